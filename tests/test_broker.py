"""The broker's scheduling and eviction, against a fake that records what it
was asked to do: no HTTP, no sleeps beyond a few short deadlines."""

import threading
import time

import pytest

from mgpumanager.broker import Broker
from mgpumanager.config import parse_config
from mgpumanager.consumers import HealthResult
from mgpumanager.errors import Abandoned, ConsumerUnhealthy, InsufficientVram

CONFIG = {
    "gpu": {"backend": "ledger", "total_mib": 20000, "cushion_mib": 0},
    "scheduler": {"queue_timeout_s": 0.3, "evict_settle_s": 0},
    "routes": {"tts": "mvoice", "stt": "whisper", "llm": "ollama", "image": "comfyui"},
    "consumers": {
        "mvoice": {"url": "http://127.0.0.1:1", "paths": {"tts": "/tts"}, "vram_resident_mib": 3000,
                   "can_coexist_with": ["ollama", "whisper"],
                   "load": {"path": "/load"}, "unload": {"path": "/unload"}},
        "whisper": {"url": "http://127.0.0.1:2", "paths": {"stt": "/inference"},
                    "vram_resident_mib": 2000, "unload": {"path": "/unload"}},
        "ollama": {"url": "http://127.0.0.1:3", "paths": {"llm": "/api/generate"},
                   "vram_resident_mib": 6000, "vram_managed": True},
        "comfyui": {"url": "http://127.0.0.1:4", "paths": {"image": "/prompt"},
                    "vram_resident_mib": 12000, "unload": {"path": "/free"}},
    },
}


class RecordingActions:
    """Stands in for the consumers' admin routes; records every call."""

    def __init__(self, fail=()):
        self.calls: list[tuple[str, str]] = []
        self.fail = set(fail)

    reports_loaded = False        # True: the health answer says "loaded" after a load

    def probe_health(self, c):
        loaded = None
        if self.reports_loaded:
            loaded = any(name == c.name for what, name in self.calls if what == "load")
        return HealthResult(True, loaded=loaded)

    def call(self, c, call, timeout_s=None):
        what = "load" if call is c.load else "unload"
        self.calls.append((what, c.name))
        return f"{what} failed" if c.name in self.fail else None

    def is_busy(self, c):
        return False


def make_broker(overrides=None, fail=()):
    data = {**CONFIG, **(overrides or {})}
    actions = RecordingActions(fail)
    return Broker(parse_config(data, "test.yaml"), actions=actions), actions


def run(broker, consumer, kind=None):
    job = broker.start_job(consumer, kind)
    job.finish(ok=True, status=200)
    return job


def set_loaded(broker, **states):
    for name, loaded in states.items():
        broker.registry.mark_loaded(name, loaded)


def test_a_job_that_does_not_fit_unloads_the_image_service_then_loads_the_target():
    b, actions = make_broker()
    set_loaded(b, mvoice=False, whisper=False, comfyui=True, ollama=True)
    # 20000 total - 12000 comfyui - 6000 ollama = 2000 free < 3000 for mvoice
    job = run(b, "mvoice", "tts")
    assert actions.calls == [("unload", "comfyui"), ("load", "mvoice")]
    assert job.evicted == ["comfyui"]
    st = b.status()
    assert st["consumers"]["comfyui"]["loaded"] is False and st["consumers"]["mvoice"]["loaded"]
    assert st["scheduler"]["evictions"] == 1 and st["scheduler"]["loads"] == 1


def test_a_resident_target_causes_no_calls():
    b, actions = make_broker()
    set_loaded(b, mvoice=True, comfyui=True)
    run(b, "mvoice", "tts")
    run(b, "mvoice", "tts")
    assert actions.calls == []


