"""The HTTP facade through a real gunicorn: bodies, headers, streaming, errors."""

import hashlib
import json
import os
import socket
import time

import pytest
import requests

from mgpumanager.sim.echo import pattern

MIB = 1024 * 1024


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_facade_passes_body_query_and_content_type_byte_exact(broker, echo):
    body = os.urandom(100_000)
    r = requests.post(broker.url + "/v1/echo?a=1&b=x%20y&a=2", data=body,
                      headers={"Content-Type": "application/x-thing; v=2"})
    assert r.status_code == 200
    seen = r.json()
    assert seen["path"] == "/echo" and seen["query"] == "a=1&b=x%20y&a=2"
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["content_length"] == str(len(body)) and not seen["chunked"]
    assert dict(seen["headers"])["Content-Type"] == "application/x-thing; v=2"


def test_end_to_end_headers_pass_and_hop_by_hop_are_dropped(broker):
    r = requests.post(broker.url + "/v1/echo", data=b"x", headers={
        "X-Custom": "kept", "Authorization": "Bearer t", "X-Private": "hop",
        "Connection": "keep-alive, X-Private", "TE": "trailers", "X-Forwarded-For": "10.9.9.9"})
    sent = {k.lower(): v for k, v in r.json()["headers"]}
    assert sent["x-custom"] == "kept" and sent["authorization"] == "Bearer t"
    assert "x-private" not in sent and "te" not in sent
    assert sent["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert "accept-encoding" in sent and sent["accept-encoding"] == r.request.headers["Accept-Encoding"]
    # The upstream's end-to-end headers come back, repeated ones kept apart;
    # its hop-by-hop Keep-Alive does not.
    assert r.headers["X-Upstream"] == "echo"
    assert r.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert "Keep-Alive" not in r.headers


def test_upload_keeps_content_length_and_arrives_whole(broker, echo):
    size = 48 * MIB
    r = requests.post(broker.url + "/v1/echo", data=b"".join(pattern(size)))
    seen = r.json()
    assert seen["content_length"] == str(size) and not seen["chunked"]
    assert seen["body_sha256"] == hashlib.sha256(b"".join(pattern(size))).hexdigest()


def chunks():
    yield b"a" * 1000
    yield b"b" * 70_000


CHUNKS_SHA = hashlib.sha256(b"a" * 1000 + b"b" * 70_000).hexdigest()


def test_a_gpu_jobs_chunked_upload_is_received_whole_and_sent_with_its_length(broker):
    r = requests.post(broker.url + "/v1/echo", data=chunks())
    seen = r.json()
    assert not seen["chunked"] and seen["content_length"] == str(71_000)
    assert seen["body_sha256"] == CHUNKS_SHA


def test_a_large_gpu_upload_is_spooled_to_disk_and_arrives_whole(broker):
    body = os.urandom(3 * MIB + 17)            # past the 1 MiB kept in memory
    r = requests.post(broker.url + "/v1/echo", data=iter([body[:MIB], body[MIB:]]))
    seen = r.json()
    assert seen["content_length"] == str(len(body))
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_a_passthrough_chunked_upload_stays_chunked(broker):
    # DELETE is not among the default gpu_routes: it streams, framing unchanged.
    r = requests.delete(broker.url + "/upstream/echo/echo", data=chunks())
    seen = r.json()
    assert seen["chunked"] and seen["content_length"] is None
    assert seen["body_sha256"] == CHUNKS_SHA


def test_large_download_streams_without_growing_the_broker(broker):
    pid = broker.worker_pid()
    before = peak_rss_mib(pid)
    size = 256 * MIB
    h = hashlib.sha256()
    with requests.get(broker.url + f"/upstream/echo/bytes/{size}", stream=True) as r:
        assert r.headers["Content-Length"] == str(size)
        n = 0
        for chunk in r.iter_content(MIB):
            n += len(chunk)
            h.update(chunk)
    assert n == size
    growth = peak_rss_mib(pid) - before
    assert growth < 40, f"peak RSS grew {growth:.0f} MiB for a {size // MIB} MiB body"


def test_stream_lines_reach_the_client_as_they_are_sent(broker):
    gaps = []
    with requests.post(broker.url + "/upstream/echo/stream?lines=4&interval=0.6",
                       stream=True) as r:
        for line in r.iter_lines():
            gaps.append(time.time() - json.loads(line)["t"])
    assert len(gaps) == 4
    # Held back for the next line, a line would be 0.6 s late.
    assert max(gaps) < 0.45, f"lines were delayed in the proxy: {gaps}"


def test_llm_tokens_stream_from_the_simulated_ollama(broker):
    t0 = time.monotonic()
    arrivals = []
    with requests.post(broker.url + "/v1/llm", json={"model": "m", "prompt": "hi"},
                       stream=True) as r:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        for line in r.iter_lines():
            arrivals.append(time.monotonic() - t0)
            last = json.loads(line)
    assert last["done"] and len(arrivals) == 13
    assert arrivals[0] < arrivals[-1] - 0.03       # first token long before the last


def test_gzip_passes_through_still_compressed(broker):
    with requests.get(broker.url + "/upstream/echo/gzip", stream=True) as r:
        raw = r.raw.read(decode_content=False)
    assert r.headers["Content-Encoding"] == "gzip"
    assert raw[:2] == b"\x1f\x8b"


# What reaches the client's socket after a bodyless answer is the worker's doing.
@pytest.mark.gunicorn
@pytest.mark.parametrize("method,path", [("HEAD", "/upstream/echo/bytes/1000"),
                                         ("GET", "/upstream/echo/status/204"),
                                         ("GET", "/upstream/echo/status/304")])
def test_bodyless_answers_carry_no_body(broker, method, path):
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}\n"):
            more = s.recv(65536)
            if not more:
                break
            data += more
    first, _, rest = data.partition(b"\r\n\r\n")
    assert rest.startswith(b"HTTP/1.1 200"), "a body leaked between the two answers"


