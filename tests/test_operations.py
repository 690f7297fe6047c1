"""Running it for years: slow and lingering clients, reloads, a second
worker or broker, and a graceful stop, each through a real gunicorn."""

import signal
import socket
import threading
import time

import pytest
import requests
import yaml

from conftest import read_until_closed, sim_config, wait_until

# Signals, reloads, the master and the worker class: gunicorn itself.
pytestmark = pytest.mark.gunicorn

TTS = {"json": {"text": "hi"}}




def status_time(b) -> float:
    t0 = time.monotonic()
    assert requests.get(b.url + "/v1/status", timeout=5).ok
    return time.monotonic() - t0


def test_slow_headers_cannot_starve_the_status_page(broker_with):
    b = broker_with({"scheduler": {"max_queue": 2}, "server": {"threads": 7},
                     "proxy": {"client_timeout_s": 30}})
    socks = []
    for _ in range(2 * 7):            # twice the threads, each trickling its head
        s = socket.create_connection(("127.0.0.1", b.port))
        s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: localhost\r\n")
        socks.append(s)
    time.sleep(0.3)
    for s in socks:
        s.sendall(b"X-Slow: 1\r\n")
    times = [status_time(b) for _ in range(5)]
    # Starved, a status call would wait out client_timeout_s (30 s); a busy
    # machine alone can stall one for a second.
    assert max(times) < 5.0, times
    assert requests.get(b.url + "/healthz", timeout=5).ok
    for s in socks:
        s.close()


def test_a_pipelined_partial_head_cannot_pin_a_thread(broker_with):
    """A whole request and, in the same packet, the start of a second head
    that never ends: gunicorn handed the read-ahead straight to a thread,
    which blocked on the rest; threads + 2 such sockets left /healthz
    unanswered."""
    b = broker_with({"scheduler": {"max_queue": 2}, "server": {"threads": 7},
                     "proxy": {"client_timeout_s": 2}})
    socks = []
    for _ in range(7 + 2):
        s = socket.create_connection(("127.0.0.1", b.port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
                  b"GET /healthz HTTP/1.1\r\nHost: loc")
        socks.append(s)
    for s in socks:
        s.settimeout(5)
        answer = read_until_closed(s, lambda data: data.endswith(b"}\n"))
        assert answer.startswith(b"HTTP/1.1 200"), answer
    times = [status_time(b) for _ in range(3)]
    assert max(times) < 1.0, times
    for s in socks:                            # and each is closed at client_timeout_s
        s.settimeout(6)
        assert s.recv(4096) == b""
    for s in socks:
        s.close()


def test_an_incomplete_head_is_closed_after_client_timeout_s(broker_with):
    b = broker_with({"proxy": {"client_timeout_s": 1}})
    s = socket.create_connection(("127.0.0.1", b.port))
    s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n")
    s.settimeout(5)
    t0 = time.monotonic()
    assert s.recv(100) == b""                 # closed, without a thread ever waiting
    assert 0.9 < time.monotonic() - t0 < 4
    s.close()


def test_a_bare_lf_head_is_answered_400_at_once_and_a_huge_one_431(broker_with):
    from conftest import raw_exchange
    b = broker_with()
    t0 = time.monotonic()
    assert raw_exchange(b.port, b"GET /healthz HTTP/1.0\n\n").startswith(b"HTTP/1.1 400")
    assert time.monotonic() - t0 < 3
    huge = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X-Pad: " + b"p" * 70_000
    assert raw_exchange(b.port, huge).startswith(b"HTTP/1.1 431")
    assert status_time(b) < 1.0


def test_clients_that_linger_after_connection_close_do_not_stall_others(broker_with):
    b = broker_with()
    lingering = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", b.port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        lingering.append(s)                    # read nothing, close nothing
    time.sleep(0.2)
    times = [status_time(b) for _ in range(10)]
    assert max(times) < 1.0, times
    for s in lingering:
        s.close()


def test_a_reload_with_a_broken_config_keeps_the_old_one_serving_and_says_why(broker_with):
    """A typo and SIGHUP: the new worker exited 3, gunicorn halted, and the
    master exited with it; the error was only in the log."""
    b = broker_with()
    good = b.config_path.read_text()
    old_pid = b.worker_pid()
    b.config_path.write_text(good.replace("max_queue:", "max_queu:"))
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: b.worker_pid() != old_pid, 20, "the new worker")
    assert b.proc.poll() is None
    st = b.status()
    assert "scheduler.max_queu" in st["broker"]["config_error"]
    health = requests.get(b.url + "/healthz", timeout=5)
    assert health.status_code == 200 and "max_queu" in health.json()["warnings"][0]
    assert requests.post(b.url + "/v1/tts", timeout=30, **TTS).status_code == 200
    assert "config reload FAILED" in b.log()
    # Mended, and reloaded again: the warning is gone.
    b.config_path.write_text(good)
    pid = b.worker_pid()
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: b.worker_pid() != pid, 20, "the next worker")
    assert b.status()["broker"]["config_error"] is None
    assert requests.get(b.url + "/healthz", timeout=5).json() == {"ok": True}


