"""Soak: mixed traffic with faults switched on at random, then the promises.

    python bench/soak.py [--minutes 3] [--clients 6] [--hup-every 60]

The broker runs under gunicorn in front of the simulated consumers (one
simulated 24 GiB GPU, really accounted). Clients send TTS, STT, LLM and
image jobs; some hang up mid-answer or stall their upload. Faults come and
go at random: ollama's streams break off, mvoice's unload answers 500, a
service hangs for a while, health probes flap; the broker gets a SIGHUP
every --hup-every seconds. At the end it checks: every request got a
definite answer or a cut (none hung), no two GPU jobs overlapped, no
simulated OOM, no lease outlived its deadline (/healthz never said so), and
threads, open files and RSS stayed flat within each worker's life and in
the master, which lives through every reload.
Writes bench/out/soak.json (--out; with --write-results, also the soak section
of bench/RESULTS.md); exits 1 if a
promise broke.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import sim_config  # noqa: E402
from mgpumanager.sim import start_cluster  # noqa: E402
from mgpumanager.sim.traffic import _WAV  # noqa: E402

PAYLOAD = {"tts": {"json": {"text": "soak"}},
           "stt": {"files": {"file": ("a.wav", _WAV, "audio/wav")}},
           "llm": {"json": {"prompt": "x", "options": {"num_predict": 6}}},
           "image": {"json": {"prompt": {"1": {}}}}}


def start_broker(cfg: dict, workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = workdir / "broker.log"
    env = dict(os.environ, MGPUMANAGER_CONFIG=str(path), PYTHONUNBUFFERED="1",
               MALLOC_ARENA_MAX="1", MGPUMANAGER_LOCK_FILE=str(workdir / "gpu.lock"))
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                             "--bind", "127.0.0.1:0", "--no-control-socket"], cwd=ROOT, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "Listening at: http://127.0.0.1:" in text:
            port = text.split("Listening at: http://127.0.0.1:")[1].split()[0]
            url = f"http://127.0.0.1:{port}"
            try:
                if requests.get(url + "/healthz", timeout=2).ok:
                    return proc, url, log
            except requests.RequestException:
                pass
        time.sleep(0.1)
    raise RuntimeError("the broker did not start:\n" + log.read_text(errors="replace"))


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes: collections.Counter = collections.Counter()

    def add(self, key: str) -> None:
        with self.lock:
            self.outcomes[key] += 1


def client(url: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rnd = random.Random(seed)
    host, port = url.rsplit(":", 1)[0][7:], int(url.rsplit(":", 1)[1])
    while not stop.is_set():
        kind = rnd.choice(["tts", "stt", "llm", "image", "tts", "llm"])
        behaviour = rnd.choices(["normal", "hang-up", "stall"], [8, 1, 1])[0]
        try:
            if behaviour == "normal":
                r = requests.post(f"{url}/v1/{kind}", timeout=90, **PAYLOAD[kind])
                tally.add(f"answered {r.status_code}"
                          + (f" {r.json()['error']['code']}" if r.status_code >= 400 and
                             r.headers.get('Content-Type') == 'application/json' else ""))
            elif behaviour == "hang-up":
                # Any kind, at a random byte of its answer (an LLM stream
                # mid-token included), on a connection of its own.
                with requests.Session() as session, session.post(
                        f"{url}/v1/{kind}", timeout=30, stream=True, **PAYLOAD[kind]) as r:
                    r.raw.read(rnd.randint(1, 400))
                tally.add(f"client hung up ({kind})")
            else:
                with socket.create_connection((host, port), timeout=30) as s:
                    s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: localhost\r\n"
                              b"Content-Length: 100\r\n\r\nonly-some")
                    s.settimeout(20)
                    head = s.recv(200)
                tally.add("stalled upload: " + (head[9:12].decode() if head else "cut"))
        except requests.exceptions.ChunkedEncodingError:
            tally.add("cut mid-answer")
        except (requests.exceptions.ReadTimeout, socket.timeout):
            tally.add("NO ANSWER")
        except (requests.RequestException, OSError) as e:
            tally.add(f"connection error: {type(e).__name__}")
        time.sleep(rnd.uniform(0, 0.3))


def faults(sim, stop: threading.Event, log: list, seed: int) -> None:
    rnd = random.Random(seed)
    switches = [
        ("ollama streams break off", lambda on: setattr(sim.ollama, "die_mid_stream", on)),
        ("mvoice unload answers 500", lambda on: setattr(sim.mvoice, "fail_unload", on)),
        ("whisper hangs 3 s per request", lambda on: setattr(sim.whisper, "delay_s", 3 if on else 0)),
        ("mvoice health fails", lambda on: setattr(sim.mvoice, "healthy", not on)),
        ("comfyui health fails", lambda on: setattr(sim.comfyui, "healthy", not on)),
    ]
    while not stop.wait(rnd.uniform(2, 6)):
        name, switch = rnd.choice(switches)
        switch(True)
        log.append(name)
        stop.wait(rnd.uniform(1, 4))
        switch(False)
    for _, switch in switches:
        switch(False)


def process_sample(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {"t": time.monotonic(), "pid": pid, "threads": int(fields["Threads"]),
                "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, KeyError, ValueError):
        return None


def worker_pid(url: str) -> int | None:
    try:
        return requests.get(url + "/v1/status", timeout=5).json()["broker"]["pid"]
    except (requests.RequestException, KeyError, ValueError):
        return None


def growth(samples: list[dict]) -> dict:
    """The most threads, files and RSS grew within one process's life: a
    SIGHUP starts a fresh worker, so samples of two workers say nothing of
    a leak in either."""
    by_pid: dict[int, list[dict]] = collections.defaultdict(list)
    for s in samples:
        by_pid[s["pid"]].append(s)
    worst = {"threads": 0, "rss_mib": 0.0, "fds": 0, "processes": len(by_pid),
             "longest_life_s": 0.0}
    for life in by_pid.values():
        first, last = life[0], life[-1]
        worst["longest_life_s"] = round(max(worst["longest_life_s"], last["t"] - first["t"]), 1)
        for k in ("threads", "rss_mib", "fds"):
            worst[k] = round(max(worst[k], last[k] - first[k]), 1)
    return worst


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=3)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--hup-every", type=float, default=60)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "soak.json"),
                   help="where the results go (default bench/out/soak.json, not tracked)")
    p.add_argument("--write-results", action="store_true",
                   help="also rewrite the soak section of bench/RESULTS.md")
    a = p.parse_args()
    sim = start_cluster(24576, time_scale=0.2)
    from mgpumanager.sim.echo import EchoServer
    echo = EchoServer().start()
    cfg = sim_config(sim, echo)
    cfg["scheduler"].update(job_timeout_s=20, queue_timeout_s=40, max_queue=32)
    cfg["proxy"].update(client_timeout_s=3, read_timeout_s=15)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    proc, url, log_path = start_broker(cfg, workdir)
    stop = threading.Event()
    tally, fault_log, health = Tally(), [], collections.Counter()
    samples, master_samples = [], []
    threads = [threading.Thread(target=client, args=(url, stop, tally, a.seed + i), daemon=True)
               for i in range(a.clients)]
    threads.append(threading.Thread(target=faults, args=(sim, stop, fault_log, a.seed),
                                    daemon=True))
    for t in threads:
        t.start()
    t0 = time.monotonic()
    end = t0 + a.minutes * 60
    next_hup = t0 + a.hup_every
    hups = 0
    print(f"soak: {a.minutes:g} min, {a.clients} clients, HUP every {a.hup_every:g} s; "
          f"broker {url}, log {log_path}", flush=True)
    while time.monotonic() < end:
        time.sleep(1)
        try:
            r = requests.get(url + "/healthz", timeout=5)
            health["200" if r.ok else "503: " + "; ".join(r.json().get("problems", []))] += 1
        except requests.RequestException as e:
            health[f"unreachable: {type(e).__name__}"] += 1
        if int(time.monotonic() - t0) % 5 == 0:
            pid = worker_pid(url)
            s = process_sample(pid) if pid else None
            if s:
                samples.append(s)
            # The master lives through every reload: a leak there adds up.
            s = process_sample(proc.pid)
            if s:
                master_samples.append(s)
        if time.monotonic() >= next_hup and time.monotonic() < end - 20:
            proc.send_signal(signal.SIGHUP)
            hups += 1
            next_hup += a.hup_every
    stop.set()
    for t in threads:
        t.join(120)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(40)
    sim.stop()
    echo.stop()

    def window(lo, hi):
        picked = [s for s in samples if lo <= s["t"] - t0 < hi]
        return {k: round(sum(s[k] for s in picked) / len(picked), 1) if picked else None
                for k in ("threads", "rss_mib", "fds")}
    minute = min(60.0, a.minutes * 60 / 3)
    first, last = window(10, 10 + minute), window(a.minutes * 60 - minute, a.minutes * 60 + 1)
    overlaps = sim.gpu.overlaps()
    result = {
        "minutes": a.minutes, "clients": a.clients, "hups": hups,
        "outcomes": dict(tally.outcomes), "faults": dict(collections.Counter(fault_log)),
        "healthz": dict(health), "overlapping_gpu_jobs": len(overlaps),
        "overlaps": [f"{x.kind} ({x.consumer}) then {y.kind} ({y.consumer}), "
                     f"{(x.end - y.start) * 1000:.0f} ms" for x, y in overlaps],
        "max_concurrent_gpu_jobs": sim.gpu.max_concurrent, "simulated_ooms": sim.gpu.ooms,
        # Every worker's, from the log: each SIGHUP starts fresh counters.
        "leases_expired": log_count(log_path, "past scheduler.job_timeout_s; the watchdog"),
        "gpu_jobs": log_count(log_path, "job consumer="),
        "first_minute": first, "last_minute": last,
        "worker_growth": growth(samples), "master_growth": growth(master_samples),
    }
    broken = []
    if tally.outcomes.get("NO ANSWER"):
        broken.append(f"{tally.outcomes['NO ANSWER']} requests got no answer")
    if overlaps or sim.gpu.max_concurrent > 1:
        broken.append(f"{len(overlaps)} overlapping GPU jobs")
    if sim.gpu.ooms:
        broken.append(f"{sim.gpu.ooms} simulated OOMs: {sim.gpu.oom_log[:2]}")
    if any(k.startswith("503") for k in health):
        broken.append("/healthz said the broker could not schedule")
    for who, g in (("a worker", result["worker_growth"]), ("the master", result["master_growth"])):
        if g["threads"] > 8:
            broken.append(f"{who}'s threads grew by {g['threads']}")
        if g["fds"] > 30:
            broken.append(f"{who}'s open files grew by {g['fds']}")
        if g["rss_mib"] > 30:
            broken.append(f"{who}'s RSS grew by {g['rss_mib']} MiB")
    result["broken"] = broken
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if a.write_results:
        write_results(result)
    print("soak: " + ("PASSED" if not broken else "FAILED: " + "; ".join(broken)))
    return 1 if broken else 0


def log_count(log_path: Path, needle: str) -> int:
    """Lines of the broker's log (every worker's) that hold ``needle``."""
    with open(log_path, errors="replace") as f:
        return sum(needle in line for line in f)


def write_results(r: dict) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    start = text.find("## Soak")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))
    section = f"""## Soak (`make soak`)

