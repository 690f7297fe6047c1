"""make bench-overhead: a small GPU job's cost through the broker, as ratios
to a hand-written proxy of the same stack (bench/handwritten_proxy.py),
measured in one run on one machine.

One upstream (bench/upstream.py) on loopback; the hand-written proxy and the
broker each under gunicorn (one gthread worker); the same http.client
clients with keep-alive. Each repetition measures, for each target in turn:

- CPU per request at 8 clients: the proxy process's CPU time (user +
  system, from /proc) over the requests it served;
- added latency at 1 client: its median latency less the direct median of
  the same repetition;
- requests/s at 8 clients.

Ratios are paired per repetition (broker / hand-written of the same
repetition) and their median reported, so a machine that slows down
between repetitions moves both sides.

    python bench/overhead.py [--reps 3] [--requests 3000] [--out bench/OVERHEAD.md]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench import (Target, broker_config, cpu_seconds, machine, pct, small_posts,  # noqa: E402
                   start_broker, start_upstream, stop)


# bench/stack_floor.py's apps: what the stack costs before any proxy work.
FLOORS = ("answer", "raw_proxy", "urllib3_proxy")


def start_handwritten(tmp: Path, upstream: str,
                      app: str = "handwritten_proxy:app") -> tuple[subprocess.Popen, int, int]:
    """A Flask app of bench/ (module:name) under gunicorn's gthread worker,
    as the broker runs; (process, port, the worker's pid) once it answers."""
    log_path = tmp / f"{app.replace(':', '-')}.log"
    env = dict(os.environ, UPSTREAM=upstream, MALLOC_ARENA_MAX="1")
    env.pop("GUNICORN_CMD_ARGS", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-k", "gthread",
                                 "--threads", "40", "-w", "1", "-b", "127.0.0.1:0",
                                 "--no-control-socket", "--chdir", str(ROOT / "bench"),
                                 app],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        text = log_path.read_text()
        m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
        workers = re.findall(r"Booting worker with pid: (\d+)", text)
        if m and workers:
            port = int(m.group(1))
            try:
                if requests.post(f"http://127.0.0.1:{port}/v1/small", data=b"x", timeout=2).ok:
                    return proc, port, int(workers[-1])
            except requests.RequestException:
                pass
        if time.monotonic() > deadline or proc.poll() is not None:
            stop(proc)
            raise RuntimeError(text[-3000:])
        time.sleep(0.05)


def measure(t: Target, pid: int | None, n: int) -> dict:
    lat1, _ = small_posts(t, n // 3, 1)
    cpu0 = cpu_seconds(pid) if pid else 0.0
    lat8, rps8 = small_posts(t, n, 8)
    cpu = (cpu_seconds(pid) - cpu0) / len(lat8) if pid else None
    return {"p50_1_ms": pct(lat1, 50) * 1000, "rps_8": rps8,
            "cpu_us_8": cpu * 1e6 if cpu is not None else None}


def run(reps: int, n: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mgpumanager-overhead-"))
    procs = []
    try:
        up, up_port = start_upstream()
        procs.append(up)
        upstream = f"http://127.0.0.1:{up_port}"
        hproc, hport, hpid = start_handwritten(tmp, upstream)
        procs.append(hproc)
        bproc, burl, bpid = start_broker(tmp, broker_config(upstream, 32), "broker")
        procs.append(bproc)
        targets = [(Target("direct", up_port, ""), None),
                   (Target("handwritten", hport, "/v1"), hpid),
                   (Target("broker", int(burl.rsplit(":", 1)[1]), "/v1"), bpid)]
        for floor in FLOORS:
            fproc, fport, fpid = start_handwritten(tmp, upstream, f"stack_floor:{floor}")
            procs.append(fproc)
            targets.append((Target(floor, fport, "/v1"), fpid))
        for t, _ in targets:
            small_posts(t, 300, 1)                      # warm-up
            small_posts(t, 300, 8)
        rows = []
        for rep in range(reps):
            row = {t.name: measure(t, pid, n) for t, pid in targets}
            rows.append(row)
            print(f"repetition {rep + 1}: " + json.dumps(row), flush=True)
        return {"reps": rows, "requests": n}
    finally:
        for p in reversed(procs):
            stop(p)


def ratios(rows: list[dict], name: str = "broker") -> dict:
    """``name`` against the hand-written proxy, paired per repetition."""
    out = {"cpu": [], "latency": [], "rps": []}
    for row in rows:
        d, h, b = row["direct"], row["handwritten"], row[name]
        out["cpu"].append(b["cpu_us_8"] / h["cpu_us_8"])
        out["latency"].append((b["p50_1_ms"] - d["p50_1_ms"]) / (h["p50_1_ms"] - d["p50_1_ms"]))
        out["rps"].append(b["rps_8"] / h["rps_8"])
    return {k: {"median": statistics.median(v), "each": v} for k, v in out.items()}


def report(r: dict, command: str) -> str:
    rows, q = r["reps"], ratios(r["reps"])
    med = lambda name, key: statistics.median(row[name][key] for row in rows)  # noqa: E731
    d = med("direct", "p50_1_ms")
    L = ["# A small GPU job's cost: the broker against a hand-written proxy", "",
         f"Command: `{command}`, run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
         f"{len(rows)} repetitions of {r['requests']} requests at 8 clients and "
         f"{r['requests'] // 3} at 1 client, targets in turn within each.", ""]
    L += machine()
    L += ["", "| per small GPU POST | hand-written proxy | mgpumanager `/v1/<kind>` | broker / hand-written (median of paired) |",
          "|---|---|---|---|",
          f"| CPU at 8 clients | {med('handwritten', 'cpu_us_8'):.0f} µs | "
          f"{med('broker', 'cpu_us_8'):.0f} µs | **{q['cpu']['median']:.2f}x** "
          f"({', '.join(f'{x:.2f}' for x in q['cpu']['each'])}) |",
          f"| added latency at 1 client | +{med('handwritten', 'p50_1_ms') - d:.3f} ms | "
          f"+{med('broker', 'p50_1_ms') - d:.3f} ms | **{q['latency']['median']:.2f}x** "
          f"({', '.join(f'{x:.2f}' for x in q['latency']['each'])}) |",
          f"| requests/s at 8 clients | {med('handwritten', 'rps_8'):.0f} | "
          f"{med('broker', 'rps_8'):.0f} | **{q['rps']['median']:.2f}x** "
          f"({', '.join(f'{x:.2f}' for x in q['rps']['each'])}) |",
          "", f"Direct to the upstream: p50 {d:.3f} ms at 1 client, "
          f"{med('direct', 'rps_8'):.0f} requests/s at 8 clients.", ""]
    if all(f in rows[0] for f in FLOORS):
        L += floors(rows, med, d)
    return "\n".join(L)


def floors(rows: list[dict], med, d: float) -> list[str]:
    """The stack's floors (bench/stack_floor.py) beside the goal of 0.6x."""
    each = lambda q, k: ", ".join(f"{x:.2f}" for x in q[k]["each"])  # noqa: E731
    L = ["## The stack's floors, in the same run", "",
         "`answer`: a Flask view under the same gunicorn worker that answers itself (no "
         "upstream, no lock). `raw_proxy`: one global lock and a kept-alive socket per "
         "thread, the answer read by its Content-Length, nothing checked (the least a proxy "
         "on this stack can do; not a proxy to run). `urllib3_proxy`: `raw_proxy` with the "
         "upstream call through urllib3's pool, streamed, as the broker makes it.", "",
         "| per small GPU POST | `answer` | `raw_proxy` | `urllib3_proxy` | "
         "`raw_proxy` / hand-written | 0.6x hand-written (the goal) |",
         "|---|---|---|---|---|---|"]
    q = ratios(rows, "raw_proxy")
    h_cpu, h_lat = med("handwritten", "cpu_us_8"), med("handwritten", "p50_1_ms") - d
    L += [f"| CPU at 8 clients | {med('answer', 'cpu_us_8'):.0f} µs | "
          f"{med('raw_proxy', 'cpu_us_8'):.0f} µs | {med('urllib3_proxy', 'cpu_us_8'):.0f} µs | {q['cpu']['median']:.2f}x ({each(q, 'cpu')}) | "
          f"{0.6 * h_cpu:.0f} µs |",
          f"| added latency at 1 client | +{med('answer', 'p50_1_ms') - d:.3f} ms | "
          f"+{med('raw_proxy', 'p50_1_ms') - d:.3f} ms | "
          f"+{med('urllib3_proxy', 'p50_1_ms') - d:.3f} ms | {q['latency']['median']:.2f}x "
          f"({each(q, 'latency')}) | +{0.6 * h_lat:.3f} ms |",
          f"| requests/s at 8 clients | {med('answer', 'rps_8'):.0f} | "
          f"{med('raw_proxy', 'rps_8'):.0f} | {med('urllib3_proxy', 'rps_8'):.0f} | {q['rps']['median']:.2f}x ({each(q, 'rps')}) | "
          f"{1.6 * med('handwritten', 'rps_8'):.0f} (1.6x) |", ""]
    cpu = {name: med(name, "cpu_us_8") for name in ("broker", "urllib3_proxy", "raw_proxy", "answer")}
    L += [f"Per request at 8 clients: the server and Flask {cpu['answer']:.0f} µs; the lock and "
          f"the upstream call on a bare socket {cpu['raw_proxy'] - cpu['answer']:.0f} µs more; "
          f"urllib3's pool and http.client in its place {cpu['urllib3_proxy'] - cpu['raw_proxy']:.0f} "
          f"µs more; the broker's own work (queue order, lease and watchdog, spooled body, OS "
          f"lock, room check, status, metrics, job log, header checks) "
          f"{cpu['broker'] - cpu['urllib3_proxy']:.0f} µs more.", ""]
    return L


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--out", default=str(ROOT / "bench/OVERHEAD.md"))
    args = p.parse_args()
    results = run(args.reps, args.requests)
    text = report(results, " ".join(["python bench/overhead.py", *sys.argv[1:]]))
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
