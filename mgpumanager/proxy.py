"""The requests side of the broker: header filtering, sessions, streaming.

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

import requests
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
    """The client's body as an iterable of large pieces (requests sends it chunked)."""

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
    """With ``__len__``, requests sends Content-Length instead of chunking."""

    def __len__(self) -> int:
        return self._length


def request_body(environ: dict):
    """What to hand requests as ``data`` so the upstream sees the client's framing."""
    stream = environ["wsgi.input"]
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return _BodyStream(stream)
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length <= 0:
        return b"" if environ.get("CONTENT_LENGTH") == "0" else None
    return _SizedBodyStream(stream, length)


def drain_body(environ: dict, limit: int = 4 * CHUNK) -> None:
    """Read and drop an unread request body of up to ``limit`` bytes.

    A request refused before its body was read would otherwise leave the
    body on a keep-alive connection, where the WSGI server either has to
    drain it or drop the connection under the client's next request.
    """
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not chunked and (length <= 0 or length > limit):
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


class UpstreamClient:
    """One requests Session per thread: requests makes no thread-safety promise
    for a shared one, and a per-thread session still keeps its connections
    alive from one request to the next."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float):
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers.clear()        # pass the client's headers, not requests' defaults
            s.trust_env = False      # a proxy in the environment must not divert loopback calls
            self._local.session = s
        return s

    def send(self, method: str, url: str, *, headers: dict | None = None, data=None,
             json=None, read_timeout_s: float | None = None, consumer: str | None = None,
             stream: bool = True) -> requests.Response:
        timeout = (self.connect_timeout_s, read_timeout_s or self.read_timeout_s)
        try:
            return self.session.request(method, url, headers=headers, data=data, json=json,
                                        timeout=timeout, stream=stream, allow_redirects=False)
        except requests.ConnectTimeout as e:
            raise UpstreamUnreachable(f"{consumer or url}: connect timed out after "
                                      f"{timeout[0]:g} s", consumer=consumer) from e
        except requests.ReadTimeout as e:
            raise UpstreamTimeout(f"{consumer or url}: no answer within {timeout[1]:g} s",
                                  consumer=consumer) from e
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            raise UpstreamUnreachable(f"{consumer or url}: {describe(e)}", consumer=consumer) from e


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
        if deadline is not None:
            self._wake()             # the thread may be sleeping past this deadline
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
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 60.0
            if self._epoll is not None:
                events = self._epoll.poll(min(timeout, 60.0))
            else:
                time.sleep(min(timeout, 1.0))
                events = []
            cuts = []
            with self._lock:
                for fd, _ in events:
                    if fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif fd in self._by_fd:
                        cuts.append((self._pop(self._by_fd[fd]), "client gone"))
                now = time.monotonic()
                for key, (_, deadline, _) in list(self._entries.items()):
                    if deadline is not None and now >= deadline:
                        cuts.append((self._pop(key), "job_timeout_s"))
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

    def __init__(self, response: requests.Response, on_close: Callable[["StreamedBody"], None],
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
        sock = getattr(getattr(self.response.raw, "_connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self) -> Iterator[bytes]:
        if self._bodyless:
            return
        raw = self.response.raw
        while True:
            try:
                data = raw.read1(CHUNK, decode_content=False)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                data, error = None, e
            if self.cut_reason is not None:
                self.error = ("the client went away" if self.cut_reason == "client gone"
                              else f"the job ran past scheduler.{self.cut_reason}")
                if self.cut_reason == "client gone":
                    return                 # nobody is reading: end quietly
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
            self.response.close()
        finally:
            self._on_close(self)
