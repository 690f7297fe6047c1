"""Who holds VRAM: the registry's rules, per-process attribution, and the
broker against a GPU whose reading disagrees with what it believes."""

import os
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import requests

from conftest import sim_config
from mgpumanager.config import parse_config
from mgpumanager.consumers import ConsumerRegistry, HealthResult
from mgpumanager.procs import Attribution, Measured, PidsFrom
from mgpumanager.sim import start_cluster

# -- the registry's rules, as a table -------------------------------------------

REGISTRY_CONFIG = {
    "gpu": {"backend": "ledger", "total_mib": 16000},
    "routes": {"tts": "a"},
    "consumers": {"a": {"url": "http://127.0.0.1:1", "paths": {"tts": "/t"},
                        "vram_resident_mib": 1000, "unload": {"path": "/u"}},
                  "m": {"url": "http://127.0.0.1:2", "vram_resident_mib": 4000,
                        "vram_managed": True}},
}


def registry():
    return ConsumerRegistry(parse_config(REGISTRY_CONFIG, "t.yaml"))


def finish(reg, ok, reached):
    reg.job_started("a")
    reg.job_finished("a", ok=ok, reached=reached)


@pytest.mark.parametrize("before,event,after", [
    pytest.param(None, lambda r: None, None, id="unknown-at-start"),
    pytest.param(False, lambda r: finish(r, True, True), True, id="a-job-that-reached-it-loads-it"),
    pytest.param(False, lambda r: finish(r, False, True), True,
                 id="loaded-whatever-the-job-outcome"),
    pytest.param(False, lambda r: finish(r, False, None), None,
                 id="an-unclear-job-makes-it-possibly-loaded"),
    pytest.param(True, lambda r: finish(r, False, None), True, id="unclear-keeps-a-loaded-one"),
    pytest.param(False, lambda r: finish(r, False, False), False,
                 id="a-job-that-never-reached-it-changes-nothing"),
    pytest.param(True, lambda r: r.record_health("a", HealthResult(True, loaded=False),
                                                 r.clock()), False,
                 id="a-fresh-probe-saying-not-loaded-is-believed"),
    pytest.param(True, lambda r: r.record_health("a", HealthResult(True, loaded=False), -1.0),
                 True, id="a-probe-sent-before-the-last-change-is-not"),
    pytest.param(False, lambda r: r.mark_loaded("a", None, counted="load"), None,
                 id="an-unconfirmed-load-is-possibly-loaded"),
    pytest.param(True, lambda r: r.record_measured({"a": Measured(0, (1,))}, r.clock()), False,
                 id="measured-holding-nothing-is-not-loaded"),
    pytest.param(False, lambda r: r.record_measured({"a": Measured(900, (1,))}, r.clock()), True,
                 id="measured-holding-memory-is-loaded"),
    pytest.param(True, lambda r: r.record_measured({"a": Measured(240, (1,))}, r.clock()), False,
                 id="measured-holding-only-a-context-is-not-loaded"),
    pytest.param(False, lambda r: r.record_measured({"a": Measured(900, (1,))}, -1.0), False,
                 id="a-measurement-older-than-the-last-change-is-ignored"),
    pytest.param(False, lambda r: r.record_measured({"a": Measured(None, (), "n/a")}, r.clock()),
                 False, id="no-figure-changes-nothing"),
])
def test_load_state_rules(before, event, after):
    reg = registry()
    if before is not None:
        reg.mark_loaded("a", before)
    event(reg)
    assert reg.loaded("a") is after


def test_every_unknown_consumer_counts_in_the_ledger_managed_ones_too():
    reg = registry()
    assert reg.held_mib() == 5000
    reg.mark_loaded("m", False)
    assert reg.held_mib() == 1000


def test_a_measurement_above_the_configured_size_warns_once_and_is_planned_with():
    reg = registry()
    warnings = reg.record_measured({"a": Measured(1500, (7,))}, reg.clock())
    assert warnings and "1500 MiB" in warnings[0]
    assert reg.record_measured({"a": Measured(1400, (7,))}, reg.clock()) == []
    assert reg.views()["a"].resident_mib == 1500
    assert reg.snapshot()["a"]["measured_mib"] == 1400
    assert reg.snapshot()["a"]["peak_measured_mib"] == 1500


# -- per-process attribution, against a fake pynvml --------------------------------

