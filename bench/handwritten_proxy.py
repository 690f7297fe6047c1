"""The baseline of `bench/overhead.py`: the proxy one would write by hand on
the broker's own stack, and nothing more.

A Flask view in gunicorn's gthread worker (one worker, as the broker), a
shared requests session to the upstream, and one global lock taken before
the upstream call and released when the answer's body closes (so the next
request waits for the last byte, as a GPU job does). No queue order, no
spooling, no room making, no status, no metrics, no log line per request.

    UPSTREAM=http://127.0.0.1:PORT gunicorn -k gthread --threads 16 \
        -b 127.0.0.1:0 bench.handwritten_proxy:app
"""

import os
import threading

import requests
from flask import Flask, Response, request

UPSTREAM = os.environ["UPSTREAM"]
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-authorization", "proxy-authenticate", "content-length"}

app = Flask(__name__)
session = requests.Session()
gpu = threading.Lock()


@app.post("/v1/<path:path>")
def proxy(path):
    gpu.acquire()
    try:
        upstream = session.post(f"{UPSTREAM}/{path}", data=request.get_data(),
                                headers={"Content-Type": request.content_type or ""},
                                stream=True, timeout=60)
    except BaseException:
        gpu.release()
        raise

    def body():
        try:
            yield from upstream.raw.stream(65536, decode_content=False)
        finally:
            upstream.close()
            gpu.release()

    headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP]
    return Response(body(), status=upstream.status_code, headers=headers)