# The 100 Continue is the worker's (gunicorn's) to send.
@pytest.mark.gunicorn
def test_expect_100_continue_does_not_stall_an_upload(broker):
    body = b"z" * 200_000
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\n\r\n" % len(body))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        data = b""
        while True:
            more = s.recv(65536)
            if not more:
                break
            data += more
    assert data.startswith(b"HTTP/1.1 200")
    seen = json.loads(data.partition(b"\r\n\r\n")[2])
    assert seen["body_bytes"] == len(body)
    assert "expect" not in {k.lower() for k, _ in seen["headers"]}


def test_upstream_status_and_body_pass_through_unchanged(broker):
    r = requests.post(broker.url + "/upstream/echo/status/418")
    assert r.status_code == 418 and r.text == "status 418" and r.headers["X-Status"] == "418"
    r = requests.post(broker.url + "/v1/tts", json={})
    assert r.status_code == 400 and r.json() == {"error": "text is required"}


def test_upstream_paths_and_queries_pass_unchanged(broker, echo):
    r = requests.get(broker.url + "/upstream/echo/echo/a%2Fb/c?x=%2F&y")
    seen = r.json()
    assert seen["path"] == "/echo/a%2Fb/c" and seen["query"] == "x=%2F&y"


def test_audio_is_streamed_from_the_audio_proxy_without_the_lock(broker, sim):
    r = requests.post(broker.url + "/v1/tts", json={"text": "hello there"})
    assert r.status_code == 200 and r.content[:4] == b"RIFF"
    audio = requests.get(broker.url + r.headers["X-Audio-Path"])
    assert audio.status_code == 200 and audio.content == r.content, audio.text[:300]


# gunicorn's keep-alive: the answer is closed before the next request is read.
@pytest.mark.gunicorn
def test_upstream_keep_alive_connections_are_reused(broker, echo):
    with requests.Session() as s:
        for _ in range(20):
            assert s.post(broker.url + "/v1/echo", data=b"x").status_code == 200
    clients = {seen.client for seen in echo.requests_to("/echo")}
    assert len(clients) <= 3, f"{len(clients)} upstream connections for 20 requests"


def test_connect_failure_is_502_json(broker, echo):
    echo.stop()
    r = requests.post(broker.url + "/v1/echo", data=b"x")
    if r.status_code == 503:      # the health probe noticed first: also correct
        assert r.json()["error"]["code"] == "consumer_unhealthy"
        return
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "upstream_unreachable" and err["consumer"] == "echo"


def test_read_timeout_is_504_json(broker_with):
    b = broker_with({"consumers": {"echo": {"read_timeout_s": 0.3}}})
    t0 = time.monotonic()
    r = requests.post(b.url + "/upstream/echo/slow?s=3")
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - t0 < 2


