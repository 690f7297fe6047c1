"""Affinity through a real gunicorn and simulated services: fewer swaps, no
over-commit, bounded passing, priorities, measured costs."""

import pytest
import requests

from conftest import background, hold_gpu, queued_depth, sim_config, wait_until
from mgpumanager.sim import start_cluster

PAYLOAD = {"tts": {"json": {"text": "hello"}}, "image": {"json": {"prompt": {"1": {}}}},
           # A GPU lease for a program (POST /v1/leases) that gives the GPU back after 0.2 s.
           "leases": {"json": {"vram_mib": 1000, "ttl_s": 0.2, "label": "program"}}}


@pytest.fixture
def small_gpu():
    """ComfyUI (13500 MiB) and mvoice (3200 MiB) do not fit together in 16000."""
    sim = start_cluster(16000, time_scale=0.1)
    yield sim
    sim.stop()


def two_services(sim, echo, **scheduler) -> dict:
    cfg = sim_config(sim, echo)
    cfg["consumers"] = {n: cfg["consumers"][n] for n in ("mvoice", "comfyui", "echo")}
    cfg["consumers"]["mvoice"]["can_coexist_with"] = []
    cfg["consumers"]["echo"]["can_coexist_with"] = ["mvoice", "comfyui"]
    cfg["routes"] = {"tts": "mvoice", "image": "comfyui", "echo": "echo"}
    cfg["scheduler"].update(scheduler)
    return cfg


def queue_behind_a_held_gpu(broker, echo, kinds):
    """Hold the GPU, queue ``kinds`` in that order, let go; wait for all."""
    held = hold_gpu(broker)
    jobs = []
    for n, kind in enumerate(kinds, 1):
        jobs.append(background(lambda k=kind: requests.post(
            f"{broker.url}/v1/{k}", timeout=60, **PAYLOAD[k])))
        wait_until(lambda: queued_depth(broker) == n, what=f"{n} jobs to queue")
    status = broker.status()
    echo.release.set()
    assert list(held.lines) == [b"last"]
    for t, out in jobs:
        t.join(60)
        assert out["result"].ok, out["result"].text
    return status


def kinds_in_order(sim):
    return [j.kind for j in sorted(sim.gpu.jobs, key=lambda j: j.start)]


@pytest.mark.parametrize("policy", ["fifo", "affinity"])
def test_alternating_jobs_swap_less_under_affinity_and_never_over_commit(
        policy, small_gpu, echo, start_broker):
    sim = small_gpu
    b = start_broker(two_services(sim, echo, policy=policy, max_bypass=4))
    b.wait_healthy("mvoice", "comfyui", "echo")
    kinds = ["image", "tts"] * 4
    before = queue_behind_a_held_gpu(b, echo, kinds)
    assert [w["bypassed"] for w in before["scheduler"]["waiting_jobs"]] == [0] * 8
    wait_until(lambda: not sim.comfyui.busy, 10, "the last render")
    st = b.status()["scheduler"]
    assert sim.gpu.ooms == 0 and sim.gpu.overlaps() == [], sim.gpu.oom_log
    order = kinds_in_order(sim)
    changes = sum(a != b for a, b in zip(order, order[1:]))
    if policy == "fifo":
        assert order == kinds and changes == 7 and st["swaps_saved"] == 0
    else:
        # The first image job loads ComfyUI; the other images follow it
        # (each passing the tts jobs once), then the tts jobs.
        assert order == ["image"] * 4 + ["tts"] * 4, order
        assert changes == 1 and st["swaps_saved"] >= 1
        assert 1 <= st["max_bypassed"] <= 4 and st["max_late_s"] > 0
        assert st["evictions"] <= 2


def test_no_job_is_passed_more_than_max_bypass_times(small_gpu, echo, start_broker):
    sim = small_gpu
    b = start_broker(two_services(sim, echo, max_bypass=1))
    b.wait_healthy("mvoice", "comfyui", "echo")
    queue_behind_a_held_gpu(b, echo, ["image", "tts", "image", "image", "image"])
    wait_until(lambda: not sim.comfyui.busy, 10, "the last render")
    # The tts job is passed once (by the second image), then goes whatever it costs.
    assert kinds_in_order(sim) == ["image", "image", "tts", "image", "image"]
    assert b.status()["scheduler"]["max_bypassed"] == 1
    assert sim.gpu.ooms == 0


