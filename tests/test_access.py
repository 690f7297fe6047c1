"""Who may drive the broker (Host, Origin, token, upstream_allow), a load
that keeps failing, and a liveness that means something. In process:
these are the app's decisions, no gunicorn needed."""

import time

import pytest

from mgpumanager.app import create_app
from mgpumanager.config import parse_config

TOKEN = "s3cret-token-of-some-length"


def config(echo_url="http://127.0.0.1:9", **server):
    return parse_config({
        "server": server,
        "gpu": {"backend": "ledger", "total_mib": 24000},
        "scheduler": {"load_failures_to_cooldown": 2, "load_cooldown_s": 30,
                      "load_cooldown_max_s": 50},
        "routes": {"echo": "echo", "tts": "mvoice"},
        "consumers": {
            "echo": {"url": echo_url, "health": "/health", "paths": {"echo": "/echo"},
                     "vram_resident_mib": 0,
                     "upstream_allow": ["GET *", "POST /echo", "POST /api/generate"]},
            "mvoice": {"url": "http://127.0.0.1:9", "paths": {"tts": "/tts"},
                       "vram_resident_mib": 1000, "load": {"path": "/load"}}}}, "t.yaml")


def client(cfg):
    app = create_app(cfg, start=False)
    return app, app.test_client()


@pytest.mark.parametrize("host,ok", [
    ("localhost:8770", True), ("127.0.0.1:8770", True), ("[::1]:8770", True),
    ("LocalHost", True), ("gpu.lan:8770", True), ("evil.example:8770", False),
    ("127.0.0.1.evil.example", False),
])
def test_only_known_host_names_are_answered(host, ok):
    _, c = client(config(allowed_hosts=["gpu.lan"]))
    r = c.get("/v1/status", headers={"Host": host})
    assert r.status_code == (200 if ok else 400)
    if not ok:
        assert r.json["error"]["code"] == "bad_request" and "allowed_hosts" in r.json["error"]["message"]


def test_on_a_unix_socket_only_localhost_and_listed_hosts_are_answered():
    import socket
    _, c = client(config(allowed_hosts=["gpu.lan"]))
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        for host, status in (("evil.example", 400), ("localhost", 200), ("gpu.lan", 200)):
            r = c.get("/v1/status", headers={"Host": host},
                      environ_overrides={"gunicorn.socket": a, "SERVER_NAME": host})
            assert r.status_code == status, host
    finally:
        a.close()
        b.close()


def test_healthz_answers_any_host():
    _, c = client(config())
    assert c.get("/healthz", headers={"Host": "rebound.example"}).status_code == 200


@pytest.mark.parametrize("method,headers,status", [
    pytest.param("POST", {"Origin": "https://evil.example"}, 403, id="foreign-origin"),
    pytest.param("POST", {"Origin": "null"}, 403, id="opaque-origin"),
    pytest.param("POST", {"Sec-Fetch-Site": "cross-site"}, 403, id="cross-site-without-origin"),
    pytest.param("POST", {"Origin": "http://localhost"}, 404, id="own-origin"),
    pytest.param("POST", {"Origin": "http://dash.lan:3000"}, 404, id="allowed-origin"),
    pytest.param("POST", {}, 404, id="no-origin-a-script"),
    pytest.param("GET", {"Origin": "https://evil.example"}, 200, id="reads-are-not-state-changes"),
])
def test_cross_site_requests_may_not_change_state(method, headers, status):
    _, c = client(config(allowed_origins=["http://dash.lan:3000/"]))
    path = "/v1/consumers/ghost/unload" if method == "POST" else "/v1/status"
    r = c.open(path, method=method, headers={"Host": "localhost", **headers})
    assert r.status_code == status
    if status == 403:
        assert r.json["error"]["code"] == "forbidden"