LISTENER = """
import os, socket, subprocess, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(s.getsockname()[1], child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def service():
    """A process listening on a port, with a child (as ollama has its runner)."""
    proc = subprocess.Popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    port, child = map(int, proc.stdout.readline().split())
    yield proc.pid, child, port
    for pid in (child, proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    proc.stdout.close()


class FakeNvml(types.ModuleType):
    """Just enough of pynvml for NvmlReader: one 24 GiB GPU and a process list."""

    class NVMLError(Exception):
        pass

    nvmlMemory_v2 = 0x02000028

    def __init__(self, processes, reserved_mib=0):
        super().__init__("pynvml")
        self.processes = processes          # [(pid, MiB)]
        self.reserved_mib = reserved_mib    # the driver's own, which v1 counts as used

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        used = sum(m for _, m in self.processes) << 20
        reserved = self.reserved_mib << 20
        free = (24576 << 20) - used - reserved
        if version == self.nvmlMemory_v2:
            return types.SimpleNamespace(total=24576 << 20, reserved=reserved, used=used, free=free)
        return types.SimpleNamespace(total=24576 << 20, used=used + reserved, free=free)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=10)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m << 20) for p, m in self.processes]


@pytest.mark.parametrize("how", ["port", "pidfile", "cmdline"])
def test_attribution_gives_a_process_and_its_children_their_vram(service, tmp_path, how):
    pid, child, port = service
    pidfile = tmp_path / "svc.pid"
    pidfile.write_text(f"{pid}\n")
    source = {"port": PidsFrom(port=port), "pidfile": PidsFrom(pidfile=str(pidfile)),
              "cmdline": PidsFrom(cmdline="s.bind((\"127.0.0.1\", 0))")}[how]
    attribution = Attribution({"svc": source, "ghost": PidsFrom(port=1)})
    measured = attribution.measure([(child, 5000), (pid, 300), (999999, 77)])
    assert measured["svc"].mib == 5300 and {pid, child} <= set(measured["svc"].pids)
    assert measured["ghost"].mib is None and "no process found" in measured["ghost"].note


def test_the_broker_shows_measured_vram_and_warns_above_the_configured_size(service,
                                                                           monkeypatch):
    from mgpumanager.broker import Broker
    pid, child, port = service
    fake = FakeNvml([(child, 7000), (pid, 200)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    cfg = parse_config({
        "gpu": {"backend": "nvml"},
        "routes": {"image": "svc"},
        "consumers": {"svc": {"url": "http://127.0.0.1:1", "paths": {"image": "/p"},
                              "vram_resident_mib": 6000, "unload": {"path": "/free"},
                              "pids_from": {"port": port}},
                      "plain": {"url": "http://127.0.0.1:2", "vram_resident_mib": 100}}})
    b = Broker(cfg)
    b.gpu.sampler.sample()
    st = b.status()
    svc = st["consumers"]["svc"]
    assert st["gpu"]["source"] == "nvml"
    assert svc["measured_mib"] == 7200 and svc["loaded"] is True
    assert svc["attribution"]["from"] == f"port {port}" and pid in svc["attribution"]["pids"]
    assert st["consumers"]["plain"]["attribution"] is None
    assert [e["type"] for e in b.events.since()] == ["measured_above_config"]
    fake.processes = [(999999, 50)]             # it freed its memory
    b.gpu.sampler.sample()
    assert b.status()["consumers"]["svc"]["loaded"] is False


def test_the_drivers_reserve_is_nobodys_memory(monkeypatch):
    """An H100 with nothing on it reads 480 MiB used through NVML's v1 call:
    the driver's reserve. Taken for memory some consumer might hold, it made
    believed-unloaded consumers eviction candidates on every job."""
    from mgpumanager.broker import Broker
    fake = FakeNvml([], reserved_mib=480)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    cfg = parse_config({
        "gpu": {"backend": "nvml", "cushion_mib": 256},
        "routes": {"image": "big", "tts": "small"},
        "consumers": {
            "big": {"url": "http://127.0.0.1:1", "paths": {"image": "/p"},
                    "vram_resident_mib": 20000, "unload": {"path": "/free"}},
            "small": {"url": "http://127.0.0.1:2", "paths": {"tts": "/p"},
                      "vram_resident_mib": 3000, "unload": {"path": "/free"}}}})
    b = Broker(cfg)
    reading = b.gpu.reader.read()
    assert (reading.used_mib, reading.usable_mib) == (0, 24576 - 480)
    assert b.status()["gpu"]["reserved_mib"] == 480
    b.registry.mark_loaded("small", False)
    plan = b.room.plan("big", b.registry.views(), reading)
    assert plan.fits and plan.victims == (), plan.reason


# -- end to end: beliefs against the simulated GPU -----------------------------------

def only(cfg, *names):
    """The config with only these consumers (and the routes to them)."""
    cfg["consumers"] = {n: c for n, c in cfg["consumers"].items() if n in names}
    cfg["routes"] = {k: v for k, v in cfg["routes"].items() if v in names}
    cfg["audio_proxy"] = "mvoice" if "mvoice" in names else None
    for c in cfg["consumers"].values():
        c["can_coexist_with"] = [x for x in c.get("can_coexist_with", []) if x in names]
    return cfg


BODIES = {"tts": b'{"text": "hello there"}', "image": b'{"prompt": {"1": {}}}'}


def hang_up_mid_answer(port: int, kind: str) -> bytes:
    """A client that reads the head and a first byte of its answer, then leaves."""
    body = BODIES[kind]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/%s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (kind.encode(), len(body), body))
        data = b""
        while b"\r\n\r\n" not in data or data.endswith(b"\r\n\r\n"):
            more = s.recv(1)
            if not more:
                break
            data += more
    return data


def settle(b, sim, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        sched = b.status()["scheduler"]
        if sched["in_flight"] == 0 and sched["queue_depth"] == 0 and not sim.comfyui.busy:
            return
        assert time.monotonic() < deadline, sched
        time.sleep(0.05)


# A hang-up as gunicorn's worker sees it: the write fails, the answer is closed.
@pytest.mark.gunicorn
def test_clients_that_hang_up_mid_answer_never_erase_a_consumer_from_the_ledger(
        sim, start_broker):
    cfg = only(sim_config(sim), "mvoice", "comfyui")
    cfg["gpu"] = {"backend": "ledger", "total_mib": 16000, "cushion_mib": 256}
    cfg["scheduler"]["queue_timeout_s"] = 10
    b = start_broker(cfg)
    b.wait_healthy("mvoice", "comfyui")
    sim.mvoice.tail_delay_s = sim.comfyui.tail_delay_s = 0.3
    sim.comfyui.render_s = 3.0                       # 0.3 s at the tests' time scale
    for i in range(8):
        kind = ("tts", "image")[i % 2]
        head = hang_up_mid_answer(b.port, kind)
        assert head.startswith(b"HTTP/1.1 200"), (kind, head)
        settle(b, sim)
        st = b.status()["consumers"]
        owner = "mvoice" if kind == "tts" else "comfyui"
        assert st[owner]["loaded"] is True, (kind, st[owner])
    assert sim.gpu.ooms == 0, sim.gpu.oom_log
    assert sim.gpu.overlaps() == [], "a job ran while ComfyUI was still rendering"
    assert len([j for j in sim.gpu.jobs if j.kind == "image"]) == 4


def test_a_possibly_resident_target_is_not_counted_against_itself(sim, start_broker):
    cfg = only(sim_config(sim), "comfyui", "whisper")
    cfg["gpu"] = {"backend": "ledger", "total_mib": 16000, "cushion_mib": 256}
    cfg["scheduler"]["queue_timeout_s"] = 3
    b = start_broker(cfg)
    b.wait_healthy("comfyui", "whisper")
    st = b.status()["consumers"]
    # ComfyUI may be loaded (unloading it would settle it); whisper can be
    # neither asked nor unloaded, so it counts as not loaded until its first job.
    assert st["comfyui"]["loaded"] is None and st["whisper"]["loaded"] is False
    t0 = time.monotonic()
    r = requests.post(b.url + "/v1/image", json={"prompt": {"1": {}}}, timeout=10)
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 2.5           # not the 3 s queue deadline


def test_a_consumer_freed_behind_the_brokers_back_is_not_believed_resident(start_broker):
    sim = start_cluster(16000, time_scale=0.1)    # ComfyUI and mvoice do not fit together
    try:
        cfg = only(sim_config(sim), "mvoice", "comfyui")
        b = start_broker(cfg)
        b.wait_healthy("mvoice", "comfyui")
        assert requests.post(b.url + "/v1/image", json={"prompt": {"1": {}}}).ok
        settle(b, sim)
        assert b.status()["consumers"]["comfyui"]["loaded"] is True
        # Freed through its own API, which is no GPU route: the broker is not told.
        r = requests.post(b.url + "/upstream/comfyui/free", json={"unload_models": True})
        assert r.ok
        deadline = time.monotonic() + 5             # it frees a little later, as the real one
        while sim.comfyui.loaded:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert requests.post(b.url + "/v1/tts", json={"text": "hi"}).ok    # moves in
        assert requests.post(b.url + "/v1/image", json={"prompt": {"1": {}}}).ok
        settle(b, sim)
        assert sim.gpu.ooms == 0, sim.gpu.oom_log
        types_ = [e["type"] for e in requests.get(b.url + "/v1/events").json()["events"]]
        assert "belief_corrected" in types_ and "evicted" in types_
    finally:
        sim.stop()


def test_a_missing_service_is_looked_for_again_at_most_once_a_second(monkeypatch, tmp_path):
    import mgpumanager.procs as procs
    scans = []
    real = procs.ProcessTable
    monkeypatch.setattr(procs, "ProcessTable", lambda root: scans.append(root) or real(root))
    now = [100.0]
    attribution = Attribution({"gone": PidsFrom(port=1)}, root=str(tmp_path),
                              clock=lambda: now[0])
    for _ in range(50):                       # fifty GPU jobs in the same second
        assert attribution.measure([])["gone"].mib is None
    assert len(scans) == 1
    now[0] += 1.5
    attribution.measure([])
    assert len(scans) == 2


def test_a_measurement_from_before_an_unload_is_not_shown_to_the_planner():
    reg = registry()
    reg.record_measured({"a": Measured(900, (1,))}, reg.clock())
    assert reg.views()["a"].measured_mib == 900
    reg.mark_loaded("a", False)                 # unloaded: that figure is history
    assert reg.views()["a"].measured_mib is None
    reg.record_measured({"a": Measured(120, (1,))}, reg.clock())
    assert reg.views()["a"].measured_mib == 120 and reg.loaded("a") is False