def test_a_lease_among_affinity_reordering_is_passed_no_more_than_max_bypass(
        small_gpu, echo, start_broker):
    sim = small_gpu
    b = start_broker(two_services(sim, echo, max_bypass=1))
    b.wait_healthy("mvoice", "comfyui", "echo")
    queue_behind_a_held_gpu(b, echo, ["image", "leases", "image", "image", "image"])
    wait_until(lambda: not sim.comfyui.busy and b.status()["scheduler"]["running"] is None, 10,
               "the last render and the lease")
    done = [e["kind"] for e in requests.get(b.url + "/v1/events").json()["events"]
            if e["type"] == "job" and e["kind"] in ("image", "lease")]
    # Passed once by the second image (ComfyUI resident), then its turn, whatever it costs.
    assert done == ["image", "image", "lease", "image", "image"], done
    assert b.status()["scheduler"]["max_bypassed"] == 1 and sim.gpu.ooms == 0


def test_a_kind_with_priority_goes_ahead_of_older_jobs(small_gpu, echo, start_broker):
    sim = small_gpu
    b = start_broker(two_services(sim, echo, priority={"tts": 5}))
    b.wait_healthy("mvoice", "comfyui", "echo")
    queue_behind_a_held_gpu(b, echo, ["image", "image", "tts"])
    wait_until(lambda: not sim.comfyui.busy, 10, "the last render")
    assert kinds_in_order(sim) == ["tts", "image", "image"]
    assert b.status()["scheduler"]["priority"] == {"tts": 5}


def test_loads_unloads_and_runs_are_measured_and_shown(small_gpu, echo, start_broker):
    sim = small_gpu
    b = start_broker(two_services(sim, echo))
    b.wait_healthy("mvoice", "comfyui")
    # The first image job finds ComfyUI in an unknown state: neither timed as
    # a load nor as a run. The second is cold, the third warm.
    for kind in ["tts", "image", "tts", "image", "image"]:
        r = requests.post(f"{b.url}/v1/{kind}", timeout=60, **PAYLOAD[kind])
        assert r.status_code == 200, r.text
    # ComfyUI has no load route: its cold job's hold beyond a warm one's is
    # its load. Each is known once its render ends.
    comfyui_costs = lambda: b.status()["consumers"]["comfyui"]["costs"]   # noqa: E731
    wait_until(lambda: comfyui_costs()["load"]["samples"] >= 1
               and comfyui_costs()["run"]["samples"] >= 1,
               what="ComfyUI's cold start and warm render to be measured")
    consumers = b.status()["consumers"]
    mvoice, comfyui = consumers["mvoice"]["costs"], consumers["comfyui"]["costs"]
    assert mvoice["load"]["samples"] >= 1 and mvoice["load"]["s"] > 0   # its load route, timed
    assert mvoice["unload"]["samples"] >= 1 and comfyui["unload"]["samples"] >= 1
    assert mvoice["run"]["samples"] >= 1 and comfyui["run"]["samples"] >= 1


def test_retry_after_counts_the_measured_swaps_ahead(small_gpu, echo, start_broker):
    sim = small_gpu
    sim.mvoice.load_s = 20.0                    # 2 s at time_scale 0.1
    b = start_broker(two_services(sim, echo, max_queue=2, policy="fifo"))
    b.wait_healthy("mvoice", "comfyui", "echo")
    for kind in ["tts", "image"]:               # measure mvoice's load and an unload
        assert requests.post(f"{b.url}/v1/{kind}", timeout=60, **PAYLOAD[kind]).ok
    load_s = b.status()["consumers"]["mvoice"]["costs"]["load"]["s"]
    assert load_s >= 1.5
    held = hold_gpu(b)
    waiters = [background(lambda: requests.post(f"{b.url}/v1/tts", timeout=60,
                                                **PAYLOAD["tts"])) for _ in range(2)]
    wait_until(lambda: queued_depth(b) == 2, what="two waiters")
    r = requests.post(f"{b.url}/v1/tts", timeout=10, **PAYLOAD["tts"])
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    # mvoice is not resident (ComfyUI is): a swap is ahead, and it is priced.
    assert int(r.headers["Retry-After"]) >= load_s
    echo.release.set()
    held.close()
    for t, out in waiters:
        t.join(60)
        assert out["result"].status_code == 200


def test_no_job_waits_much_past_max_delay_s_after_its_turn(small_gpu, echo, start_broker):
    sim = small_gpu
    sim.comfyui.render_s = 3.0                      # 0.3 s each at time_scale 0.1
    b = start_broker(two_services(sim, echo, max_bypass=100, max_delay_s=0.5))
    b.wait_healthy("mvoice", "comfyui", "echo")
    queue_behind_a_held_gpu(b, echo, ["image", "tts"] + ["image"] * 6)
    wait_until(lambda: not sim.comfyui.busy, 20, "the last render")
    order = kinds_in_order(sim)
    # Never passed often enough to hit max_bypass: only max_delay_s lets it go.
    assert order.index("tts") < len(order) - 1, order
    st = b.status()["scheduler"]
    # Its turn came when the held job ended; it went once 0.5 s had passed,
    # after the render running then (generous: a busy machine).
    assert 0.5 <= st["max_late_s"] < 3.0, st
