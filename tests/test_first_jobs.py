"""A fresh broker on the ledger (any box without NVIDIA's library) in front
of the simulated services on a 16000 MiB GPU, over real HTTP: the first
job of every kind runs at once, and nothing over-commits the GPU."""

import time

import requests

from conftest import sim_config
from mgpumanager.sim import start_cluster
from mgpumanager.sim.traffic import send_job

TOTAL = 16000


def test_every_kinds_first_job_runs_at_once_on_the_ledger(start_broker):
    sim = start_cluster(TOTAL, time_scale=0.1, ollama_keep_alive_s=3600)
    try:
        cfg = sim_config(sim)
        cfg["gpu"] = {"backend": "ledger", "total_mib": TOTAL, "cushion_mib": 256}
        cfg["scheduler"]["queue_timeout_s"] = 60
        # ollama as its preset asks it (its /api/ps) and unloads it; ComfyUI
        # as its preset unloads it, waiting until its /system_stats shows the
        # memory back (a ledger cannot see it free).
        cfg["consumers"]["ollama"].update(type="ollama", vram_managed=False)
        cfg["consumers"]["comfyui"]["type"] = "comfyui"
        del cfg["consumers"]["comfyui"]["unload"]
        # ComfyUI came up with a model loaded from before the broker's start.
        sim.comfyui.ensure_loaded()
        broker = start_broker(cfg)
        for kind in ("tts", "stt", "llm", "image", "tts", "llm"):
            t0 = time.monotonic()
            r = send_job(broker.url, kind)
            assert r.status_code == 200, (kind, r.text)
            assert time.monotonic() - t0 < 10, f"{kind} took {time.monotonic() - t0:.1f} s"
        assert sim.gpu.ooms == 0, sim.gpu.oom_log
        status = broker.status()
        assert status["gpu"]["source"] == "ledger"
        assert status["scheduler"]["rejected"] == 0
    finally:
        sim.stop()


def test_a_tts_job_allowed_beside_everyone_settles_an_unknown_comfyui_first(start_broker):
    """mvoice may stay beside everyone, so no consumer was ever its victim;
    ComfyUI's state unknown (it may hold 13500 MiB) left it no room: its
    first job waited out the queue timeout."""
    sim = start_cluster(TOTAL, time_scale=0.1)
    try:
        cfg = sim_config(sim)
        cfg["gpu"] = {"backend": "ledger", "total_mib": TOTAL, "cushion_mib": 256}
        cfg["scheduler"]["queue_timeout_s"] = 60
        cfg["consumers"]["mvoice"]["can_coexist_with"] = ["ollama", "whisper", "comfyui"]
        cfg["consumers"]["comfyui"]["type"] = "comfyui"
        del cfg["consumers"]["comfyui"]["unload"]
        sim.comfyui.ensure_loaded()
        broker = start_broker(cfg)
        t0 = time.monotonic()
        r = send_job(broker.url, "tts")
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 10
        assert broker.status()["consumers"]["comfyui"]["evictions"] == 1
        assert sim.gpu.ooms == 0, sim.gpu.oom_log
    finally:
        sim.stop()


def test_a_job_nothing_can_make_room_for_is_refused_at_once_naming_the_holders(start_broker):
    """whisper, loaded, cannot be unloaded and may not stay beside ComfyUI:
    on a ledger nothing will ever free its memory, so the image job is
    refused at once, not after its queue timeout."""
    sim = start_cluster(TOTAL, time_scale=0.1, ollama_keep_alive_s=3600)
    try:
        cfg = sim_config(sim)
        cfg["gpu"] = {"backend": "ledger", "total_mib": TOTAL, "cushion_mib": 256}
        cfg["scheduler"]["queue_timeout_s"] = 60
        cfg["consumers"]["whisper"]["can_coexist_with"] = []
        cfg["consumers"]["whisper"]["vram_resident_mib"] = 5000
        broker = start_broker(cfg)
        assert send_job(broker.url, "stt").status_code == 200
        t0 = time.monotonic()
        r = send_job(broker.url, "image")
        assert time.monotonic() - t0 < 10
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "insufficient_vram"
        assert "held: whisper 5000 MiB" in error["message"]
        assert sim.gpu.ooms == 0
    finally:
        sim.stop()
