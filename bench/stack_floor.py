"""Two floors for `bench/overhead.py`: what the broker's stack costs before
the broker does anything, measured in the same run as the others.

- ``answer``: a Flask view in gunicorn's gthread worker that reads the body
  and answers itself. No upstream, no lock: the cost of the server and the
  framework alone.
- ``raw_proxy``: the least a proxy on this stack can do. The view takes one
  global lock, writes the request to a kept-alive socket of its thread,
  reads the answer by its Content-Length (no pool, no timeouts, no header
  checks, no streaming: it cannot fail safely and is no proxy to run), and
  releases the lock when the answer's body closes.
- ``urllib3_proxy``: ``raw_proxy`` with the upstream call made through
  urllib3's pool (http.client under it) and the answer streamed from it, as
  the broker does: the difference is what that client costs.

    UPSTREAM=http://127.0.0.1:PORT gunicorn -k gthread -b 127.0.0.1:0 \
        --chdir bench stack_floor:raw_proxy
"""

import os
import socket
import threading

import urllib3

from flask import Flask, Response, request

answer = Flask("answer")


@answer.post("/v1/<path:path>")
def answer_view(path):
    request.get_data()
    return b'{"ok":true}', 200, {"Content-Type": "application/json"}


raw_proxy = Flask("raw_proxy")
gpu = threading.Lock()
_local = threading.local()


def _upstream_socket() -> socket.socket:
    sock = getattr(_local, "sock", None)
    if sock is None:
        host, port = os.environ["UPSTREAM"].rsplit("/", 1)[1].split(":")
        sock = _local.sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@raw_proxy.post("/v1/<path:path>")
def raw_proxy_view(path):
    body = request.get_data()
    gpu.acquire()
    try:
        sock = _upstream_socket()
        sock.sendall(b"POST /%s HTTP/1.1\r\nHost: upstream\r\nContent-Type: %s\r\n"
                     b"Content-Length: %d\r\n\r\n%s"
                     % (path.encode(), (request.content_type or "").encode(), len(body), body))
        got = b""
        while b"\r\n\r\n" not in got:
            got += sock.recv(65536)
        head, rest = got.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        fields = [line.split(":", 1) for line in lines]
        length = next(int(v) for k, v in fields if k.lower() == "content-length")
        while len(rest) < length:
            rest += sock.recv(65536)
    except BaseException:
        gpu.release()
        raise

    def body_then_release():
        try:
            yield rest
        finally:
            gpu.release()

    hop = ("content-length", "connection", "keep-alive", "transfer-encoding")
    return Response(body_then_release(), status=int(status_line.split()[1]),
                    headers=[(k, v.strip()) for k, v in fields if k.lower() not in hop])


urllib3_proxy = Flask("urllib3_proxy")
_pool = None


@urllib3_proxy.post("/v1/<path:path>")
def urllib3_proxy_view(path):
    global _pool
    if _pool is None:
        _pool = urllib3.connection_from_url(os.environ["UPSTREAM"], maxsize=64)
    body = request.get_data()
    gpu.acquire()
    try:
        answer = _pool.urlopen("POST", f"/{path}", body=body, preload_content=False,
                               headers={"Content-Type": request.content_type or ""},
                               retries=False, timeout=urllib3.Timeout(connect=5, read=60))
    except BaseException:
        gpu.release()
        raise

    def body_then_release():
        try:
            yield from answer.stream(65536, decode_content=False)
        finally:
            answer.release_conn()
            gpu.release()

    hop = ("content-length", "connection", "keep-alive", "transfer-encoding")
    return Response(body_then_release(), status=answer.status,
                    headers=[(k, v) for k, v in answer.headers.items() if k.lower() not in hop])
