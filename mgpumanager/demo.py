"""``mgpumanager demo``: simulated consumers, the broker under gunicorn, and a
little mixed traffic, so that a newcomer with no GPU sees routing, queueing
and eviction on the status page within a minute."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import requests
import yaml

from .config import CONFIG_ENV, load_config
from .sim import start_cluster
from .sim.traffic import send_job

DEMO_CONFIG = str(resources.files("mgpumanager") / "demo.yaml")


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the broker exited with status {proc.returncode}")
        try:
            if requests.get(url + "/healthz", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the broker did not answer on {url} within {timeout_s:g} s")


def _drive(base: str, stop: threading.Event) -> None:
    order = ["image", "tts", "llm", "stt"]
    for round_no in itertools.count(1):
        threads = []
        for kind in order:
            def run(kind=kind, round_no=round_no):
                t0 = time.monotonic()
                try:
                    r = send_job(base, kind)
                    n = len(r.content)
                    print(f"  round {round_no}: {kind:5s} -> {r.status_code} ({n} bytes, "
                          f"{time.monotonic() - t0:.1f} s)", flush=True)
                except requests.RequestException as e:
                    if not stop.is_set():     # at Ctrl-C the broker stops under it: no noise
                        print(f"  round {round_no}: {kind:5s} -> {e}", flush=True)
            t = threading.Thread(target=run, daemon=True)
            t.start()
            threads.append(t)
            time.sleep(0.15)          # arrival order: image first, so TTS must evict it
        for t in threads:
            t.join()
        order = order[1:] + order[:1]
        if stop.wait(3.0):
            return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The simulated cards: one of 24 GiB; for ``demo --gpus 2`` a 12 GiB one
# and a 16 GiB one, and who runs on the second.
ONE_GPU_MIB = 24576
TWO_GPUS_MIB = (12288, 16384)
ON_SECOND_GPU = ("comfyui",)


def config_on_free_ports(workdir: str, text: str | None = None) -> str:
    """A copy of the demo's config with every simulated service on a port
    the kernel says is free now (a busy machine may hold the fixed ones)."""
    text = Path(DEMO_CONFIG).read_text() if text is None else text
    cfg = load_config(DEMO_CONFIG)
    fixed = {urlsplit(c.url).port for c in cfg.consumers.values()}
    fixed.add(urlsplit(cfg.gpu.sim_url).port)
    for port in fixed:
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    path = os.path.join(workdir, "demo.yaml")
    Path(path).write_text(text)
    return path


def two_gpu_config() -> str:
    """The demo's config on two simulated cards: ComfyUI alone on the second,
    the rest sharing the first, 12 GiB, where they still swap."""
    data = yaml.safe_load(Path(DEMO_CONFIG).read_text())
    data["gpus"] = [{"index": 0}, {"index": 1}]
    for name, consumer in data["consumers"].items():
        consumer["gpu"] = 1 if name in ON_SECOND_GPU else 0
        consumer["can_coexist_with"] = [   # across cards, it says nothing
            o for o in consumer.get("can_coexist_with", [])
            if (o in ON_SECOND_GPU) == (name in ON_SECOND_GPU)]
    return "# mgpumanager demo --gpus 2\n" + yaml.safe_dump(data, sort_keys=False)


def run_demo(bind: str = "127.0.0.1:8770", traffic: bool = True,
             duration_s: float | None = None, any_ports: bool = False, gpus: int = 1) -> int:
    workdir = tempfile.mkdtemp(prefix="mgpumanager-demo-")
    text = two_gpu_config() if gpus == 2 else None
    if any_ports:
        config_path = config_on_free_ports(workdir, text)
    elif text is not None:
        config_path = os.path.join(workdir, "demo.yaml")
        Path(config_path).write_text(text)
    else:
        config_path = DEMO_CONFIG
    cfg = load_config(config_path)
    ports = {name: urlsplit(c.url).port for name, c in cfg.consumers.items()}
    ports["gpu"] = urlsplit(cfg.gpu.sim_url).port
    first, *more = TWO_GPUS_MIB if gpus == 2 else (ONE_GPU_MIB,)
    try:
        cluster = start_cluster(first, ports=ports, ollama_keep_alive_s=60,
                                more_gpus_mib=tuple(more),
                                placement={n: 1 for n in ON_SECOND_GPU} if more else None)
    except OSError as e:
        print(f"mgpumanager demo: cannot start the simulated consumers on ports "
              f"{sorted(ports.values())}: {e}", file=sys.stderr)
        return 1
    env = dict(os.environ, **{CONFIG_ENV: config_path})
    env.setdefault("MALLOC_ARENA_MAX", "1")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                             "python:mgpumanager.gunicorn_conf", "--bind", bind], env=env)
    base = f"http://{bind}"
    stop = threading.Event()
    try:
        wait_ready(base, proc)
        print(f"\nmgpumanager demo: the broker is at {base}/  (status page)\n"
              f"  JSON: {base}/v1/status   metrics: {base}/metrics   events: {base}/v1/events\n"
              f"  try:  curl -sf {base}/v1/tts -d '{{\"text\": \"hi\"}}' -o hi.wav\n"
              f"  simulated consumers: "
              + ", ".join(f"{n} {s.url}" for n, s in cluster.consumers.items())
              + "\n  Ctrl-C stops it.\n", flush=True)
        if traffic:
            threading.Thread(target=_drive, args=(base, stop), daemon=True).start()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while proc.poll() is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
        return 0 if proc.poll() in (None, 0) else 1
    except KeyboardInterrupt:
        print("\nmgpumanager demo: stopping", flush=True)
        return 0
    except RuntimeError as e:
        print(f"mgpumanager demo: {e}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
