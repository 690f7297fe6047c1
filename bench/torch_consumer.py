"""A consumer that really holds VRAM, for the real-GPU check (gpu_e2e.py).

It allocates ``--mib`` of GPU memory with torch when loaded and frees it
when unloaded. Its unload answers at once and frees the memory
``--free-late-s`` later, as ComfyUI's /free does, so the broker must wait
for the live reading instead of trusting the answer. A job loads it if
needed (a cold start), then runs a matrix product in that memory; an
allocation that fails answers 507 with the CUDA message, so an
out-of-memory shows up in the client's status.

    python bench/torch_consumer.py --port 19001 --mib 30000
"""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class Model:
    def __init__(self, mib: int, free_late_s: float):
        self.mib = mib
        self.free_late_s = free_late_s
        self.block: torch.Tensor | None = None
        self.lock = threading.Lock()
        self.jobs = 0

    def load(self) -> None:
        with self.lock:
            if self.block is None:
                self.block = torch.empty(self.mib * 1024 * 1024, dtype=torch.uint8, device="cuda")
                self.block[::4096] = 1          # touch it, as a real model's weights are
                torch.cuda.synchronize()

    def unload_later(self) -> None:
        def free():
            time.sleep(self.free_late_s)
            with self.lock:
                self.block = None
                torch.cuda.empty_cache()
        threading.Thread(target=free, daemon=True).start()

    def job(self) -> dict:
        self.load()
        with self.lock:
            n = 2048
            a = self.block[: n * n * 2].view(torch.bfloat16).view(n, n)
            (a @ a).sum().item()
            self.jobs += 1
            return {"jobs": self.jobs}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mib", type=int, required=True)
    p.add_argument("--free-late-s", type=float, default=1.0)
    a = p.parse_args()
    torch.cuda.init()
    torch.zeros(1, device="cuda")   # the CUDA context exists before the broker looks
    model = Model(a.mib, a.free_late_s)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.answer(200, {"ok": True, "loaded": model.block is not None})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                if self.path == "/load":
                    model.load()
                    self.answer(200, {"loaded": True})
                elif self.path == "/unload":
                    model.unload_later()
                    self.answer(200, {"unloading": True})
                elif self.path == "/job":
                    self.answer(200, model.job())
                else:
                    self.answer(404, {"error": "no such route"})
            except torch.OutOfMemoryError as e:
                self.answer(507, {"error": "cuda_oom", "message": str(e)[:300]})

    print(f"ready {a.port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
