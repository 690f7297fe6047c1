"""Making room with per-process measurements, in process: a small model of
a GPU that knows what each consumer really holds, frees what an unload
frees (at once, or some readings later) and leaves a CUDA context behind.
Each case was found by attacking the planner; each asserts the fix."""


import pytest

from mgpumanager.broker import Broker
from mgpumanager.clock import FakeClock
from mgpumanager.config import parse_config
from mgpumanager.consumers import HealthResult
from mgpumanager.errors import InsufficientVram
from mgpumanager.gpu import GpuReading
from mgpumanager.procs import Measured

PIDS = {"comfyui": 101, "whisper": 102, "mvoice": 103, "big": 104, "plain": 105}


class World:
    """What each consumer really holds; an unload frees after ``free_after``
    readings, down to its context."""

    def __init__(self, total):
        self.total = total
        self.held: dict[str, int] = {}
        self.pending: dict[str, float] = {}       # name -> when (monotonic) it frees
        self.free_after: dict[str, float] = {}    # name -> seconds from its unload
        self.context: dict[str, int] = {}
        self.clock = FakeClock()                 # the broker's too: its waits take no time

    def tick(self):
        for name, at in list(self.pending.items()):
            if self.clock.now() >= at:
                del self.pending[name]
                self.held[name] = self.context.get(name, 0)

    def free(self):
        return self.total - sum(self.held.values())


class WorldReader:
    source, live = "world", True

    def __init__(self, world, processes=True):
        self.world, self.processes = world, processes

    def read(self):
        w = self.world
        w.tick()
        procs = (tuple((PIDS[n], m) for n, m in w.held.items() if m)
                 if self.processes else None)
        return GpuReading("world", total_mib=w.total, used_mib=w.total - w.free(),
                          free_mib=w.free(), processes=procs)

    def close(self):
        pass


class WorldAttribution:
    def __init__(self, names):
        self.names = names

    def measure(self, processes):
        by_pid = dict(processes)
        return {n: Measured(by_pid.get(PIDS[n], 0), (PIDS[n],)) for n in self.names}


class WorldActions:
    """Unloads free memory in the world; probes say nothing of load state."""

    def __init__(self, world):
        self.world = world
        self.calls: list[tuple[str, str]] = []

    def probe_health(self, c):
        return HealthResult(True, loaded=None)

    def call(self, c, call, timeout_s=None):
        what = "load" if call is c.load else "unload"
        self.calls.append((what, c.name))
        if what == "unload":
            later = self.world.free_after.get(c.name, 0)
            if later:
                self.world.pending[c.name] = self.world.clock.now() + later
            else:
                self.world.held[c.name] = self.world.context.get(c.name, 0)
        return None

    def is_busy(self, c):
        return False


def broker(world, consumers, *, attribution=True, cushion=0, **scheduler):
    config = parse_config({
        "gpu": {"backend": "ledger", "total_mib": world.total, "cushion_mib": cushion},
        "scheduler": {"queue_timeout_s": 0.5, "evict_settle_s": 0, **scheduler},
        "routes": {k: n for n, c in consumers.items() for k in c["paths"]},
        "consumers": {n: {"url": f"http://127.0.0.1:{i + 1}", "unload": {"path": "/u"}, **c}
                      for i, (n, c) in enumerate(consumers.items())}}, "t.yaml")
    b = Broker(config, reader=WorldReader(world, processes=attribution),
               actions=WorldActions(world), clock=world.clock)
    if attribution:
        b.room.attribute.attributions[0] = WorldAttribution(set(consumers))
    return b


def run(b, world, target, need_mib):
    """Start and finish a job; whether the memory it needs was really there."""
    job = b.start_job(target, None)
    room = world.free() + world.held.get(target, 0) >= need_mib
    job.finish(ok=True, status=200)
    return room


def test_a_model_smaller_than_the_configured_peak_is_loaded_and_can_be_unloaded():
    """ComfyUI configured for its largest workflow (20000) holds a small one
    (4000). A quarter-of-the-size rule called it not loaded: never unloaded,
    and the other job was refused."""
    w = World(20000)
    w.held = {"comfyui": 4000}
    b = broker(w, {"comfyui": {"paths": {"image": "/p"}, "vram_resident_mib": 20000},
                   "big": {"paths": {"llm": "/g"}, "vram_resident_mib": 17000}})
    b.gpu.sampler.sample()
    assert b.registry.loaded("comfyui") is True
    assert run(b, w, "big", 17000)
    assert b.actions.calls == [("unload", "comfyui")]