def test_unhealthy_consumer_is_refused_at_once_and_never_called(broker, sim):
    sim.mvoice.healthy = False
    deadline = time.monotonic() + 5
    while broker.status()["consumers"]["mvoice"]["healthy"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = len(sim.mvoice.requests_to("/api/tts"))
    r = requests.post(broker.url + "/v1/tts", json={"text": "hi"})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "consumer_unhealthy" and err["consumer"] == "mvoice" and err["kind"] == "tts"
    assert "failed its last health probe" in err["message"]
    assert len(sim.mvoice.requests_to("/api/tts")) == before


@pytest.mark.parametrize("method,path,status,code", [
    ("POST", "/v1/nope", 404, "unknown_kind"),
    ("GET", "/upstream/ghost/x", 404, "unknown_consumer"),
    ("POST", "/v1/consumers/ghost/unload", 404, "unknown_consumer"),
    ("GET", "/v1/tts", 405, "method_not_allowed"),
    ("GET", "/no/such/route", 404, "not_found"),
    ("GET", "/v1/events?since=x", 400, "bad_request"),
])
def test_broker_errors_are_json_with_the_contract_code(broker, method, path, status, code):
    r = requests.request(method, broker.url + path)
    assert r.status_code == status
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    if status == 405:
        assert "POST" in r.headers["Allow"].split(", ")


def test_a_refused_request_leaves_the_keep_alive_connection_usable(broker):
    with requests.Session() as s:
        r = s.post(broker.url + "/v1/nope", data=b"q" * 300_000)
        assert r.status_code == 404
        r = s.post(broker.url + "/v1/echo", data=b"after")
        assert r.status_code == 200 and r.json()["body_bytes"] == 5


def test_status_has_the_contract_shape(broker):
    requests.post(broker.url + "/v1/echo", data=b"x")
    st = broker.status()
    assert set(st) >= {"broker", "gpu", "consumers", "scheduler"}
    assert set(st["broker"]) >= {"version", "pid", "uptime_s", "config"}
    assert set(st["gpu"]) >= {"source", "index", "name", "total_mib", "used_mib", "free_mib",
                              "util_pct", "sampled_at", "error"}
    assert st["gpu"]["source"] == "sim" and st["gpu"]["total_mib"] == 24576
    echo = st["consumers"]["echo"]
    assert set(echo) >= {"url", "kinds", "healthy", "last_probe_at", "last_error", "loaded",
                         "vram_resident_mib", "vram_managed", "active", "total_requests",
                         "failed_requests", "last_used"}
    assert echo["kinds"] == ["echo"] and echo["total_requests"] >= 1
    assert set(st["scheduler"]) >= {"queue_depth", "in_flight", "total_jobs", "rejected",
                                    "last_wait_ms", "last_run_ms", "oldest_queued_s",
                                    "evictions", "loads"}
    assert requests.get(broker.url + "/healthz").json() == {"ok": True}


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified"])
def test_bytes_after_a_bodyless_answer_never_reach_the_next_request(broker, echo, status_line):
    """A service that sends more after a 204: the connection went back to
    the pool and the next client received those bytes as its answer."""
    echo.verbatim["nobody"] = [status_line + b"\r\n\r\n", 0.5,
                               b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"]
    first = requests.get(broker.url + "/upstream/echo/raw/nobody", timeout=5)
    assert first.status_code == int(status_line.split()[1]) and first.content == b""
    second = requests.get(broker.url + "/upstream/echo/small", timeout=5)
    assert second.content == b'{"ok":true}'


def test_the_head_parser_keeps_what_http_client_keeps_and_refuses_what_is_no_header():
    from mgpumanager.proxy import MalformedHead, parse_head
    msg = parse_head([b"Content-Type: text/plain \r\n", b"Set-Cookie: a=1\r\n",
                      b"set-cookie: b=2\r\n", b"X-Folded: one\r\n", b"\t two\r\n",
                      b"X-Empty:\r\n", b"\r\n"])
    assert msg.get("content-type") == "text/plain" and msg.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert msg["x-folded"] == "one two" and msg["X-Empty"] == "" and msg.defects == []
    assert list(msg.items())[0] == ("Content-Type", "text/plain")
    for bad in (b"Bad Header: x\r\n", b": x\r\n", b" first\r\n", b"NoColon\r\n"):
        with pytest.raises(MalformedHead):
            parse_head([bad, b"\r\n"])