{r['minutes']:g} minutes, {r['clients']} clients, {r['hups']} SIGHUP reloads, faults:
{', '.join(f'{k} ({v}x)' for k, v in sorted(r['faults'].items())) or 'none'}.

| promise | result |
|---|---|
| every request answered or cut | {outcomes} |
| overlapping GPU jobs | {r['overlapping_gpu_jobs']} (at most {r['max_concurrent_gpu_jobs']} at once) |
| simulated OOMs | {r['simulated_ooms']} |
| leases released by the watchdog / /healthz 503s | {r['leases_expired']} / {sum(v for k, v in r['healthz'].items() if k != '200')} |
| worker threads, first minute -> last (different workers after a reload) | {r['first_minute']['threads']} -> {r['last_minute']['threads']} |
| most growth within one worker's life ({r['worker_growth']['processes']} workers, longest {r['worker_growth']['longest_life_s']} s): threads, open files, RSS MiB | {r['worker_growth']['threads']}, {r['worker_growth']['fds']}, {r['worker_growth']['rss_mib']} |
| growth in the master: threads, open files, RSS MiB | {r['master_growth']['threads']}, {r['master_growth']['fds']}, {r['master_growth']['rss_mib']} |
| verdict | {'passed' if not r['broken'] else 'FAILED: ' + '; '.join(r['broken'])} |
"""
    path.write_text(text.rstrip() + "\n\n" + section)


if __name__ == "__main__":
    sys.exit(main())
