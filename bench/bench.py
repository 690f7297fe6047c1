"""make bench: what the broker costs, side by side with direct access and nginx.

One run starts one fast upstream (bench/upstream.py, its own process), nginx
as a plain reverse proxy in front of it (proxy_buffering off), and the broker
under gunicorn with its GPU lock on, all on loopback; the same client (plain
http.client with keep-alive, in this process) drives the same workload
against each, alternating targets between repetitions. Results go to
bench/RESULTS.md with the machine, the versions and the command.

    python bench/bench.py [--quick] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mgpumanager.sim import start_cluster  # noqa: E402
from mgpumanager.sim.traffic import DIRECT_CONSUMER, DIRECT_PATHS, send_job, storm  # noqa: E402

MIB = 1024 * 1024
CLK = os.sysconf("SC_CLK_TCK")


# -- processes -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_upstream() -> tuple[subprocess.Popen, int]:
    """bench/upstream.py on a free port, once it listens."""
    port = free_port()
    up = subprocess.Popen([sys.executable, str(ROOT / "bench/upstream.py"), str(port)],
                          stdout=subprocess.PIPE)
    up.stdout.readline()
    return up, port


def find_nginx() -> tuple[str | None, str]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx:
        return nginx, ""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing Debian's nginx for the comparison...", flush=True)
        r = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                           "apt-get install -y -qq nginx-light || DEBIAN_FRONTEND=noninteractive "
                           "apt-get install -y -qq nginx", shell=True, capture_output=True)
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if nginx:
            return nginx, ""
        return None, f"nginx could not be installed: {r.stderr.decode()[-200:]}"
    return None, "nginx is not installed and this user cannot install it"


def start_nginx(nginx: str, tmp: Path, port: int, upstream_port: int) -> subprocess.Popen:
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log;
user root;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    location / {{
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 300s;
    }}
  }}
}}
""")
    return subprocess.Popen([nginx, "-c", str(conf), "-e", str(tmp / "nginx-error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def broker_config(upstream: str, max_queue: int) -> dict:
    ops = ("small", "bytes", "upload", "stream", "slow")
    return {
        "gpu": {"backend": "ledger", "total_mib": 24576},
        "health": {"interval_s": 5, "timeout_s": 2},
        "scheduler": {"max_queue": max_queue, "queue_timeout_s": 120},
        "routes": {op: "up" for op in ops},
        "audio_proxy": "up",
        "consumers": {"up": {"url": upstream, "health": "/small",
                             "paths": {op: f"/{op}" for op in ops}, "vram_resident_mib": 0}},
    }


def start_broker(tmp: Path, cfg: dict, name: str,
                 timeout_s: float = 30) -> tuple[subprocess.Popen, str, int]:
    """The broker under gunicorn on a port of its own (0: gunicorn picks; the
    log says which), with an OS lock file of its own, so that it never waits
    for a broker already running on this machine. Its log is tmp/NAME.log.
    Returns (process, URL, the worker's pid) once it answers."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log_path = tmp / f"{name}.log"
    env = dict(os.environ, MGPUMANAGER_CONFIG=str(path), MALLOC_ARENA_MAX="1",
               MGPUMANAGER_LOCK_FILE=str(tmp / f"{name}.lock"), PYTHONUNBUFFERED="1")
    env.pop("GUNICORN_CMD_ARGS", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                                 str(ROOT / "gunicorn.conf.py"), "--bind", "127.0.0.1:0",
                                 "--no-control-socket"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    url = None
    while True:
        if url is None:
            m = re.search(r"Listening at: (http://\S+)", log_path.read_text())
            url = m and m.group(1)
        try:
            if url and requests.get(url + "/healthz", timeout=1).ok:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            stop(proc)
            raise RuntimeError(log_path.read_text()[-5000:])
        time.sleep(0.05)
    pid = requests.get(url + "/v1/status", timeout=5).json()["broker"]["pid"]
    return proc, url, pid


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the client ---------------------------------------------------------------------

class Target:
    def __init__(self, name: str, port: int, prefix: str):
        self.name, self.port, self.prefix = name, port, prefix

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)

    def path(self, op: str, query: str = "") -> str:
        return f"{self.prefix}/{op}" + (f"?{query}" if query else "")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def small_posts(t: Target, n: int, clients: int) -> tuple[list[float], float]:
    lat: list[float] = []
    lock = threading.Lock()

    def worker(count: int):
        c = t.conn()
        mine = []
        for _ in range(count):
            t0 = time.perf_counter()
            c.request("POST", t.path("small"), body=b'{"x":1}',
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            mine.append(time.perf_counter() - t0)
            assert r.status == 200, r.status
        c.close()
        with lock:
            lat.extend(mine)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n // clients,)) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return lat, len(lat) / (time.perf_counter() - t0)


def download(t: Target, size: int, chunked: bool) -> float:
    c = t.conn()
    buf = bytearray(MIB)
    view = memoryview(buf)
    t0 = time.perf_counter()
    c.request("POST", t.path("bytes", f"size={size}" + ("&chunked=1" if chunked else "")))
    r = c.getresponse()
    got = 0
    while True:
        n = r.readinto(view)
        if not n:
            break
        got += n
    elapsed = time.perf_counter() - t0
    assert got == size, (got, size)
    c.close()
    return size / MIB / elapsed


def upload(t: Target, size: int, chunked: bool) -> float:
    block = bytes(MIB)

    def body():
        left = size
        while left:
            piece = block[:min(left, MIB)]
            left -= len(piece)
            yield piece
    c = t.conn()
    t0 = time.perf_counter()
    if chunked:
        c.request("POST", t.path("upload"), body=body(), encode_chunked=True,
                  headers={"Transfer-Encoding": "chunked"})
    else:
        c.request("POST", t.path("upload"), body=body(), headers={"Content-Length": str(size)})
    r = c.getresponse()
    answer = json.loads(r.read())
    elapsed = time.perf_counter() - t0
    assert answer["received"] == size, answer
    c.close()
    return size / MIB / elapsed


def stream_lines(t: Target, lines: int = 20, interval: float = 0.05) -> tuple[float, list[float]]:
    c = t.conn()
    sent = time.time()
    c.request("POST", t.path("stream", f"lines={lines}&interval={interval}"))
    r = c.getresponse()
    delays, first = [], None
    for _ in range(lines):
        line = r.readline()
        now = time.time()
        first = first if first is not None else now - sent
        delays.append(now - json.loads(line)["t"])
    r.read()
    c.close()
    return first, delays


def concurrent_downloads(t: Target, path: str, n: int) -> float:
    def one():
        c = t.conn()
        c.request("GET", path)
        r = c.getresponse()
        while r.read(MIB):
            pass
        c.close()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0


# -- the figures ----------------------------------------------------------------------

def run(quick: bool) -> dict:
    reps = 1 if quick else 3
    big = (64 if quick else 256) * MIB
    n_small = 600 if quick else 3000
    tmp = Path(tempfile.mkdtemp(prefix="mgpumanager-bench-"))
    procs: list[subprocess.Popen] = []
    results: dict = {"notes": []}
    try:
        up, up_port = start_upstream()
        procs.append(up)
        targets = [Target("direct", up_port, "")]
        nginx, why = find_nginx()
        if nginx:
            ng_port = free_port()
            procs.append(start_nginx(nginx, tmp, ng_port, up_port))
            wait_port(ng_port)
            targets.append(Target("nginx", ng_port, ""))
            results["nginx_version"] = subprocess.run([nginx, "-v"], capture_output=True,
                                                      text=True).stderr.strip()
        else:
            results["notes"].append(f"nginx skipped: {why}")
        bproc, burl, bpid = start_broker(tmp, broker_config(f"http://127.0.0.1:{up_port}", 32),
                                         "broker")
        procs.append(bproc)
        broker = Target("broker", int(burl.rsplit(":", 1)[1]), "/v1")
        targets.append(broker)
        names = [t.name for t in targets]

        print("small POSTs...", flush=True)
        for t in targets:                          # warm-up: connections, imports, caches
            small_posts(t, 200, 1)
        lat1 = {n: [] for n in names}
        lat8 = {n: [] for n in names}
        rps1 = {n: [] for n in names}
        rps8 = {n: [] for n in names}
        cpu_per_req = []
        for _ in range(reps):
            for t in targets:
                cpu0 = cpu_seconds(bpid) if t is broker else 0
                lat, rps = small_posts(t, n_small // reps, 1)
                if t is broker:
                    cpu_per_req.append((cpu_seconds(bpid) - cpu0) / len(lat))
                lat1[t.name] += lat
                rps1[t.name].append(rps)
                lat, rps = small_posts(t, n_small // reps, 8)
                lat8[t.name] += lat
                rps8[t.name].append(rps)
        results["small"] = {n: {"p50_1": pct(lat1[n], 50) * 1000, "p99_1": pct(lat1[n], 99) * 1000,
                                "rps_1": statistics.median(rps1[n]),
                                "p50_8": pct(lat8[n], 50) * 1000, "p99_8": pct(lat8[n], 99) * 1000,
                                "rps_8": statistics.median(rps8[n])} for n in names}
        results["broker_cpu_ms_per_request"] = statistics.median(cpu_per_req) * 1000

        print("downloads and uploads...", flush=True)
        rss_before_big = rss_mib(bpid)
        tput = {}
        for fn, label in ((download, "download"), (upload, "upload")):
            for chunked in (False, True):
                key = f"{label} ({'chunked' if chunked else 'Content-Length'})"
                runs = {n: [] for n in names}
                for _ in range(reps):
                    for t in targets:
                        runs[t.name].append(fn(t, big, chunked))
                tput[key] = {n: statistics.median(v) for n, v in runs.items()}
        results["throughput"] = tput
        results["big_mib"] = big // MIB

        print("streaming fidelity...", flush=True)
        stream = {n: {"first": [], "delays": []} for n in names}
        for _ in range(reps):
            for t in targets:
                first, delays = stream_lines(t)
                stream[t.name]["first"].append(first)
                stream[t.name]["delays"] += delays
        results["stream"] = {n: {"first_ms": statistics.median(v["first"]) * 1000,
                                 "worst_ms": max(v["delays"]) * 1000,
                                 "median_ms": statistics.median(v["delays"]) * 1000}
                             for n, v in stream.items()}

        print("lock hand-off...", flush=True)
        gaps = []
        requests.get(f"http://127.0.0.1:{up_port}/log")
        def slow_job():
            c = broker.conn()
            c.request("POST", broker.path("slow", "ms=50"))
            c.getresponse().read()
            c.close()
        for _ in range(reps):
            threads = []
            for _ in range(16):
                th = threading.Thread(target=slow_job)
                th.start()
                threads.append(th)
                time.sleep(0.002)
            for th in threads:
                th.join()
            log = sorted(requests.get(f"http://127.0.0.1:{up_port}/log").json())
            gaps += [b[0] - a[1] for a, b in zip(log, log[1:])]
            overlaps = [g for g in gaps if g < 0]
            assert not overlaps, f"jobs overlapped: {overlaps}"
        # Baseline: one client sending the same jobs back to back, straight to
        # the upstream. Its gaps are the client's and the upstream's own
        # turnaround, which the broker's gaps contain too.
        base_gaps = []
        for _ in range(reps):
            c = targets[0].conn()
            for _ in range(16):
                c.request("POST", "/slow?ms=50")
                c.getresponse().read()
            c.close()
            log = sorted(requests.get(f"http://127.0.0.1:{up_port}/log").json())
            base_gaps += [b[0] - a[1] for a, b in zip(log, log[1:])]
        results["handoff"] = {"p50_ms": pct(gaps, 50) * 1000, "p99_ms": pct(gaps, 99) * 1000,
                              "n": len(gaps), "direct_p50_ms": pct(base_gaps, 50) * 1000,
                              "direct_p99_ms": pct(base_gaps, 99) * 1000}

        print("status under a full queue...", flush=True)
        holder = threading.Thread(target=lambda: requests.post(burl + "/v1/slow?ms=4000", timeout=60))
        holder.start()
        time.sleep(0.2)
        waiters = [threading.Thread(target=lambda: requests.post(burl + "/v1/slow?ms=5", timeout=60))
                   for _ in range(32)]
        for w in waiters:
            w.start()
        deadline = time.monotonic() + 5
        with requests.Session() as s:
            while s.get(burl + "/v1/status").json()["scheduler"]["queue_depth"] < 32:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            t0 = time.perf_counter()
            refused = s.post(burl + "/v1/small", data=b"x")
            refuse_ms = (time.perf_counter() - t0) * 1000
            st_lat, depths = [], []
            for _ in range(150):
                t0 = time.perf_counter()
                depths.append(s.get(burl + "/v1/status").json()["scheduler"]["queue_depth"])
                st_lat.append(time.perf_counter() - t0)
        results["status_full"] = {"p50_ms": pct(st_lat, 50) * 1000, "p99_ms": pct(st_lat, 99) * 1000,
                                  "min_depth": min(depths), "refused": refused.status_code,
                                  "refuse_ms": refuse_ms,
                                  "retry_after": refused.headers.get("Retry-After")}
        holder.join()
        for w in waiters:
            w.join()

        print("/audio concurrency...", flush=True)
        audio = {}
        for t, path in ((targets[0], f"/audio/bytes?size={16 * MIB}"),
                        (broker, f"/audio/bytes?size={16 * MIB}")):
            audio[t.name] = statistics.median(concurrent_downloads(t, path, 16) for _ in range(reps))
        results["audio"] = audio

        print("memory...", flush=True)
        rss0 = rss_mib(bpid)
        download(broker, 1024 * MIB, False)
        results["memory"] = {"peak_mib": rss_mib(bpid, "VmHWM"), "rss_before_big_mib": rss_before_big,
                             "rss_before_1g_mib": rss0, "rss_after_1g_mib": rss_mib(bpid)}
        stop(bproc)

        print("OOM storm...", flush=True)
        results["storm"] = oom_storm(tmp, 40)
    finally:
        for p in procs:
            stop(p)
    return results


def oom_storm(tmp: Path, n: int) -> dict:
    out = {}
    cluster = start_cluster(24576, time_scale=0.2)
    try:
        t0 = time.monotonic()
        res = storm(lambda k: send_job(cluster.consumers[DIRECT_CONSUMER[k]].url, k, DIRECT_PATHS), n)
        while cluster.comfyui.busy:
            time.sleep(0.02)
        images_failed = sum(1 for h in cluster.comfyui.history.values() if not h["status"]["completed"])
        out["direct"] = {"completed": sum(r.status_code == 200 for r in res) - images_failed,
                         "ooms": cluster.gpu.ooms, "makespan_s": time.monotonic() - t0,
                         "evictions": 0, "max_concurrent": cluster.gpu.max_concurrent}
    finally:
        cluster.stop()
    cluster = start_cluster(24576, time_scale=0.2)
    proc = None
    try:
        cfg = yaml.safe_load((ROOT / "etc/demo.yaml").read_text())
        cfg["gpu"]["sim_url"] = cluster.gpu_server.url
        cfg["scheduler"]["max_queue"] = n
        for name, c in cluster.consumers.items():
            cfg["consumers"][name]["url"] = c.url
        proc, url, _ = start_broker(tmp, cfg, "storm-broker")
        t0 = time.monotonic()
        res = storm(lambda k: send_job(url, k), n)
        while cluster.comfyui.busy:
            time.sleep(0.02)
        images_failed = sum(1 for h in cluster.comfyui.history.values() if not h["status"]["completed"])
        st = requests.get(url + "/v1/status").json()["scheduler"]
        out["broker"] = {"completed": sum(r.status_code == 200 for r in res) - images_failed,
                         "ooms": cluster.gpu.ooms, "makespan_s": time.monotonic() - t0,
                         "evictions": st["evictions"], "max_concurrent": cluster.gpu.max_concurrent}
    finally:
        stop(proc)
        cluster.stop()
    out["n"] = n
    return out


# -- the report ------------------------------------------------------------------------

def machine() -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))) / 1024 / 1024
    vers = ", ".join(f"{p} {metadata.version(p)}" for p in
                     ("gunicorn", "Flask", "Werkzeug", "requests", "urllib3"))
    return [f"- machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.platform()}",
            f"- Python {platform.python_version()}; {vers}"]


def report(r: dict, command: str) -> str:
    names = list(r["small"])
    ratio = lambda v, d: f"{v / d:.2f}x" if d else "-"  # noqa: E731
    L = ["# mgpumanager benchmark results", "",
         f"Command: `{command}`, run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    L += machine()
    if "nginx_version" in r:
        L.append(f"- {r['nginx_version']} (proxy_buffering off, keepalive to the upstream)")
    L += [f"- note: {n}" for n in r["notes"]]
    L += ["", "All on loopback against one asyncio upstream (bench/upstream.py) in its own "
          "process; the same http.client client for every target; targets alternate within "
          "each repetition; medians over repetitions. The broker runs under gunicorn with its "
          "GPU lock on: every request below goes through `/v1/<kind>` and the lock.", ""]
    L += ["## Small POST (11-byte answer)", "",
          "| target | p50 1 client | p99 1 client | req/s 1 client | p50 8 clients | p99 8 clients | req/s 8 clients | req/s vs direct (1 / 8) |",
          "|---|---|---|---|---|---|---|---|"]
    d = r["small"]["direct"]
    for n in names:
        s = r["small"][n]
        L.append(f"| {n} | {s['p50_1']:.3f} ms | {s['p99_1']:.3f} ms | {s['rps_1']:.0f} | "
                 f"{s['p50_8']:.3f} ms | {s['p99_8']:.3f} ms | {s['rps_8']:.0f} | "
                 f"{ratio(s['rps_1'], d['rps_1'])} / {ratio(s['rps_8'], d['rps_8'])} |")
    b = r["small"]["broker"]
    L += ["", f"Broker: added p50 at 1 client **{b['p50_1'] - d['p50_1']:.3f} ms** over direct; "
          f"CPU per proxied request **{r['broker_cpu_ms_per_request']:.3f} ms** (worker process "
          "CPU time / requests served).", ""]
    L += [f"## Throughput, {r['big_mib']} MiB bodies (MB/s)", "",
          "| transfer | " + " | ".join(names) + " | broker vs direct | nginx vs direct |",
          "|---|" + "---|" * (len(names) + 2)]
    for key, v in r["throughput"].items():
        L.append(f"| {key} | " + " | ".join(f"{v[n]:.0f}" for n in names) +
                 f" | {ratio(v['broker'], v['direct'])} | "
                 f"{ratio(v['nginx'], v['direct']) if 'nginx' in v else '-'} |")
    L += ["", "## Streaming fidelity (20 NDJSON lines, 50 ms apart)", "",
          "| target | time to first line | median line delay | worst line delay |", "|---|---|---|---|"]
    for n in names:
        s = r["stream"][n]
        L.append(f"| {n} | {s['first_ms']:.2f} ms | {s['median_ms']:.2f} ms | {s['worst_ms']:.2f} ms |")
    h, st = r["handoff"], r["status_full"]
    L += ["", "## The GPU lock", "",
          f"- Lock hand-off, 16 jobs queued on a 50 ms upstream ({h['n']} gaps between one job's "
          f"end at the upstream and the next job's start there): p50 **{h['p50_ms']:.2f} ms**, "
          f"p99 **{h['p99_ms']:.2f} ms**. The same 16 jobs sent back to back by one client "
          f"straight to the upstream: p50 {h['direct_p50_ms']:.2f} ms, p99 "
          f"{h['direct_p99_ms']:.2f} ms; the broker's share is the difference, p50 "
          f"**{h['p50_ms'] - h['direct_p50_ms']:.2f} ms**.",
          f"- `/v1/status` with a full queue (32 waiting, at least {st['min_depth']} throughout): "
          f"p50 {st['p50_ms']:.2f} ms, p99 **{st['p99_ms']:.2f} ms**.",
          f"- The next job on the full queue: {st['refused']} in {st['refuse_ms']:.1f} ms, "
          f"Retry-After {st['retry_after']}.",
          f"- `/audio/*` (no lock): 16 concurrent 16 MiB downloads took "
          f"{r['audio']['broker']:.2f} s through the broker, {r['audio']['direct']:.2f} s direct "
          f"({ratio(r['audio']['broker'], r['audio']['direct'])}).", ""]
    m = r["memory"]
    L += ["## Memory (broker worker)", "",
          f"- Peak RSS over the whole run: **{m['peak_mib']:.0f} MiB**.",
          f"- RSS before the large transfers {m['rss_before_big_mib']:.0f} MiB; before a 1 GiB "
          f"download {m['rss_before_1g_mib']:.0f} MiB, after it {m['rss_after_1g_mib']:.0f} MiB.", ""]
    s = r["storm"]
    L += [f"## OOM storm: {s['n']} concurrent mixed jobs, simulated 24 GiB GPU", "",
          "| sent | completed | simulated OOMs | most jobs at once | makespan | evictions |",
          "|---|---|---|---|---|---|"]
    for k in ("direct", "broker"):
        v = s[k]
        L.append(f"| {k} | {v['completed']}/{s['n']} | {v['ooms']} | {v['max_concurrent']} | "
                 f"{v['makespan_s']:.1f} s | {v['evictions']} |")
    return "\n".join(L) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller bodies, one repetition")
    p.add_argument("--out", default=str(ROOT / "bench/RESULTS.md"))
    args = p.parse_args()
    results = run(args.quick)
    text = report(results, "make bench" + ("-quick" if args.quick else ""))
    out = Path(args.out)
    # make soak writes its own section of this file; a new run keeps it.
    before = out.read_text() if out.exists() else ""
    if "## Soak" in before:
        text += "\n" + before[before.index("## Soak"):]
    out.write_text(text)
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
