"""Fixtures: simulated consumers on loopback and a broker per test.

Each test gets fresh simulated servers (threads in this process, on free
ports, so the test can look at what reached them) and, where it talks to
the broker, a broker of its own on a port of its own, in one of two tiers:

- by default, ``create_app`` in this process behind a threaded WSGI server
  (the whole HTTP contract, real sockets, no process to start);
- for tests marked ``gunicorn`` (what the worker class, the master and
  signals do: head gathering, lingering closes, SIGHUP, SIGTERM, a second
  worker), a fresh gunicorn process running a config written for it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from werkzeug.serving import WSGIRequestHandler, make_server

from mgpumanager.app import EXTENSION, create_app

from mgpumanager.sim import start_cluster
from mgpumanager.sim.echo import EchoServer

ROOT = Path(__file__).resolve().parent.parent
# Simulated work runs at this fraction of the demo's pace: a TTS job takes
# 30 ms, an image renders in 150 ms.
TIME_SCALE = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def background(fn, *args):
    """Run ``fn`` on a thread; (thread, out), out["result"] or out["error"] when done."""
    out = {}

    def run():
        try:
            out["result"] = fn(*args)
        except Exception as e:        # surfaced by the test's assertions
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def hold_gpu(broker):
    """Start a GPU job that streams one line and then waits for echo.release."""
    r = requests.post(broker.url + "/upstream/echo/hold", stream=True, timeout=30)
    r.lines = r.iter_lines()      # kept: a dropped iterator closes the connection
    assert next(r.lines) == b"first"
    return r


def queued_depth(broker) -> int:
    return broker.status()["scheduler"]["queue_depth"]


def wait_idle(cluster, timeout: float = 30) -> None:
    """Until the simulated ComfyUI has no render running."""
    wait_until(lambda: not cluster.comfyui.busy, timeout, "the last render")


def read_until_closed(sock, enough=lambda data: False) -> bytes:
    """What the peer sends until it closes, resets, times out, or ``enough(data)``."""
    data = b""
    while not enough(data):
        try:
            more = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not more:
            break
        data += more
    return data


def raw_exchange(port: int, request: bytes, *, half_close: bool = False,
                 timeout_s: float = 10) -> bytes:
    """Send raw request bytes and read until the broker closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return read_until_closed(s)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="no chromium here")


@contextlib.contextmanager
def chromium():
    """Headless Chromium (Debian's, driven by Playwright), closed after."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield browser
        finally:
            browser.close()


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture(autouse=True)
def own_gpu_lock_file(tmp_path, monkeypatch):
    """Each test's brokers share a GPU lock file of their own, so that tests
    running in parallel do not wait for each other's GPU jobs."""
    monkeypatch.setenv("MGPUMANAGER_LOCK_FILE", str(tmp_path / "gpu.lock"))


@pytest.fixture
def sim():
    cluster = start_cluster(24576, time_scale=TIME_SCALE)
    yield cluster
    cluster.stop()


@pytest.fixture
def echo():
    server = EchoServer().start()
    yield server
    server.release.set()
    server.stop()


def sim_config(sim, echo=None) -> dict:
    """The demo's layout, pointed at this test's simulated servers."""
    c = sim.consumers
    cfg = {
        "gpu": {"backend": "sim", "sim_url": sim.gpu_server.url, "cushion_mib": 256,
                "sample_interval_s": 0.5},
        # Every live broker probes each consumer this often: at 0.2 s the
        # probes alone were a sixth of the suite's CPU.
        "health": {"interval_s": 0.5, "timeout_s": 1},
        "scheduler": {"max_queue": 48, "queue_timeout_s": 30, "evict_settle_s": 2,
                      "busy_poll_s": 0.02},
        # cut_hold_s: the echo upstream never lets go of a hung-up answer (it
        # waits for echo.release), so a test that lets go of hold_gpu() by
        # hanging up would wait out the whole bound.
        "proxy": {"connect_timeout_s": 2, "read_timeout_s": 10, "cut_hold_s": 0.3},
        "routes": {"tts": "mvoice", "stt": "whisper", "llm": "ollama", "image": "comfyui"},
        "audio_proxy": "mvoice",
        "consumers": {
            "mvoice": {"url": c["mvoice"].url, "health": "/health", "paths": {"tts": "/api/tts"},
                       "vram_resident_mib": 3200, "can_coexist_with": ["ollama", "whisper"],
                       "load": {"path": "/api/admin/load"},
                       "unload": {"path": "/api/admin/unload"}},
            "whisper": {"url": c["whisper"].url, "health": "/health",
                        "paths": {"stt": "/inference"}, "vram_resident_mib": 1800,
                        "can_coexist_with": ["comfyui"]},
            "ollama": {"url": c["ollama"].url, "health": "/api/version",
                       "paths": {"llm": "/api/generate"}, "vram_resident_mib": 8000,
                       "vram_managed": True},
            "comfyui": {"url": c["comfyui"].url, "health": "/system_stats",
                        "paths": {"image": "/prompt"}, "vram_resident_mib": 13500,
                        "unload": {"path": "/free",
                                   "json": {"unload_models": True, "free_memory": True}},
                        "busy": {"path": "/queue", "keys": ["queue_running", "queue_pending"]},
                        "gpu_routes": ["POST /prompt"]},
        },
    }
    if echo is not None:
        cfg["routes"]["echo"] = "echo"
        cfg["consumers"]["echo"] = {"url": echo.url, "health": "/health",
                                    "paths": {"echo": "/echo"}, "vram_resident_mib": 0,
                                    "can_coexist_with": ["mvoice", "whisper", "ollama", "comfyui"]}
    return cfg