def test_a_reload_by_hup_during_a_stream_loses_nothing_and_overlaps_nothing(broker_with,
                                                                            sim, echo):
    b = broker_with()
    old_pid = b.worker_pid()
    held = requests.post(b.url + "/upstream/echo/hold", stream=True, timeout=30)
    lines = held.iter_lines()
    assert next(lines) == b"first"
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: b.worker_pid() != old_pid, 20, "the new worker")
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        requests.post(b.url + "/v1/tts", timeout=30, **TTS).status_code)) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert sim.mvoice.requests_to("/api/tts") == [], "the new worker ran beside the old one's job"
    st = b.status()
    assert st["scheduler"]["lock_file"]["holder_pid"] == old_pid
    echo.release.set()
    assert list(lines) == [b"last"]
    held.close()
    for t in threads:
        t.join(30)
    assert results == [200, 200, 200]
    assert sim.gpu.max_concurrent == 1 and sim.gpu.ooms == 0


def mixed_storm(urls, n=12):
    payload = {"tts": TTS, "image": {"json": {"prompt": {"1": {}}}},
               "llm": {"json": {"prompt": "x", "options": {"num_predict": 2}}}}
    kinds = ["tts", "image", "llm"] * (n // 3)
    out = []

    def send(i, kind):
        url = urls[i % len(urls)]
        out.append(requests.post(f"{url}/v1/{kind}", timeout=60, **payload[kind]).status_code)
    threads = [threading.Thread(target=send, args=(i, k)) for i, k in enumerate(kinds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return out


def test_a_second_worker_by_ttin_never_runs_a_gpu_job_beside_the_first(broker_with, sim):
    b = broker_with()
    b.proc.send_signal(signal.SIGTTIN)
    pids = set()
    deadline = time.monotonic() + 20
    while len(pids) < 2:                       # both workers answer
        pids.add(b.worker_pid())
        assert time.monotonic() < deadline, pids
    sim.gpu.reset_counters()
    statuses = mixed_storm([b.url])
    assert statuses == [200] * len(statuses)
    wait_until(lambda: not sim.comfyui.busy, 20, "the renders")
    assert sim.gpu.max_concurrent == 1 and sim.gpu.ooms == 0, sim.gpu.oom_log


def test_two_brokers_on_one_box_share_one_gpu_lock(sim, start_broker, tmp_path):
    cfg = sim_config(sim)
    cfg["scheduler"]["lock_file"] = str(tmp_path / "shared.lock")
    a = start_broker(cfg)
    b = start_broker(cfg)
    a.wait_healthy(*cfg["consumers"])
    b.wait_healthy(*cfg["consumers"])
    sim.gpu.reset_counters()
    statuses = mixed_storm([a.url, b.url])
    assert statuses == [200] * len(statuses)
    wait_until(lambda: not sim.comfyui.busy, 20, "the renders")
    assert sim.gpu.max_concurrent == 1 and sim.gpu.ooms == 0, sim.gpu.oom_log


def test_a_broker_whose_beliefs_another_changed_asks_again_instead_of_running_into_an_oom(
        sim, start_broker, tmp_path):
    """B loads ComfyUI; A unloads it and fills the GPU with the others. B's
    next image job found ComfyUI "resident" by its own stale belief, made no
    room, and the render ran out of memory: B's turn after A's now makes
    every belief it can ask again possibly loaded."""
    cfg = sim_config(sim)
    cfg["scheduler"]["lock_file"] = str(tmp_path / "shared.lock")
    a, b = start_broker(cfg), start_broker(cfg)
    a.wait_healthy(*cfg["consumers"])
    b.wait_healthy(*cfg["consumers"])
    image = {"json": {"prompt": {"1": {}}}}
    assert requests.post(b.url + "/v1/image", timeout=30, **image).ok
    wait_until(lambda: not sim.comfyui.busy, 20, "the render")
    assert requests.post(a.url + "/v1/consumers/comfyui/unload", timeout=30).ok
    assert requests.post(a.url + "/v1/tts", timeout=30, **TTS).ok
    assert requests.post(a.url + "/v1/llm", timeout=30,
                         json={"prompt": "x", "options": {"num_predict": 2}}).ok
    assert not sim.comfyui.loaded and sim.ollama.loaded and sim.mvoice.loaded
    r = requests.post(b.url + "/v1/image", timeout=30, **image)
    assert r.ok, r.text
    wait_until(lambda: not sim.comfyui.busy, 20, "the render")
    assert sim.gpu.ooms == 0, sim.gpu.oom_log
    assert any(e["type"] == "beliefs_reset"
               for e in requests.get(b.url + "/v1/events").json()["events"])


def test_sigterm_finishes_the_running_job_and_answers_the_queue(start_broker, sim, echo):
    cfg = sim_config(sim, echo)
    b = start_broker(cfg, extra_args=["--graceful-timeout", "8"])
    b.wait_healthy(*cfg["consumers"])
    held = requests.post(b.url + "/upstream/echo/hold", stream=True, timeout=30)
    lines = held.iter_lines()
    assert next(lines) == b"first"
    queued = []
    threads = [threading.Thread(target=lambda: queued.append(
        requests.post(b.url + "/v1/echo", data=b"q", timeout=30))) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: b.status()["scheduler"]["queue_depth"] == 3, what="three queued jobs")
    t0 = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    with socket.socket() as late:     # a new connection is refused, not left in the backlog
        late.settimeout(2)
        t1 = time.monotonic()
        try:
            late.connect(("127.0.0.1", b.port))
            late.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert late.recv(100) == b""
        except (ConnectionRefusedError, ConnectionResetError):
            pass
        assert time.monotonic() - t1 < 1.5
    for t in threads:                 # the queue is refused 2 s before the 8 s are up
        t.join(15)
    refused_after = time.monotonic() - t0
    assert [r.status_code for r in queued] == [503] * 3
    for r in queued:
        assert r.json()["error"]["code"] == "shutting_down" and int(r.headers["Retry-After"]) > 0
    assert 4 < refused_after < 7.5, refused_after
    echo.release.set()                # the running job still ends normally
    assert list(lines) == [b"last"]
    held.close()
    assert echo.requests_to("/echo") == []
    b.proc.wait(15)
    assert time.monotonic() - t0 < 12


def test_a_stop_with_jobs_in_flight_or_idle_is_clean(start_broker, sim):
    """OSError EINVAL from listener.accept() (its read side shut while the
    event loop could still accept) in 6 of 12 stops, the worker exiting 255;
    AttributeError from refuse_new_if_stopping after the listeners closed."""
    cfg = sim_config(sim)
    for busy in (True, False, True, False):
        b = start_broker(cfg, extra_args=["--graceful-timeout", "3"])
        def client():
            try:
                requests.post(b.url + "/v1/tts", timeout=10, **TTS)
            except requests.RequestException:
                pass                      # refused or cut by the stop: that is allowed
        clients = [threading.Thread(target=client, daemon=True) for _ in range(4 if busy else 0)]
        for t in clients:
            t.start()
        b.proc.send_signal(signal.SIGTERM)
        # New connections keep arriving while it stops.
        for _ in range(20):
            try:
                socket.create_connection(("127.0.0.1", b.port), timeout=0.2).close()
            except OSError:
                pass
            time.sleep(0.01)
        assert b.proc.wait(15) == 0
        for t in clients:
            t.join(10)
        log = b.log()
        assert "Traceback" not in log and "Errno 22" not in log, log[-3000:]


def test_idle_connections_at_the_cap_make_room_for_a_real_client(start_broker, sim):
    """1000 idle connections filled worker_connections and the broker was
    unreachable until they timed out; an attacker just reconnects."""
    b = start_broker(sim_config(sim), extra_args=["--worker-connections", "30"])
    idle = []
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", b.port))
        if i % 2:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: local")     # a head never finished
        idle.append(s)
    t0 = time.monotonic()
    assert requests.get(b.url + "/healthz", timeout=10).ok
    assert time.monotonic() - t0 < 3
    for s in idle:
        s.close()


def test_long_streams_that_are_no_gpu_job_cannot_take_every_thread(broker_with, echo):
    """NDJSON streams through /upstream/ could take every thread: threads =
    max_queue + 9 did not count them, and /healthz went unanswered."""
    b = broker_with({"scheduler": {"max_queue": 2}, "server": {"max_streams": 3}})
    held = [requests.get(b.url + "/upstream/echo/hold", stream=True, timeout=30)
            for _ in range(3)]
    lines = [r.iter_lines() for r in held]
    for it in lines:
        assert next(it) == b"first"
    refused = requests.get(b.url + "/upstream/echo/hold", timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_streams"
    assert refused.headers["Retry-After"] == "1"
    assert status_time(b) < 1.0
    echo.release.set()
    for r, it in zip(held, lines):
        assert list(it) == [b"last"]
        r.close()
    wait_until(lambda: requests.get(b.url + "/upstream/echo/small", timeout=5).ok,
               what="a stream slot to come free")


def test_a_reload_during_a_render_does_not_start_the_next_job_before_it_ends(broker_with, sim):
    """The old worker held the GPU for ComfyUI's render, exited while it ran,
    and the new worker's TTS job started 8 ms before the render ended."""
    sim.comfyui.render_s = 20          # 2 s at the tests' pace
    b = broker_with()
    old_pid = b.worker_pid()
    assert requests.post(b.url + "/v1/image", json={"prompt": {"1": {}}}, timeout=10).ok
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: b.worker_pid() != old_pid, 20, "the new worker")
    assert requests.post(b.url + "/v1/tts", timeout=30, **TTS).ok
    wait_until(lambda: not sim.comfyui.busy, 10, "the render to end")
    assert sim.gpu.overlaps() == [], sim.gpu.overlaps()


def test_reloads_that_would_fail_in_the_worker_or_come_fast_keep_the_broker(broker_with,
                                                                              tmp_path):
    """A config that parses but names an unusable lock file made the new
    worker exit 3 and gunicorn halt; so did HUPs faster than a worker boots
    (the copy it was to read was gone)."""
    b = broker_with()
    good = b.config_path.read_text()
    (tmp_path / "planted").symlink_to("/etc/hostname")
    cfg = yaml.safe_load(good)
    cfg["scheduler"]["lock_file"] = str(tmp_path / "planted")
    b.config_path.write_text(yaml.safe_dump(cfg))
    pid = b.worker_pid()
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: b.worker_pid() != pid, 20, "the new worker")
    assert "symbolic link" in b.status()["broker"]["config_error"]
    b.config_path.write_text(good)
    for _ in range(6):
        b.proc.send_signal(signal.SIGHUP)
        time.sleep(0.15)
    time.sleep(2)
    assert b.proc.poll() is None, b.log()[-2000:]

    def reloaded():
        try:                       # workers come and go meanwhile
            return b.status()["broker"]["config_error"] is None
        except requests.RequestException:
            return False
    wait_until(reloaded, 30, "a good reload")
    assert b.proc.poll() is None, b.log()[-2000:]
    wait_until(lambda: requests.post(b.url + "/v1/tts", timeout=30, **TTS).ok, 30,
               "a job on the reloaded broker")