def test_a_form_post_from_another_site_cannot_unload_a_consumer():
    app, c = client(config())
    r = c.post("/v1/consumers/mvoice/unload", data="x=1",
               headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403
    assert app.extensions["mgpumanager"].status()["scheduler"]["total_jobs"] == 0


def test_with_a_token_every_route_but_healthz_wants_it():
    _, c = client(config(auth_token=TOKEN))
    assert c.get("/healthz").status_code == 200
    r = c.get("/v1/status")
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
    assert c.get("/v1/status", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 401
    assert c.get("/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get("/metrics").status_code == 401


def test_the_status_page_signs_in_with_a_form_and_a_cookie():
    _, c = client(config(auth_token=TOKEN))
    page = c.get("/")
    assert page.status_code == 401 and b'name="token"' in page.data
    assert c.post("/login", data={"token": "nope-nope-nope-nope"},
                  headers={"Origin": "http://localhost"}).status_code == 401
    r = c.post("/login", data={"token": TOKEN}, headers={"Origin": "http://localhost"})
    assert r.status_code == 302
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/").status_code == 200 and c.get("/v1/status").status_code == 200


def test_a_login_from_another_site_is_refused():
    _, c = client(config(auth_token=TOKEN))
    assert c.post("/login", data={"token": TOKEN},
                  headers={"Origin": "https://evil.example"}).status_code == 403


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/anything", True), ("POST", "/echo", True), ("POST", "/api/generate", True),
    ("DELETE", "/api/delete", False), ("POST", "/api/pull", False),
    ("POST", "/api/generate/../pull", False), ("POST", "/%65cho", True),
])
def test_upstream_allow_limits_what_passes_through(echo, method, path, allowed):
    _, c = client(config(echo.url))
    r = c.open("/upstream/echo" + path, method=method, data=b"x")
    if allowed:
        assert r.status_code != 403
    else:
        assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"
        assert not echo.seen


def test_a_load_that_keeps_failing_cools_the_consumer_down_doubling_to_a_cap():
    app, _ = client(config())
    b = app.extensions["mgpumanager"]
    b.registry.mark_loaded("mvoice", False)
    b.registry.mark_loaded("echo", False)
    for _ in range(2):                    # the load route is unreachable
        b.start_job("mvoice", "tts").finish(ok=True, reached=False)
    from mgpumanager.errors import ConsumerCoolingDown
    with pytest.raises(ConsumerCoolingDown) as info:
        b.start_job("mvoice", "tts")
    assert 25 <= info.value.retry_after <= 30
    st = b.status()["consumers"]["mvoice"]
    assert st["load_failures"] == 2 and st["cooling_down_s"] > 25
    assert [e for e in b.events.since() if e["type"] == "cooling_down"]
    reg = b.registry
    assert reg.load_result("mvoice", "again", after=2, base_s=30, max_s=50) == 50   # doubled, capped
    assert reg.load_result("mvoice", None, after=2, base_s=30, max_s=50) is None    # one success
    assert reg.cooling_down_for("mvoice") == 0


def test_healthz_fails_when_a_lease_outlives_its_deadline():
    app, c = client(config())
    b = app.extensions["mgpumanager"]
    b.gpu.watch._clock = lambda: 0.0           # a watchdog stuck in the past: it never steps in
    job = b.start_job("echo", "echo")
    job.lease.deadline = time.monotonic() - b.gpu.watch.grace_s - 5
    r = c.get("/healthz")
    assert r.status_code == 503 and "past its deadline" in r.json["problems"][0]
    assert b.status()["broker"]["live"] is False
    job.finish(ok=True)
    assert c.get("/healthz").status_code == 200


def test_the_brokers_token_never_reaches_a_service_but_the_services_own_key_does(echo):
    """The token (header and cookie) was forwarded to every service: any of
    them, its logs or plugins, learnt the key to the whole broker."""
    _, c = client(config(echo.url, auth_token=TOKEN))
    seen = []
    for headers in ({"Authorization": f"Bearer {TOKEN}"},
                    {"X-Mgpumanager-Token": TOKEN, "Authorization": f"Bearer  {TOKEN}"},
                    {"X-Mgpumanager-Token": TOKEN, "Authorization": "Bearer service-key"},
                    {}):
        if not headers:                            # the status page's cookie
            c.set_cookie("theirs", "1")
            c.set_cookie("mgpumanager_token", TOKEN)
        r = c.get("/upstream/echo/echo", headers=headers)
        assert r.status_code == 200, r.data
        seen.append({k.lower(): v for k, v in r.json["headers"]})
    for headers in seen:
        assert TOKEN not in " ".join(headers.values())
    assert seen[2]["authorization"] == "Bearer service-key"
    assert "theirs=1" in seen[3]["cookie"]


def test_an_unauthenticated_login_reads_no_more_than_a_token_needs():
    """Multipart bodies of any size went into temporary files (400 MiB took
    417 MB of disk), then 401."""
    _, c = client(config(auth_token=TOKEN))
    origin = {"Origin": "http://localhost"}
    big = c.post("/login", data={"token": "x" * 100_000}, headers=origin)
    assert big.status_code == 413 and big.json["error"]["code"] == "payload_too_large"
    upload = c.post("/login", data={"token": TOKEN, "f": (__import__("io").BytesIO(b"x"), "f")},
                    headers=origin, content_type="multipart/form-data")
    assert upload.status_code == 400
    assert c.post("/login", data={"token": TOKEN}, headers=origin).status_code == 302
