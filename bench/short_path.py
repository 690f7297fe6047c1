"""The short path: what a GPU job whose target is resident costs the broker
in process (its turn, room made, its end; no HTTP), taking the short path
against taking the full one (a fresh reading and a plan), in one run.

Two readings: the ledger (the beliefs, read in process) and a live one over
HTTP (the simulated GPU's ``GET /gpu``, as the sim backend reads it; NVML's
three driver calls and nvidia-smi's subprocess per reading are the real
cards' equivalents, and nvidia-smi's costs tens of milliseconds). The two
paths alternate, repetition by repetition, and the ratio of each
repetition is paired.

    python bench/short_path.py [--reps 5] [--jobs 3000] [--out bench/SHORT_PATH.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench import machine  # noqa: E402
from mgpumanager import room  # noqa: E402
from mgpumanager.broker import Broker  # noqa: E402
from mgpumanager.config import parse_config  # noqa: E402
from mgpumanager.sim import start_cluster  # noqa: E402

TOTAL_MIB = 24576
SHORT_PATH = room.still_resident        # the full path's arm replaces it with a refusal
CONSUMERS = {"tts": 3000, "stt": 2000, "llm": 9000, "image": 10000, "spare": 500}


def broker(backend: str, sim_url: str | None, lock_file: str) -> Broker:
    config = parse_config({
        "gpu": {"backend": backend, "total_mib": TOTAL_MIB, "sim_url": sim_url,
                "sample_interval_s": 1.0},
        "scheduler": {"lock_file": lock_file},
        "routes": {n: n for n in CONSUMERS},
        "consumers": {n: {"url": f"http://127.0.0.1:{i + 1}", "paths": {n: "/"},
                          "vram_resident_mib": mib, "unload": {"path": "/unload"}}
                      for i, (n, mib) in enumerate(CONSUMERS.items())}}, "short_path.yaml")
    return Broker(config)


def jobs_per_second(b: Broker, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        b.start_job("tts", "tts").finish(ok=True, status=200)
    return n / (time.perf_counter() - t0)


def measure(backend: str, reps: int, n: int) -> dict:
    cluster = start_cluster(TOTAL_MIB) if backend == "sim" else None
    with tempfile.TemporaryDirectory() as tmp:
        b = broker(backend, cluster.gpu_server.url if cluster else None, f"{tmp}/gpu.lock")
        try:
            if cluster:
                cluster.gpu.allocate("tts", CONSUMERS["tts"])   # what the sim backend reads
                b.gpu.sampler.start()
            for name in CONSUMERS:             # settled: nothing but tts is loaded
                b.registry.mark_loaded(name, name == "tts")
            time.sleep(1.2)                    # a sampler reading after the job's belief
            rows = []
            for _ in range(reps):
                row = {}
                for arm in ("short", "full"):
                    room.still_resident = SHORT_PATH if arm == "short" else \
                        (lambda *a: False)
                    row[arm] = 1e6 / jobs_per_second(b, n)
                room.still_resident = SHORT_PATH
                rows.append(row)
            return {"rows": rows,
                    "ratio": statistics.median(r["short"] / r["full"] for r in rows)}
        finally:
            b.gpu.sampler.stop()
            b.stop()
            if cluster:
                cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--out", default=str(ROOT / "bench/SHORT_PATH.md"))
    a = p.parse_args()
    results = {backend: measure(backend, a.reps, a.jobs) for backend in ("ledger", "sim")}
    lines = ["# The short path: a resident target's job, in process", "",
             f"`python bench/short_path.py --reps {a.reps} --jobs {a.jobs}`, "
             f"{time.strftime('%Y-%m-%d')}:", "", *machine(), "",
             "Per job: its turn, room made, its end (no HTTP); µs of one thread's wall time, "
             "medians of the repetitions, and the ratio paired per repetition.", "",
             "| reading | short path | full path | short / full |", "|---|---|---|---|"]
    for backend, r in results.items():
        short = statistics.median(x["short"] for x in r["rows"])
        full = statistics.median(x["full"] for x in r["rows"])
        lines.append(f"| {backend} | {short:.0f} µs | {full:.0f} µs | {r['ratio']:.2f}x |")
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
