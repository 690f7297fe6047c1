"""The planner against a simulated GPU, model-based (hypothesis stateful).

A ``Truth`` knows what each consumer really holds: some are loaded at
start, some free late after an unload, some say in their health probe
whether they are loaded, and (on a live reading) other programs take
memory behind the broker's back. The broker runs in process on a fake
clock, with its own beliefs. After every job:

- never over-commit: when a job starts, what the GPU really holds beside
  it, plus the target, fits;
- never refuse or wait when some set of allowed unloads would make room
  (allowed: an unload route, not vram_managed, and either not allowed
  beside the target or of a state the broker does not know);
- never unload a consumer twice for one job;
- every job ends (the fake clock refuses to run forever).

On the ledger nothing frees late: an unload route that answers before its
memory is free cannot be seen by a ledger, and presets wait for it
(ComfyUI's ``until_freed``). A consumer that can be neither asked nor
unloaded is not loaded at start: the contract's assumption.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
from hypothesis import HealthCheck, assume, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mgpumanager.broker import Broker
from mgpumanager.clock import FakeClock
from mgpumanager.config import parse_config
from mgpumanager.consumers import HealthResult
from mgpumanager.errors import InsufficientVram
from mgpumanager.gpu import GpuReading

TOTAL = 16000
CUSHION = 256
SETTLE_S = 2.0
QUEUE_TIMEOUT_S = 300.0
SIZES = (500, 1000, 3000, 8000, 13000)
NAMES = ("a", "b", "c", "d", "e")


class Truth:
    def __init__(self, clock: FakeClock, spec: dict):
        self.clock = clock
        self.spec = spec
        self.held = {n: 0 for n in spec}
        self.frees_at: dict[str, float] = {}     # late frees in flight
        self.foreign = 0                         # memory other programs hold

    def tick(self) -> None:
        for name, at in list(self.frees_at.items()):
            if self.clock.now() >= at:
                del self.frees_at[name]
                self.held[name] = 0

    def used(self) -> int:
        self.tick()
        return sum(self.held.values()) + self.foreign


class TruthReader:
    source, live = "truth", True

    def __init__(self, truth: Truth):
        self.truth = truth

    def read(self) -> GpuReading:
        used = self.truth.used()
        return GpuReading("truth", total_mib=TOTAL, used_mib=used, free_mib=TOTAL - used)

    def close(self):
        pass


class TruthActions:
    def __init__(self, truth: Truth, live: bool):
        self.truth = truth
        self.live = live
        self.unloads: list[str] = []

    def probe_health(self, c):
        s = self.truth.spec[c.name]
        self.truth.tick()
        return HealthResult(True, loaded=(self.truth.held[c.name] > 0) if s["reports"] else None)

    def call(self, c, call, timeout_s=None):
        assert call is c.unload
        self.unloads.append(c.name)
        late = self.truth.spec[c.name]["late_s"]
        if self.live and late and self.truth.held[c.name]:
            self.truth.frees_at[c.name] = self.truth.clock.now() + late
        else:
            self.truth.held[c.name] = 0
        return None

    def is_busy(self, c):
        return False


@st.composite
def worlds(draw):
    n = draw(st.integers(2, 5))
    spec = {}
    for name in NAMES[:n]:
        managed = draw(st.integers(0, 5)) == 0      # ollama: frees by itself, says so
        spec[name] = {"size": draw(st.sampled_from(SIZES)),
                      "managed": managed,
                      "unload": not managed and draw(st.booleans()),
                      "reports": draw(st.booleans()),
                      "late_s": draw(st.sampled_from([0, 0, 1.0, 3.0])),
                      "loaded": draw(st.booleans())}
    pairs = [p for p in itertools.combinations(spec, 2) if draw(st.booleans())]
    # Loaded at start only what fits, and never one the broker can neither
    # ask nor unload (the contract's assumption).
    used = 0
    for name, s in spec.items():
        s["loaded"] = s["loaded"] and (s["unload"] or s["reports"]) \
            and used + s["size"] <= TOTAL
        used += s["size"] if s["loaded"] else 0
    return spec, pairs


class PlannerMachine(RuleBasedStateMachine):
    live = False

    @initialize(world=worlds())
    def boot(self, world):
        spec, pairs = world
        self.spec, self.pairs = spec, pairs
        self.clock = FakeClock()
        self.truth = Truth(self.clock, spec)
        for name, s in spec.items():
            self.truth.held[name] = s["size"] if s["loaded"] else 0
        consumers = {}
        for i, (name, s) in enumerate(spec.items()):
            consumers[name] = {"url": f"http://127.0.0.1:{i + 1}", "paths": {f"k{name}": "/"},
                               "vram_resident_mib": s["size"],
                               "can_coexist_with": [y if x == name else x for x, y in pairs
                                                    if name in (x, y)]}
            if s["unload"]:
                consumers[name]["unload"] = {"path": "/unload"}
            if s["managed"]:
                consumers[name]["vram_managed"] = True
        config = parse_config({
            "gpu": {"backend": "ledger", "total_mib": TOTAL, "cushion_mib": CUSHION},
            "scheduler": {"queue_timeout_s": QUEUE_TIMEOUT_S, "evict_settle_s": SETTLE_S,
                          "lock_file": None},
            "routes": {f"k{n}": n for n in spec}, "consumers": consumers}, "model.yaml")
        self.actions = TruthActions(self.truth, self.live)
        self.broker = Broker(config, reader=TruthReader(self.truth) if self.live else None,
                             actions=self.actions, clock=self.clock)
        # The broker's first round of health probes, before its first job.
        for name in spec:
            self.broker.health.probe(name)

    def teardown(self):
        if hasattr(self, "broker"):
            self.broker.stop()

    def coexist(self, a: str, b: str) -> bool:
        return (a, b) in self.pairs or (b, a) in self.pairs

    def room_possible(self, target: str, beliefs: dict) -> bool:
        """Whether unloading every consumer the broker may unload would make
        room in truth (the target's own memory counts for it)."""
        self.truth.tick()
        stays = sum(held for name, held in self.truth.held.items() if name != target and not (
            self.spec[name]["unload"]
            and (not self.coexist(name, target) or beliefs[name] is None)))
        return TOTAL - self.truth.foreign - stays >= self.spec[target]["size"] + CUSHION

    def may_free_by_itself(self) -> bool:
        return bool(self.truth.frees_at) or (self.live and self.truth.foreign > 0) or any(
            self.truth.held[n] for n, s in self.spec.items() if s["managed"])

    @rule(data=st.data())
    def job(self, data):
        target = data.draw(st.sampled_from(sorted(self.spec)))
        beliefs = {n: self.broker.registry.loaded(n) for n in self.spec}
        possible = self.room_possible(target, beliefs)
        free_by_itself = self.may_free_by_itself()
        t0, unloads_before = self.clock.now(), len(self.actions.unloads)
        try:
            job = self.broker.start_job(target, f"k{target}")
        except InsufficientVram as e:
            unloads = self.actions.unloads[unloads_before:]
            assert len(unloads) == len(set(unloads)), f"unloaded twice for one job: {unloads}"
            assert not possible, f"refused {target} though unloads would make room: {e}"
            if not free_by_itself and not self.may_free_by_itself():
                waited = self.clock.now() - t0
                assert waited <= (len(unloads) + 1) * 2 * SETTLE_S, \
                    f"waited {waited:.1f} s for VRAM nothing could free: {e}"
            return
        unloads = self.actions.unloads[unloads_before:]
        assert len(unloads) == len(set(unloads)), f"unloaded twice for one job: {unloads}"
        others = self.truth.used() - self.truth.held[target]
        assert others + self.spec[target]["size"] <= TOTAL, (
            f"over-commit: {target} ({self.spec[target]['size']}) beside {others} MiB "
            f"of {TOTAL}; truth {self.truth.held}, unloads {unloads}")
        if not free_by_itself:
            waited = self.clock.now() - t0
            assert waited <= len(unloads) * 2 * SETTLE_S + 1, f"waited {waited:.1f} s"
        self.truth.held[target] = self.spec[target]["size"]
        self.truth.frees_at.pop(target, None)
        job.finish(ok=True, status=200)

    @rule(data=st.data())
    def a_managed_consumer_expires_its_model(self, data):
        # Only one that says so: to a ledger one that does not is loaded
        # forever, and a reading cannot tell which of two such ones left
        # (test_a_managed_consumer_the_reading_shows_gone_is_not_waited_for
        # has the case where it can).
        managed = sorted(n for n, s in self.spec.items() if s["managed"] and s["reports"])
        assume(managed)
        self.truth.held[data.draw(st.sampled_from(managed))] = 0

    @rule(data=st.data())
    def probe(self, data):
        self.broker.health.probe(data.draw(st.sampled_from(sorted(self.spec))))

    @rule(seconds=st.sampled_from([0.5, 5.0]))
    def time_passes(self, seconds):
        self.clock.advance(seconds)

    @invariant()
    def the_gpu_lock_is_free_between_jobs(self):
        if hasattr(self, "broker"):
            assert self.broker.gpu.lock.snapshot().holder is None


class LivePlannerMachine(PlannerMachine):
    live = True

    # A reading cannot tell another program's memory from a resident
    # target's: without per-process attribution, a consumer that frees behind
    # the broker's back while another program takes the same memory looks
    # exactly like one still resident. The model keeps the two apart: a
    # program takes memory only while every belief in a loaded consumer holds.
    @precondition(lambda self: self.truth.foreign == 0 and all(
        self.truth.held[n] for n in self.spec if self.broker.registry.loaded(n) is True))
    @rule(mib=st.sampled_from([2000, 6000]))
    def another_program_takes_memory(self, mib):
        assume(self.truth.used() + mib <= TOTAL)
        self.truth.foreign = mib

    @precondition(lambda self: self.truth.foreign > 0)
    @rule()
    def the_other_program_exits(self):
        self.truth.foreign = 0

    # The sampler's reading is what the short path decides by, of any age.
    @rule()
    def the_sampler_reads(self):
        self.broker.gpu.sampler.sample()

    # Only one that can be asked: of two that cannot, the reading cannot
    # say which one left.
    @precondition(lambda self: self.truth.foreign == 0)
    @rule(data=st.data())
    def a_consumer_frees_behind_the_brokers_back(self, data):
        reporting = sorted(n for n, s in self.spec.items() if s["reports"])
        assume(reporting)
        self.truth.held[data.draw(st.sampled_from(reporting))] = 0


# 75 runs of 25 steps in `make test`; `make test-long` runs ten times as many.
SETTINGS = settings(max_examples=int(os.environ.get("PLANNER_EXAMPLES", "75")),
                    stateful_step_count=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _own_lock_file(own_gpu_lock_file):
    pass


TestPlannerOnTheLedger = PlannerMachine.TestCase
TestPlannerOnTheLedger.settings = SETTINGS
TestPlannerOnALiveReading = LivePlannerMachine.TestCase
TestPlannerOnALiveReading.settings = SETTINGS


# -- the cases that were found with real services, as examples ---------------

def in_process_broker(consumers: dict, truth_held: dict | None = None, *, live=False):
    """A broker on the ledger (or a live reading of ``Truth``) over these
    consumers; returns (broker, truth, clock)."""
    clock = FakeClock()
    spec = {n: {"late_s": 0, "reports": False, "size": c["vram_resident_mib"]}
            for n, c in consumers.items()}
    truth = Truth(clock, spec)
    truth.held.update(truth_held or {})
    config = parse_config({
        "gpu": {"backend": "ledger", "total_mib": TOTAL, "cushion_mib": CUSHION},
        "scheduler": {"queue_timeout_s": QUEUE_TIMEOUT_S, "evict_settle_s": SETTLE_S},
        "routes": {k: n for n, c in consumers.items() for k in c["paths"]},
        "consumers": {n: {"url": f"http://127.0.0.1:{i + 1}", **c}
                      for i, (n, c) in enumerate(consumers.items())}}, "t.yaml")
    actions = TruthActions(truth, live)
    broker = Broker(config, reader=TruthReader(truth) if live else None, actions=actions,
                    clock=clock)
    return broker, truth, clock


FIVE_SERVICES = {   # issue 18's box: a 16000 MiB card without NVIDIA's library
    "comfyui": {"paths": {"image": "/prompt"}, "vram_resident_mib": 13000,
                "unload": {"path": "/free"}},
    "llm": {"paths": {"llm": "/completion"}, "vram_resident_mib": 8000,
            "unload": {"command": ["systemctl", "stop", "llama-server"]}},
    "whisper": {"paths": {"stt": "/inference"}, "vram_resident_mib": 1000,
                "unload": {"command": ["systemctl", "stop", "whisper-server"]},
                "can_coexist_with": ["comfyui", "llm", "fw", "piper"]},
    "fw": {"paths": {"stt2": "/v1/audio/transcriptions"}, "vram_resident_mib": 1000,
           "can_coexist_with": ["comfyui", "llm", "piper"]},
    "piper": {"paths": {"tts": "/synthesize"}, "vram_resident_mib": 500,
              "can_coexist_with": ["comfyui", "llm"]},
}


def test_a_fresh_broker_on_the_ledger_runs_its_first_tts_job_at_once(own_gpu_lock_file):
    """Every consumer started possibly loaded: the ledger summed to -7500
    MiB free and piper, allowed beside everyone, had no victim: refused
    (or waited out its queue timeout)."""
    broker, truth, clock = in_process_broker(FIVE_SERVICES)
    try:
        t0 = clock.now()
        broker.start_job("piper", "tts").finish(ok=True, status=200)
        assert clock.now() - t0 < 1
        # Those it can neither ask nor unload count as not loaded; the rest
        # are settled when room is needed, by unloading (cheap when they
        # hold nothing).
        assert {n: broker.registry.loaded(n) for n in FIVE_SERVICES} == {
            "comfyui": False, "llm": None, "whisper": None, "fw": False, "piper": True}
        for consumer, kind in (("fw", "stt2"), ("whisper", "stt"), ("comfyui", "image"),
                               ("llm", "llm"), ("piper", "tts")):
            broker.start_job(consumer, kind).finish(ok=True, status=200)
        assert clock.now() - t0 < 1
        assert truth.used() <= TOTAL
    finally:
        broker.stop()


def test_a_restart_with_comfyui_loaded_settles_it_before_the_llm_runs(own_gpu_lock_file):
    broker, truth, _ = in_process_broker(FIVE_SERVICES, {"comfyui": 13000})
    try:
        broker.start_job("llm", "llm").finish(ok=True, status=200)
        assert "comfyui" in broker.actions.unloads
        assert truth.held["comfyui"] == 0
    finally:
        broker.stop()


def test_two_that_fit_apart_and_cannot_be_unloaded_run_the_first_and_refuse_the_second_at_once(
        own_gpu_lock_file):
    """Allowed beside each other, but 10000 + 8000 MiB on a 16000 MiB
    ledger, neither with an unload route: the first job waited 30 s and
    more for memory a ledger never sees come free."""
    broker, _, clock = in_process_broker({
        "big": {"paths": {"image": "/p"}, "vram_resident_mib": 10000,
                "can_coexist_with": ["mid"]},
        "mid": {"paths": {"llm": "/g"}, "vram_resident_mib": 8000}})
    try:
        broker.start_job("big", "image").finish(ok=True, status=200)
        t0 = clock.now()
        with pytest.raises(InsufficientVram, match=r"big 10000 MiB"):
            broker.start_job("mid", "llm")
        assert clock.now() - t0 < 1
    finally:
        broker.stop()


def test_a_resident_target_is_not_credited_with_what_one_possibly_loaded_holds(
        own_gpu_lock_file):
    """Found by the live model: e said it was loaded, then freed behind the
    broker's back; c, possibly loaded since the start, holds 9500 MiB. The
    planner took the memory in use for e's, and e cold-started beside c
    (16500 MiB on a 16000 MiB card)."""
    broker, truth, _ = in_process_broker({
        "c": {"paths": {"kc": "/c"}, "vram_resident_mib": 9500, "unload": {"path": "/u"}},
        "e": {"paths": {"ke": "/e"}, "vram_resident_mib": 7000}}, {"c": 9500, "e": 7000},
        live=True)
    try:
        truth.spec["e"]["reports"] = True
        broker.health.probe("e")
        assert broker.registry.loaded("e") is True and broker.registry.loaded("c") is None
        truth.held["e"] = 0
        job = broker.start_job("e", "ke")
        assert truth.used() + 7000 <= TOTAL, f"over-commit: e beside {truth.used()} MiB"
        assert broker.actions.unloads == ["c"]
        job.finish(ok=True, status=200)
    finally:
        broker.stop()


def test_a_managed_consumer_the_reading_shows_gone_is_not_waited_for(own_gpu_lock_file):
    """A vram_managed consumer that does not report expired its model; the
    broker still believed it loaded, so it waited 300 s for memory the
    reading showed was not there."""
    broker, truth, clock = in_process_broker({
        "m": {"paths": {"llm": "/g"}, "vram_resident_mib": 8000, "vram_managed": True},
        "x": {"paths": {"image": "/p"}, "vram_resident_mib": 10000},
        "y": {"paths": {"tts": "/t"}, "vram_resident_mib": 7000}}, live=True)
    try:
        broker.start_job("m", "llm").finish(ok=True, status=200)
        truth.held["m"] = 8000
        truth.held["m"] = 0                        # expired by itself
        broker.start_job("x", "image").finish(ok=True, status=200)
        truth.held["x"] = 10000
        t0 = clock.now()
        with pytest.raises(InsufficientVram):
            broker.start_job("y", "tts")
        assert clock.now() - t0 < 10
    finally:
        broker.stop()


# -- the short path: a target believed resident, no room to make -------------

TWO = {"a": {"paths": {"ka": "/a"}, "vram_resident_mib": 6000, "unload": {"path": "/u"}},
       "b": {"paths": {"kb": "/b"}, "vram_resident_mib": 6000, "unload": {"path": "/u"},
             "can_coexist_with": ["a"]}}


def counted_reads(broker) -> list:
    reads = []
    read = broker.gpu.reader.read
    broker.gpu.reader.read = lambda: reads.append(1) or read()
    return reads


def run(broker, truth, consumer: str) -> None:
    broker.start_job(consumer, f"k{consumer}").finish(ok=True, status=200)
    truth.held[consumer] = truth.spec[consumer]["size"]


@contextlib.contextmanager
def both_resident_and_sampled():
    """a and b resident on a live reading, the sampler's reading taken half
    a second after: (broker, truth, clock)."""
    broker, truth, clock = in_process_broker(TWO, live=True)
    try:
        run(broker, truth, "a")
        run(broker, truth, "b")
        clock.advance(0.5)
        broker.gpu.sampler.sample()
        yield broker, truth, clock
    finally:
        broker.stop()


def test_a_resident_targets_job_decides_by_the_samplers_recent_reading(own_gpu_lock_file):
    with both_resident_and_sampled() as (broker, truth, clock):
        clock.advance(1.0)
        reads = counted_reads(broker)
        run(broker, truth, "a")
        assert reads == []


def test_a_reading_older_than_fresh_enough_is_taken_again(own_gpu_lock_file):
    with both_resident_and_sampled() as (broker, truth, clock):
        clock.advance(broker.room.fresh_s + 0.1)
        reads = counted_reads(broker)
        run(broker, truth, "a")
        assert reads


def test_a_reading_from_before_a_belief_changed_is_not_decided_by(own_gpu_lock_file):
    """By the beliefs after b's unload, the old reading (b still held)
    would agree with anything: it is read again."""
    with both_resident_and_sampled() as (broker, truth, clock):
        clock.advance(0.5)
        broker.unload("b")
        reads = counted_reads(broker)
        run(broker, truth, "a")
        assert reads


def test_a_recent_reading_that_cannot_hold_the_resident_target_sends_it_to_the_planner(
        own_gpu_lock_file):
    """It freed behind the broker's back: the sampler's reading shows too
    little in use for it, so the job plans, and corrects the belief."""
    broker, truth, clock = in_process_broker(TWO, live=True)
    try:
        run(broker, truth, "a")
        run(broker, truth, "b")
        truth.held["a"] = 0
        clock.advance(0.5)
        broker.gpu.sampler.sample()
        run(broker, truth, "a")
        assert "belief_corrected" in [e["type"] for e in broker.events.since()]
    finally:
        broker.stop()


def test_on_the_ledger_a_resident_targets_job_plans_nothing(own_gpu_lock_file, monkeypatch):
    broker, truth, _ = in_process_broker(TWO)
    try:
        run(broker, truth, "a")
        plans = []
        plan = broker.room.plan
        monkeypatch.setattr(broker.room, "plan", lambda *a, **k: plans.append(a) or plan(*a, **k))
        run(broker, truth, "a")
        assert plans == []
        run(broker, truth, "b")          # not yet loaded: planned
        assert plans
    finally:
        broker.stop()


# -- the short path against what the broker has seen since ------------------

THREE = {**TWO, "c": {"paths": {"kc": "/c"}, "vram_resident_mib": 4000, "unload": {"path": "/u"},
                      "can_coexist_with": ["a", "b"]}}


def test_a_lease_granted_on_a_fresher_reading_is_not_overruled_by_an_older_one(
        own_gpu_lock_file):
    """a freed behind the broker's back just after the sampler's reading. A
    program's lease then read the card afresh (a gone: beliefs_contradicted),
    was given a's memory and changed no belief; its program outlived the
    lease (its ttl, a cached allocator). a's next job, within fresh_s of the
    old reading, decided by it: a cold-started beside b and the program,
    17000 MiB on a 16000 MiB card. The full path reads 11000 MiB in use,
    corrects a's belief and, with c possibly loaded (never settled since
    the start), finds no room: it settles c and a and refuses. Every
    reading the broker takes is now the sampler's newest."""
    broker, truth, clock = in_process_broker(THREE, live=True)
    try:
        run(broker, truth, "a")
        run(broker, truth, "b")
        # c was never needed settled: possibly loaded, as at every start.
        assert broker.registry.loaded("c") is None
        clock.advance(0.5)
        broker.gpu.sampler.sample()               # a and b resident: 12000 MiB in use
        truth.held["a"] = 0                       # a's service restarted, empty
        lease = broker.leases.take(vram_mib=5000, label="nb", ttl_s=60.0,
                                   coexist=frozenset(), gpus=(0,))
        assert lease.job.evicted == []            # it fit in a's memory: no belief changed
        assert "beliefs_contradicted" in [e["type"] for e in broker.events.since()]
        truth.foreign = 5000                      # the program takes its memory
        broker.leases.end(lease.id, "ttl")        # and keeps it past its lease
        clock.advance(0.5)
        try:
            job = broker.start_job("a", "ka")
        except InsufficientVram:
            return                                # refused: nothing over-committed
        others = truth.used() - truth.held["a"]
        assert others + THREE["a"]["vram_resident_mib"] <= TOTAL, (
            f"over-commit: a (6000) cold-starts beside {others} MiB of {TOTAL}")
        job.finish(ok=True, status=200)
    finally:
        broker.stop()


def test_a_reading_taken_at_the_instant_a_belief_changed_is_not_decided_by(
        own_gpu_lock_file):
    """On one clock reading the order of a sample and a change is unknown:
    an equal time is before, never after."""
    with both_resident_and_sampled() as (broker, truth, clock):
        broker.unload("b")                       # the same instant
        reads = counted_reads(broker)
        run(broker, truth, "a")
        assert reads


def test_the_sampler_offers_a_reading_for_decisions_only_once_attributed(
        own_gpu_lock_file):
    """While on_sample gives a reading's memory to its consumers (which may
    change a belief), a decision must not take that reading yet."""
    broker, truth, clock = in_process_broker(TWO, live=True)
    try:
        run(broker, truth, "a")
        clock.advance(0.5)
        sampler = broker.gpu.sampler
        seen = []
        attribute = sampler._on_sample
        sampler._on_sample = lambda reading, at: (
            seen.append(sampler.recent(10.0, after=float("-inf")) is reading),
            attribute(reading, at))
        sampler.sample()
        assert seen == [False]
        assert sampler.recent(10.0, after=float("-inf")) is not None
    finally:
        broker.stop()
