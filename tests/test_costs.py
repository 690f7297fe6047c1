"""Measured costs and the affinity counters, in-process (no HTTP): what is
timed as a load, an unload or a run, what Retry-After makes of it, and
what counts as a reordered grant."""

import threading
import time

from mgpumanager.consumers import HealthResult
from mgpumanager.errors import Abandoned
from test_broker import make_broker, set_loaded


def wait_depth(lock, n):
    deadline = time.monotonic() + 5
    while lock.snapshot().queue_depth != n:
        assert time.monotonic() < deadline, lock.snapshot()
        time.sleep(0.001)


def test_a_cold_start_from_an_unknown_state_is_neither_a_warm_run_nor_a_load():
    """After a start, ComfyUI (no load route, no loaded report) is unknown:
    its first job may or may not load its model."""
    b, _ = make_broker({"scheduler": {"queue_timeout_s": 5, "evict_settle_s": 0}})
    set_loaded(b, mvoice=False, whisper=False, ollama=False)
    assert b.registry.loaded("comfyui") is None
    job = b.start_job("comfyui", "image")
    job.finish(ok=True, status=200)
    costs = b.status()["consumers"]["comfyui"]["costs"]
    assert costs["run"]["samples"] == costs["load"]["samples"] == 0, costs
    job = b.start_job("comfyui", "image")          # now known loaded: a warm run
    job.finish(ok=True, status=200)
    assert b.status()["consumers"]["comfyui"]["costs"]["run"]["samples"] == 1


def test_a_cold_job_beyond_a_warm_ones_time_is_a_load():
    b, _ = make_broker({"scheduler": {"queue_timeout_s": 5, "evict_settle_s": 0}})
    b.registry.record_run("comfyui", 1.0, cold=False)
    b.registry.record_run("comfyui", 5.0, cold=True)
    costs = b.registry.costs()["comfyui"]
    assert (costs.run_s, costs.load_s) == (1.0, 4.0)


def test_a_load_no_probe_could_confirm_is_not_timed_as_a_load():
    b, actions = make_broker({"scheduler": {"queue_timeout_s": 5, "evict_settle_s": 0.3}})
    set_loaded(b, mvoice=False, whisper=False, comfyui=False, ollama=False)
    actions.probe_health = lambda c: HealthResult(False, error="busy loading")
    b.start_job("mvoice", "tts").finish(ok=True, status=200)
    assert b.status()["consumers"]["mvoice"]["costs"]["load"]["samples"] == 0


class Waiting:
    def __init__(self, consumer):
        self.consumer = consumer


def test_retry_after_prices_every_swap_of_an_alternating_queue():
    """mvoice and comfyui do not coexist: mvoice, comfyui, mvoice, comfyui
    is a swap at every job, not one load each."""
    b, _ = make_broker({"scheduler": {"policy": "fifo"}})
    set_loaded(b, mvoice=False, whisper=False, comfyui=True, ollama=True)
    for name in ("mvoice", "comfyui"):
        b.registry.record_cost(name, "load", 10.0)
        b.registry.record_cost(name, "unload", 0.0)
        b.registry.record_run(name, 1.0, cold=False)
    ahead = [Waiting("mvoice"), Waiting("comfyui"), Waiting("mvoice"), Waiting("comfyui")]
    # the running job (1) + four runs (4) + four loads (40)
    assert b.order.estimate_wait(ahead, 1.0) == 45


def test_a_chosen_job_whose_client_leaves_is_not_counted_as_reordered():
    b, _ = make_broker({"scheduler": {"queue_timeout_s": 5, "evict_settle_s": 0}})
    set_loaded(b, mvoice=True, whisper=False, comfyui=False, ollama=True)
    held = b.gpu.lock.acquire("holder", 1)
    gone = threading.Event()
    got = {}

    def oldest():        # comfyui needs mvoice evicted: it does not fit as things are
        t = b.gpu.lock.acquire("comfyui:image", 5, consumer="comfyui", kind="image")
        got["oldest"] = t
        b.gpu.lock.release(t)

    def younger():       # fits, so it is chosen first; its client is gone by then
        try:
            b.gpu.lock.acquire("mvoice:tts", 5, consumer="mvoice", kind="tts",
                           cancelled=gone.is_set, poll_s=0.01)
        except Abandoned:
            got["younger"] = "abandoned"
    first = threading.Thread(target=oldest)
    first.start()
    wait_depth(b.gpu.lock, 1)
    second = threading.Thread(target=younger)
    second.start()
    wait_depth(b.gpu.lock, 2)
    gone.set()
    b.gpu.lock.release(held)
    first.join(5)
    second.join(5)
    assert got["younger"] == "abandoned" and got["oldest"].bypassed == 0
    st = b.status()["scheduler"]
    assert (st["reordered"], st["swaps_saved"]) == (0, 0), st
