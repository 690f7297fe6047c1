"""The lease and its watchdog, the header filter and the GPU-route matcher:
plain Python, no HTTP."""

import socket
import threading
import time

import pytest

from conftest import wait_until

from mgpumanager.broker import Broker
from mgpumanager.config import parse_config, route_forms
from mgpumanager.errors import UpstreamBadResponse
from mgpumanager.gpulock import GpuLock
from mgpumanager.lease import CLIENT_GONE, JOB_TIMEOUT, Lease, LeaseCut, LeaseWatch
from mgpumanager.headers import response_headers, status_line
from urllib3 import HTTPHeaderDict




@pytest.fixture
def lock():
    return GpuLock(8)


def lease_on(lock, deadline_in_s=60.0, label="job"):
    released = []
    ticket = lock.acquire(label, 1)
    lease = Lease(label, ticket, time.monotonic(), time.monotonic() + deadline_in_s,
                  lambda le: (released.append(le), lock.release(le.ticket)))
    return lease, released


def test_release_hands_the_lock_on_once_from_any_number_of_threads(lock):
    lease, released = lease_on(lock)
    results = []
    threads = [threading.Thread(target=lambda: results.append(lease.release())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and released == [lease]
    assert lock.snapshot().holder is None


def test_a_cut_shuts_every_attached_socket_and_one_attached_later():
    lease = Lease("x", None, time.monotonic(), time.monotonic() + 60, lambda le: None)
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    lease.attach(a)
    assert lease.cut(CLIENT_GONE) and not lease.cut(JOB_TIMEOUT)
    assert lease.cut_reason == CLIENT_GONE
    assert a_peer.recv(10) == b""             # the peer sees the end at once
    lease.attach(b)                            # too late: shut on arrival
    assert b_peer.recv(10) == b""
    with pytest.raises(LeaseCut):
        lease.check()
    for s in (a, a_peer, b, b_peer):
        s.close()


def test_a_released_lease_lets_go_of_its_sockets(lock):
    lease, _ = lease_on(lock)
    a, a_peer = socket.socketpair()
    lease.attach(a)
    lease.release()
    lease.cut(JOB_TIMEOUT)                     # a late cut...
    a.sendall(b"still open")                   # ...does not reach a connection that lives on
    assert a_peer.recv(20) == b"still open"
    a.close()
    a_peer.close()


def test_the_watchdog_cuts_at_the_deadline_and_releases_after_the_grace(lock):
    expired = []
    watch = LeaseWatch(expired.append, grace_s=0.3)
    lease, released = lease_on(lock, deadline_in_s=0.2)
    a, a_peer = socket.socketpair()
    lease.attach(a)
    t0 = time.monotonic()
    watch.watch(lease)                          # its owner never releases it
    wait_until(lambda: lease.cut_reason is not None, 3)
    assert lease.cut_reason == JOB_TIMEOUT and a_peer.recv(10) == b""
    wait_until(lambda: released, 3)
    assert 0.45 <= time.monotonic() - t0 < 2.5
    assert expired == [lease] and lock.snapshot().holder is None
    assert lock.acquire("next", 1) is not None
    a.close()
    a_peer.close()


def test_the_watchdog_cuts_a_lease_whose_client_hangs_up(lock):
    watch = LeaseWatch(lambda le: None)
    lease, _ = lease_on(lock)
    client, peer = socket.socketpair()
    watch.watch(lease)
    watch.watch_client(lease, client)
    peer.close()
    wait_until(lambda: lease.cut_reason is not None, 3)
    assert lease.cut_reason == CLIENT_GONE
    lease.release()
    watch.unwatch(lease)
    client.close()


def test_a_released_lease_is_never_expired(lock):
    expired = []
    watch = LeaseWatch(expired.append, grace_s=0.05)
    lease, _ = lease_on(lock, deadline_in_s=0.1)
    watch.watch(lease)
    watch.unwatch(lease)
    lease.release()
    time.sleep(0.4)
    assert expired == [] and lease.cut_reason is None


CONFIG = {
    "gpu": {"backend": "ledger", "total_mib": 20000},
    "scheduler": {"job_timeout_s": 0.2},
    "routes": {"tts": "mvoice"},
    "consumers": {"mvoice": {"url": "http://127.0.0.1:1", "paths": {"tts": "/tts"},
                             "vram_resident_mib": 1000}},
}


def test_a_job_whose_thread_never_finishes_is_released_counted_and_the_queue_moves():
    b = Broker(parse_config(CONFIG, "t.yaml"))
    b.gpu.watch.grace_s = 0.2
    job = b.start_job("mvoice", "tts")              # and never finished by its thread
    t0 = time.monotonic()
    second = b.start_job("mvoice", "tts")          # waits for the watchdog
    assert time.monotonic() - t0 < 2.5
    st = b.status()["scheduler"]
    assert st["leases_expired"] == 1
    def events():
        return [e for e in b.events.since() if e["type"] in ("lease_expired", "job")]
    wait_until(lambda: len(events()) == 2)         # the job's record follows its release
    events = events()
    assert [e["type"] for e in events] == ["lease_expired", "job"]
    assert events[1]["ok"] is False
    job.finish(ok=True)                              # the stray thread returns at last: no-op
    second.finish(ok=True)
    assert b.gpu.lock.snapshot().holder is None and b.status()["scheduler"]["total_jobs"] == 2


@pytest.mark.parametrize("headers,expected", [
    pytest.param([("Content-Type", "text/plain"), ("Set-Cookie", "a"), ("Set-Cookie", "b")],
                 [("Content-Type", "text/plain"), ("Set-Cookie", "a"), ("Set-Cookie", "b")],
                 id="end-to-end-kept"),
    pytest.param([("Connection", "close, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "5"), ("X", "y")],
                 [("X", "y")], id="hop-by-hop-dropped"),
    pytest.param([("Transfer-Encoding", "chunked"), ("Content-Length", "3")], [],
                 id="content-length-beside-chunked-dropped"),
    pytest.param([("Content-Length", "5"), ("Content-Length", "5")], [("Content-Length", "5")],
                 id="repeated-equal-length-once"),
])
def test_response_headers_forward(headers, expected):
    assert response_headers(HTTPHeaderDict(headers)) == expected


@pytest.mark.parametrize("headers", [
    pytest.param([("Content-Length", "abc")], id="length-not-a-number"),
    pytest.param([("Content-Length", "-1")], id="negative-length"),
    pytest.param([("Content-Length", "5, 6")], id="conflicting-lengths"),
    pytest.param([("X(Evil)", "1")], id="bad-name"),
    pytest.param([("X-A", "a\x01b")], id="control-byte-in-value"),
    pytest.param([("X-A", "a\r\nX-Injected: 1")], id="crlf-in-value"),
])
def test_response_headers_that_cannot_be_forwarded_are_a_bad_response(headers):
    with pytest.raises(UpstreamBadResponse):
        response_headers(HTTPHeaderDict(headers))


def test_a_reason_phrase_gunicorn_would_refuse_is_dropped():
    assert status_line(200, "OK") == "200 OK"
    assert status_line(200, "O\x01K") == "200"
    assert status_line(404, None) == "404"


@pytest.mark.parametrize("raw,form", [
    ("/prompt", "/prompt"), ("/%70rompt", "/prompt"), ("//prompt", "/prompt"),
    ("/prompt/", "/prompt"), ("/x/../prompt", "/prompt"), ("/%2e%2e/prompt", "/prompt"),
    ("/./prompt", "/prompt"), ("/%2570rompt", "/prompt"), ("/api//prompt/", "/api/prompt"),
    ("/../../prompt", "/prompt"), ("", "/"), ("/prompt#frag", "/prompt"),
])
def test_route_forms_are_what_a_service_would_serve(raw, form):
    assert form in route_forms(raw)


@pytest.mark.parametrize("method,path,gpu", [
    ("POST", "/prompt", True), ("POST", "/%70rompt", True), ("POST", "//prompt", True),
    ("POST", "/prompt/", True), ("POST", "/api/prompt", True), ("POST", "/api/../prompt", True),
    ("post", "/prompt", True), ("GET", "/prompt", False), ("POST", "/history", False),
    ("POST", "/promptx", False),
])
def test_gpu_routes_match_after_normalising(method, path, gpu):
    cfg = parse_config({**CONFIG, "consumers": {"mvoice": {
        **CONFIG["consumers"]["mvoice"], "gpu_routes": ["POST /prompt", "POST /api/prompt/"]}}})
    assert cfg.consumers["mvoice"].is_gpu_route(method, path) is gpu


def test_draining_a_refused_body_gives_the_socket_its_deadline_back():
    import io
    from mgpumanager.client_body import drain_body
    a, b = socket.socketpair()
    a.settimeout(60)
    drain_body({"CONTENT_LENGTH": "5", "wsgi.input": io.BytesIO(b"hello"),
                "gunicorn.socket": a}, within_s=0.5)
    assert a.gettimeout() == 60
    a.close()
    b.close()


@pytest.mark.parametrize("preset,method,path,gpu", [
    # Routes the allow-lists missed, which ran beside another consumer's job.
    ("llama.cpp", "POST", "/chat/completions", True), ("llama.cpp", "POST", "/api/chat", True),
    ("llama.cpp", "POST", "/v1/messages", True), ("llama.cpp", "POST", "/responses", True),
    ("llama.cpp", "POST", "/reranking", True), ("llama.cpp", "POST", "/v1/rerank", True),
    ("llama.cpp", "POST", "/audio/transcriptions", True),
    ("llama.cpp", "POST", "/models/load", True), ("ollama", "POST", "/v1/messages", True),
    ("vllm", "POST", "/wake_up", True), ("vllm", "POST", "/v1/score", True),
    ("vllm", "POST", "/pooling", True), ("openai", "POST", "/v1/anything/new", True),
    # What each service documents as no GPU work.
    ("llama.cpp", "POST", "/tokenize", False), ("ollama", "POST", "/api/pull", False),
    ("comfyui", "POST", "/upload/image", False), ("comfyui", "POST", "/api/interrupt", False),
    ("comfyui", "POST", "/%66ree", False), ("comfyui", "POST", "/prompt", True),
    ("comfyui", "POST", "/api/prompt", True), ("comfyui", "POST", "/upload/../prompt", True),
    ("ollama", "GET", "/api/tags", False),
])
def test_preset_gpu_routes_fail_closed(preset, method, path, gpu):
    cfg = parse_config({**CONFIG, "consumers": {"mvoice": {
        **CONFIG["consumers"]["mvoice"], "type": preset}}})
    assert cfg.consumers["mvoice"].is_gpu_route(method, path) is gpu


def test_an_allow_list_of_gpu_routes_is_warned_of():
    cfg = parse_config({**CONFIG, "consumers": {"mvoice": {
        **CONFIG["consumers"]["mvoice"], "gpu_routes": ["POST /prompt"]}}})
    assert any("consumers.mvoice.gpu_routes lists only some routes" in w for w in cfg.warnings())


def test_llama_servers_unload_takes_only_the_models_it_runs():
    """Its router lists every model it knows, and answers 400 "model is not
    running" to an unload of one that is not: the unload failed."""
    cfg = parse_config({**CONFIG, "consumers": {"mvoice": {
        **CONFIG["consumers"]["mvoice"], "type": "llama.cpp", "unload": None}}})
    where = cfg.consumers["mvoice"].unload.for_each
    assert [m["id"] for m in [{"id": "a", "status": {"value": "unloaded"}},
                              {"id": "b", "status": {"value": "loaded"}}]
            if where.listed(m)] == ["b"]
