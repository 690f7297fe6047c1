"""One GPU job at a time, in arrival order (policy fifo), through a real gunicorn."""

import json
import socket
import threading
import time

import pytest
import requests

from conftest import TIME_SCALE, background, hold_gpu, queued_depth, wait_until


def test_mixed_jobs_never_overlap_and_start_in_arrival_order_under_fifo(broker_with, sim, echo):
    broker = broker_with({"scheduler": {"policy": "fifo"}})
    sim.gpu.reset_counters()
    kinds = ["image", "tts", "llm", "stt", "tts", "image", "llm", "stt"]
    payload = {"tts": {"json": {"text": "hello"}},
               "stt": {"files": {"file": ("a.wav", b"RIFF" + b"\0" * 1000)}},
               "llm": {"json": {"prompt": "x", "options": {"num_predict": 3}}},
               "image": {"json": {"prompt": {"1": {}}}}}
    # Arrival order is made certain, not hoped for: each job is queued
    # behind a held GPU before the next is sent.
    held = hold_gpu(broker)
    threads = []
    for i, kind in enumerate(kinds):
        threads.append(background(
            lambda k=kind: requests.post(broker.url + f"/v1/{k}", timeout=60, **payload[k])))
        wait_until(lambda: queued_depth(broker) == i + 1, what=f"job {i + 1} to queue")
    echo.release.set()
    assert list(held.lines) == [b"last"]
    for t, out in threads:
        t.join(60)
        assert out["result"].status_code == 200, out["result"].text
    wait_until(lambda: not sim.comfyui.busy, 10, "the last render")
    jobs = sorted(sim.gpu.jobs, key=lambda j: j.start)
    assert sim.gpu.overlaps() == [] and sim.gpu.max_concurrent == 1
    assert [j.kind for j in jobs] == kinds
    assert sim.gpu.ooms == 0


def test_a_job_never_starts_while_another_response_is_streaming(broker, echo):
    held = hold_gpu(broker)
    t, out = background(lambda: requests.post(broker.url + "/v1/echo", data=b"x", timeout=30))
    wait_until(lambda: queued_depth(broker) == 1, what="the second job to queue")
    time.sleep(0.3)
    assert echo.requests_to("/echo") == []        # it waits while the stream runs
    echo.release.set()
    assert list(held.lines) == [b"last"]
    t.join(10)
    assert out["result"].status_code == 200 and len(echo.requests_to("/echo")) == 1


def test_full_queue_refuses_at_once_while_status_answers_fast(broker_with, echo):
    b = broker_with({"scheduler": {"max_queue": 3}})
    held = hold_gpu(b)
    waiters = [background(lambda: requests.post(b.url + "/v1/echo", data=b"w", timeout=30))
               for _ in range(3)]
    wait_until(lambda: queued_depth(b) == 3, what="three waiters")
    t0 = time.monotonic()
    r = requests.post(b.url + "/v1/echo", data=b"x")
    assert time.monotonic() - t0 < 5            # at once, not after the 30 s queue deadline
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["Retry-After"]) >= 1
    times = []
    for _ in range(20):
        t0 = time.monotonic()
        st = requests.get(b.url + "/v1/status").json()
        times.append(time.monotonic() - t0)
    assert max(times) < 1.5, times              # never waits for the queue (make bench times it)
    assert st["scheduler"]["queue_depth"] == 3 and st["scheduler"]["in_flight"] == 1
    assert st["scheduler"]["rejected_by_code"]["queue_full"] == 1
    echo.release.set()
    held.close()
    for t, out in waiters:
        t.join(10)
        assert out["result"].status_code == 200


def test_queue_timeout_comes_after_the_configured_wait(broker_with, echo):
    b = broker_with({"scheduler": {"queue_timeout_s": 1}})
    held = hold_gpu(b)
    t0 = time.monotonic()
    r = requests.post(b.url + "/v1/echo", data=b"x")
    waited = time.monotonic() - t0
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
    assert "Retry-After" in r.headers
    assert 1.0 <= waited < 5, waited
    echo.release.set()
    held.close()


def test_a_client_leaving_mid_stream_frees_the_gpu_at_once(broker, echo):
    held = hold_gpu(broker)          # the upstream now stays silent until released
    t, out = background(lambda: requests.post(broker.url + "/v1/echo", data=b"x", timeout=30))
    wait_until(lambda: queued_depth(broker) == 1, what="the second job to queue")
    t0 = time.monotonic()
    held.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    held.close()
    t.join(5)
    assert out["result"].status_code == 200
    assert time.monotonic() - t0 < 5, "the GPU was held after the client left"   # not 30 s
    events = requests.get(broker.url + "/v1/events").json()["events"]
    hold_job = [e for e in events if e["type"] == "job" and e["consumer"] == "echo"][0]
    assert hold_job["ok"] is False and hold_job["error"] == "the client went away"


