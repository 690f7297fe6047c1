"""The upstream side of the broker: header filtering, connections, streaming.

After Werkzeug's ``middleware/http_proxy.py``: the hop-by-hop filter is a pure
predicate, every upstream call has explicit (connect, read) timeouts,
connection failures become typed 502/504 errors, and both bodies stream:
the client's body is read from ``wsgi.input`` in large pieces and sent with
the framing the client used; the upstream's body is read from the raw
urllib3 stream (``iter_content`` would decompress gzip) and handed to the
WSGI server chunk by chunk as it arrives.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Callable, Iterator

import urllib3
from urllib3.util import SKIP_HEADER

from .errors import UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger("mgpumanager.proxy")

# gunicorn keeps up to 1 MiB read ahead and recopies that buffer on every
# read, so small reads cost a copy each: read and forward in 1 MiB pieces.
CHUNK = 1024 * 1024

# RFC 9110 7.6.1, plus the pre-standard ones proxies still meet.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})
# Not hop-by-hop, but answered or set by this hop: gunicorn already sent
# "100 Continue", and Host names the upstream, not the broker.
NOT_FORWARDED = frozenset({"expect", "host", "content-length"})


def connection_tokens(value: str | None) -> frozenset[str]:
    """Header names a ``Connection`` field marks as hop-by-hop."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def is_hop_by_hop(name: str, named_by_connection: frozenset[str] = frozenset()) -> bool:
    lname = name.lower()
    return lname in HOP_BY_HOP or lname in named_by_connection


