"""What people and monitoring see: /metrics, /v1/events, the status page."""

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, chromium, needs_chromium, wait_until
from mgpumanager import logs


def fill_the_gpu(broker):
    """ollama 8000 + whisper 1800 + comfyui 13500 resident: the next TTS must evict."""
    assert requests.post(broker.url + "/v1/llm", json={"prompt": "x"}).ok
    assert requests.post(broker.url + "/v1/stt", files={"file": ("a.wav", b"RIFF")}).ok
    assert requests.post(broker.url + "/v1/image", json={"prompt": {"1": {}}}).ok


def metric_values(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_move_when_jobs_run(broker):
    r = requests.get(broker.url + "/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    before = metric_values(r.text)
    assert before[("mgpumanager_gpu_memory_total_bytes", (("gpu", "0"), ("source", "sim")))] \
        == 24576 * 1024 ** 2
    assert before[("mgpumanager_consumer_up", (("consumer", "mvoice"),))] == 1.0
    assert requests.post(broker.url + "/v1/tts", json={"text": "hi"}).status_code == 200
    key = ("mgpumanager_jobs_total", (("consumer", "mvoice"), ("outcome", "ok")))
    # The job is counted once its answer has gone out, a moment after the client has it.
    wait_until(lambda: key in metric_values(requests.get(broker.url + "/metrics").text),
               what="the job counted")
    after = metric_values(requests.get(broker.url + "/metrics").text)
    assert after[key] == before.get(key, 0) + 1
    assert after[("mgpumanager_job_run_seconds_count", ())] == before[("mgpumanager_job_run_seconds_count", ())] + 1
    assert after[("mgpumanager_consumer_loaded", (("consumer", "mvoice"),))] == 1.0
    requests.post(broker.url + "/v1/nope")
    requests.post(broker.url + "/v1/consumers/mvoice/unload")
    after = metric_values(requests.get(broker.url + "/metrics").text)
    assert after[("mgpumanager_evictions_total", (("consumer", "mvoice"),))] == 1.0


def test_events_can_be_polled_with_since(broker):
    first = requests.get(broker.url + "/v1/events").json()
    requests.post(broker.url + "/v1/tts", json={"text": "hi"})

    def newer_events():
        return requests.get(broker.url + f"/v1/events?since={first['last_id']}").json()
    # The job's event is written once its answer has gone out, so a moment later.
    wait_until(lambda: any(e["type"] == "job" for e in newer_events()["events"]),
               what="the job's event")
    newer = newer_events()
    assert newer["events"] and all(e["id"] > first["last_id"] for e in newer["events"])
    job = [e for e in newer["events"] if e["type"] == "job"][-1]
    assert job["consumer"] == "mvoice" and job["status"] == 200 and job["wait_ms"] >= 0
    again = requests.get(broker.url + f"/v1/events?since={newer['last_id']}").json()
    assert again["events"] == [] and again["last_id"] == newer["last_id"]


def test_the_page_answers_the_questions_without_javascript(broker):
    fill_the_gpu(broker)
    requests.post(broker.url + "/v1/tts", json={"text": "x"})      # evicts comfyui
    html = requests.get(broker.url + "/").text
    assert "Who holds the VRAM" in html and 'id="consumer-comfyui"' in html
    assert "evicted" in html and "unloaded comfyui to make room for mvoice" in html
    assert '<noscript><meta http-equiv="refresh"' in html
    assert "https://" not in html and "http://cdn" not in html       # works offline
    assert requests.get(broker.url + "/static/status.js").status_code == 200


def test_job_logs_go_to_the_error_log_one_line_per_job(broker):
    requests.post(broker.url + "/v1/tts", json={"text": "x"})
    time.sleep(0.2)
    lines = [ln for ln in broker.log().splitlines() if "job consumer=mvoice" in ln]
    assert lines and "status=200" in lines[-1] and "wait_ms=" in lines[-1]


def test_the_job_log_is_written_off_the_jobs_thread_once_and_drained_on_exit():
    """A job's thread only hands its line over; a warning is written at once."""
    written = []

    class Recording(logging.Handler):
        def emit(self, record):
            written.append((record.name, record.getMessage(), threading.get_ident()))

    broker_log = logging.getLogger("mgpumanager")
    saved = broker_log.handlers[:]
    logs.setup_logging()
    broker_log.handlers[:] = [Recording()]
    try:
        logging.getLogger("mgpumanager.jobs").info("job consumer=%s status=%s", "mvoice", 200,
                                                   extra={"fields": {"event": "job"}})
        logging.getLogger("mgpumanager.room").warning("beliefs contradicted")
        logs._drain_job_log()             # what exit does: every queued line written
        logs._job_listener.start()
    finally:
        broker_log.handlers[:] = saved
    me = threading.get_ident()
    assert sorted((name, message, by == me) for name, message, by in written) == [
        ("mgpumanager.jobs", "job consumer=mvoice status=200", False),
        ("mgpumanager.room", "beliefs contradicted", True)]


# gunicorn's own log lines in the same format.
@pytest.mark.gunicorn
def test_json_log_format_writes_one_object_per_job_and_eviction(broker_with):
    b = broker_with({"server": {"log_format": "json"}})
    fill = [("llm", {"json": {"prompt": "x"}}), ("stt", {"files": {"file": ("a.wav", b"RIFF")}}),
            ("image", {"json": {"prompt": {"1": {}}}}), ("tts", {"json": {"text": "x"}})]
    for kind, kw in fill:
        assert requests.post(b.url + f"/v1/{kind}", **kw).ok
    time.sleep(0.2)
    lines = [ln for ln in b.log().splitlines() if ln.strip()]
    assert lines and all(ln.startswith("{") for ln in lines), \
        [ln for ln in lines if not ln.startswith("{")][:3]     # gunicorn's own lines too
    records = [json.loads(ln) for ln in lines]
    assert any(r["logger"] == "gunicorn.error" and "Booting worker" in r["message"]
               for r in records)
    jobs = [r for r in records if r.get("event") == "job"]
    assert [j["kind"] for j in jobs] == ["llm", "stt", "image", "tts"]
    assert jobs[-1]["evicted"] == ["comfyui"] and jobs[-1]["status"] == 200
    assert {"ts", "level", "logger", "wait_ms", "run_ms", "bytes_in", "bytes_out"} <= set(jobs[-1])
    evictions = [r for r in records if r.get("event") == "eviction"]
    assert evictions and evictions[-1]["victim"] == "comfyui" and evictions[-1]["for"] == "mvoice"


@pytest.mark.browser
@needs_chromium
def test_page_updates_in_a_real_browser_without_reload(broker):
    out = Path(os.environ.get("TEST_OUTPUT", ROOT / "test-output"))
    out.mkdir(exist_ok=True)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(broker.url + "/")
        page.wait_for_selector("#live.on", timeout=10_000)
        page.evaluate("window.__notReloaded = true")
        total = page.locator('[data-k="consumers.comfyui.total_requests"]')
        assert total.inner_text() == "0"
        fill_the_gpu(broker)
        assert requests.post(broker.url + "/v1/tts", json={"text": "hello"}).ok
        page.wait_for_function(
            "document.querySelector('[data-k=\"consumers.comfyui.total_requests\"]').textContent === '1'",
            timeout=10_000)
        page.wait_for_selector("#event-list li.ev-evicted", timeout=10_000)
        assert "unloaded comfyui to make room for mvoice" in page.inner_text("#event-list")
        assert page.evaluate("window.__notReloaded") is True
        page.screenshot(path=str(out / "status-page.png"), full_page=True)
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(broker.url + "/")
        phone.wait_for_selector("#live.on", timeout=10_000)
        width = phone.evaluate("document.documentElement.scrollWidth")
        phone.screenshot(path=str(out / "status-page-phone.png"), full_page=True)
        assert width <= 400, f"the page scrolls sideways on a phone ({width}px)"
