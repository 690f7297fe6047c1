"""The client's side of a request body: read from ``wsgi.input`` in large
pieces with the client's own framing, spooled whole for a GPU job (memory,
then a temporary file, bounded in size and by the client's pace), drained
after a refusal, and watched for a client that hangs up while it waits.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import select
import socket
import tempfile
import time
from typing import Callable, Iterator

from .errors import BadRequest, PayloadTooLarge, RequestTimeout

# gunicorn keeps up to 1 MiB read ahead and recopies that buffer on every
# read, so small reads cost a copy each: read and forward in 1 MiB pieces.
CHUNK = 1024 * 1024


class BodyStream:
    """The client's body as an iterable of large pieces, sent on chunked.

    A read that fails is the client's fault (a lying or malformed chunked
    body, a stall, a hang-up): it is raised as the client's error, which
    urllib3 passes through untouched, never as the upstream's.
    """

    def __init__(self, stream, length: int | None = None):
        self._stream = stream
        self._length = length
        self.bytes_read = 0

    def __iter__(self) -> Iterator[bytes]:
        left = self._length
        while left is None or left > 0:
            data = _read_client(self._stream, CHUNK if left is None else min(CHUNK, left))
            if not data:
                if left:
                    raise BadRequest(f"the request body ended after {self.bytes_read} of "
                                     f"{self._length} bytes")
                break
            self.bytes_read += len(data)
            if left is not None:
                left -= len(data)
            yield data


class SizedBodyStream(BodyStream):
    """A body of known length: sent on with its Content-Length."""

    def __len__(self) -> int:
        return self._length


def _read_client(stream, size: int) -> bytes:
    """One read of the client's body; its failures become the client's errors."""
    try:
        return stream.read(size)
    except TimeoutError:
        raise RequestTimeout("the client sent no part of its body for "
                             "proxy.client_timeout_s") from None
    except Exception as e:        # gunicorn's InvalidChunkSize, NoMoreData, a reset...
        raise BadRequest(f"the request body could not be read: "
                         f"{type(e).__name__} {str(e)[:100]}".strip()) from None


def _framing(environ: dict) -> tuple[bool, int]:
    """(chunked?, Content-Length or 0) of the client's body."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return True, 0
    try:
        return False, max(0, int(environ.get("CONTENT_LENGTH") or 0))
    except ValueError:
        return False, 0


def request_body(environ: dict):
    """The body to stream upstream, so that the upstream sees the client's framing."""
    chunked, length = _framing(environ)
    if chunked:
        return BodyStream(environ["wsgi.input"])
    if length == 0:
        return b"" if environ.get("CONTENT_LENGTH") == "0" else None
    return SizedBodyStream(environ["wsgi.input"], length)


class SpooledBody:
    """A GPU job's request body, received whole before the job queues.

    A client that trickles its upload must not hold the GPU while it does
    (nginx buffers request bodies for the same reason): the body is read
    here, into memory up to 1 MiB and into a temporary file beyond, and
    sent upstream at loopback speed with a Content-Length, whatever framing
    the client used.
    """

    MEMORY_BYTES = CHUNK

    def __init__(self) -> None:
        self.file = tempfile.SpooledTemporaryFile(max_size=self.MEMORY_BYTES)
        self.size = 0

    def upstream_body(self):
        """Bytes when it is small, else the file from its start (sent in 1 MiB blocks)."""
        self.file.seek(0)
        if self.size <= self.MEMORY_BYTES:
            return self.file.read()
        return self.file

    def chunks(self, size: int = 64 * 1024):
        """The body from its start, a piece at a time (for a look at it
        before it goes upstream; upstream_body() starts over)."""
        self.file.seek(0)
        while True:
            data = self.file.read(size)
            if not data:
                return
            yield data

    @contextlib.contextmanager
    def view(self):
        """The whole body as one buffer, without a copy: the memory spool's
        own bytes, or the file mapped read-only (pages read as touched)."""
        inner = self.file._file        # SpooledTemporaryFile's: a BytesIO until it rolls over
        if isinstance(inner, io.BytesIO):
            with inner.getbuffer() as buf:
                yield buf
        else:
            self.file.flush()
            with mmap.mmap(inner.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                yield mapped

    def close(self) -> None:
        self.file.close()


def spool_body(environ: dict, max_bytes: int) -> SpooledBody | None:
    """Receive the client's whole body (None if it sent none).

    Raises PayloadTooLarge beyond ``max_bytes``, RequestTimeout when the
    client stalls (the socket's timeout is proxy.client_timeout_s), and
    BadRequest for a body that is malformed or shorter than announced.
    """
    chunked, length = _framing(environ)
    if not chunked and length == 0:
        return None
    if length > max_bytes:
        raise PayloadTooLarge(f"the request body is {length} bytes; proxy.max_body_mib allows "
                              f"{max_bytes // CHUNK} MiB")
    spool = SpooledBody()
    try:
        stream = environ["wsgi.input"]
        while chunked or spool.size < length:
            data = _read_client(stream, CHUNK if chunked else min(CHUNK, length - spool.size))
            if not data:
                break
            spool.size += len(data)
            if spool.size > max_bytes:
                raise PayloadTooLarge(f"the request body is over proxy.max_body_mib "
                                      f"({max_bytes // CHUNK} MiB)")
            spool.file.write(data)
        if not chunked and spool.size < length:
            raise BadRequest(f"the request body ended after {spool.size} of {length} bytes")
    except BaseException:
        spool.close()
        raise
    return spool


def drain_body(environ: dict, limit: int = 4 * CHUNK, within_s: float = 1.0) -> None:
    """Read and drop an unread request body of up to ``limit`` bytes, for at
    most ``within_s`` seconds.

    A request refused before its body was read would otherwise leave the
    body on a keep-alive connection, where the WSGI server either has to
    drain it or drop the connection under the client's next request. A
    client that trickles gets its connection dropped instead of a thread.
    """
    chunked, length = _framing(environ)
    if not chunked and not 0 < length <= limit:
        return
    stream, seen = environ["wsgi.input"], 0
    sock = environ.get("gunicorn.socket")
    before = sock.gettimeout() if sock is not None else None
    deadline = time.monotonic() + within_s
    try:
        while seen < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if sock is not None:
                sock.settimeout(left)
            data = stream.read(min(CHUNK, limit - seen))
            if not data:
                break
            seen += len(data)
    except Exception:
        pass                  # a broken or stalled body: gunicorn drops the connection
    finally:
        if sock is not None:
            try:              # the error answer that follows gets the usual deadline
                sock.settimeout(before)
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
