"""Attacks on several GPUs per box: leaked turns, races across cards, config."""

from __future__ import annotations

import threading

import pytest

from conftest import wait_until
from mgpumanager.config import parse_config
from mgpumanager.errors import BrokerError, ConfigError
from mgpumanager.gpu import GpuReading
from test_several_gpus import TOTAL, BoxActions, box_broker, finished, started


def test_a_spanning_job_whose_first_turn_expires_while_it_waits_for_the_second_leaks_nothing():
    # The turn on GPU 0 is granted first and its deadline runs while the job
    # still waits for GPU 1 (queue_timeout_s above job_timeout_s, or a short
    # lease ttl): the watchdog ends it; the turn on GPU 1, granted later, must
    # not stay held forever.
    b, box = box_broker({"c": (1,), "v": (0, 1)}, {"c": 1000, "v": 2000},
                         scheduler={"queue_timeout_s": 10000, "job_timeout_s": 100},
                         extra={"v": {"can_coexist_with": ["c"]}})
    # GPU 1 is held by a lease that outlives what follows (its hold is its
    # ttl, not job_timeout_s): only v's own turn can expire meanwhile.
    holder = b.leases.take(vram_mib=0, label="hold", ttl_s=1000, coexist=frozenset(),
                           gpus=(1,))
    out = {}

    def spanning():
        try:
            out["job"] = started(b, box, "v")
        except BrokerError as e:
            out["error"] = e
    t = threading.Thread(target=spanning, daemon=True)
    t.start()
    wait_until(lambda: b.gpus[1].lock.snapshot().queue_depth == 1, what="v waits for GPU 1")
    b.clock.advance(200)                      # past v's GPU 0 deadline and the grace
    b.clock.advance(1)
    # A watchdog that watches v's first turn ends it now (its own thread).
    wait_until(lambda: not b.gpus[0].watch.held() or b.gpus[0].current is None, timeout=5,
               what="the watchdog to act on v's first turn, if it watches it")
    # GPU 1 is given up; v gets it, after GPU 0's turn is long gone if it was watched.
    b.leases.end(holder.id)
    t.join(5)
    assert not t.is_alive()
    if "job" in out:
        finished(box, out["job"])
    wait_until(lambda: b.gpus[0].current is None, timeout=5, what="GPU 0 free")
    assert b.gpus[1].current is None, f"GPU 1 still held by {b.gpus[1].current}"
    assert b.gpus[1].lock.snapshot().holder is None
    # And a later job on GPU 1 runs.
    finished(box, started(b, box, "c"))


class BusyAtStart(BoxActions):
    """``img`` (GPU 1) is still rendering for the worker before this one:
    its busy probe answers only once ``idle`` is set, then says idle."""

    def __init__(self, box):
        super().__init__(box)
        self.idle = threading.Event()
        self.asked: list[str] = []

    def is_busy(self, c):
        self.asked.append(c.name)
        if c.name == "img":
            self.idle.wait(10)
        return False


def test_the_busy_check_at_start_is_per_card():
    # The first job on GPU 0 must not wait for a busy service on GPU 1, and
    # a job on GPU 1 racing it must not skip the wait for that service.
    b, box = box_broker({"a": (0,), "img": (1,)}, {"a": 1000, "img": 1000},
                         extra={"img": {"busy": {"path": "/queue"}}},
                         actions=BusyAtStart)
    actions = b.actions
    got = {}
    t0 = threading.Thread(target=lambda: got.__setitem__("a", started(b, box, "a")),
                          daemon=True)
    t0.start()
    t0.join(1.0)
    t1 = threading.Thread(target=lambda: got.__setitem__("img", started(b, box, "img")),
                          daemon=True)
    t1.start()
    t1.join(1.0)
    ran_while_busy = "img" in got
    a_waited = t0.is_alive()
    actions.idle.set()
    t0.join(5)
    t1.join(5)
    for job in got.values():
        finished(box, job)
    assert (a_waited, ran_while_busy) == (False, False), \
        "(the job on GPU 0 waited for img on GPU 1, img's job began while img was busy)"
    assert not ran_while_busy, "img's job on GPU 1 began while img was still busy"