def test_a_consumer_holding_part_of_its_size_runs_its_own_job():
    w = World(24000)
    w.held = {"comfyui": 4000}
    b = broker(w, {"comfyui": {"paths": {"image": "/p"}, "vram_resident_mib": 21000}})
    b.gpu.sampler.sample()
    assert run(b, w, "comfyui", 21000)


def test_a_small_consumers_bare_context_is_not_a_loaded_model():
    """whisper (1800) keeps a 600 MiB context after an unload. Called loaded,
    it was unloaded to make room, freed nothing, and the job waited."""
    w = World(20000)
    w.held = {"whisper": 600, "comfyui": 12000}
    w.context = {"whisper": 600}
    b = broker(w, {"whisper": {"paths": {"stt": "/s"}, "vram_resident_mib": 1800},
                   "comfyui": {"paths": {"image": "/p"}, "vram_resident_mib": 12000},
                   "big": {"paths": {"llm": "/g"}, "vram_resident_mib": 8000}},
               queue_timeout_s=5, evict_settle_s=1)
    b.gpu.sampler.sample()
    assert b.registry.loaded("whisper") is False
    assert run(b, w, "big", 8000)
    assert b.actions.calls == [("unload", "comfyui")]


def test_a_victim_that_frees_late_is_waited_for_not_joined_by_another():
    """ComfyUI frees its memory only after the settle time (1.5 s against
    1 s); whisper, also loaded, need not go. Its memory is waited on for
    another evict_settle_s, so 0.5 s of margin either side."""
    w = World(20000)
    w.held = {"comfyui": 10000, "whisper": 8000}
    w.free_after = {"comfyui": 1.5}
    b = broker(w, {"comfyui": {"paths": {"image": "/p"}, "vram_resident_mib": 10000},
                   "whisper": {"paths": {"stt": "/s"}, "vram_resident_mib": 8000},
                   "big": {"paths": {"llm": "/g"}, "vram_resident_mib": 10000}},
               queue_timeout_s=10, evict_settle_s=1)
    for name in ("comfyui", "whisper"):
        b.registry.mark_loaded(name, True)
    b.registry.job_started("whisper")
    b.registry.job_finished("whisper", ok=True)      # whisper used last: comfyui goes first
    b.registry.mark_loaded("big", False)
    assert run(b, w, "big", 10000)
    assert b.actions.calls == [("unload", "comfyui")]


def test_a_possibly_resident_target_nobody_else_can_make_room_for_is_unloaded_itself():
    """Without attribution, ComfyUI (unknown) holds 12000; plain (unknown, no
    unload route) holds nothing but could, by its size. Only unloading
    ComfyUI settles it; refusing its jobs forever did not."""
    w = World(24000)
    w.held = {"comfyui": 12000}
    b = broker(w, {"comfyui": {"paths": {"image": "/p"}, "vram_resident_mib": 12000},
                   "plain": {"paths": {"stt": "/s"}, "vram_resident_mib": 12000,
                             "unload": None}},
               attribution=False, cushion=500)
    assert run(b, w, "comfyui", 12000)
    assert b.actions.calls == [("unload", "comfyui")]


def test_a_victim_that_never_frees_ends_the_job_at_its_deadline_and_frees_the_lock():
    w = World(20000)
    w.held = {"comfyui": 12000}
    w.free_after = {"comfyui": 10.0 ** 9}
    b = broker(w, {"comfyui": {"paths": {"image": "/p"}, "vram_resident_mib": 12000},
                   "big": {"paths": {"llm": "/g"}, "vram_resident_mib": 10000}},
               queue_timeout_s=1, evict_settle_s=0.2)
    b.registry.mark_loaded("comfyui", True)
    t0 = w.clock.now()
    with pytest.raises(InsufficientVram):
        b.start_job("big", None)
    assert 1.0 <= w.clock.now() - t0 < 1.5          # the queue's deadline, not sooner or later
    assert b.actions.calls == [("unload", "comfyui")]
    assert b.gpu.lock.snapshot().holder is None
    w.pending.clear()
    w.held["comfyui"] = 0                            # it frees at last: the next job runs
    assert run(b, w, "big", 10000)