def test_least_recently_used_goes_first_and_no_more_than_needed():
    b, actions = make_broker({"gpu": {"backend": "ledger", "total_mib": 16000, "cushion_mib": 0}})
    set_loaded(b, ollama=False, comfyui=False)
    run(b, "whisper", "stt")            # used first: the older of the two
    run(b, "mvoice", "tts")
    actions.calls.clear()
    # 16000 - 2000 - 3000 = 11000 free, 12000 needed: one victim, the older one
    run(b, "comfyui", "image")
    assert actions.calls == [("unload", "whisper")]


def test_coexisting_consumers_are_spared():
    b, actions = make_broker({"gpu": {"backend": "ledger", "total_mib": 22500, "cushion_mib": 0}})
    set_loaded(b, ollama=True, whisper=True, comfyui=True, mvoice=False)
    run(b, "whisper", "stt")            # used first: least recently used, were it a candidate
    run(b, "comfyui", "image")
    actions.calls.clear()
    # 22500 - 6000 - 2000 - 12000 = 2500 free, 3000 needed: whisper alone would
    # make room, but mvoice may stay beside it; comfyui may not.
    run(b, "mvoice", "tts")
    assert actions.calls == [("unload", "comfyui"), ("load", "mvoice")]


def test_a_coexisting_consumer_is_spared_even_when_that_leaves_no_room():
    b, actions = make_broker({"gpu": {"backend": "ledger", "total_mib": 10500, "cushion_mib": 0}})
    set_loaded(b, ollama=True, whisper=True, comfyui=False, mvoice=False)
    # 10500 - 6000 (vram_managed) - 2000 = 2500 free, 3000 needed; whisper may stay.
    with pytest.raises(InsufficientVram):
        b.start_job("mvoice", "tts")
    assert actions.calls == []


def test_vram_managed_consumers_are_never_unloaded_and_a_job_that_cannot_fit_is_refused_at_once():
    b, actions = make_broker({"gpu": {"backend": "ledger", "total_mib": 16000, "cushion_mib": 0},
                              "scheduler": {"queue_timeout_s": 30}})
    set_loaded(b, ollama=True, comfyui=False, mvoice=True, whisper=True)
    t0 = time.monotonic()
    with pytest.raises(InsufficientVram) as info:
        b.start_job("comfyui", "image")      # 12000 > 16000 - 6000 held by ollama
    assert time.monotonic() - t0 < 3         # at once, not after the 30 s queue deadline
    assert actions.calls == []               # no unload storm
    assert "ollama 6000 MiB (vram_managed)" in info.value.message
    assert b.gpu.lock.snapshot().holder is None
    assert b.status()["scheduler"]["rejected_by_code"] == {"insufficient_vram": 1}


def test_a_failed_unload_is_counted_and_the_next_candidate_tried():
    b, actions = make_broker({"gpu": {"backend": "ledger", "total_mib": 21000, "cushion_mib": 0}},
                             fail=["mvoice"])
    set_loaded(b, ollama=True, whisper=True, mvoice=True, comfyui=False)
    # comfyui needs 12000; 21000-6000-2000-3000 = 10000 free: either one victim will do,
    # mvoice first (both unused, by name); its unload fails, so whisper goes instead.
    run(b, "comfyui", "image")
    assert actions.calls == [("unload", "mvoice"), ("unload", "whisper")]
    st = b.status()["consumers"]
    assert st["mvoice"]["unload_failures"] == 1 and st["mvoice"]["loaded"] is True
    assert st["whisper"]["loaded"] is False
    assert b.gpu.lock.snapshot().holder is None


def ollama_says_it_is_loaded(b):
    """ollama (vram_managed) as its /api/ps answers: loaded, and it frees by itself."""
    b.registry.record_health("ollama", HealthResult(True, loaded=True))