def test_a_spanning_consumer_measured_above_its_share_on_its_first_card_is_planned_so():
    # v's 20000 MiB is 10000 on each card; its processes are measured on its
    # first card holding 12000: it holds 12000 on each, and a measurement is
    # never ignored. The per-card figure must not be read as v's whole size.
    from mgpumanager.gpu import GpuReading
    from mgpumanager.procs import Measured
    b, box = box_broker({"a": (0,), "v": (0, 1)}, {"a": 1000, "v": 20000},
                         extra={"v": {"pids_from": {"cmdline": "vllm"}}})
    b.room.attribute.attributions[0].measure = lambda procs: {"v": Measured(12000, (7,))}
    reading = GpuReading("box", 0, total_mib=TOTAL, used_mib=12000, free_mib=TOTAL - 12000,
                         processes=((7, 12000),))
    b.room.attribute(reading, b.clock.now(), 0)
    assert b.registry.loaded("v") is True
    assert b.registry.views(0)["v"].resident_mib >= 12000
    assert b.registry.views(1)["v"].resident_mib >= 12000
    assert b.registry.held_mib(1) >= 12000        # the ledger of GPU 1
    # Only a CUDA context on each card: not loaded, as on one card.
    b.room.attribute.attributions[0].measure = lambda procs: {"v": Measured(700, (7,))}
    b.room.attribute(reading, b.clock.now() + 1, 0)
    assert b.registry.loaded("v") is False


CARDS = {"gpu": {"backend": "ledger"},
         "gpus": [{"index": 0, "total_mib": 24576}, {"index": 1, "total_mib": 16384}],
         "routes": {"image": "comfyui"},
         "consumers": {"comfyui": {"url": "http://127.0.0.1:1", "paths": {"image": "/prompt"},
                                   "vram_resident_mib": 13000, "gpu": 0}}}


@pytest.mark.parametrize("gpus, where", [
    ([None], "gpus[0]"),                                    # a ledger with no total at all
    ([None, {"index": 0, "total_mib": 5000}], "gpus[0]"),   # an entry silently dropped
])
def test_a_null_gpus_entry_is_a_problem_named_by_its_path(gpus, where):
    with pytest.raises(ConfigError) as e:
        parse_config({**CARDS, "gpus": gpus}, "x.yaml")
    assert f"x.yaml: {where}: " in str(e.value)


@pytest.mark.parametrize("key, value", [("gpu", 1.0), ("gpus", [0, 1.0])])
def test_a_consumers_gpu_is_a_whole_number_not_a_float_equal_to_one(key, value):
    node = {**CARDS["consumers"]["comfyui"]}
    node.pop("gpu")
    node[key] = value
    with pytest.raises(ConfigError) as e:
        parse_config({**CARDS, "consumers": {"comfyui": node}}, "x.yaml")
    assert "consumers.comfyui.gpu" in str(e.value)


def test_a_spanning_job_that_can_never_fit_on_its_second_card_unloads_nothing_on_the_first():
    # v's 34000 MiB is 17000 on each card: more than GPU 1's 16000 (GPU 0
    # has 24000). It is
    # refused (insufficient_vram) every time it is asked for; a on GPU 0
    # must not be unloaded each time for a job that cannot run.
    from mgpumanager.errors import InsufficientVram
    b, box = box_broker({"a": (0,), "v": (0, 1)}, {"a": 9000, "v": 34000},
                         totals=(24000, TOTAL))
    finished(box, started(b, box, "a"))
    with pytest.raises(InsufficientVram):
        started(b, box, "v")
    assert box.unloads == [] and b.registry.loaded("a") is True
    assert b.gpus[0].current is None and b.gpus[1].current is None