def test_a_client_leaving_while_queued_is_never_sent_upstream(broker, echo):
    held = hold_gpu(broker)
    s = socket.create_connection(("127.0.0.1", broker.port))
    s.sendall(b"POST /v1/echo?queued=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc")
    wait_until(lambda: queued_depth(broker) == 1, what="the job to queue")
    s.close()
    wait_until(lambda: queued_depth(broker) == 0, 3, "the abandoned job to leave the queue")
    echo.release.set()
    held.close()
    requests.post(broker.url + "/v1/echo", data=b"after")
    assert [x.query for x in echo.requests_to("/echo")] == [""]
    assert broker.status()["scheduler"]["abandoned"] == 1


def test_a_job_past_job_timeout_is_cut_off_and_frees_the_gpu(broker_with):
    b = broker_with({"scheduler": {"job_timeout_s": 0.5}})
    t0 = time.monotonic()
    r = requests.post(b.url + "/upstream/echo/hold", stream=True, timeout=30)
    got = b""
    try:
        for chunk in r.iter_content(None):
            got += chunk
    except requests.exceptions.ChunkedEncodingError:
        pass                           # the truncation shows as a broken body
    assert got == b"first\n" and time.monotonic() - t0 < 3
    assert requests.post(b.url + "/v1/echo", data=b"x", timeout=5).status_code == 200


def test_an_image_job_holds_the_gpu_until_the_render_ends(broker, sim):
    sim.comfyui.render_s = 30.0                      # 3 s at the tests' time scale
    sim.gpu.reset_counters()
    r = requests.post(broker.url + "/v1/image", json={"prompt": {"1": {}}})
    assert r.status_code == 200
    pid = r.json()["prompt_id"]
    t, out = background(lambda: requests.post(broker.url + "/v1/llm", timeout=30,
                                              json={"prompt": "x", "options": {"num_predict": 2}}))
    # Reading ComfyUI's own API is not a GPU job: it waits for nobody.
    t0 = time.monotonic()
    assert requests.get(broker.url + "/upstream/comfyui/queue").json()["queue_running"]
    requests.get(broker.url + f"/upstream/comfyui/history/{pid}")
    assert time.monotonic() - t0 < 2              # the render takes 3 s
    t.join(30)
    assert out["result"].status_code == 200
    image = next(j for j in sim.gpu.jobs if j.kind == "image")
    llm = next(j for j in sim.gpu.jobs if j.kind == "llm")
    assert llm.start >= image.end, "the LLM ran while the image was rendering"
    assert requests.get(broker.url + f"/upstream/comfyui/history/{pid}").json()[pid]["status"]["completed"]


def test_per_consumer_active_and_totals_show_in_status(broker, echo):
    held = hold_gpu(broker)
    st = broker.status()
    assert st["consumers"]["echo"]["active"] == 1 and st["scheduler"]["in_flight"] == 1
    assert st["scheduler"]["running"]["consumer"] == "echo"
    echo.release.set()
    held.close()
    wait_until(lambda: broker.status()["consumers"]["echo"]["active"] == 0)
    st = broker.status()["scheduler"]
    assert st["total_jobs"] == 1 and st["last_run_ms"] > 0 and st["last_wait_ms"] is not None


# A hang-up as gunicorn's worker sees it: the write fails, the answer is closed.
@pytest.mark.gunicorn
def test_a_hang_up_mid_stream_holds_the_gpu_until_the_service_lets_go(broker_with, sim):
    """The client hangs up in the middle of an LLM stream with a TTS job
    queued behind it. The simulated ollama, like the real one, notices only
    when a write fails, about a token later: the TTS job started while it
    still computed (14 overlaps in 15 tries)."""
    b = broker_with()
    tokens = int(round(1.0 / (sim.ollama.token_s * TIME_SCALE)))   # a stream of about 1 s
    for attempt in range(5):
        s = socket.create_connection(("127.0.0.1", b.port))
        body = json.dumps({"model": "sim", "prompt": "go", "options": {"num_predict": tokens}})
        s.sendall(f"POST /v1/llm HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        got = b""
        # Mid-stream; after its first token too, before its pace is known.
        while got.count(b"tok") < 1 + attempt % 2:
            got += s.recv(4096)
        queued = threading.Thread(target=lambda: requests.post(
            b.url + "/v1/tts", json={"text": "next"}, timeout=30), daemon=True)
        queued.start()
        wait_until(lambda: b.status()["scheduler"]["queue_depth"] == 1, what="the queued job")
        s.close()
        queued.join(30)
    wait_until(lambda: not sim.gpu.reading()["running_jobs"], what="the GPU to go idle")
    jobs = [(j.consumer, round(j.start % 100, 3), round(j.end % 100, 3)) for j in sim.gpu.jobs]
    assert sim.gpu.overlaps() == [], jobs