_serial = itertools.count(1)


class _BrokerUnderTest:
    port: int | None
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, *names: str, timeout_s: float = 10) -> dict:
        """Until every named consumer has passed a health probe."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if all(status["consumers"][n]["healthy"] for n in names):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy in time: {status['consumers']}")
            time.sleep(0.05)

    def status(self) -> dict:
        r = requests.get(self.url + "/v1/status", timeout=5)
        r.raise_for_status()
        return r.json()


class _ClosedOnce:
    """An answer's iterable whose close() runs once, whoever calls it."""

    def __init__(self, answer):
        self.answer = answer
        self.closed = False

    def __iter__(self):
        return iter(self.answer)

    def close(self):
        if not self.closed:
            self.closed = True
            getattr(self.answer, "close", lambda: None)()


def _closing(app):
    def serve(environ, start_response):
        environ["tests.answer"] = answer = _ClosedOnce(app(environ, start_response))
        return answer
    return serve


class _Handler(WSGIRequestHandler):
    """Werkzeug's handler with the client socket in the environ (as gunicorn
    puts it there, for the broker's hang-up check), no access log, and the
    answer closed however the exchange ends: Werkzeug skips close() when the
    client resets the connection after the last chunk, where gunicorn and
    the WSGI spec do not (the GPU job ends in close())."""

    def make_environ(self):
        self._environ = environ = super().make_environ()
        environ["gunicorn.socket"] = self.connection
        return environ

    def run_wsgi(self):
        try:
            super().run_wsgi()
        finally:
            answer = getattr(self, "_environ", {}).get("tests.answer")
            if answer is not None:
                answer.close()

    def log_request(self, *args, **kwargs):
        pass


class InProcessBroker(_BrokerUnderTest):
    """The broker's app in this process, behind a threaded WSGI server on
    port 0: the same views, core and sockets as under gunicorn, started in
    milliseconds."""

    def __init__(self, config: dict, tmp_path: Path):
        n = next(_serial)
        self.config_path = tmp_path / f"broker-{n}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / f"broker-{n}.log"
        self.app = create_app(str(self.config_path))
        self.broker = self.app.extensions[EXTENSION]
        logger = logging.getLogger("mgpumanager")
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(logger.handlers[0].formatter if logger.handlers else None)
        logger.handlers[:] = [self._handler]
        self.server = make_server("127.0.0.1", 0, _closing(self.app), threaded=True,
                                  request_handler=_Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def wait_ready(self, timeout_s: float = 30) -> "InProcessBroker":
        return self

    def worker_pid(self) -> int:
        return os.getpid()

    def log(self) -> str:
        self._handler.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.server.shutdown()
        self.broker.stop()
        self.server.server_close()
        logging.getLogger("mgpumanager").removeHandler(self._handler)
        self._handler.close()


class BrokerProcess(_BrokerUnderTest):
    """A gunicorn serving the broker on its own port, for one test."""

    def __init__(self, config: dict, tmp_path: Path, extra_args: list[str] = ()):
        n = next(_serial)
        self.port: int | None = None      # gunicorn binds port 0; wait_ready reads which
        self.config_path = tmp_path / f"broker-{n}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / f"broker-{n}.log"
        env = dict(os.environ, MGPUMANAGER_CONFIG=str(self.config_path), PYTHONUNBUFFERED="1",
                   MALLOC_ARENA_MAX="1")
        env.pop("GUNICORN_CMD_ARGS", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
             "--bind", "127.0.0.1:0", "--no-control-socket", *extra_args],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30) -> "BrokerProcess":
        """Until the worker answers /healthz. gunicorn listens before its
        worker has booted, so a slow start (a busy machine) shows as a
        timeout or a refusal here, never as a failure."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited {self.proc.returncode}:\n{self.log()}")
            if self.port is None:
                found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())
                if found:
                    self.port = int(found.group(1))
            if self.port is not None:
                try:
                    if requests.get(self.url + "/healthz", timeout=2).ok:
                        return self
                except requests.RequestException:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer within {timeout_s} s:\n{self.log()}")

    def worker_pid(self) -> int:
        return self.status()["broker"]["pid"]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_broker(request, tmp_path):
    """Start a broker on ``config``: in this process, or under gunicorn
    for a test marked ``gunicorn``."""
    under_gunicorn = request.node.get_closest_marker("gunicorn") is not None
    started: list = []

    def start(config: dict, *, extra_args: list[str] = (), ready: bool = True):
        if under_gunicorn:
            b = BrokerProcess(config, tmp_path, list(extra_args))
        else:
            assert not extra_args, "gunicorn arguments need a test marked gunicorn"
            b = InProcessBroker(config, tmp_path)
        started.append(b)
        return b.wait_ready() if ready else b

    yield start
    for b in started:             # all at once: each waits out its lingering clients
        if isinstance(b, BrokerProcess) and b.proc.poll() is None:
            b.proc.send_signal(signal.SIGTERM)
    for b in started:
        b.stop()


@pytest.fixture
def broker_with(sim, echo, start_broker):
    """Start a broker whose config is the tests' default with ``overrides``
    merged in (``{"scheduler": {"max_queue": 3}}``), once all are healthy."""
    def start(overrides: dict | None = None) -> BrokerProcess:
        cfg = deep_merge(sim_config(sim, echo), overrides or {})
        b = start_broker(cfg)
        b.wait_healthy(*cfg["consumers"])
        return b
    return start


@pytest.fixture
def broker(broker_with):
    """The broker in front of the simulated consumers and the echo upstream."""
    return broker_with()