def test_a_leases_pids_are_those_holding_memory_now_not_every_one_ever_seen():
    import os
    import subprocess
    from mgpumanager.clock import Clock
    from mgpumanager.program_leases import ProgramLease, ProgramLeases
    child = subprocess.Popen(["sleep", "30"])
    try:
        leases = ProgramLeases(jobs=None, clock=Clock())
        lease = ProgramLease("id", "train", 8000, 60.0, 0.0, job=None, pid=os.getpid(),
                             gpus=(0, 1))
        leases._held[lease.id] = lease

        def reading(index, processes):
            return GpuReading("nvml", index, total_mib=24576, used_mib=10000, free_mib=14576,
                              processes=processes)
        leases.measure(reading(0, ((child.pid, 7000),)), 0)
        leases.measure(reading(1, ((os.getpid(), 500),)), 1)
        assert lease.pids == tuple(sorted((child.pid, os.getpid())))
        assert lease.measured_mib == 7500
        # The child let go of GPU 0's memory (or ended): it holds nothing now.
        leases.measure(reading(0, ()), 0)
        assert lease.pids == (os.getpid(),) and lease.measured_mib == 500
    finally:
        child.kill()
        child.wait()


def test_in_flight_counts_a_turn_held_without_a_job_an_unload_on_either_card():
    b, box = box_broker({"a": (0,), "c": (1,), "v": (0, 1)}, {"a": 1000, "c": 1000, "v": 2000})
    held = b.gpus.try_turns([b.gpus[1]], "c:idle-unload", "c")
    assert b.status()["scheduler"]["in_flight"] == 1
    held.release()
    both = b.gpus.try_turns(b.gpus.of((0, 1)), "v:idle-unload", "v")   # one, on two cards
    assert b.status()["scheduler"]["in_flight"] == 1
    both.release()
    assert b.status()["scheduler"]["in_flight"] == 0


def test_the_watchdog_ending_a_spanning_job_gives_back_every_card():
    b, box = box_broker({"c": (1,), "v": (0, 1)}, {"c": 1000, "v": 2000},
                         scheduler={"job_timeout_s": 100})
    job = started(b, box, "v")
    b.clock.advance(101)
    b.clock.advance(3)
    wait_until(lambda: b.gpus[0].current is None and b.gpus[1].current is None,
               timeout=5, what="both cards back")
    box.done("v")
    finished(box, started(b, box, "c"))
    job.finish(ok=False)                      # late, from its own thread: nothing more



class SlowAnswer(BoxActions):
    """``v`` answers its probe only once ``answer`` is set (a slow health route)."""

    def __init__(self, box):
        super().__init__(box)
        self.answer = threading.Event()
        self.asked = threading.Event()
        self.slow = False

    def probe_health(self, c):
        if c.name == "v" and self.slow:
            self.asked.set()
            self.answer.wait(10)
        return super().probe_health(c)


def test_a_job_on_one_card_waits_for_an_answer_a_job_on_the_other_is_already_asking_for():
    # v (spanning, no unload route) is believed loaded but unloaded itself.
    # A job on GPU 0 that does not fit asks every consumer; v answers
    # slowly. A job on GPU 1 that needs the same answer must wait for it,
    # not be refused insufficient_vram meanwhile.
    placement, sizes = {"a": (0,), "c": (1,), "v": (0, 1)}, {"a": 12000, "c": 12000, "v": 10000}
    b, box = box_broker(placement, sizes, actions=SlowAnswer, ledger=True,
                         extra={"v": {"unload": None}})     # only asking settles it
    actions = b.actions
    b.registry.mark_loaded("v", True)
    actions.slow = True
    got, errors = [], []

    def job(name):
        try:
            got.append(started(b, box, name))
        except BrokerError as e:
            errors.append(e)
    t0 = threading.Thread(target=job, args=("a",), daemon=True)
    t0.start()
    assert actions.asked.wait(5)
    t1 = threading.Thread(target=job, args=("c",), daemon=True)
    t1.start()
    t1.join(1.0)
    actions.answer.set()
    t0.join(5)
    t1.join(5)
    for j in got:
        finished(box, j)
    assert not errors and len(got) == 2
