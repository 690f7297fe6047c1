"""The upstream side of the broker: connections, the answer's head, streaming.

After Werkzeug's ``middleware/http_proxy.py``: which headers pass is
headers.py's, every upstream call has explicit (connect, read) timeouts,
connection failures become typed 502/504 errors, and both bodies stream:
the client's (``client_body``) is sent with the framing the client used; the
upstream's is read from the raw urllib3 stream (``iter_content`` would
decompress gzip) and handed to the WSGI server chunk by chunk as it arrives.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import re
import socket
import threading
import time
from typing import Callable, Iterator

import urllib3
import urllib3.connection

from .client_body import CHUNK, BodyStream, SizedBodyStream, SpooledBody
from .errors import Abandoned, UpstreamBadResponse, UpstreamTimeout, UpstreamUnreachable
from .headers import FIELD_NAME
from .lease import CLIENT_GONE, JOB_TIMEOUT, UPSTREAM_BROKE, Exchange, shut

log = logging.getLogger("mgpumanager.proxy")


_sending = threading.local()        # .exchange, .target: what this thread is sending


class HeadersCutOff(http.client.HTTPException):
    """The upstream closed the connection in the middle of its headers."""


class MalformedHead(http.client.HTTPException):
    """The upstream's head has a line that is no header."""


class _FinalResponse(http.client.HTTPResponse):
    """http.client's response, stricter where a proxy must be.

    - Interim answers (102 Processing, 103 Early Hints) are skipped: the job
      goes on until the final answer. http.client skips only 100.
    - A head cut off by the end of the connection is an error, not an
      empty answer that looks whole.
    """

    def _read_status(self):
        while True:
            version, status, reason = super()._read_status()
            if 101 < status < 200:
                http.client._read_headers(self.fp)    # the interim answer's headers
                continue
            return version, status, reason

    def begin(self):
        """http.client's begin (CPython 3.11), with the head parsed here
        instead of through the ``email`` package, which cost a fifth of a
        small job's CPU; the framing decisions after it are http.client's."""
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            http.client._read_headers(self.fp)    # the 100's headers
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        lines = http.client._read_headers(self.fp)
        if not lines or lines[-1] == b"":
            raise HeadersCutOff("the connection closed in the middle of the answer's head")
        self.headers = self.msg = parse_head(lines)
        tr_enc = self.headers.get("transfer-encoding")
        self.chunked = bool(tr_enc and tr_enc.lower() == "chunked")
        if self.chunked:
            self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


# A header line: a field name of token characters, a colon, its value (RFC 9110 5.1).
_HEADER_LINE = re.compile(rf"({FIELD_NAME.pattern}):[ \t]*(.*?)[ \t]*\r?\n?\Z", re.S)


def parse_head(lines: list[bytes]) -> http.client.HTTPMessage:
    """The header lines of an answer (up to its blank line) as http.client's
    HTTPMessage, without the ``email`` parser. A line that is no header is
    MalformedHead: a parser that stopped there would lose what follows
    (Content-Length, say) and frame the answer wrongly. An obs-fold
    continuation is joined with a space (RFC 9112 5.2)."""
    msg = http.client.HTTPMessage()
    fields = msg._headers                 # email.message.Message's own list of (name, value)
    for raw in lines[:-1]:
        line = raw.decode("iso-8859-1")
        if line[:1] in (" ", "\t"):
            if not fields:
                raise MalformedHead(f"the head begins with a continuation line ({line[:60]!r})")
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        found = _HEADER_LINE.match(line)
        if found is None:
            raise MalformedHead(f"a line in the head is no header ({line[:60]!r})")
        fields.append((found.group(1), found.group(2)))
    return msg


class _WatchedConnectionMixin:
    """Attaches its socket to the exchange the thread is sending, so that a
    cut (the client gone, the deadline) shuts it and whatever is blocked on
    it, from the connect on: a fresh connection at connect(), a reused one
    when the request starts."""

    response_class = _FinalResponse

    def connect(self):
        super().connect()
        exchange = getattr(_sending, "exchange", None)
        if exchange is not None:
            exchange.attach_upstream(self.sock)

    def request(self, method, url, *args, **kwargs):
        exchange = getattr(_sending, "exchange", None)
        if exchange is not None and self.sock is not None:
            exchange.attach_upstream(self.sock)
        # urllib3 re-encodes the target (%2e becomes %2E); a proxy sends it as it came.
        url = getattr(_sending, "target", None) or url
        return super().request(method, url, *args, **kwargs)


