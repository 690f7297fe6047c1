"""Starting the broker: gunicorn settings, refusals, the console script."""

import os
import subprocess
import sys

import requests
import yaml

from conftest import ROOT, BrokerProcess, free_port, sim_config


def test_two_workers_are_refused_with_the_reason(sim, tmp_path):
    b = BrokerProcess(sim_config(sim), tmp_path, ["--workers", "2"])
    try:
        assert b.proc.wait(20) != 0
        log = b.log()
        assert "refusing to start with 2 workers" in log and "GPU" in log
    finally:
        b.stop()


def test_a_bad_config_stops_gunicorn_and_lists_every_problem(tmp_path):
    b = BrokerProcess({"routes": {"tts": "ghost"}, "consumers": {"a": {"url": "nope"}}},
                      tmp_path)
    try:
        assert b.proc.wait(20) != 0
        log = b.log()
        assert "routes.tts: expected the name of a consumer" in log
        assert "consumers.a.url: expected an http:// or https:// URL" in log
        assert "consumers.a.vram_resident_mib" in log
    finally:
        b.stop()


def test_gunicorn_conf_derives_threads_from_the_queue(sim, tmp_path):
    cfg = sim_config(sim)
    cfg["scheduler"]["max_queue"] = 20
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-c", "from mgpumanager import gunicorn_conf as g; "
         "print(g.workers, g.worker_class, g.threads, g.bind)"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MGPUMANAGER_CONFIG": str(path)})
    assert out.stdout.split() == ["1", "mgpumanager.worker.BrokerWorker", str(20 + 21),
                                 "['127.0.0.1:8770']"]


def test_serve_command_runs_gunicorn_on_the_given_config_and_address(sim, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(sim_config(sim)))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mgpumanager.cli", "serve", "--config",
                             str(path), "--bind", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        b = BrokerProcess.__new__(BrokerProcess)
        b.port, b.proc = port, proc
        b.log = lambda: "(serve output not captured)"
        b.wait_ready()
        assert requests.get(b.url + "/v1/status").json()["broker"]["config"] == str(path)
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_demo_serves_and_drives_traffic_then_stops_cleanly():
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "mgpumanager.cli", "demo", "--bind",
                          f"127.0.0.1:{port}", "--duration", "8", "--any-ports"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"the broker is at http://127.0.0.1:{port}/" in out.stdout
    rounds = [ln for ln in out.stdout.splitlines() if "round 1:" in ln]
    assert len(rounds) == 4 and all("-> 200" in ln for ln in rounds), out.stdout
    assert "eviction victim=" in out.stderr          # it shows eviction, not only routing
