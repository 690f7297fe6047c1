"""The GPU lease through a real gunicorn: nothing a client or a service does
holds the GPU past its deadline, skips the lock, ends a cut answer cleanly,
or blames the wrong side."""

import json
import socket
import threading
import time

import pytest
import requests

from conftest import hold_gpu, raw_exchange, wait_until

FAST = {"scheduler": {"job_timeout_s": 10}, "proxy": {"client_timeout_s": 1}}




def gpu_is_free(broker) -> bool:
    return broker.status()["scheduler"]["in_flight"] == 0


def assert_next_job_runs_promptly(broker):
    t0 = time.monotonic()
    r = requests.post(broker.url + "/v1/echo", data=b"next", timeout=10)
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 3, "the next job waited for a lease that should be gone"


def read_answer(sock) -> tuple[int, dict]:
    """One answer with a Content-Length from a raw socket: (status, JSON body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                      if ln.lower().startswith(b"content-length:")))
    while len(body) < length:
        more = sock.recv(65536)
        assert more, body
        body += more
    return int(head[9:12]), json.loads(body)




# 1. A service answer gunicorn cannot send

@pytest.mark.parametrize("raw", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello", id="length-not-a-number"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 5\r\n\r\nhello",
                 id="control-byte-in-value"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX(Evil): 1\r\nContent-Length: 5\r\n\r\nhello", id="bad-name"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
                 id="two-lengths"),
    pytest.param(b"HTTP/1.1 2000 Nope\r\n\r\n", id="bad-status-line"),
    # http.client stops parsing at the line, losing Content-Length: the
    # answer went out chunked and held the GPU until read_timeout_s.
    pytest.param(b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 5\r\n\r\nhello",
                 id="a-line-that-is-no-header"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-Partial: 1\r\n", id="head-cut-off"),
    pytest.param(b"HTTP/1.1 200 OK\r\n folded: 1\r\nContent-Length: 5\r\n\r\nhello",
                 id="head-begins-with-a-continuation"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
                 id="space-before-the-colon"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                 id="transfer-coding-besides-chunked"),
    pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\n\r\n", id="protocol-switch"),
])
def test_a_malformed_answer_is_a_502_and_the_gpu_is_free(broker_with, echo, raw):
    b = broker_with(FAST)
    echo.verbatim["bad"] = raw
    r = requests.post(b.url + "/upstream/echo/raw/bad", data=b"x", timeout=10)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_bad_response"
    assert gpu_is_free(b)
    assert_next_job_runs_promptly(b)


# 2. A client that stalls its upload

def test_a_stalled_upload_never_holds_the_gpu_and_gets_a_408(broker_with, echo):
    b = broker_with(FAST)
    s = socket.create_connection(("127.0.0.1", b.port))
    s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    time.sleep(0.2)
    assert gpu_is_free(b)                        # it is still sending: not queued
    assert_next_job_runs_promptly(b)
    s.settimeout(5)
    status, body = read_answer(s)
    s.close()
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert echo.requests_to("/echo") and all(x.body_bytes == 4 for x in echo.requests_to("/echo"))
    st = b.status()
    assert st["consumers"]["echo"]["failed_requests"] == 0
    assert st["scheduler"]["client_errors_by_code"] == {"request_timeout": 1}


def test_a_client_that_leaves_during_its_upload_never_queues(broker_with, echo):
    b = broker_with(FAST)
    s = socket.create_connection(("127.0.0.1", b.port))
    s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    s.close()
    time.sleep(0.3)
    assert echo.requests_to("/echo") == []
    assert_next_job_runs_promptly(b)


def test_a_body_over_max_body_mib_is_refused_with_413(broker_with, echo):
    b = broker_with({"proxy": {"max_body_mib": 1}})
    r = requests.post(b.url + "/v1/echo", data=b"x" * (1024 * 1024 + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = requests.post(b.url + "/v1/echo", data=iter([b"x" * 700_000, b"y" * 700_000]))
    assert r.status_code == 413
    assert echo.requests_to("/echo") == []


# 3. A client that leaves before the service answers

def test_a_client_that_leaves_before_the_answer_frees_the_gpu_at_once(broker_with, echo):
    b = broker_with(FAST)
    s = socket.create_connection(("127.0.0.1", b.port))
    s.sendall(b"POST /upstream/echo/slow?s=8 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
    wait_until(lambda: echo.requests_to("/slow"), what="the job to reach the service")
    assert not gpu_is_free(b)
    t0 = time.monotonic()
    s.close()
    wait_until(lambda: gpu_is_free(b), 4, "the GPU to be freed")   # not after the 8 s answer
    assert time.monotonic() - t0 < 4
    assert_next_job_runs_promptly(b)


def test_a_client_that_hangs_up_after_the_whole_answer_does_not_hold_the_gpu(broker_with, echo):
    """curl hangs up the moment it has read the answer. The watchdog saw that
    hang-up before the answer's close and took it for a cut mid-answer: the
    job then waited for the service to let go, and one more of its gaps
    between chunks (a 50 ms job held the lock 140 ms in make bench's
    hand-off, 93 ms between jobs instead of 2)."""
    b = broker_with({"proxy": {"cut_hold_s": 5},
                     "consumers": {"echo": {"paths": {"echo": "/stream"}}}})
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", b.port))
        # Two lines 0.6 s apart: the wrongful hold would be 1.5 gaps more.
        s.sendall(b"POST /v1/echo?lines=2&interval=0.6 HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Length: 0\r\n\r\n")
        got = b""
        while not got.endswith(b"0\r\n\r\n"):
            more = s.recv(65536)
            assert more, got
            got += more
        assert got.startswith(b"HTTP/1.1 200")
        s.close()
        wait_until(lambda: gpu_is_free(b), 10, "the GPU to be freed")
        run_ms = b.status()["scheduler"]["last_run_ms"]
        assert run_ms < 1200, f"a whole answer held the GPU {run_ms:.0f} ms, past its 600 ms"
    assert_next_job_runs_promptly(b)


def test_a_client_that_stops_reading_is_cut_after_client_timeout_s(broker_with, echo):
    b = broker_with({"scheduler": {"job_timeout_s": 30}, "proxy": {"client_timeout_s": 1}})
    s = socket.create_connection(("127.0.0.1", b.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"POST /upstream/echo/bytes/268435456 HTTP/1.1\r\nHost: localhost\r\n"
              b"Content-Length: 0\r\n\r\n")
    wait_until(lambda: not gpu_is_free(b), what="the job to start")
    t0 = time.monotonic()
    wait_until(lambda: gpu_is_free(b), 10, "the stalled reader to be cut")
    assert time.monotonic() - t0 < 6
    s.close()
    assert_next_job_runs_promptly(b)


# 4. Paths a service decodes to its GPU route

@pytest.mark.parametrize("path", ["/prompt", "/%70rompt", "/prompt/", "//prompt", "/api/prompt",
                                  "/x/../prompt", "/%2e%2e/prompt", "/%2570rompt"])
def test_encoded_gpu_routes_wait_for_the_lock(broker_with, sim, path):
    # Sent as raw bytes: an HTTP client library would tidy the path first.
    b = broker_with({"consumers": {"comfyui": {"gpu_routes": ["POST /prompt", "POST /api/prompt"]}}})
    held = hold_gpu(b)
    body = b'{"prompt": {}}'
    out = {}
    request = (b"POST /upstream/comfyui" + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
               b"Content-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    t = threading.Thread(target=lambda: out.update(data=raw_exchange(b.port, request)), daemon=True)
    t.start()
    wait_until(lambda: b.status()["scheduler"]["queue_depth"] == 1, what="the job to queue")
    assert [x.path for x in sim.comfyui.seen if x.method == "POST"] == []
    held.close()
    t.join(10)
    assert out["data"].startswith(b"HTTP/1.1 "), out
    posts = [x.path for x in sim.comfyui.seen if x.method == "POST"]
    # Forwarded as sent (http.server itself folds a leading "//" into "/").
    assert posts == [path if not path.startswith("//") else path[1:]]


@pytest.mark.parametrize("interim", [b"HTTP/1.1 102 Processing\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"])
def test_an_interim_answer_does_not_end_the_job(broker_with, echo, interim):
    b = broker_with(FAST)
    echo.verbatim["slow"] = [interim, 0.8, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone"]
    out = {}

    def first():
        r = requests.post(b.url + "/upstream/echo/raw/slow", data=b"x", timeout=10)
        out.update(status=r.status_code, body=r.content, at=time.monotonic())
    t = threading.Thread(target=first)
    t.start()
    wait_until(lambda: echo.requests_to("/raw/slow"), what="the first job to reach the service")
    requests.post(b.url + "/v1/echo", data=b"second", timeout=10)
    second_done = time.monotonic()
    t.join(10)
    assert out["status"] == 200 and out["body"] == b"done"
    assert second_done >= out["at"], "the second job ran while the first was still working"


def test_the_upstream_path_is_forwarded_as_sent_when_the_prefix_is_escaped(broker, echo):
    data = raw_exchange(broker.port, b"GET /upstream/%65cho/echo/a;b%5cc%2Fd?q=%2F HTTP/1.1\r\n"
                        b"Host: localhost\r\nConnection: close\r\n\r\n")
    seen = json.loads(data.partition(b"\r\n\r\n")[2])
    assert seen["path"] == "/echo/a;b%5cc%2Fd" and seen["query"] == "q=%2F"


def test_an_admin_call_under_a_lease_ends_by_its_deadline(broker_with, echo):
    b = broker_with({"scheduler": {"job_timeout_s": 1},
                     "consumers": {"echo": {"unload": {"path": "/hold?max=20"}}}})
    t0 = time.monotonic()
    r = requests.post(b.url + "/v1/consumers/echo/unload", timeout=15)
    assert r.status_code == 502 and r.json()["error"]["code"] == "unload_failed"
    assert time.monotonic() - t0 < 4
    assert b.status()["scheduler"]["leases_expired"] == 0     # it ended by itself, in time
    assert_next_job_runs_promptly(b)


def test_a_fragment_in_the_target_is_refused_and_never_forwarded(broker, sim):
    for path in (b"/upstream/comfyui/prompt#x", b"/upstream/echo/echo#/../secret"):
        data = raw_exchange(broker.port, b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\n"
                            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert [s for s in sim.comfyui.seen if s.method == "POST"] == []


# 5. Never a clean end on a cut answer

def test_a_half_closed_llm_stream_is_cut_not_ended_cleanly(broker, sim):
    body = json.dumps({"model": "m", "prompt": "hi", "options": {"num_predict": 40}}).encode()
    data = raw_exchange(broker.port, b"POST /v1/llm HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
                        half_close=True)
    assert not data.endswith(b"0\r\n\r\n"), data[-200:]
    wait_until(lambda: gpu_is_free(broker), 3, "the GPU to be freed")


def test_content_length_beside_chunked_is_dropped_and_the_body_arrives_whole(broker, echo):
    echo.verbatim["both"] = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"
                             b"Content-Type: text/plain\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    r = requests.post(broker.url + "/upstream/echo/raw/both", data=b"x")
    assert r.status_code == 200 and r.content == b"hello world"
    assert "Content-Length" not in r.headers


def test_an_upstream_that_breaks_off_mid_body_truncates_the_answer(broker, echo):
    echo.verbatim["short"] = (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
                              b"Content-Type: text/plain\r\n\r\nonly forty-two bytes of a hundred.........")
    data = raw_exchange(broker.port, b"POST /upstream/echo/raw/short HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Length: 0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) < 100
    wait_until(lambda: gpu_is_free(broker), 3, "the GPU to be freed")
    events = requests.get(broker.url + "/v1/events").json()["events"]
    job = [e for e in events if e["type"] == "job"][-1]
    assert job["ok"] is False and "broke off" in job["error"]


# 6. The client's own errors are the client's

@pytest.mark.parametrize("body", [
    pytest.param(b"zz\r\nabc\r\n0\r\n\r\n", id="bad-chunk-size"),
    pytest.param(b"3\r\nabcdef\r\n0\r\n\r\n", id="chunk-longer-than-its-size"),
    pytest.param(b"ff\r\nabc", id="chunk-shorter-than-its-size"),
])
@pytest.mark.parametrize("path", ["/v1/echo", "/upstream/echo/echo?gpu=0"])
def test_a_malformed_chunked_body_is_the_clients_400(broker, echo, body, path):
    method = b"POST" if path.startswith("/v1") else b"DELETE"      # DELETE streams: no GPU job
    data = raw_exchange(broker.port, method + b" " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + body, half_close=True)
    if data:                                   # a client that lies may also get just a cut
        assert data.startswith(b"HTTP/1.1 400"), data[:200]
        assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_request"
    st = broker.status()
    assert st["consumers"]["echo"]["failed_requests"] == 0
    assert st["consumers"]["echo"]["healthy"] is True
    events = requests.get(broker.url + "/v1/events").json()["events"]
    assert not [e for e in events if e["type"] in ("job", "refused")]
    assert gpu_is_free(broker)


class _Pieces(list):
    """A verbatim answer that notes when each piece went out: the last
    note is the moment the service stopped working (its write failed)."""

    def __init__(self, pieces):
        super().__init__(pieces)
        self.sent_at: list[float] = []
        self.done = threading.Event()

    def __iter__(self):
        try:
            for piece in super().__iter__():
                if not isinstance(piece, (int, float)):
                    self.sent_at.append(time.monotonic())
                yield piece
        finally:
            self.done.set()


@pytest.mark.parametrize("framing", ["none", "length"])
@pytest.mark.parametrize("cut_by", ["client", "deadline"])
def test_a_cut_answer_that_closes_its_connection_holds_the_gpu_until_the_service_lets_go(
        broker_with, echo, cut_by, framing):
    """An answer with Connection: close, cut short. http.client lets go of
    such a connection's socket at once, so there was none left to watch the
    service let go of; and an answer with neither a length nor chunks ends
    where its connection does, so the cut's own shutdown read as its end.
    Either way the job ended while the service still worked, and the next
    job could reach it half a second before it noticed."""
    tokens = [b"token %02d\n" % i for i in range(12)]
    length = b"Content-Length: %d\r\n" % sum(map(len, tokens)) if framing == "length" else b""
    answer = [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n%sConnection: close\r\n\r\n" % length]
    for token in tokens:
        answer += [token, 0.25]
    echo.verbatim["closing"] = pieces = _Pieces(answer)
    b = broker_with({"scheduler": {"job_timeout_s": 1 if cut_by == "deadline" else 30},
                     "proxy": {"cut_hold_s": 5},
                     "consumers": {"echo": {"paths": {"echo": "/raw/closing"}}}})
    s = socket.create_connection(("127.0.0.1", b.port))
    s.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
    got = b""
    while got.count(b"token") < 2:
        got += s.recv(4096)
    if cut_by == "client":
        s.close()
    wait_until(lambda: gpu_is_free(b), 10, "the GPU to be freed")
    freed = time.monotonic()
    s.close()
    assert pieces.done.wait(10), "the service never stopped"
    assert len(pieces.sent_at) < len(answer) // 2, "the answer was never cut"
    stopped = pieces.sent_at[-1]       # its write that failed
    assert freed >= stopped, f"the GPU was free {stopped - freed:.2f} s before the service stopped"
