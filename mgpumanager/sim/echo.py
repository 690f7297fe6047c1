"""A plain upstream for proxy tests and benchmarks: echoes what it received,
streams bodies of any size, gzip, NDJSON at a set pace, any status."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import time

from .http import Reply, Request, SimServer

BLOCK = bytes(range(256)) * 4096          # 1 MiB of a known pattern


def pattern(size: int):
    """``size`` bytes of BLOCK repeated, as 1 MiB chunks."""
    left = size
    while left > 0:
        piece = BLOCK if left >= len(BLOCK) else BLOCK[:left]
        left -= len(piece)
        yield piece


class EchoServer(SimServer):
    name = "echo"

    def register(self):
        self.release = threading.Event()      # /hold waits for this
        self.verbatim: dict[str, bytes | list] = {}  # /raw/<name> answers these as they are
        self.route("*", "/echo(/.*)?", self.echo)
        self.route("GET", "/health", lambda r: Reply.json({"ok": True}) if self.healthy
                   else Reply.json({"ok": False}, 503))
        self.route("*", "/bytes/(?P<size>[0-9]+)", self.bytes)
        self.route("GET", "/gzip", self.gzipped)
        self.route("*", "/stream", self.stream)
        self.route("*", "/status/(?P<code>[0-9]{3})", self.status)
        self.route("*", "/slow", self.slow)
        self.route("*", "/hold", self.hold)
        self.route("*", "/raw/(?P<name>[^/]+)",
                   lambda r: Reply.verbatim(self.verbatim[r.params["name"]]))
        self.route("*", "/small", lambda r: Reply(200, b'{"ok":true}', content_type="application/json"))

    def echo(self, req: Request) -> Reply:
        h = hashlib.sha256()
        n = 0
        for chunk in req.iter_body():
            h.update(chunk)
            n += len(chunk)
        out = {"method": req.method, "path": req.path, "query": req.query_string,
               "headers": [[k, v] for k, v in req.headers.items()],
               "body_sha256": h.hexdigest(), "body_bytes": n, "chunked": req.chunked,
               "content_length": req.headers.get("Content-Length")}
        headers = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Upstream", "echo"),
                   ("Keep-Alive", "timeout=99")]
        status = int(req.query.get("status", "200"))
        return Reply(status, json.dumps(out).encode(), headers, "application/json")

    def bytes(self, req: Request) -> Reply:
        size = int(req.params["size"])
        for _ in req.iter_body():
            pass
        if req.query.get("chunked"):
            return Reply(200, pattern(size), content_type="application/octet-stream")
        return Reply(200, pattern(size), {"Content-Length": str(size)}, "application/octet-stream")

    def gzipped(self, req: Request) -> Reply:
        data = gzip.compress(b"hello gzip " * 1000)
        return Reply(200, data, {"Content-Encoding": "gzip"}, "text/plain")

    def stream(self, req: Request) -> Reply:
        lines = int(req.query.get("lines", "5"))
        interval = float(req.query.get("interval", "0.1"))

        def gen():
            for i in range(lines):
                if i:
                    time.sleep(interval)
                yield (json.dumps({"i": i, "t": time.time()}) + "\n").encode()
        return Reply(200, gen(), content_type="application/x-ndjson")

    def status(self, req: Request) -> Reply:
        code = int(req.params["code"])
        return Reply(code, b"" if code in (204, 304) else f"status {code}".encode(),
                     {"X-Status": str(code)}, "text/plain")

    def slow(self, req: Request) -> Reply:
        time.sleep(float(req.query.get("s", "2")))
        return Reply.json({"slow": True})

    def hold(self, req: Request) -> Reply:
        """Sends one line, then waits for ``release`` before the last."""
        def gen():
            yield b"first\n"
            self.release.wait(float(req.query.get("max", "30")))
            yield b"last\n"
        return Reply(200, gen(), content_type="text/plain")