def test_with_nothing_left_to_evict_it_waits_for_what_frees_by_itself_then_refuses():
    b, actions = make_broker(fail=["comfyui", "whisper"])
    set_loaded(b, comfyui=True, whisper=True, mvoice=False)
    ollama_says_it_is_loaded(b)
    before = b.events.since()[-1]["id"] if b.events.since() else 0
    t0 = time.monotonic()
    with pytest.raises(InsufficientVram) as info:
        b.start_job("mvoice", "tts")
    assert 0.25 <= time.monotonic() - t0 < 1.5           # queue_timeout_s 0.3
    assert "comfyui 12000 MiB" in info.value.message
    assert b.gpu.lock.snapshot().holder is None
    refused = [e for e in b.events.since(before) if e["type"] == "refused"]
    assert len(refused) == 1 and refused[0]["code"] == "insufficient_vram"


def test_with_nothing_left_to_evict_and_nothing_to_free_by_itself_it_refuses_at_once():
    """ollama's state is only believed (its probe says nothing): a ledger
    would never see it expire its models, so waiting cannot help."""
    b, actions = make_broker({"scheduler": {"queue_timeout_s": 30, "evict_settle_s": 0}},
                             fail=["comfyui", "whisper"])
    set_loaded(b, ollama=True, comfyui=True, whisper=True, mvoice=False)
    t0 = time.monotonic()
    with pytest.raises(InsufficientVram) as info:
        b.start_job("mvoice", "tts")
    assert time.monotonic() - t0 < 2
    assert "ollama 6000 MiB (vram_managed), comfyui 12000 MiB" in info.value.message
    assert actions.calls == [("unload", "comfyui")]    # whisper alone would not do


def test_a_consumer_its_unload_stopped_is_loaded_by_its_next_job_not_refused():
    """whisper.cpp's unload command ends its process, so its probe fails;
    its jobs were refused consumer_unhealthy forever, the load never run."""
    b, actions = make_broker()
    b.unload("mvoice")
    b.registry.record_health("mvoice", HealthResult(False, "connection refused"))
    run(b, "mvoice", "tts")
    assert actions.calls == [("unload", "mvoice"), ("load", "mvoice")]


def test_an_unhealthy_consumer_is_refused_before_queueing():
    b, _ = make_broker()
    b.registry.record_health("mvoice", HealthResult(False, "connection refused"))
    with pytest.raises(ConsumerUnhealthy) as info:
        b.start_job("mvoice", "tts")
    assert "connection refused" in info.value.message
    assert b.status()["scheduler"]["rejected_by_code"] == {"consumer_unhealthy": 1}


def test_explicit_unload_and_load_run_under_the_lock():
    b, actions = make_broker()
    set_loaded(b, mvoice=True, comfyui=False)
    assert b.unload("mvoice") == {"consumer": "mvoice", "loaded": False}
    # Its health says nothing of its state: the load stays unconfirmed.
    assert b.load("mvoice")["loaded"] is None
    assert actions.calls == [("unload", "mvoice"), ("load", "mvoice")]
    assert b.gpu.lock.snapshot().holder is None


def test_a_load_a_probe_confirms_is_believed():
    b, actions = make_broker()
    actions.reports_loaded = True
    set_loaded(b, mvoice=False, comfyui=False)
    assert b.load("mvoice")["loaded"] is True


def test_jobs_for_different_consumers_run_one_at_a_time():
    b, _ = make_broker({"scheduler": {"queue_timeout_s": 5}})
    set_loaded(b, mvoice=True, whisper=True, ollama=True)
    running, peak, lock = [0], [0], threading.Lock()

    def worker(name):
        job = b.start_job(name)
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        job.finish(ok=True)
    threads = [threading.Thread(target=worker, args=(n,)) for n in ["mvoice", "whisper", "ollama"] * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] == 1 and b.status()["scheduler"]["total_jobs"] == 15


