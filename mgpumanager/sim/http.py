"""A small threaded HTTP/1.1 server for the simulated consumers (stdlib only).

Keep-alive, request bodies with Content-Length or chunked, JSON and chunked
streaming replies, and a log of every request that reached it, so tests can
say "this request never reached the upstream" or "it arrived with its
Content-Length".
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable
from urllib.parse import parse_qs


@dataclass
class Seen:
    """One request as the simulated upstream received it."""
    method: str
    path: str
    query: str
    headers: dict
    at: float = field(default_factory=time.monotonic)
    body_bytes: int = 0
    client: tuple = ()


class Request:
    def __init__(self, handler: "_Handler", method: str):
        self.handler = handler
        self.method = method
        # Split by hand: urlsplit would take "//x" for a host.
        self.path, _, self.query_string = handler.path.partition("?")
        self.query = {k: v[-1] for k, v in parse_qs(self.query_string).items()}
        self.headers = handler.headers
        self._body: bytes | None = None
        self.bytes_read = 0
        self.consumed = False
        self.chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()

    def iter_body(self, size: int = 1 << 20) -> Iterable[bytes]:
        for chunk in self._read_body(size):
            self.bytes_read += len(chunk)
            yield chunk
        self.consumed = True

    def _read_body(self, size: int) -> Iterable[bytes]:
        rfile = self.handler.rfile
        if self.chunked:
            while True:
                line = rfile.readline(65537)
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = n
                while left:
                    data = rfile.read(min(size, left))
                    if not data:
                        return
                    left -= len(data)
                    yield data
                rfile.readline(3)
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                data = rfile.read(min(size, left))
                if not data:
                    return
                left -= len(data)
                yield data

    def body(self) -> bytes:
        if self._body is None:
            self._body = b"".join(self.iter_body())
        return self._body

    def json(self):
        data = self.body()
        return json.loads(data) if data else {}


class Reply:
    """What a route returns: status, headers, and a body (bytes or an iterable
    of chunks, sent chunked as each is produced)."""

    def __init__(self, status: int = 200, body: bytes | Iterable[bytes] = b"",
                 headers: dict | list | None = None, content_type: str | None = None):
        self.status = status
        self.body = body
        self.headers = list(headers.items() if isinstance(headers, dict) else headers or [])
        if content_type:
            self.headers.append(("Content-Type", content_type))

    raw: bytes | None = None

    @classmethod
    def json(cls, obj, status: int = 200, headers=None) -> "Reply":
        return cls(status, json.dumps(obj).encode(), headers, "application/json")

    @classmethod
    def verbatim(cls, data) -> "Reply":
        """These bytes, status line and all, then the connection closes:
        for answers no well-behaved server would send. A list mixes bytes
        and pauses (numbers of seconds)."""
        reply = cls()
        reply.raw = data
        return reply


Route = Callable[[Request], Reply]


class SimServer:
    """Routes are ``(method, regex) -> handler``; ``start()`` serves on a thread."""

    name = "sim"

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.routes: list[tuple[str, re.Pattern, Route]] = []
        self.seen: list[Seen] = []
        self._seen_lock = threading.Lock()
        self.healthy = True          # tests flip this to make /health fail
        self.delay_s = 0.0           # tests add latency to every request
        self.tail_delay_s = 0.0      # tests: hold an answer's last byte back this long
        server = self
        handler = type("Handler", (_Handler,), {"sim": server})
        self.httpd = _QuietServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name=f"sim-{self.name}", kwargs={"poll_interval": 0.05})
        self.register()

    def register(self) -> None:
        """Subclasses add their routes here."""

    def route(self, method: str, pattern: str, fn: Route) -> None:
        self.routes.append((method, re.compile(pattern + r"\Z"), fn))

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "SimServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def record(self, seen: Seen) -> None:
        with self._seen_lock:
            self.seen.append(seen)

    def requests_to(self, path_regex: str, method: str | None = None) -> list[Seen]:
        rx = re.compile(path_regex)
        with self._seen_lock:
            return [s for s in self.seen if rx.fullmatch(s.path) and (method is None or s.method == method)]

    def dispatch(self, req: Request) -> Reply:
        allowed = []
        for method, rx, fn in self.routes:
            m = rx.match(req.path)
            if m:
                if method in (req.method, "*"):
                    req.params = m.groupdict()
                    return fn(req)
                allowed.append(method)
        if allowed:
            return Reply.json({"error": "method not allowed"}, 405, {"Allow": ", ".join(allowed)})
        return Reply.json({"error": f"not found: {req.path}"}, 404)


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up, or a fault a test switched on, is expected
    here: no traceback on stderr for it."""

    def handle_error(self, request, client_address):
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # A head and its body are two writes: with Nagle's algorithm the body
    # waited for the client's delayed ACK, 40 ms of every keep-alive answer.
    disable_nagle_algorithm = True
    sim: SimServer

    def log_message(self, format, *args):      # quiet: tests read sim.seen instead
        pass

    def _handle(self):
        req = Request(self, self.command)
        seen = Seen(self.command, req.path, req.query_string, dict(self.headers.items()),
                    client=self.client_address)
        self.sim.record(seen)
        if self.sim.delay_s:
            time.sleep(self.sim.delay_s)
        try:
            reply = self.sim.dispatch(req)
        except Exception as e:        # a sim bug shows as a 500, like a real server's
            reply = Reply.json({"error": f"{type(e).__name__}: {e}"}, 500)
        if not req.consumed:
            for _ in req.iter_body():        # keep the connection usable
                pass
        seen.body_bytes = req.bytes_read
        self._send(reply)

    def _send(self, reply: Reply):
        if reply.raw is not None:
            for piece in (reply.raw if isinstance(reply.raw, list) else [reply.raw]):
                if isinstance(piece, (int, float)):
                    time.sleep(piece)
                else:
                    self.wfile.write(piece)
                    self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(reply.status)
        names = {k.lower() for k, _ in reply.headers}
        for k, v in reply.headers:
            self.send_header(k, v)
        body = reply.body
        bodyless = self.command == "HEAD" or reply.status in (204, 304)
        if isinstance(body, (bytes, bytearray)):
            if "content-length" not in names:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not bodyless:
                if self.sim.tail_delay_s and len(body) > 1:
                    self.wfile.write(body[:-1])
                    self.wfile.flush()
                    time.sleep(self.sim.tail_delay_s)
                    body = body[-1:]
                self.wfile.write(body)
            return
        if "content-length" in names:
            self.end_headers()
            for chunk in body:
                self.wfile.write(chunk)
                self.wfile.flush()
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in body:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            close = getattr(body, "close", None)
            if close:
                close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle
