"""GPU leases for programs the broker does not proxy: POST /v1/leases and
`mgpumanager run -- CMD`, in the same queue as every GPU job."""

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from conftest import (background, deep_merge, hold_gpu, queued_depth, sim_config, wait_idle,
                      wait_until)
from mgpumanager.clock import Clock
from mgpumanager.config import ConfigError, parse_config
from mgpumanager.gpu import GpuReading
from mgpumanager.program_leases import ProgramLease, ProgramLeases
from mgpumanager.runner import EXIT_LEASE_ENDED, EXIT_REFUSED, EXIT_TRY_LATER

IMAGE = {"json": {"prompt": {"1": {}}}}


def running(b):
    return b.status()["scheduler"]["running"]


def mgpumanager_run(b, *args, env=None, **kw):
    """`mgpumanager run` against broker ``b``, as a child process."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "mgpumanager.cli", "run", "--url", b.url,
                             *args], env=env or dict(os.environ, MGPUMANAGER_TOKEN=""), **kw)


def finished(p, timeout=15) -> tuple[int, bytes]:
    """Its exit status and what it said on stderr."""
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def test_a_lease_makes_room_and_holds_the_gpu_until_deleted(broker, sim):
    assert requests.post(broker.url + "/v1/image", **IMAGE).ok
    wait_idle(sim)
    assert sim.comfyui.loaded
    r = requests.post(broker.url + "/v1/leases", json={"vram_mib": 20000, "label": "train"})
    assert r.status_code == 201, r.text
    lease = r.json()
    assert lease["evicted"] == ["comfyui"] and not sim.comfyui.loaded
    assert r.headers["Location"].endswith(f"/v1/leases/{lease['id']}")
    assert running(broker)["label"] == "lease:train" and running(broker)["kind"] == "lease"
    assert [x["id"] for x in broker.status()["leases"]] == [lease["id"]]
    # A job waits for it, in the same queue.
    thread, out = background(lambda: requests.post(broker.url + "/v1/tts", json={"text": "hi"}))
    wait_until(lambda: queued_depth(broker) == 1, what="the TTS job to queue")
    time.sleep(0.2)
    assert not sim.mvoice.requests_to("/api/tts")
    assert requests.delete(broker.url + f"/v1/leases/{lease['id']}").status_code == 204
    thread.join(10)
    assert out["result"].status_code == 200
    assert requests.delete(broker.url + f"/v1/leases/{lease['id']}").status_code == 404
    done = [e for e in requests.get(broker.url + "/v1/events").json()["events"]
            if e["type"] == "job" and e["kind"] == "lease"]
    assert done[-1]["label"] == "lease:train" and done[-1]["run_ms"] >= 200


def test_a_forgotten_lease_ends_at_its_ttl(broker):
    r = requests.post(broker.url + "/v1/leases", json={"ttl_s": 0.5})
    assert r.status_code == 201
    wait_until(lambda: running(broker) is None, timeout=3, what="the lease to end at its ttl")
    assert requests.get(broker.url + f"/v1/leases/{r.json()['id']}").status_code == 404


def test_a_lease_that_can_never_fit_is_refused_at_once(broker):
    t0 = time.monotonic()
    r = requests.post(broker.url + "/v1/leases", json={"vram_mib": 100_000})
    assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_vram"
    assert time.monotonic() - t0 < 5 and running(broker) is None


def test_a_lease_may_stay_beside_the_consumers_it_names(broker, sim):
    assert requests.post(broker.url + "/v1/tts", json={"text": "x"}).ok
    wait_idle(sim)
    r = requests.post(broker.url + "/v1/leases", json={"vram_mib": 1000, "coexist": ["mvoice"]})
    assert r.status_code == 201 and "mvoice" not in r.json()["evicted"]
    assert sim.mvoice.loaded
    requests.delete(broker.url + f"/v1/leases/{r.json()['id']}")


@pytest.mark.parametrize("body,says", [
    ({"vram_mib": -1}, "vram_mib"),
    ({"vram_mib": "8000"}, "vram_mib"),
    ({"vram_mib": 1.5}, "vram_mib"),
    ({"ttl_s": 0}, "ttl_s"),
    ({"ttl_s": 100_000}, "ttl_s: seconds in (0, 1800]"),
    ({"ttl_s": "1"}, "ttl_s"),
    ({"coexist": ["nobody"]}, "coexist"),
    ({"label": "x" * 65}, "label"),
    ({"vram": 1}, "unknown keys"),
    ([1], "JSON object"),
])
def test_bad_lease_requests_are_400_naming_what_was_expected(broker, body, says):
    r = requests.post(broker.url + "/v1/leases", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    assert says in r.json()["error"]["message"]
    assert running(broker) is None


def test_an_unknown_lease_is_404(broker):
    assert requests.delete(broker.url + "/v1/leases/nope").status_code == 404
    assert requests.get(broker.url + "/v1/leases/nope").json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("name", ["lease", "leases"])
def test_consumers_named_like_the_leases_are_refused(sim, name):
    cfg = sim_config(sim)
    cfg["consumers"][name] = cfg["consumers"].pop("mvoice")
    cfg["routes"]["tts"] = name
    with pytest.raises(ConfigError) as raised:
        parse_config(cfg)
    assert f"consumers.{name}" in str(raised.value)


# -- mgpumanager run, against the broker under gunicorn -------------------------------

@pytest.mark.gunicorn
def test_run_holds_a_lease_while_the_command_runs_and_passes_its_status(broker, sim):
    p = mgpumanager_run(broker, "--vram", "20000", "--label", "encode", "--",
                        sys.executable, "-c", "import os, sys; print(os.environ"
                        "['MGPUMANAGER_LEASE_ID']); import time; time.sleep(0.5); sys.exit(7)")
    wait_until(lambda: running(broker) is not None, what="the lease to be held")
    assert running(broker)["label"] == "lease:encode"
    out, err = p.communicate(timeout=15)
    assert p.returncode == 7, err
    assert len(out.strip()) == 16                  # the lease's id, in the command's environment
    wait_until(lambda: running(broker) is None, timeout=3, what="the lease to end")


@pytest.mark.gunicorn
def test_sigkill_of_the_wrapper_frees_the_gpu_within_seconds(broker):
    p = mgpumanager_run(broker, "--", "sleep", "30", start_new_session=True)
    wait_until(lambda: running(broker) is not None, what="the lease to be held")
    p.send_signal(signal.SIGKILL)
    p.wait(5)
    p.stdout.close()                               # the orphaned sleep holds them open
    p.stderr.close()
    t0 = time.monotonic()
    try:
        wait_until(lambda: running(broker) is None, timeout=3, what="the GPU to be free")
        assert time.monotonic() - t0 < 2.5
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)       # the orphaned sleep
        except ProcessLookupError:
            pass


@pytest.mark.gunicorn
def test_a_lease_that_ends_first_stops_the_command(broker):
    t0 = time.monotonic()
    p = mgpumanager_run(broker, "--ttl", "0.5", "--grace", "1", "--", "sleep", "30")
    out, err = p.communicate(timeout=15)
    assert p.returncode == EXIT_LEASE_ENDED, err
    assert b"lease ended first (ttl)" in err and time.monotonic() - t0 < 8


def test_run_waits_its_turn_and_a_full_queue_says_try_later(broker_with):
    b = broker_with({"scheduler": {"max_queue": 2}})
    held = hold_gpu(b)
    waiting = mgpumanager_run(b, "--", "true")
    wait_until(lambda: queued_depth(b) == 1, what="the wrapper to queue")
    code, err = finished(mgpumanager_run(b, "--wait-max", "0.5", "--", "true"))
    assert code == EXIT_TRY_LATER and b"--wait-max" in err
    wait_until(lambda: queued_depth(b) == 1, what="the bounded wrapper to leave the queue")
    second = mgpumanager_run(b, "--", "true")
    wait_until(lambda: queued_depth(b) == 2, what="a second wrapper to queue")
    code, err = finished(mgpumanager_run(b, "--", "true"))
    assert code == EXIT_TRY_LATER and b"queue_full" in err
    held.close()
    assert finished(waiting)[0] == 0 and finished(second)[0] == 0


def test_run_reads_the_token_from_a_file_or_the_environment(sim, start_broker, tmp_path):
    token = "s3cret-token-0123456789"
    b = start_broker(deep_merge(sim_config(sim), {"server": {"auth_token": token}}))
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    assert finished(mgpumanager_run(b, "--token-file", str(token_file), "--", "true"))[0] == 0
    env = dict(os.environ, MGPUMANAGER_TOKEN=token)
    assert finished(mgpumanager_run(b, "--", "true", env=env))[0] == 0
    code, err = finished(mgpumanager_run(b, "--", "true",
                                         env=dict(os.environ, MGPUMANAGER_TOKEN="wrong")))
    assert code == EXIT_REFUSED and b"unauthorized" in err


def test_run_without_a_broker_says_try_later(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mgpumanager.cli", "run", "--url",
                        "http://127.0.0.1:9", "--", "true"], capture_output=True, timeout=15)
    assert p.returncode == EXIT_TRY_LATER and b"no broker answered" in p.stderr


def test_the_lease_kind_is_counted_in_metrics(broker):
    r = requests.post(broker.url + "/v1/leases", json={"ttl_s": 5})
    requests.delete(broker.url + f"/v1/leases/{r.json()['id']}")
    text = requests.get(broker.url + "/metrics").text
    assert 'mgpumanager_jobs_total{consumer="lease",outcome="ok"} 1.0' in text



def test_a_live_reading_gives_the_programs_process_tree_memory_to_its_lease():
    child = subprocess.Popen(["sleep", "30"])
    try:
        leases = ProgramLeases(jobs=None, clock=Clock())
        lease = ProgramLease("id", "train", 8000, 60.0, 0.0, job=None, pid=os.getpid())
        leases._held[lease.id] = lease
        reading = GpuReading("nvml", total_mib=24576, used_mib=10000, free_mib=14576, processes=(
            (child.pid, 7000), (os.getpid(), 500), (1, 2000)))
        leases.measure(reading)
        assert lease.measured_mib == 7500 and lease.pids == tuple(sorted((child.pid, os.getpid())))
    finally:
        child.kill()
        child.wait()


def test_run_names_its_process_and_a_label_the_broker_takes(broker):
    p = mgpumanager_run(broker, "--label", "my+job/1", "--", sys.executable, "-c",
                        "import time; time.sleep(1)")
    wait_until(lambda: broker.status()["leases"], what="the lease")
    held = broker.status()["leases"][0]
    assert held["label"] == "my-job-1" and held["pid"] == p.pid
    assert finished(p)[0] == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                   # a zombie (reaped by nobody yet) is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


# Found by attacking the leases: a program still stopping, its children, the
# token, --wait-max, the ledger's window, the stop.

def test_the_gpu_is_not_handed_on_while_the_command_is_still_being_stopped(broker, sim):
    """The lease's ttl ends it while the program ignores SIGTERM: the GPU is
    handed on only once the wrapper has stopped it (SIGKILL after --grace)."""
    cmd = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
           "print('up', flush=True); time.sleep(30)")
    p = mgpumanager_run(broker, "--ttl", "1", "--grace", "3", "--", sys.executable, "-c", cmd)
    assert p.stdout.readline().strip() == b"up"
    thread, out = background(lambda: requests.post(broker.url + "/v1/tts", json={"text": "x"},
                                                   timeout=30))
    wait_until(lambda: queued_depth(broker) == 1, what="the TTS job to queue")
    p.communicate(timeout=20)
    program_gone = time.monotonic()
    assert p.returncode == EXIT_LEASE_ENDED
    thread.join(20)
    assert out["result"].status_code == 200
    tts_at = sim.mvoice.requests_to("/api/tts")[-1].at
    assert tts_at >= program_gone - 0.1, (
        f"the TTS job reached the GPU {program_gone - tts_at:.1f} s before the leased "
        "program had stopped")


def test_a_lease_that_ends_first_stops_the_commands_children_too(broker, tmp_path):
    """CMD that forks (a shell script, a launcher): its children are stopped too."""
    pidfile = tmp_path / "grandchild"
    cmd = ("import subprocess, sys; c = subprocess.Popen(['sleep', '30']); "
           f"open({str(pidfile)!r}, 'w').write(str(c.pid)); c.wait()")
    p = mgpumanager_run(broker, "--ttl", "1", "--grace", "1", "--", sys.executable, "-c", cmd,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert p.wait(20) == EXIT_LEASE_ENDED
    grandchild = int(pidfile.read_text())
    try:
        time.sleep(0.3)
        assert not alive(grandchild), "the command's child outlived the lease"
    finally:
        try:
            os.kill(grandchild, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_brokers_token_is_not_handed_to_the_command(sim, start_broker):
    token = "s3cret-token-0123456789"
    b = start_broker(deep_merge(sim_config(sim), {"server": {"auth_token": token}}))
    p = mgpumanager_run(b, "--", sys.executable, "-c",
                        "import os; print(os.environ.get('MGPUMANAGER_TOKEN', ''))",
                        env=dict(os.environ, MGPUMANAGER_TOKEN=token))
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert token.encode() not in out, "CMD (any program) got the broker's admin token"


def test_wait_max_bounds_the_wait_not_the_commands_run(broker):
    """The broker's heartbeat comes every 5 s: --wait-max 1 must not cut the run."""
    p = mgpumanager_run(broker, "--wait-max", "1", "--", "sleep", "3")
    _, err = p.communicate(timeout=20)
    assert p.returncode == 0, err


def test_wait_max_zero_is_an_exit_status_not_a_traceback(broker):
    p = mgpumanager_run(broker, "--wait-max", "0", "--", "true")
    _, err = p.communicate(timeout=20)
    assert p.returncode in (0, EXIT_TRY_LATER), err
    assert b"Traceback" not in err


def test_the_next_job_does_not_see_a_released_leases_memory(sim, echo, start_broker):
    """The lease leaves the ledger before the lock is handed on, however
    slow its event and log line: mvoice, which fits beside whisper, stays."""
    cfg = deep_merge(sim_config(sim, echo), {"gpu": {"backend": "ledger", "total_mib": 24576}})
    b = start_broker(cfg)
    b.wait_healthy(*cfg["consumers"])
    assert requests.post(b.url + "/v1/tts", json={"text": "x"}).ok       # mvoice: 3200
    stats = b.broker.stats
    slow = stats.job_done

    def job_done(fields):                 # the event and the log line: a slow disk
        if fields.get("kind") == "lease":
            time.sleep(float(os.environ.get("ATTACK_DELAY", "0.5")))
        slow(fields)
    stats.job_done = job_done
    r = requests.post(b.url + "/v1/leases", json={"vram_mib": 20000, "coexist": ["mvoice"]})
    assert r.status_code == 201 and "mvoice" not in r.json()["evicted"], r.text
    thread, out = background(lambda: requests.post(b.url + "/v1/stt", files={"file": ("a.wav", b"RIFF")},
                                                   timeout=30))
    wait_until(lambda: queued_depth(b) == 1, what="the STT job to queue")
    assert requests.delete(b.url + f"/v1/leases/{r.json()['id']}").status_code == 204
    thread.join(20)
    assert out["result"].ok, out["result"].text
    assert sim.mvoice.loaded and not sim.mvoice.requests_to("/api/admin/unload"), \
        "mvoice was evicted for a lease that had already ended"


