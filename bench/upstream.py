"""The benchmark's upstream: a small, fast asyncio HTTP/1.1 server.

Runs in its own process so its CPU is not the client's. Routes (any method):
  /small                 11-byte JSON answer (the body, if any, is read)
  /bytes?size=N[&chunked=1]   N bytes, with Content-Length or chunked
  /upload                reads the body (Content-Length or chunked), answers its size
  /stream?lines=N&interval=S  NDJSON lines, each stamped with its send time
  /slow?ms=M             answers after M ms; records start/end for hand-off figures
  /log                   the recorded /slow intervals, then clears them
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import parse_qs, urlsplit

BLOCK = bytes(range(256)) * 4096      # 1 MiB
SLOW_LOG: list[tuple[float, float]] = []


async def read_body(reader: asyncio.StreamReader, headers: dict) -> int:
    n = 0
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                return n
            left = size
            while left:
                data = await reader.read(min(left, 1 << 20))
                if not data:
                    return n
                left -= len(data)
                n += len(data)
            await reader.readline()
    left = int(headers.get("content-length", "0"))
    while left:
        data = await reader.read(min(left, 1 << 20))
        if not data:
            break
        left -= len(data)
        n += len(data)
    return n


def head(status: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            headers = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            url = urlsplit(target)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            received = await read_body(reader, headers)
            path = url.path.rstrip("/").rsplit("/", 1)[-1]
            await route(path, q, received, writer)
    except (ConnectionError, ValueError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def route(path: str, q: dict, received: int, writer: asyncio.StreamWriter) -> None:
    if path == "bytes":
        size = int(q.get("size", "0"))
        if q.get("chunked"):
            writer.write(head("200 OK", [("Content-Type", "application/octet-stream"),
                                         ("Transfer-Encoding", "chunked")]))
            left = size
            while left:
                piece = BLOCK[:min(left, len(BLOCK))]
                left -= len(piece)
                writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(head("200 OK", [("Content-Type", "application/octet-stream"),
                                         ("Content-Length", str(size))]))
            left = size
            while left:
                piece = BLOCK[:min(left, len(BLOCK))]
                left -= len(piece)
                writer.write(piece)
                await writer.drain()
    elif path == "stream":
        lines, interval = int(q.get("lines", "20")), float(q.get("interval", "0.05"))
        writer.write(head("200 OK", [("Content-Type", "application/x-ndjson"),
                                     ("Transfer-Encoding", "chunked")]))
        await writer.drain()
        for i in range(lines):
            if i:
                await asyncio.sleep(interval)
            data = (json.dumps({"i": i, "t": time.time()}) + "\n").encode()
            writer.write(b"%x\r\n" % len(data) + data + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
    elif path == "slow":
        start = time.monotonic()
        await asyncio.sleep(int(q.get("ms", "100")) / 1000)
        body = b'{"ok":true}'
        writer.write(head("200 OK", [("Content-Type", "application/json"),
                                     ("Content-Length", str(len(body)))]) + body)
        await writer.drain()
        SLOW_LOG.append((start, time.monotonic()))
    elif path == "log":
        body = json.dumps(SLOW_LOG).encode()
        SLOW_LOG.clear()
        writer.write(head("200 OK", [("Content-Type", "application/json"),
                                     ("Content-Length", str(len(body)))]) + body)
    else:                       # small, upload
        body = b'{"ok":true}' if path != "upload" else json.dumps({"received": received}).encode()
        writer.write(head("200 OK", [("Content-Type", "application/json"),
                                     ("Content-Length", str(len(body)))]) + body)
    await writer.drain()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=1 << 20)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
