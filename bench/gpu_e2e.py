"""The broker against a real GPU: consumers that really hold VRAM.

Starts three torch consumers (bench/torch_consumer.py), each holding 40 %
of the card when loaded, so any two fit and three do not, and each freeing
its memory a while after its unload answers. Runs the broker on them with
the NVML reader and per-process attribution, sends jobs from three clients
that each keep to one consumer, and samples NVML throughout. It checks
that every job succeeded (a CUDA out-of-memory answers 507), that the
broker evicted, and that the memory it reported matched NVML's. Prints a
report and writes it as JSON; exits 1 if a check fails.

    python bench/gpu_e2e.py [--jobs 30] [--policy fifo] [--out report.json]

Needs a machine with an NVIDIA GPU, torch, and the broker's dependencies.
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench import start_broker  # noqa: E402
from mgpumanager.gpu import NvmlReader  # noqa: E402

KINDS = ("tts", "stt", "image")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready within {timeout_s} s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=30, help="jobs per client")
    p.add_argument("--policy", default=None, help="scheduler.policy, if the broker has one")
    p.add_argument("--free-late-s", type=float, default=1.5)
    p.add_argument("--out", default=None)
    p.add_argument("--log-out", default=None, help="copy the broker's log here at the end")
    p.add_argument("--stall-s", type=float, default=45,
                   help="no job done for this long: print the broker's state and stop")
    a = p.parse_args()
    nvml = NvmlReader(0)
    total = nvml.read().total_mib
    mib = int(total * 0.4)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    procs: list[subprocess.Popen] = []
    report: dict = {"total_mib": total, "consumer_mib": mib, "policy": a.policy}
    try:
        ports = {}
        for kind in KINDS:
            port = ports[kind] = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "torch_consumer.py"), "--port", str(port),
                 "--mib", str(mib), "--free-late-s", str(a.free_late_s)]))
        for kind, port in ports.items():
            wait_for(f"consumer {kind}", lambda: requests.get(
                f"http://127.0.0.1:{port}/health", timeout=1).ok, 120)
        scheduler = {"evict_settle_s": 20, "queue_timeout_s": 600, "max_queue": 64}
        if a.policy:
            scheduler["policy"] = a.policy
        config = {
            "server": {"bind": "127.0.0.1:0"},
            "gpu": {"backend": "nvml", "cushion_mib": 512, "sample_interval_s": 0.5},
            "health": {"interval_s": 1, "timeout_s": 1},
            "scheduler": scheduler,
            "routes": {kind: f"c{kind}" for kind in KINDS},
            "consumers": {
                f"c{kind}": {
                    "url": f"http://127.0.0.1:{port}",
                    "health": "/health",
                    "paths": {kind: "/job"},
                    "vram_resident_mib": mib,
                    "load": {"method": "POST", "path": "/load"},
                    "unload": {"method": "POST", "path": "/unload"},
                    "pids_from": {"port": port},
                } for kind, port in ports.items()},
        }
        broker, url, _ = start_broker(tmp, config, "broker", timeout_s=60)
        procs.append(broker)
        log_path = tmp / "broker.log"

        samples: list[int] = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                samples.append(nvml.read().used_mib)
                time.sleep(0.02)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        results: list[tuple[str, int, float]] = []
        stalled = threading.Event()

        def client(kind: str):
            for _ in range(a.jobs):
                if stalled.is_set():
                    return
                t0 = time.monotonic()
                try:
                    r = requests.post(f"{url}/v1/{kind}", json={}, timeout=300)
                    code = r.status_code
                except requests.RequestException:
                    code = -1
                results.append((kind, code, time.monotonic() - t0))
                print(f"{time.monotonic() - start:7.2f} s {kind} {code} "
                      f"{time.monotonic() - t0:.2f} s", flush=True)
        t0 = start = time.monotonic()
        clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in KINDS]
        for c in clients:
            c.start()
        last, done = time.monotonic(), 0
        while any(c.is_alive() for c in clients):
            time.sleep(0.5)
            if len(results) != done:
                last, done = time.monotonic(), len(results)
            elif time.monotonic() - last > a.stall_s:
                stalled.set()
                print(f"STALLED: no job done for {a.stall_s:g} s; the broker's state:", flush=True)
                st = requests.get(url + "/v1/status", timeout=5).json()
                print(json.dumps({"scheduler": st["scheduler"], "gpu": st["gpu"],
                                  "consumers": st["consumers"]}, indent=1)[:12000], flush=True)
                print(log_path.read_text()[-8000:], flush=True)
                return 1
        makespan = time.monotonic() - t0
        stop.set()
        sampler.join()
        time.sleep(3)       # idle: consumers done freeing, a fresh sample taken
        status = requests.get(url + "/v1/status", timeout=5).json()
        reading = nvml.read()

        codes: dict[int, int] = {}
        for _, code, _ in results:
            codes[code] = codes.get(code, 0) + 1
        evictions = status["scheduler"]["evictions"]
        measured = {n: c.get("measured_mib") for n, c in status["consumers"].items()}
        report.update({
            "jobs": len(results), "codes": codes, "makespan_s": round(makespan, 1),
            "peak_used_mib": max(samples), "samples": len(samples),
            "evictions": evictions, "status_gpu": {k: status["gpu"].get(k) for k in ("source", "name", "used_mib", "free_mib")},
            "queue": {k: status["scheduler"].get(k)
                      for k in ("policy", "swaps_saved", "reordered", "max_bypassed")},
            "nvml_used_mib_at_end": reading.used_mib, "measured_mib": measured,
            "consumers": {n: {k: c.get(k) for k in ("loaded", "loads", "evictions", "total_requests",
                                                      "failed_requests", "costs")}
                          for n, c in status["consumers"].items()},
        })
        checks = {
            "every job answered 200": codes == {200: len(results)},
            "no CUDA out-of-memory": 507 not in codes,
            "the broker evicted": bool(evictions),
            "peak use within the card": max(samples) <= total,
            "the status reading is NVML's": abs(status["gpu"]["used_mib"] - reading.used_mib) <= 256,
        }
        report["checks"] = checks
        print(json.dumps(report, indent=2))
        if not all(checks.values()):
            print(log_path.read_text()[-6000:])
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=2))
        return 0 if all(checks.values()) else 1
    finally:
        if a.log_out and (tmp / "broker.log").exists():
            Path(a.log_out).write_bytes((tmp / "broker.log").read_bytes()[-4_000_000:])
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