def test_a_lease_queued_at_the_stop_is_refused_not_granted(broker):
    """The queue is closed before the held leases are ended: a lease queued
    behind them is refused, not granted by a broker that is stopping."""
    first = requests.post(broker.url + "/v1/leases", json={"label": "first"})
    assert first.status_code == 201
    thread, out = background(lambda: requests.post(broker.url + "/v1/leases",
                                                   json={"label": "second"}, timeout=30))
    wait_until(lambda: queued_depth(broker) == 1, what="the second lease to queue")
    broker.broker.begin_shutdown(time.monotonic() + 2.0)
    thread.join(10)
    time.sleep(0.3)
    held = [lease.label for lease in broker.broker.leases.held()]
    assert out["result"].status_code == 503, out["result"].text
    assert held == [], f"leases still held after the stop ended them: {held}"


def test_a_delete_racing_the_ttl_does_not_raise_in_the_ttl_thread():
    """A DELETE that ends the lease as its ttl passes: nothing raised in the ttl thread."""
    leases = ProgramLeases(jobs=None, clock=Clock())
    lease = ProgramLease("gone", "x", 0, 0.01, 0.0, job=None)   # already popped by DELETE
    leases._expire_at_ttl(lease)


@pytest.mark.gunicorn
def test_a_broker_stopping_ends_the_lease_and_the_wrapper_stops_its_command(sim, start_broker):
    b = start_broker(sim_config(sim), extra_args=["--graceful-timeout", "4"])
    p = mgpumanager_run(b, "--grace", "1", "--", "sleep", "60")
    wait_until(lambda: running(b) is not None, what="the lease to be held")
    t0 = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    code, err = finished(p, 20)
    assert code == EXIT_LEASE_ENDED and b"the broker is stopping" in err, err
    assert time.monotonic() - t0 < 10


def test_a_ttl_as_long_as_job_timeout_ends_as_a_ttl_not_as_the_watchdogs_cut(broker_with, sim):
    """The ttl counts from the turn, and the lock's own deadline comes after
    it: a lease at the longest ttl ends by it, and says so."""
    b = broker_with({"scheduler": {"job_timeout_s": 3}})
    assert requests.post(b.url + "/v1/image", **IMAGE).ok
    wait_idle(sim)
    sim.comfyui.delay_s = 0.8               # making room (ComfyUI's /free) takes a while
    code, err = finished(mgpumanager_run(b, "--vram", "20000", "--grace", "1", "--",
                                         "sleep", "30"), 20)
    assert code == EXIT_LEASE_ENDED and b"ended first (ttl)" in err, err
    events = [e["type"] for e in requests.get(b.url + "/v1/events").json()["events"]]
    assert "lease_expired" not in events


def test_the_status_page_names_a_running_lease_by_its_label(broker):
    r = requests.post(broker.url + "/v1/leases", json={"label": "nightly-train", "ttl_s": 5})
    page = requests.get(broker.url + "/").text
    requests.delete(broker.url + f"/v1/leases/{r.json()['id']}")
    assert "GPU lease <b>lease:nightly-train</b>" in page