def test_idle_consumers_are_unloaded_after_idle_unload_s():
    cfg = {**CONFIG, "consumers": {**CONFIG["consumers"],
                                   "mvoice": {**CONFIG["consumers"]["mvoice"], "idle_unload_s": 0.2}}}
    b, actions = make_broker(cfg)
    set_loaded(b, mvoice=False)
    run(b, "mvoice", "tts")
    actions.calls.clear()
    b.start()
    try:
        deadline = time.monotonic() + 5
        while ("unload", "mvoice") not in actions.calls:
            assert time.monotonic() < deadline, actions.calls
            time.sleep(0.05)
        assert b.registry.loaded("mvoice") is False
    finally:
        b.stop()


def test_a_probe_answer_from_before_an_unload_does_not_undo_it():
    b, _ = make_broker()
    set_loaded(b, comfyui=True)
    sent_at = b.registry.clock()           # a probe goes out...
    b.unload("comfyui")                    # ...the broker unloads meanwhile...
    b.registry.record_health("comfyui", HealthResult(True, loaded=True), sent_at)
    assert b.registry.loaded("comfyui") is False     # ...and its stale answer is ignored
    b.registry.record_health("comfyui", HealthResult(True, loaded=True), b.registry.clock())
    assert b.registry.loaded("comfyui") is True      # a later probe is believed


def test_a_client_leaving_while_its_job_waits_for_vram_frees_the_gpu():
    b, _ = make_broker({"scheduler": {"queue_timeout_s": 30}}, fail=["comfyui", "whisper"])
    set_loaded(b, comfyui=True, whisper=True, mvoice=False)
    ollama_says_it_is_loaded(b)
    gone = threading.Event()
    threading.Timer(0.2, gone.set).start()
    t0 = time.monotonic()
    with pytest.raises(Abandoned):
        b.start_job("mvoice", "tts", cancelled=gone.is_set)
    assert time.monotonic() - t0 < 2.5        # not the 30 s queue deadline
    assert b.gpu.lock.snapshot().holder is None
    assert b.status()["scheduler"]["abandoned"] == 1
    assert b.status()["scheduler"]["rejected"] == 0
    assert [e["type"] for e in b.events.since()][-1] == "abandoned"


class FixedReading:
    """A live reading that nothing the broker does changes: memory held by
    someone its unloads do not reach."""
    source, live = "fixed", True

    def __init__(self, used_mib, total_mib=20000):
        self.used, self.total = used_mib, total_mib

    def read(self):
        from mgpumanager.gpu import GpuReading
        return GpuReading("fixed", total_mib=self.total, used_mib=self.used,
                          free_mib=self.total - self.used)

    def close(self):
        pass


def test_making_room_unloads_each_consumer_at_most_once_per_job():
    """Seen in the OOM storm benchmark: ComfyUI (state unknown) held its
    memory; the planner took it for unexplained memory and unloaded ollama,
    believed unloaded, five times over (freeing nothing each time), then
    waited out the queue deadline."""
    config = parse_config({**CONFIG, "consumers": {
        **CONFIG["consumers"],
        "ollama": {**CONFIG["consumers"]["ollama"], "vram_managed": False,
                   "unload": {"path": "/api/generate"}}}}, "test.yaml")
    actions = RecordingActions()
    b = Broker(config, actions=actions, reader=FixedReading(used_mib=12000 + 2000))
    set_loaded(b, mvoice=False, whisper=True, ollama=False)        # comfyui: unknown
    with pytest.raises(InsufficientVram):
        b.start_job("comfyui", "image")
    unloads = [name for what, name in actions.calls if what == "unload"]
    assert len(unloads) == len(set(unloads)), unloads


def test_asking_every_consumer_is_bounded_in_all_by_the_health_timeout():
    """A consumer whose /health answer trickles (one byte every 0.3 s) kept
    a job, and the GPU lock, as long as it liked: the probe's timeout bounds
    each read, not the answer."""
    class Trickling(RecordingActions):
        def probe_health(self, c):
            if c.name == "whisper":
                time.sleep(5)
            return super().probe_health(c)
    b = Broker(parse_config({**CONFIG, "health": {"timeout_s": 0.5},
                             "scheduler": {"queue_timeout_s": 30, "evict_settle_s": 0}},
                            "test.yaml"), actions=Trickling(fail=["comfyui", "whisper"]))
    set_loaded(b, ollama=True, comfyui=True, whisper=True, mvoice=False)
    for _ in range(2):                  # the second job does not wait for the first's probe
        t0 = time.monotonic()
        with pytest.raises(InsufficientVram):
            b.start_job("mvoice", "tts")
        assert time.monotonic() - t0 < 1.5