def request_headers(environ: dict) -> dict[str, str]:
    """The client's end-to-end headers, from a WSGI environ, plus X-Forwarded-*."""
    dropped = connection_tokens(environ.get("HTTP_CONNECTION"))
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith("HTTP_") or key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            continue
        name = key[5:].replace("_", "-").title()
        lname = name.lower()
        if lname in NOT_FORWARDED or is_hop_by_hop(lname, dropped):
            continue
        headers[name] = value
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    remote = environ.get("REMOTE_ADDR")
    if remote:
        prior = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    if "HTTP_HOST" in environ and "X-Forwarded-Host" not in headers:
        headers["X-Forwarded-Host"] = environ["HTTP_HOST"]
    headers.setdefault("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "http"))
    # urllib3 adds a User-Agent and requests an Accept-Encoding of its own;
    # the upstream must see the client's, or none.
    headers.setdefault("User-Agent", SKIP_HEADER)
    headers.setdefault("Accept-Encoding", SKIP_HEADER)
    return headers


def response_headers(raw_headers) -> list[tuple[str, str]]:
    """The upstream's end-to-end headers, repeated fields (Set-Cookie) kept apart."""
    dropped = connection_tokens(raw_headers.get("Connection"))
    return [(k, v) for k, v in raw_headers.items() if not is_hop_by_hop(k, dropped)]


class _BodyStream:
    """The client's body as an iterable of large pieces, sent on chunked."""

    def __init__(self, stream, length: int | None = None):
        self._stream = stream
        self._length = length
        self.bytes_read = 0

    def __iter__(self) -> Iterator[bytes]:
        left = self._length
        while left is None or left > 0:
            data = self._stream.read(CHUNK if left is None else min(CHUNK, left))
            if not data:
                break
            self.bytes_read += len(data)
            if left is not None:
                left -= len(data)
            yield data


class _SizedBodyStream(_BodyStream):
    """A body of known length: sent on with its Content-Length."""

    def __len__(self) -> int:
        return self._length


def _framing(environ: dict) -> tuple[bool, int]:
    """(chunked?, Content-Length or 0) of the client's body."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return True, 0
    try:
        return False, max(0, int(environ.get("CONTENT_LENGTH") or 0))
    except ValueError:
        return False, 0


def request_body(environ: dict):
    """The body to send upstream, so that the upstream sees the client's framing."""
    chunked, length = _framing(environ)
    if chunked:
        return _BodyStream(environ["wsgi.input"])
    if length == 0:
        return b"" if environ.get("CONTENT_LENGTH") == "0" else None
    return _SizedBodyStream(environ["wsgi.input"], length)


def drain_body(environ: dict, limit: int = 4 * CHUNK) -> None:
    """Read and drop an unread request body of up to ``limit`` bytes.

    A request refused before its body was read would otherwise leave the
    body on a keep-alive connection, where the WSGI server either has to
    drain it or drop the connection under the client's next request.
    """
    chunked, length = _framing(environ)
    if not chunked and not 0 < length <= limit:
        return
    stream, seen = environ["wsgi.input"], 0
    try:
        while seen < limit:
            data = stream.read(min(CHUNK, limit - seen))
            if not data:
                break
            seen += len(data)
    except OSError:
        pass


_GONE = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def client_gone(environ: dict) -> Callable[[], bool] | None:
    """A check that says whether the client has closed its connection.

    gunicorn puts the client socket in the environ; the peer's FIN shows as
    POLLRDHUP even while request bytes are still buffered unread.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None

    def gone() -> bool:
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | _GONE)
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & _GONE:
                return True
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True
    return gone


class UpstreamPool:
    """Keep-alive connections to every consumer, for the proxied requests.

    This is urllib3, the transport requests itself uses, called directly:
    its connection pool is thread-safe and keeps connections alive across
    requests and threads, and skipping requests' session layer (settings
    merging, hooks, cookie jars, runtime type checks) halved the broker's
    CPU time per proxied request. Admin and health calls, where that does
    not matter, still go through requests (consumers.HttpActions).
    """

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, maxsize: int = 16):
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._pools: dict[str, urllib3.HTTPConnectionPool] = {}    # guarded by _lock for writes

    def _pool(self, base_url: str) -> urllib3.HTTPConnectionPool:
        pool = self._pools.get(base_url)
        if pool is None:
            with self._lock:
                pool = self._pools.get(base_url)
                if pool is None:
                    # block=False: past maxsize, extra connections are made and
                    # dropped after use instead of making a request wait.
                    pool = urllib3.connection_from_url(base_url, maxsize=self.maxsize, block=False,
                                                       retries=False)
                    self._pools[base_url] = pool
        return pool

    def open(self, method: str, base_url: str, path: str, *, headers: dict, body=None,
             read_timeout_s: float | None = None,
             consumer: str | None = None) -> urllib3.HTTPResponse:
        """Send the request; return the response with its body still unread."""
        chunked = isinstance(body, _BodyStream) and not isinstance(body, _SizedBodyStream)
        if isinstance(body, _SizedBodyStream):
            headers["Content-Length"] = str(len(body))
        timeout = urllib3.Timeout(connect=self.connect_timeout_s,
                                  read=read_timeout_s or self.read_timeout_s)
        try:
            return self._pool(base_url).urlopen(
                method, path, body=body, headers=headers, retries=False, redirect=False,
                assert_same_host=False, preload_content=False, decode_content=False,
                timeout=timeout, chunked=chunked)
        except urllib3.exceptions.ReadTimeoutError as e:
            raise UpstreamTimeout(f"{consumer or base_url}: no answer within {timeout.read_timeout:g} s",
                                  consumer=consumer) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            # ConnectTimeoutError, NewConnectionError (refused), ProtocolError (reset)
            raise UpstreamUnreachable(f"{consumer or base_url}: {describe(e)}",
                                      consumer=consumer) from e


def describe(e: BaseException) -> str:
    """A short reason for a failed upstream call, for people."""
    text = str(e)
    for needle, short in (("Connection refused", "connection refused"),
                          ("Name or service not known", "unknown host"),
                          ("timed out", "timed out"),
                          ("Connection reset", "connection reset"),
                          ("RemoteDisconnected", "closed the connection without answering")):
        if needle in text:
            return short
    return text[:200]


class UpstreamBroken(Exception):
    """The upstream failed mid-body: the client's response must end abruptly,
    not with a clean end of chunks that would pass a truncated body as whole."""


# Why a StreamGuard cut a stream short.
CLIENT_GONE = "client gone"
JOB_TIMEOUT = "job_timeout_s"


class StreamGuard:
    """Ends streamed responses early, from one daemon thread for all of them.

    A thread blocked reading a silent upstream (an LLM thinking, a stalled
    server) would notice neither that its client hung up nor that the job ran
    past ``job_timeout_s`` until the next byte came. The guard watches each
    client socket for the peer's hang-up (EPOLLRDHUP) and each job's
    deadline, and calls the stream's ``cut`` at once, which shuts the
    upstream socket down and so unblocks the reader.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[int, tuple] = {}     # key -> (fd, deadline, cut); guarded by _lock
        self._by_fd: dict[int, int] = {}         # fd -> key; guarded by _lock
        self._keys = iter(range(1, 1 << 62))
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        if self._epoll is not None:
            self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._wakes_at = float("inf")            # when the thread next looks at deadlines

    def watch(self, client_sock, deadline: float | None, cut: Callable[[str], None]) -> int:
        fd = None
        with self._lock:
            key = next(self._keys)
            if client_sock is not None and self._epoll is not None:
                try:
                    fd = client_sock.fileno()
                    self._epoll.register(fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
                    self._by_fd[fd] = key
                except (OSError, ValueError):
                    fd = None
            self._entries[key] = (fd, deadline, cut)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-guard", daemon=True)
                self._thread.start()
            # Wake the thread only if it would sleep past this deadline: a
            # wake-up per job costs a thread switch on every request.
            wake = deadline is not None and deadline < self._wakes_at
        if wake:
            self._wake()
        return key

    def unwatch(self, key: int) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry and entry[0] is not None:
                self._by_fd.pop(entry[0], None)
                try:
                    self._epoll.unregister(entry[0])
                except (OSError, ValueError):
                    pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                deadlines = [d for _, d, _ in self._entries.values() if d is not None]
                timeout = min(60.0, max(0.0, min(deadlines) - time.monotonic()) if deadlines else 60.0)
                self._wakes_at = time.monotonic() + timeout
            if self._epoll is not None:
                events = self._epoll.poll(timeout)
            else:
                time.sleep(min(timeout, 1.0))
                events = []
            cuts = []
            with self._lock:
                for fd, _ in events:
                    if fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif fd in self._by_fd:
                        cuts.append((self._pop(self._by_fd[fd]), CLIENT_GONE))
                now = time.monotonic()
                for key, (_, deadline, _) in list(self._entries.items()):
                    if deadline is not None and now >= deadline:
                        cuts.append((self._pop(key), JOB_TIMEOUT))
            for cut, reason in cuts:
                try:
                    cut(reason)
                except Exception:
                    log.exception("cutting a stream failed")

    def _pop(self, key: int):
        fd, _, cut = self._entries.pop(key)
        if fd is not None:
            self._by_fd.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
        return cut


class StreamedBody:
    """The WSGI response iterable for a proxied response.

    Chunks are yielded as the upstream sends them. ``close()`` (which the
    WSGI server calls after the last chunk, or when the client has gone)
    closes the upstream response at once and then calls ``on_close`` exactly
    once: that is where the GPU job ends. A ``StreamGuard`` may ``cut`` it
    from another thread when the client hangs up or the job runs too long.
    """

    def __init__(self, response: urllib3.HTTPResponse, on_close: Callable[["StreamedBody"], None],
                 *, bodyless: bool = False):
        self.response = response
        self._on_close = on_close
        self._bodyless = bodyless
        self.bytes_out = 0
        self.complete = bodyless
        self.error: str | None = None
        self.cut_reason: str | None = None
        self._closed = False

    def cut(self, reason: str) -> None:
        """End the stream now: shut the upstream socket so a blocked read returns."""
        if self.complete or self._closed:
            return                  # its connection may already serve another request
        self.cut_reason = reason
        sock = getattr(self.response.connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self) -> Iterator[bytes]:
        if self._bodyless:
            return
        read1 = self.response.read1
        while True:
            try:
                data = read1(CHUNK, decode_content=False)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                data, error = None, e
            if self.cut_reason == CLIENT_GONE:
                self.error = "the client went away"
                return                     # nobody is reading: end quietly
            if self.cut_reason == JOB_TIMEOUT:
                self.error = "the job ran past scheduler.job_timeout_s"
                log.warning("%s: %s after %d bytes; cutting the response off",
                            self.response.url, self.error, self.bytes_out)
                raise UpstreamBroken(self.error)
            if data is None:
                self.error = describe(error)
                log.warning("upstream %s broke mid-response after %d bytes: %s",
                            self.response.url, self.bytes_out, self.error)
                raise UpstreamBroken(self.error) from None
            if not data:
                self.complete = True
                return
            self.bytes_out += len(data)
            yield data

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.complete and self.cut_reason is None:
                if self._bodyless:
                    self.response.drain_conn()    # lets http.client mark it finished
                self.response.release_conn()      # whole: the connection is reusable
            else:
                self.response.close()             # cut short: it is not
        finally:
            self._on_close(self)
