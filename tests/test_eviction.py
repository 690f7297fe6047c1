"""VRAM-aware eviction end to end: simulated consumers on one simulated GPU."""

import json
import time

import requests

from conftest import TIME_SCALE, wait_idle, wait_until
from mgpumanager.sim import start_cluster
from mgpumanager.sim.consumers import wav_bytes
from mgpumanager.sim.traffic import DIRECT_CONSUMER, DIRECT_PATHS, send_job, storm

WAV = wav_bytes(0.2)



def test_a_storm_sent_directly_over_commits_the_gpu():
    cluster = start_cluster(24576, time_scale=TIME_SCALE)
    try:
        results = storm(lambda k: send_job(cluster.consumers[DIRECT_CONSUMER[k]].url, k,
                                           DIRECT_PATHS))
        wait_idle(cluster)
        failed = [r for r in results if r.status_code != 200]
        assert cluster.gpu.ooms > 0
        assert cluster.gpu.max_concurrent > 1
        # Someone is told: a client of a synchronous service, or ComfyUI's
        # history for a render that failed after /prompt had answered.
        told = [r.text for r in failed if "CUDA out of memory" in r.text] + [
            h for h in cluster.comfyui.history.values() if "out of memory" in json.dumps(h)]
        assert told, (cluster.gpu.ooms, [r.text for r in failed])
    finally:
        cluster.stop()


def test_the_same_storm_through_the_broker_completes_without_an_oom(broker, sim):
    results = storm(lambda k: send_job(broker.url, k))
    wait_idle(sim)
    assert [r.status_code for r in results] == [200] * 40, [r.text for r in results if r.status_code != 200]
    assert sim.gpu.ooms == 0, sim.gpu.oom_log
    assert sim.gpu.max_concurrent == 1 and sim.gpu.overlaps() == []
    assert all(h["status"]["completed"] for h in sim.comfyui.history.values())
    # A job is counted as its answer closes, just after the client has the last byte.
    wait_until(lambda: broker.status()["scheduler"]["total_jobs"] == 40, what="40 jobs counted")
    assert broker.status()["scheduler"]["evictions"] >= 1


def test_a_tts_job_that_does_not_fit_unloads_the_image_service_and_nothing_else(broker, sim):
    assert requests.post(broker.url + "/v1/llm", json={"prompt": "x"}).status_code == 200
    assert requests.post(broker.url + "/v1/stt",
                         files={"file": ("a.wav", WAV)}).status_code == 200
    r = requests.post(broker.url + "/v1/image", json={"prompt": {"1": {}}})
    assert r.status_code == 200
    wait_idle(sim)
    # Resident now: ollama 8000 + whisper 1800 + comfyui 13500 = 23300 of 24576.
    frees_before = len(sim.comfyui.requests_to("/free"))
    r = requests.post(broker.url + "/v1/tts", json={"text": "hello"})
    assert r.status_code == 200
    assert len(sim.comfyui.requests_to("/free")) == frees_before + 1
    assert sim.ollama.loaded and sim.whisper.loaded and not sim.comfyui.loaded
    assert sim.mvoice.loaded and sim.gpu.ooms == 0
    st = broker.status()
    assert st["consumers"]["comfyui"]["loaded"] is False
    assert st["consumers"]["comfyui"]["evictions"] == 1
    evicted = [e for e in requests.get(broker.url + "/v1/events").json()["events"]
               if e["type"] == "evicted"]
    assert evicted[-1]["consumer"] == "comfyui" and evicted[-1]["for_consumer"] == "mvoice"


def test_resident_targets_cause_no_admin_calls(broker, sim):
    # ComfyUI resident beside mvoice (13500 + 3000 of 24576): nothing needs to go.
    assert requests.post(broker.url + "/v1/image", json={"prompt": {"1": {}}}).status_code == 200
    wait_idle(sim)
    assert sim.comfyui.loaded
    for _ in range(3):
        assert requests.post(broker.url + "/v1/tts", json={"text": "x"}).status_code == 200
    assert len(sim.mvoice.requests_to("/api/admin/load")) <= 1
    assert sim.mvoice.requests_to("/api/admin/unload") == []
    assert sim.comfyui.requests_to("/free") == [] and sim.comfyui.loaded


def test_a_job_that_can_never_fit_is_refused_without_unloading_anyone(broker_with, sim):
    b = broker_with({"consumers": {"comfyui": {"vram_resident_mib": 30000}}})
    requests.post(b.url + "/v1/tts", json={"text": "x"})
    r = requests.post(b.url + "/v1/image", json={"prompt": {"1": {}}})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "insufficient_vram" and err["consumer"] == "comfyui"
    assert "30256 MiB" in err["message"] and "held:" in err["message"]
    assert sim.mvoice.requests_to("/api/admin/unload") == [] and sim.mvoice.loaded
    assert sim.comfyui.requests_to("/prompt") == []


def test_explicit_unload_and_load_work_and_show_in_status(broker, sim):
    r = requests.post(broker.url + "/v1/consumers/mvoice/load")
    assert r.status_code == 200 and r.json()["loaded"] is True
    assert sim.mvoice.loaded and broker.status()["consumers"]["mvoice"]["loaded"] is True
    r = requests.post(broker.url + "/v1/consumers/mvoice/unload")
    assert r.status_code == 200 and r.json() == {"consumer": "mvoice", "loaded": False}
    assert not sim.mvoice.loaded
    st = broker.status()
    assert st["consumers"]["mvoice"]["loaded"] is False
    assert st["scheduler"]["loads"] >= 1 and st["scheduler"]["evictions"] >= 1
    r = requests.post(broker.url + "/v1/consumers/ollama/unload")
    assert r.status_code >= 400 and "no unload route" in r.json()["error"]["message"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = requests.post(broker.url + "/v1/consumers/mvoice/reboot")
    assert r.status_code == 404


def test_status_shows_the_gpu_reading_and_its_source(broker, sim):
    requests.post(broker.url + "/v1/tts", json={"text": "x"})
    time.sleep(0.6)                          # one sample interval
    gpu = broker.status()["gpu"]
    assert gpu["source"] == "sim" and gpu["live"] is True and gpu["error"] is None
    assert gpu["used_mib"] == sim.gpu.used_mib and gpu["free_mib"] == 24576 - sim.gpu.used_mib