def test_a_job_is_counted_before_its_turn_is_given_back():
    """Whoever asks /v1/status once the next job can start sees this one counted."""
    b, _ = make_broker()
    set_loaded(b, mvoice=True)
    counted_at_release = []
    release = b.gpu.lock.release

    def observed(ticket):
        counted_at_release.append(b.status()["scheduler"]["total_jobs"])
        release(ticket)
    b.gpu.lock.release = observed
    run(b, "mvoice", "tts")
    run(b, "mvoice", "tts")
    assert counted_at_release == [1, 2]


def test_an_explicit_load_is_no_job_of_its_consumer():
    b, _ = make_broker()
    set_loaded(b, mvoice=False, comfyui=False)
    b.load("mvoice")
    st = b.status()
    assert st["consumers"]["mvoice"]["active"] == 0
    assert st["scheduler"]["last_wait_ms"] is None


def test_a_load_shows_its_victims_while_it_makes_room():
    b, actions = make_broker()
    set_loaded(b, mvoice=False, whisper=False, comfyui=True, ollama=True)
    seen = []
    unload = actions.call

    def watching(c, call, timeout_s=None):
        seen.append(list(b.status()["scheduler"]["running"]["evicted"]))
        return unload(c, call, timeout_s)
    actions.call = watching
    run(b, "mvoice", "tts")
    assert seen == [[], ["comfyui"]]          # the unload, then the load sees its victim


def test_a_busy_hold_the_watchdog_ends_is_said_and_its_run_measured():
    consumers = {**CONFIG["consumers"], "comfyui": {**CONFIG["consumers"]["comfyui"],
                                                    "busy": {"path": "/queue"}}}
    b, actions = make_broker({"consumers": consumers,
                              "scheduler": {"queue_timeout_s": 5, "evict_settle_s": 0,
                                            "job_timeout_s": 1, "busy_poll_s": 0.05}})
    b.gpu.watch.grace_s = 0.2
    set_loaded(b, comfyui=True)
    hang = threading.Event()
    job = b.start_job("comfyui", "image")
    actions.is_busy = lambda c: hang.wait(3) or True     # busy after its job, and slow to say so
    job.finish(ok=True, status=200)
    deadline = time.monotonic() + 10
    while b.gpu.lock.snapshot().holder is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    hang.set()
    time.sleep(0.3)
    types = [e["type"] for e in b.events.since(0)]
    assert "lease_expired" in types and "job_timeout" in types
    assert b.registry.costs()["comfyui"].run_s is not None


def test_the_watchdog_follows_a_fake_clock():
    """Time jumped past a lease's deadline and its grace: the watchdog ends
    the job at once (in real time), as it would after the real wait."""
    from mgpumanager.clock import FakeClock
    clock = FakeClock()
    b = Broker(parse_config({**CONFIG, "scheduler": {"job_timeout_s": 100, "evict_settle_s": 0}},
                            "test.yaml"), actions=RecordingActions(), clock=clock)
    set_loaded(b, mvoice=True)
    job = b.start_job("mvoice", "tts")
    time.sleep(0.2)                        # the watchdog asleep until the (fake) deadline
    clock.advance(100 + b.gpu.watch.grace_s + 1)
    deadline = time.monotonic() + 5
    while b.gpu.lock.snapshot().holder is not None:
        assert time.monotonic() < deadline, "the watchdog slept through the fake deadline"
        time.sleep(0.01)
    assert job.lease.expired and b.liveness() == []