class _WatchedHTTPConnection(_WatchedConnectionMixin, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnectionMixin, urllib3.connection.HTTPSConnection):
    pass


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
                    # blocksize: a spooled body goes out in 1 MiB sends.
                    pool = urllib3.connection_from_url(base_url, maxsize=self.maxsize, block=False,
                                                       retries=False, blocksize=CHUNK)
                    pool.ConnectionCls = (_WatchedHTTPSConnection if pool.scheme == "https"
                                          else _WatchedHTTPConnection)
                    self._pools[base_url] = pool
        return pool

    def close(self) -> None:
        """Close every idle connection (the broker is stopping); one in use
        is closed by its answer as usual."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def open(self, method: str, base_url: str, path: str, *, headers: dict, body=None,
             read_timeout_s: float | None = None, consumer: str | None = None,
             exchange: Exchange | None = None) -> urllib3.HTTPResponse:
        """Send the request; return the response with its body still unread.

        Failures are typed, and each says whether the request reached the
        consumer (``reached``: False when it surely did not, None when it
        may have, True when the consumer answered).
        """
        chunked = isinstance(body, BodyStream) and not isinstance(body, SizedBodyStream)
        if isinstance(body, SizedBodyStream):
            headers["Content-Length"] = str(len(body))
        elif isinstance(body, SpooledBody):
            headers["Content-Length"] = str(body.size)
            body = body.upstream_body()
        timeout = urllib3.Timeout(connect=self.connect_timeout_s,
                                  read=read_timeout_s or self.read_timeout_s)
        who = consumer or base_url
        _sending.exchange, _sending.target = exchange, path
        try:
            return self._pool(base_url).urlopen(
                method, path, body=body, headers=headers, retries=False, redirect=False,
                assert_same_host=False, preload_content=False, decode_content=False,
                timeout=timeout, chunked=chunked)
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as e:
            raise _upstream_error(e, who, timeout, exchange, consumer) from e
        finally:
            _sending.exchange = _sending.target = None


def _upstream_error(e: BaseException, who: str, timeout, exchange: Exchange | None,
                    consumer: str | None):
    """The typed error for a failed upstream call, with ``reached`` set."""
    cause = e.__context__ if isinstance(e, urllib3.exceptions.ProtocolError) else None
    if exchange is not None and exchange.cut_reason is not None:
        err = cut_error(exchange.cut_reason, consumer)
        err.reached = None
    elif isinstance(e, urllib3.exceptions.ReadTimeoutError):
        err = UpstreamTimeout(f"{who}: no answer within {timeout.read_timeout:g} s",
                              consumer=consumer)
        err.reached = None
    elif isinstance(e, (urllib3.exceptions.ConnectTimeoutError,
                        urllib3.exceptions.NewConnectionError)):
        err = UpstreamUnreachable(f"{who}: {describe(e)}", consumer=consumer)
        err.reached = False
    elif isinstance(e, urllib3.exceptions.InvalidHeader) or (
            isinstance(cause, http.client.HTTPException)
            and not isinstance(cause, (http.client.RemoteDisconnected, http.client.IncompleteRead))):
        # It answered, with a status line or headers that cannot be parsed.
        err = UpstreamBadResponse(f"{who}: malformed answer: {describe(cause or e)}",
                                  consumer=consumer)
        err.reached = True
    else:
        # Reset or closed mid-exchange: it may have started the job.
        err = UpstreamUnreachable(f"{who}: {describe(e)}", consumer=consumer)
        err.reached = None
    return err


def cut_error(reason: str, consumer: str | None):
    """The error a cut exchange answers with (if anyone still reads it)."""
    if reason == JOB_TIMEOUT:
        return UpstreamTimeout("the job ran past scheduler.job_timeout_s", consumer=consumer)
    return Abandoned(f"the exchange was cut: {reason}", consumer=consumer)


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


class ResponseCut(ConnectionResetError):
    """Raised from a response body that was cut short, so that the WSGI
    server drops the connection instead of ending the body cleanly (a
    truncated answer must never pass for a whole one). A connection reset
    is what gunicorn expects here, so it logs no traceback."""

    def __init__(self, message: str):
        super().__init__(errno.ECONNRESET, message)


# TCP states (linux/tcp_states.h) in which the service still holds the
# connection: it has sent neither a FIN nor been reset.
_HELD_STATES = {1, 4, 5}        # ESTABLISHED, FIN_WAIT1, FIN_WAIT2


# A service's pace between chunks when none was measured: an LLM token on a
# slow card (20 tokens a second).
UNKNOWN_GAP_S = 0.05


def _tcp_state(sock) -> int | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except (OSError, ValueError, AttributeError):
        return None                 # not TCP (a unix socket), or closed already


def wait_for_let_go(sock, within_s: float, gap_s: float | None) -> float:
    """After a cut (the socket shut both ways), wait until the service has
    let go of the connection, at most ``within_s``; the seconds waited.

    A service that streams notices a client gone only when a write fails
    (ollama, the simulator) or when it reads our FIN (Go's servers,
    llama-server's cpp-httplib). Its FIN shows as TIME_WAIT; its next write
    reaches a socket whose read side is shut, which Linux answers with a
    reset (CLOSE), and the write after that fails on its side: so one more
    of its measured gaps between chunks (``gap_s``) is waited for too.
    """
    t0 = time.monotonic()
    deadline = t0 + within_s
    while _tcp_state(sock) in _HELD_STATES and time.monotonic() < deadline:
        time.sleep(0.005)
    if _tcp_state(sock) == 7:                 # reset by us: its next write fails
        # Cut before two chunks came, its pace is unknown: a token's worth.
        gap = gap_s if gap_s is not None else UNKNOWN_GAP_S
        time.sleep(max(0.0, min(1.5 * gap + 0.01, deadline - time.monotonic())))
    return time.monotonic() - t0


class StreamedBody:
    """The WSGI response iterable for a proxied response.

    It yields nothing first, which makes gunicorn send the status and
    headers at once: from then on, a failure can only truncate the answer,
    never turn it into a different one. Chunks are then yielded as the
    upstream sends them. A cut of the exchange (the client gone, the
    deadline) or an upstream that breaks off raises ResponseCut.
    ``close()`` (which the WSGI server calls after the last chunk, or when
    the client has gone) closes the upstream response and then calls
    ``on_close`` exactly once: that is where the GPU job ends.
    """

    def __init__(self, response: urllib3.HTTPResponse, exchange: Exchange,
                 on_close: Callable[["StreamedBody"], None], *, bodyless: bool = False,
                 cut_hold_s: float = 0.0):
        self.response = response
        self.exchange = exchange
        self._on_close = on_close
        self._bodyless = bodyless
        self.gap_s: float | None = None   # the longest wait between two chunks
        self.held_after_cut_s = 0.0
        # urllib3 closes the connection where a read fails, before close()
        # could watch the service let go of it: a second descriptor keeps
        # the connection open until then.
        self._cut_hold_s = cut_hold_s
        self._kept: socket.socket | None = None
        self.bytes_out = 0
        self.complete = bodyless
        self._reusable = False            # read whole, and its connection out of any cut's reach
        self.error: str | None = None
        self.handed_over = False          # the WSGI server owns it (it will close it)
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        if self._bodyless:
            return
        yield b""
        # Only once the server iterates: then it will call close() too.
        # (The exchange's socket, not the connection's: http.client lets go
        # of the latter when the answer says Connection: close.)
        sock = self.exchange.upstream_sock if self._cut_hold_s else None
        if sock is not None:
            try:
                self._kept = socket.socket(fileno=os.dup(sock.fileno()))
            except OSError:
                pass
        read1 = self.response.read1
        last = None
        while True:
            try:
                data = read1(CHUNK, decode_content=False)
                now = time.monotonic()
                if last is not None and data and (self.gap_s is None or now - last > self.gap_s):
                    self.gap_s = now - last
                last = now
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
                    ValueError) as e:
                data, error = None, e
            if data == b"" and self._read_whole():
                return
            reason = self.exchange.cut_reason
            if reason is not None or data is None:
                if reason is None:
                    self.error = f"the upstream broke off: {describe(error)}"
                    self.exchange.cut(UPSTREAM_BROKE)     # shuts the client's socket too
                elif reason == CLIENT_GONE:
                    self.error = "the client went away"
                elif reason == JOB_TIMEOUT:
                    self.error = "the job ran past scheduler.job_timeout_s"
                else:
                    self.error = reason
                if reason != CLIENT_GONE:
                    log.warning("%s: %s after %d bytes; cutting the answer off",
                                self.response.url, self.error, self.bytes_out)
                raise ResponseCut(self.error)
            self.bytes_out += len(data)
            yield data

    def _read_whole(self) -> bool:
        """The read that returned nothing: whether it ended the answer.

        It did where the framing says so (a length, a last chunk), or where
        the service closed before any cut. An answer with neither ends where
        its connection does, and a cut's shutdown ends that too: the service
        may still be working then.
        """
        sock = self.exchange.upstream_sock
        # Detached, a cut from here on (curl hangs up the moment it has read
        # the answer) cannot shut a connection that goes back to the pool.
        detached = sock is not None and self.exchange.detach(sock)
        framed = self.response.chunked or self.response.length_remaining is not None
        if not (detached or framed or self.exchange.cut_reason is None):
            return False
        self.complete = True      # read whole, whoever hangs up now
        self._reusable = detached and getattr(self.response.connection, "sock", None) is not None
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._bodyless:
                # Nothing may follow a bodyless answer (HEAD, 1xx, 204, 304),
                # but a service that sends bytes anyway would have them read
                # as the next client's answer, or end its GPU job early:
                # such a connection is never reused.
                self.response.close()
            elif self.complete:
                # Read whole: the service has answered, whoever hung up since
                # (the watchdog may see curl's hang-up before this close), so
                # there is nothing to wait for.
                if self._reusable:
                    self.response.release_conn()
                else:
                    self.response.close()
            else:
                # The client gone (seen by the watchdog, or by a write that
                # failed), or the deadline: the service may still be working.
                if self._kept is not None and self.exchange.cut_reason != UPSTREAM_BROKE:
                    shut(self._kept)
                    self.held_after_cut_s = wait_for_let_go(self._kept, self._cut_hold_s,
                                                            self.gap_s)
                self.response.close()             # cut short: it is not
        finally:
            if self._kept is not None:
                self._kept.close()
            self._on_close(self)
