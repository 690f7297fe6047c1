"""Several GPUs in one box: a lock, a reading and a ledger per card.

The core on a ``Box`` of simulated cards (in process, a fake clock): jobs
on two cards run at once, one card runs one job at a time, room is made
only on the cards a job needs, a consumer spanning cards takes them in
index order. A model-based machine throws random arrivals and finishes
at a box with a spanning consumer and asserts, after every step, that no
card runs two jobs, no card is over-committed, and that every job ends.
Then the NVML reader against a fake ``pynvml`` with two devices, and the
HTTP contract against two simulated cards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conftest import ROOT, chromium, deep_merge, needs_chromium, sim_config, wait_until
from mgpumanager.broker import Broker
from mgpumanager.clock import FakeClock
from mgpumanager.config import parse_config
from mgpumanager.consumers import HealthResult
from mgpumanager.errors import ConfigError
from mgpumanager.gpu import GpuReading, NvmlReader
from mgpumanager.oslock import device_lock_file
from mgpumanager.sim import start_cluster

TOTAL = 16000
CUSHION = 256


class Box:
    """What each card really holds, and who runs on each right now."""

    def __init__(self, placement: dict[str, tuple[int, ...]], sizes: dict[str, int],
                 cards: int = 2):
        self.placement, self.sizes = placement, sizes
        self.held = [dict() for _ in range(cards)]     # card -> {consumer: MiB}
        self.running: list[list[str]] = [[] for _ in range(cards)]
        self.problems: list[str] = []
        self.unloads: list[str] = []
        self._mutex = threading.Lock()

    def share(self, name: str) -> int:
        return -(-self.sizes[name] // len(self.placement[name]))

    def used(self, card: int) -> int:
        return sum(self.held[card].values())

    def run(self, name: str) -> None:
        """A job of ``name`` begins: it loads (really allocating) if it was not."""
        with self._mutex:
            for card in self.placement[name]:
                if self.running[card]:
                    self.problems.append(f"{name} ran on GPU {card} beside "
                                         f"{self.running[card]}")
                self.running[card].append(name)
                if name not in self.held[card]:
                    if self.used(card) + self.share(name) > TOTAL:
                        self.problems.append(f"{name} over-committed GPU {card}: "
                                             f"{self.held[card]}")
                    self.held[card][name] = self.share(name)

    def done(self, name: str) -> None:
        with self._mutex:
            for card in self.placement[name]:
                self.running[card].remove(name)

    def unload(self, name: str) -> None:
        with self._mutex:
            self.unloads.append(name)
            for card in self.placement[name]:
                self.held[card].pop(name, None)


class CardReader:
    source, live = "box", True

    def __init__(self, box: Box, card: int, total_mib: int = TOTAL):
        self.box, self.card, self.total_mib = box, card, total_mib

    def read(self) -> GpuReading:
        used = self.box.used(self.card)
        return GpuReading("box", self.card, total_mib=self.total_mib, used_mib=used,
                          free_mib=self.total_mib - used)

    def close(self):
        pass


class BoxActions:
    def __init__(self, box: Box):
        self.box = box

    def probe_health(self, c):
        return HealthResult(True, loaded=any(c.name in h for h in self.box.held))

    def call(self, c, call, timeout_s=None):
        assert call is c.unload
        self.box.unload(c.name)
        return None

    def is_busy(self, c):
        return False


def box_broker(placement: dict[str, tuple[int, ...]], sizes: dict[str, int], *,
               coexist: dict[str, list[str]] | None = None, scheduler: dict | None = None,
               extra: dict[str, dict] | None = None, actions=BoxActions,
               totals: tuple[int, int] = (TOTAL, TOTAL), ledger: bool = False):
    """A broker over two simulated cards (of ``totals`` MiB; read live, or
    on its ledger): (broker, box). ``extra``: more settings per consumer."""
    box = Box(placement, sizes)
    consumers = {}
    for i, name in enumerate(placement):
        gpus = placement[name]
        consumers[name] = {"url": f"http://127.0.0.1:{i + 1}", "paths": {name: "/"},
                           "vram_resident_mib": sizes[name], "unload": {"path": "/unload"},
                           "can_coexist_with": (coexist or {}).get(name, []),
                           **({"gpu": gpus[0]} if len(gpus) == 1 else {"gpus": list(gpus)}),
                           **(extra or {}).get(name, {})}
    config = parse_config({
        "gpu": {"backend": "ledger", "cushion_mib": CUSHION},
        "gpus": [{"index": i, "total_mib": total} for i, total in enumerate(totals)],
        "scheduler": {"queue_timeout_s": 300.0, "evict_settle_s": 0, "max_queue": 64,
                      **(scheduler or {})},
        "routes": {n: n for n in placement}, "consumers": consumers}, "box.yaml")
    readers = None if ledger else {i: CardReader(box, i, total)
                                   for i, total in enumerate(totals)}
    broker = Broker(config, readers=readers, actions=actions(box), clock=FakeClock())
    for name in placement:
        broker.health.probe(name)
    return broker, box


def started(broker, box, name):
    job = broker.start_job(name, name)
    box.run(name)
    return job


def finished(box, job):
    box.done(job.consumer)
    job.finish(ok=True)


def waiting(broker) -> int:
    return sum(g.lock.snapshot().queue_depth for g in broker.gpus)


# -- the config --------------------------------------------------------------------

TWO_CARDS = {
    "gpu": {"backend": "ledger"},
    "gpus": [{"index": 0, "total_mib": 24576}, {"index": 1, "total_mib": 16384}],
    "routes": {"image": "comfyui", "llm": "vllm"},
    "consumers": {
        "comfyui": {"url": "http://127.0.0.1:1", "paths": {"image": "/prompt"},
                    "vram_resident_mib": 13000, "gpu": 1},
        "vllm": {"url": "http://127.0.0.1:2", "paths": {"llm": "/v1/completions"},
                 "vram_resident_mib": 20000, "gpus": [1, 0]}}}


def test_a_two_card_config_names_each_consumers_cards_and_splits_a_spanning_size():
    cfg = parse_config(TWO_CARDS, "two.yaml")
    assert [d.index for d in cfg.devices] == [0, 1]
    assert [d.total_mib for d in cfg.devices] == [24576, 16384]
    assert cfg.consumers["comfyui"].gpus == (1,)
    assert cfg.consumers["vllm"].gpus == (0, 1)         # index order, whatever the YAML's
    assert cfg.consumers["vllm"].share_mib() == 10000
    assert cfg.on_gpu(0) == ["vllm"] and cfg.on_gpu(1) == ["comfyui", "vllm"]


def test_with_several_cards_every_problem_is_named_with_its_key_path():
    bad = deep_merge(TWO_CARDS, {
        "gpu": {"index": 1},
        "gpus": [{"index": 0, "total_mib": 24576}, {"index": 1}, {"index": 1}, {}],
        "consumers": {"comfyui": {"gpu": 2}, "vllm": {"gpus": [0, 0]},
                      "extra": {"url": "http://127.0.0.1:3", "paths": {"x": "/"},
                                "vram_resident_mib": 1}}})
    with pytest.raises(ConfigError) as e:
        parse_config(bad, "two.yaml")
    text = str(e.value)
    for expected in ("gpu.index: no gpu.index beside a gpus list",
                     "gpus[1].total_mib: a whole number of MiB (required for backend ledger",
                     "gpus[2].index: expected an index no other entry of gpus has, got 1",
                     "gpus[3].index: the GPU's index (required",
                     "consumers.comfyui.gpu: expected the index of a GPU in gpus (0, 1), got 2",
                     "consumers.vllm.gpus[1]: expected a GPU not already listed, got 0",
                     "consumers.extra.gpu: the index of a GPU in gpus (0, 1) (required with "
                     "several GPUs"):
        assert expected in text, text


def test_one_card_needs_no_gpu_key_and_takes_gpu_index():
    cfg = parse_config({"gpu": {"backend": "ledger", "total_mib": 8000, "index": 1},
                        "routes": {"x": "a"},
                        "consumers": {"a": {"url": "http://127.0.0.1:1", "paths": {"x": "/"},
                                            "vram_resident_mib": 1}}}, "one.yaml")
    assert [(d.index, d.total_mib) for d in cfg.devices] == [(1, 8000)]
    assert cfg.consumers["a"].gpus == (1,) and not cfg.several_gpus


def test_each_card_has_its_own_lock_file_and_card_zero_keeps_the_old_name():
    assert device_lock_file("/run/mgpumanager/gpu.lock", 0) == "/run/mgpumanager/gpu.lock"
    assert device_lock_file("/run/mgpumanager/gpu.lock", 1) == "/run/mgpumanager/gpu.1.lock"
    assert device_lock_file("/run/x.d/lock", 2) == "/run/x.d/lock.2"
    b, _ = box_broker({"a": (0,), "b": (1,)}, {"a": 1, "b": 1})
    paths = [g.oslock.path for g in b.gpus]
    assert len(set(paths)) == 2 and paths[1].endswith("gpu.1.lock")


# -- the core ---------------------------------------------------------------------

PAIR = {"a": (0,), "c": (1,)}


def test_jobs_on_two_cards_hold_their_turns_at_once():
    b, box = box_broker(PAIR, {"a": 8000, "c": 8000})
    first = started(b, box, "a")
    second = started(b, box, "c")              # does not wait for the first card's job
    assert b.gpus[0].current is first.lease and b.gpus[1].current is second.lease
    assert b.status()["scheduler"]["in_flight"] == 2
    finished(box, first)
    finished(box, second)
    assert not box.problems


def test_one_card_still_runs_one_job_at_a_time():
    b, box = box_broker({"a": (0,), "b": (0,), "c": (1,)}, {"a": 4000, "b": 4000, "c": 4000},
                        coexist={"a": ["b"]})
    first = started(b, box, "a")
    later = []
    t = threading.Thread(target=lambda: later.append(started(b, box, "b")), daemon=True)
    t.start()
    wait_until(lambda: b.gpus[0].lock.snapshot().queue_depth == 1, what="b queued on GPU 0")
    other = started(b, box, "c")               # GPU 1 is free: no wait behind GPU 0's queue
    assert not later
    finished(box, first)
    t.join(5)
    assert later and not box.problems
    finished(box, later[0])
    finished(box, other)


def test_eviction_stays_on_its_card():
    # a and b cannot share GPU 0; c on GPU 1 is in the way of nothing.
    b, box = box_broker({"a": (0,), "b": (0,), "c": (1,)}, {"a": 9000, "b": 9000, "c": 15000})
    for name in ("c", "a", "b"):
        finished(box, started(b, box, name))
    assert box.unloads == ["a"]                # c, the biggest and oldest, stayed
    assert "c" in box.held[1] and not box.problems


def test_a_spanning_consumer_makes_room_on_each_of_its_cards():
    b, box = box_broker({"a": (0,), "c": (1,), "v": (0, 1)}, {"a": 9000, "c": 9000, "v": 20000})
    finished(box, started(b, box, "a"))
    finished(box, started(b, box, "c"))
    job = started(b, box, "v")                 # 10000 on each card: a and c must go
    assert sorted(job.evicted) == ["a", "c"] and set(box.unloads) == {"a", "c"}
    assert b.gpus[0].current is job.lease and b.gpus[1].current is job.lease.companions[0]
    finished(box, job)
    assert b.gpus[0].current is None and b.gpus[1].current is None
    assert not box.problems


def test_a_spanning_job_waits_for_every_card_and_holds_the_first_meanwhile():
    b, box = box_broker({"a": (0,), "c": (1,), "v": (0, 1)}, {"a": 1000, "c": 1000, "v": 2000},
                        coexist={"v": ["a", "c"], "a": ["c"]})
    on_one = started(b, box, "c")
    spanning = []
    t = threading.Thread(target=lambda: spanning.append(started(b, box, "v")), daemon=True)
    t.start()
    wait_until(lambda: b.gpus[1].lock.snapshot().queue_depth == 1, what="v waiting for GPU 1")
    assert b.gpus[0].lock.snapshot().holder == "v:v"    # in index order: GPU 0 first
    on_zero = []
    t0 = threading.Thread(target=lambda: on_zero.append(started(b, box, "a")), daemon=True)
    t0.start()
    wait_until(lambda: b.gpus[0].lock.snapshot().queue_depth == 1, what="a behind v")
    finished(box, on_one)
    t.join(5)
    assert spanning and not on_zero
    finished(box, spanning[0])
    t0.join(5)
    assert on_zero and not box.problems
    finished(box, on_zero[0])


def test_a_lease_on_one_card_is_counted_held_on_that_cards_ledger_only():
    b, box = box_broker(PAIR, {"a": 1000, "c": 1000})
    lease = b.leases.take(vram_mib=6000, label="train", ttl_s=60, coexist=frozenset(),
                          gpus=(1,))
    assert b.gpus[1].reader is not None and b.leases.held_mib(1) == 6000
    assert b.leases.held_mib(0) == 0
    assert b.gpus[1].current is lease.job.lease and b.gpus[0].current is None
    assert lease.to_json(0)["gpus"] == [1]
    b.leases.end(lease.id)
    assert b.gpus[1].current is None


def test_status_has_each_cards_reading_queue_and_consumers():
    b, box = box_broker(PAIR, {"a": 1000, "c": 3000})
    job = started(b, box, "c")
    status = b.status()
    assert [g["index"] for g in status["gpus"]] == [0, 1]
    assert status["gpu"]["index"] == 0 and "queue" not in status["gpu"]
    one = status["gpus"][1]
    assert one["consumers"] == ["c"] and one["queue"]["running"]["consumer"] == "c"
    assert one["used_mib"] == 3000 and status["gpus"][0]["queue"]["running"] is None
    assert status["scheduler"]["running"]["consumer"] == "c"
    finished(box, job)


# -- random arrivals at a box with a spanning consumer (model-based) -----------------

PLACEMENT = {"a": (0,), "b": (0,), "c": (1,), "d": (1,), "v": (0, 1)}
MAX_PENDING = 6


class SeveralCardsMachine(RuleBasedStateMachine):
    """Arrivals and finishes in any order. After every step, once each
    job's thread has either started or is waiting in a queue: no card runs
    two jobs, nothing over-commits a card. At the end every job drains."""

    @initialize(sizes=st.fixed_dictionaries({n: st.sampled_from([2000, 6000, 9000, 12000])
                                             for n in PLACEMENT}),
                pairs=st.sets(st.sampled_from([("a", "b"), ("c", "d"), ("a", "v"),
                                               ("c", "v"), ("b", "v")])))
    def boot(self, sizes, pairs):
        # Those allowed to stay beside each other must fit together: the
        # planner never unloads one for the other (the config says so).
        coexist: dict[str, list[str]] = {}
        kept: set[str] = set()
        for x, y in sorted(pairs):
            together = kept | {x, y}
            if all(sum(-(-sizes[n] // len(PLACEMENT[n])) for n in together
                       if card in PLACEMENT[n]) <= TOTAL - CUSHION for card in (0, 1)):
                kept = together
                coexist.setdefault(x, []).append(y)
        self.broker, self.box = box_broker(PLACEMENT, sizes, coexist=coexist)
        self.running: dict[int, object] = {}    # arrival number -> its running job
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._mutex = threading.Lock()

    def _arrive(self, name: str, number: int) -> None:
        try:
            job = started(self.broker, self.box, name)
        except BaseException as e:                  # noqa: BLE001 - asserted empty
            self.errors.append(e)
            return
        with self._mutex:
            self.running[number] = job

    def pending(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def settled(self) -> bool:
        """Every job's thread runs its job or waits in a queue, and no card
        is free while a job waits for it (one chosen, not yet awake)."""
        snaps = [g.lock.snapshot() for g in self.broker.gpus]
        return (self.pending() == sum(s.queue_depth for s in snaps)
                and all(s.holder is not None or not s.queue_depth for s in snaps))

    def settle(self) -> None:
        # Then the next step sees the same state on every run of these steps.
        wait_until(self.settled, timeout=10, what="every job running or queued")

    @rule(name=st.sampled_from(sorted(PLACEMENT)))
    def a_job_arrives(self, name):
        if self.pending() >= MAX_PENDING:
            return
        t = threading.Thread(target=self._arrive, args=(name, len(self.threads)), daemon=True)
        self.threads.append(t)
        t.start()
        self.settle()

    @rule(which=st.integers(0, MAX_PENDING * 2))
    def a_job_finishes(self, which):
        # Which job, by arrival, drawn the same way whatever runs: with two
        # cards, what runs after a step can differ between runs of it (two
        # jobs granted at once race to the shared beliefs, and the affinity
        # chooser reads them), and hypothesis needs the same draws each time.
        with self._mutex:
            if not self.running:
                return
            numbers = sorted(self.running)
            job = self.running.pop(numbers[which % len(numbers)])
        finished(self.box, job)
        self.settle()

    @invariant()
    def no_card_runs_two_jobs_or_is_over_committed(self):
        if hasattr(self, "box"):
            assert not self.box.problems
            assert not self.errors, self.errors

    def teardown(self):
        if not hasattr(self, "broker"):
            return
        deadline = time.monotonic() + 20
        while self.pending() or self.running:
            assert time.monotonic() < deadline, "jobs never drained: a deadlock"
            with self._mutex:
                jobs, self.running = list(self.running.values()), {}
            for job in jobs:
                finished(self.box, job)
            time.sleep(0.01)
        assert not self.box.problems and not self.errors
        self.broker.stop()


TestSeveralCards = SeveralCardsMachine.TestCase
TestSeveralCards.settings = settings(
    max_examples=int(os.environ.get("PLANNER_EXAMPLES", "30")), stateful_step_count=25,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- NVML with two devices --------------------------------------------------------------

def fake_pynvml(devices: list[dict]):
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass
    nv.NVMLError = NVMLError
    nv.nvmlMemory_v2 = 2
    nv.nvmlInit = lambda: None
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    nv.nvmlDeviceGetName = lambda h: h["name"].encode()
    mib = 1024 * 1024
    nv.nvmlDeviceGetMemoryInfo = lambda h, version=None: types.SimpleNamespace(
        total=h["total"] * mib, used=h["used"] * mib, free=(h["total"] - h["used"]) * mib)
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h["util"])
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=p, usedGpuMemory=m * mib) for p, m in h["procs"]]
    return nv


def test_the_nvml_reader_reads_the_device_of_its_index(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([
        {"name": "RTX 3090", "total": 24576, "used": 1000, "util": 5, "procs": [(11, 900)]},
        {"name": "RTX 4060", "total": 8192, "used": 6000, "util": 80, "procs": [(22, 5800)]}]))
    zero, one = NvmlReader(0).read(), NvmlReader(1).read()
    assert (zero.index, zero.name, zero.total_mib, zero.used_mib) == (0, "RTX 3090", 24576, 1000)
    assert (one.index, one.name, one.total_mib, one.free_mib, one.util_pct) == \
        (1, "RTX 4060", 8192, 2192, 80)
    assert one.processes == ((22, 5800),) and zero.processes == ((11, 900),)


# -- the HTTP contract on two simulated cards ------------------------------------------

@pytest.fixture
def two_cards():
    cluster = start_cluster(24576, time_scale=0.2, more_gpus_mib=(16384,),
                            placement={"comfyui": 1})
    yield cluster
    cluster.stop()


@pytest.fixture
def two_card_broker(two_cards, start_broker):
    cfg = sim_config(two_cards)
    cfg["gpus"] = [{"index": 0}, {"index": 1}]
    for name, c in cfg["consumers"].items():
        c["gpu"] = 1 if name == "comfyui" else 0
    b = start_broker(cfg)
    b.wait_healthy(*cfg["consumers"])
    return b


def test_an_image_on_the_second_card_runs_beside_speech_on_the_first(two_cards,
                                                                      two_card_broker):
    url = two_card_broker.url
    results = {}

    def image():
        results["image"] = requests.post(url + "/v1/image",
                                         json={"prompt": {"1": {}}, "steps": 10}).status_code
    t = threading.Thread(target=image, daemon=True)
    t.start()
    wait_until(lambda: two_cards.gpus[1].reading()["running_jobs"] == 1, what="the image runs")
    assert requests.post(url + "/v1/tts", json={"text": "hello"}, timeout=10).status_code == 200
    assert two_cards.gpus[1].reading()["running_jobs"] == 1   # the image was not waited for
    t.join(30)
    assert results["image"] == 200
    assert not two_cards.gpus[0].overlaps() and not two_cards.gpus[1].overlaps()
    assert two_cards.gpus[0].ooms == 0 and two_cards.gpus[1].ooms == 0
    status = requests.get(url + "/v1/status").json()
    assert [g["total_mib"] for g in status["gpus"]] == [24576, 16384]
    assert status["gpus"][1]["consumers"] == ["comfyui"]
    metrics = requests.get(url + "/metrics").text
    assert 'mgpumanager_gpu_memory_total_bytes{gpu="1",source="sim"}' in metrics
    assert 'mgpumanager_queue_depth{gpu="1"}' in metrics

    def jobs_by_card():
        events = requests.get(url + "/v1/events").json()["events"]
        return {(e["consumer"], tuple(e["gpus"])) for e in events if e["type"] == "job"}
    # A job's event is written once its answer has gone out, a moment later.
    wait_until(lambda: jobs_by_card() >= {("comfyui", (1,)), ("mvoice", (0,))},
               what="each job's event naming its card")
    page = requests.get(url + "/").text            # one VRAM bar and queue per card
    assert 'id="vram-bar-1"' in page and "Who holds the VRAM on GPU 1" in page
    assert 'id="waiting-0"' in page and 'id="waiting-1"' in page


def test_a_lease_names_its_card_and_a_bad_one_is_a_400(two_card_broker):
    url = two_card_broker.url
    r = requests.post(url + "/v1/leases", json={"vram_mib": 1000, "gpu": 1, "ttl_s": 30})
    assert r.status_code == 201 and r.json()["gpus"] == [1]
    status = requests.get(url + "/v1/status").json()
    assert status["gpus"][1]["queue"]["running"]["kind"] == "lease"
    assert status["gpus"][0]["queue"]["running"] is None
    assert requests.delete(url + "/v1/leases/" + r.json()["id"]).status_code == 204
    bad = requests.post(url + "/v1/leases", json={"vram_mib": 1000, "gpu": 7})
    assert bad.status_code == 400 and "gpu: a GPU's index" in bad.json()["error"]["message"]


def test_run_with_gpu_leases_that_card_and_shows_the_command_only_it(two_card_broker):
    script = ("import os; print(os.environ['CUDA_VISIBLE_DEVICES'], "
              "os.environ['CUDA_DEVICE_ORDER'])")
    p = subprocess.run([sys.executable, "-m", "mgpumanager.cli", "run", "--url",
                        two_card_broker.url, "--gpu", "1", "--vram", "1000", "--", sys.executable,
                        "-c", script], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, MGPUMANAGER_TOKEN=""))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "PCI_BUS_ID"]      # numbered as nvidia-smi numbers them
    bad = subprocess.run([sys.executable, "-m", "mgpumanager.cli", "run", "--gpu", "x", "--",
                          "true"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "GPU indices like 0 or 0,1" in bad.stderr


@pytest.mark.browser
@needs_chromium
def test_the_page_redraws_each_cards_bar_in_a_real_browser(two_card_broker):
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(two_card_broker.url + "/")
        page.wait_for_selector("#live.on", timeout=10_000)
        assert requests.post(two_card_broker.url + "/v1/consumers/comfyui/unload").ok
        page.wait_for_function(
            "!document.getElementById('vram-bar-1').textContent.includes('comfyui')",
            timeout=10_000)
        assert requests.post(two_card_broker.url + "/v1/image",
                             json={"prompt": {"1": {}}}).status_code == 200
        page.wait_for_function(
            "document.getElementById('vram-bar-1').textContent.includes('comfyui')",
            timeout=10_000)
        assert "comfyui" not in page.inner_text("#vram-bar-0")
        out = Path(os.environ.get("TEST_OUTPUT", ROOT / "test-output"))
        out.mkdir(exist_ok=True)
        page.screenshot(path=str(out / "status-page-two-cards.png"), full_page=True)


def test_the_two_card_demo_puts_comfyui_alone_on_the_second_card():
    import yaml
    from mgpumanager.demo import ON_SECOND_GPU, TWO_GPUS_MIB, two_gpu_config
    cfg = parse_config(yaml.safe_load(two_gpu_config()), "demo.yaml")
    assert cfg.on_gpu(1) == list(ON_SECOND_GPU) == ["comfyui"]
    assert set(cfg.on_gpu(0)) == {"mvoice", "whisper", "ollama"} and not cfg.warnings()
    # The rest do not all fit on the first card: it still swaps.
    assert sum(cfg.consumers[n].vram_resident_mib for n in cfg.on_gpu(0)) > TWO_GPUS_MIB[0]


def test_a_lease_without_gpu_takes_every_card_even_the_one_of_gpu_index_1():
    cfg = parse_config({"gpu": {"backend": "ledger", "total_mib": 8000, "index": 1},
                        "routes": {"x": "a"},
                        "consumers": {"a": {"url": "http://127.0.0.1:1", "paths": {"x": "/"},
                                            "vram_resident_mib": 1}}}, "one.yaml")
    b = Broker(cfg, clock=FakeClock())
    lease = b.leases.take(vram_mib=100, label="x", ttl_s=10, coexist=frozenset())
    assert lease.gpus == (1,) and b.gpus[1].current is lease.job.lease
    b.leases.end(lease.id)
    b.stop()
    b2, _ = box_broker(PAIR, {"a": 1, "c": 1})
    both = b2.leases.take(vram_mib=100, label="x", ttl_s=10, coexist=frozenset())
    assert both.gpus == (0, 1) and b2.gpus[1].current is both.job.lease.companions[0]
    b2.leases.end(both.id)
