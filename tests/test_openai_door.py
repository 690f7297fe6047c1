"""The OpenAI door: one base URL for every OpenAI client, routed by model,
each request a GPU job under the one lock. Driven by the real openai SDK."""

import io
import socket
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
from werkzeug.formparser import parse_form_data

from conftest import (TIME_SCALE, background, deep_merge, hold_gpu, queued_depth,
                      read_until_closed, sim_config, wait_idle, wait_until)
from mgpumanager.client_body import SpooledBody
from mgpumanager.config import ConfigError, parse_config
from mgpumanager.errors import BadRequest
from mgpumanager.models import _multipart_fields, model_of
from mgpumanager.sim.consumers import wav_bytes
from mgpumanager.sim.openai_sim import OpenAISim


@pytest.fixture
def door_with(sim, echo, start_broker):
    """Two LLM servers that do not fit together on the 24 GiB simulated GPU
    (alpha configured by name, beta known only from its own /v1/models), a
    speech server that fits beside anything, and ``overrides`` merged in."""
    servers = {
        "llm-a": OpenAISim(sim.gpu, "llm-a", ["alpha"], accepts=["alpha", "alpha-*"],
                           resident_mib=14000, time_scale=TIME_SCALE).start(),
        "llm-b": OpenAISim(sim.gpu, "llm-b", ["beta", "beta-large"], resident_mib=14000,
                           time_scale=TIME_SCALE).start(),
        "speech": OpenAISim(sim.gpu, "speech", ["tts-1", "whisper-1"], resident_mib=2000,
                            time_scale=TIME_SCALE).start(),
    }
    clients = []

    def start(overrides: dict | None = None):
        unload = {"path": "/sim/unload"}
        cfg = deep_merge(sim_config(sim, echo), {"consumers": {
            "llm-a": {"type": "openai", "url": servers["llm-a"].url, "vram_resident_mib": 14000,
                      "models": ["alpha", "alpha-*"], "unload": unload},
            "llm-b": {"type": "openai", "url": servers["llm-b"].url, "vram_resident_mib": 14000,
                      "unload": unload},
            "speech": {"type": "openai", "url": servers["speech"].url, "vram_resident_mib": 2000,
                       "models": ["tts-1", "whisper-1"], "unload": unload,
                       "can_coexist_with": ["mvoice", "whisper", "ollama", "comfyui", "llm-a",
                                            "llm-b"]},
        }})
        cfg = deep_merge(cfg, overrides or {})
        b = start_broker(cfg)
        b.wait_healthy(*cfg["consumers"])
        wait_until(lambda: "beta" in {m["id"] for m in requests.get(b.url + "/v1/models")
                                      .json()["data"]}, what="llm-b's own list")
        b.servers = servers
        b.client = openai.OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0)
        clients.append(b.client)
        return b

    yield start
    for c in clients:
        c.close()
    for s in servers.values():
        s.stop()


@pytest.fixture
def door(door_with):
    return door_with()


def test_chat_is_routed_by_model_streamed_and_not(door):
    r = door.client.chat.completions.create(model="alpha", max_tokens=3,
                                            messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "tok0 tok1 tok2 "
    stream = door.client.chat.completions.create(model="beta", max_tokens=4, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "tok0 tok1 tok2 tok3 "
    assert door.servers["llm-a"].asked_for == ["alpha"]
    assert door.servers["llm-b"].asked_for == ["beta"]
    def jobs():
        return [e for e in requests.get(door.url + "/v1/events").json()["events"]
                if e["type"] == "job"]
    wait_until(lambda: len(jobs()) >= 2, what="both jobs done")     # done as the answer closes
    assert [(e["consumer"], e["kind"]) for e in jobs()][-2:] == [
        ("llm-a", "chat/completions"), ("llm-b", "chat/completions")]


def test_a_glob_routes_names_the_config_does_not_list(door):
    r = door.client.completions.create(model="alpha-instruct", prompt="x", max_tokens=2)
    assert r.choices[0].text == "tok0 tok1 "
    assert door.servers["llm-a"].asked_for == ["alpha-instruct"]


def test_embeddings_speech_and_a_transcription_upload(door):
    e = door.client.embeddings.create(model="beta-large", input=["a", "bb"])
    assert [d.index for d in e.data] == [0, 1]
    speech = door.client.audio.speech.create(model="tts-1", voice="alloy", input="hello")
    assert speech.content.startswith(b"RIFF")
    text = door.client.audio.transcriptions.create(model="whisper-1",
                                                   file=("a.wav", wav_bytes(0.5)))
    assert text.text.startswith("simulated transcript of")
    assert door.servers["speech"].asked_for == ["tts-1", "whisper-1"]


def test_the_model_field_after_a_large_file_part_is_found(door):
    """A 3 MiB upload is spooled to a file; its model field comes last."""
    audio = b"\0" * (3 << 20)
    r = requests.post(door.url + "/v1/audio/translations",
                      files=[("file", ("big.wav", io.BytesIO(audio))), ("model", (None, "whisper-1"))])
    assert r.status_code == 200, r.text
    assert door.servers["speech"].asked_for == ["whisper-1"]


def test_models_lists_every_concrete_name_with_its_consumer(door):
    door.client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}])
    listed = {m.id: m for m in door.client.models.list()}
    assert {k: v.owned_by for k, v in listed.items() if v.owned_by.startswith(("llm", "speech"))} \
        == {"alpha": "llm-a", "beta": "llm-b", "beta-large": "llm-b",
            "tts-1": "speech", "whisper-1": "speech"}
    def alpha_loaded():
        return {m["id"]: m["loaded"] for m in requests.get(door.url + "/v1/models")
                .json()["data"]}["alpha"]
    wait_until(lambda: alpha_loaded() is True, what="alpha's consumer counted loaded")


def test_an_unknown_model_is_a_404_in_openais_shape_naming_close_ones(door):
    with pytest.raises(openai.NotFoundError) as raised:
        door.client.chat.completions.create(model="alpah", messages=[])
    err = raised.value
    assert err.code == "model_not_found" and err.param == "model"
    assert "alpha" in err.message and err.type == "invalid_request_error"
    assert all(not s.asked_for for s in door.servers.values())


@pytest.mark.parametrize("body,kw", [
    ("not json", {"headers": {"Content-Type": "application/json"}}),
    (None, {"json": {"messages": []}}),
    (None, {"json": {"model": 7}}),
    (None, {}),
    ("[" * 100_000, {"headers": {"Content-Type": "application/json"}}),
])
def test_no_model_or_no_json_is_a_400_in_openais_shape(door, body, kw):
    r = requests.post(door.url + "/v1/chat/completions", data=body, **kw)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == "bad_request"
    assert r.headers["x-should-retry"] == "false"


def test_a_full_queue_is_a_503_with_retry_after_in_openais_shape(door_with):
    b = door_with({"scheduler": {"max_queue": 1}})
    held = hold_gpu(b)
    thread, out = background(lambda: b.client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "x"}]))
    wait_until(lambda: queued_depth(b) == 1, what="one job queued")
    with pytest.raises(openai.InternalServerError) as raised:
        b.client.chat.completions.create(model="beta", messages=[])
    err = raised.value
    assert err.status_code == 503 and err.code == "queue_full" and err.type == "server_error"
    assert int(err.response.headers["retry-after"]) >= 1
    assert "x-should-retry" not in err.response.headers      # the SDK may retry this one
    held.close()
    thread.join(10)
    assert out["result"].choices[0].message.content


def test_a_model_that_can_never_fit_is_refused_at_once_and_not_retried(door_with):
    b = door_with({"consumers": {"llm-b": {"vram_resident_mib": 30000}}})
    client = openai.OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=2)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="beta", messages=[])
    client.close()
    assert raised.value.code == "insufficient_vram"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert b.servers["llm-b"].asked_for == []
    assert b.status()["scheduler"]["rejected_by_code"] == {"insufficient_vram": 1}
    # Errors before the door routes (a method the route does not take) are OpenAI's too.
    r = requests.get(b.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_eight_clients_alternating_models_run_one_job_at_a_time(door, sim):
    errors = []

    def client(i):
        try:
            for j in range(3):
                model = "alpha" if (i + j) % 2 else "beta"
                r = door.client.chat.completions.create(model=model, max_tokens=2,
                                                        messages=[{"role": "user", "content": "x"}])
                assert r.choices[0].message.content == "tok0 tok1 "
        except Exception as e:              # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wait_idle(sim)
    assert errors == []
    assert sim.gpu.ooms == 0, sim.gpu.oom_log
    assert sim.gpu.max_concurrent == 1 and sim.gpu.overlaps() == []
    st = door.status()
    assert st["consumers"]["llm-a"]["evictions"] + st["consumers"]["llm-b"]["evictions"] >= 1
    wait_until(lambda: door.status()["scheduler"]["total_jobs"] >= 24, what="24 jobs counted")


def test_a_long_model_name_is_answered_at_once_and_shown_cut(door):
    r = requests.post(door.url + "/v1/embeddings", json={"model": "m" * 1_000_000, "input": "x"},
                      timeout=5)
    assert r.status_code == 400 and len(r.content) < 2000
    assert "over 1024 bytes" in r.json()["error"]["message"]
    r = requests.post(door.url + "/v1/embeddings", json={"model": "m" * 1000, "input": "x"},
                      timeout=5)
    assert r.status_code == 404 and len(r.content) < 2000
    assert r.json()["error"]["code"] == "model_not_found"


def test_the_kind_routes_are_unchanged_beside_the_door(door):
    assert requests.post(door.url + "/v1/tts", json={"text": "hi"}).status_code == 200
    r = requests.post(door.url + "/v1/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_kind"


# -- the config and the body reader, without HTTP --------------------------------------

BASE = {"routes": {}, "consumers": {
    "a": {"url": "http://127.0.0.1:1", "vram_resident_mib": 1, "models": ["m", "x-*"]},
    "b": {"url": "http://127.0.0.1:2", "vram_resident_mib": 1, "models": ["m"]}}}


def test_a_model_two_consumers_claim_is_a_config_error_naming_both():
    with pytest.raises(ConfigError) as raised:
        parse_config(BASE)
    assert "consumers.b.models[0]" in str(raised.value) and "consumers.a.models" in str(raised.value)


@pytest.mark.parametrize("kind", ["chat", "completions", "embeddings", "audio", "images",
                                  "models", "leases"])
def test_kinds_named_like_the_brokers_own_routes_are_refused(kind):
    cfg = deep_merge(BASE, {"consumers": {"b": {"models": [], "paths": {kind: "/x"}}},
                            "routes": {kind: "b"}})
    with pytest.raises(ConfigError) as raised:
        parse_config(cfg)
    assert f"routes.{kind}" in str(raised.value)


def model_in(data: bytes, content_type: str) -> str:
    """model_of on ``data`` as the GPU job's spool keeps it."""
    body = SpooledBody()
    try:
        body.file.write(data)
        body.size = len(data)
        return model_of(body, content_type)
    finally:
        body.close()


def _form(fields, boundary="XyZ"):
    out = b""
    for name, value, filename in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n").encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_the_model_field_is_found_across_any_chunk_boundary(chunk):
    # The boundary's text followed by neither CRLF nor "--" is data, not a delimiter.
    body = _form([("file", b"--XyZx\r\n" * 50, "a.wav"),
                  ("model", b"whisper-1", None), ("language", b"en", None)])
    pieces = (body[i:i + chunk] for i in range(0, len(body), chunk))
    assert _multipart_fields(pieces, b"XyZ", "model") == ["whisper-1"]


def test_a_multipart_body_without_a_model_field_is_a_bad_request():
    body = _form([("file", b"abc", "a.wav")])
    with pytest.raises(BadRequest):
        model_in(body, "multipart/form-data; boundary=XyZ")


# -- found by attacking the door: bodies that mislead, services that list a lot ----

def _werkzeug_model(body: bytes, ct: str):
    """What a standard multipart parser (Flask's own) reads as the model field."""
    env = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": ct, "CONTENT_LENGTH": str(len(body)),
           "wsgi.input": io.BytesIO(body)}
    _, form, files = parse_form_data(env)
    for f in files.values():
        f.close()
    return form.getlist("model")


def test_json_model_lookup_does_not_blow_up_memory():
    """max_body_mib defaults to 1024: parsed whole, a 1 GiB JSON body of '[],'
    would become ~19 GB of Python lists in one request thread."""
    body = b'{"model":"alpha","x":[' + b"[]," * ((1 << 18) // 3) + b'[]]}'
    tracemalloc.start()
    try:
        assert model_in(body, "application/json") == "alpha"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n = len(body)
    del body
    assert peak < 4 * n, f"peak {peak >> 20} MiB for a {n >> 20} MiB body"


# The multipart scanner reads the model a standard parser reads.

def _part(disp_extra: str, value: bytes, extra_head: str = "") -> bytes:
    return (f"--XyZ\r\n{extra_head}Content-Disposition: form-data; {disp_extra}\r\n\r\n"
            .encode() + value + b"\r\n")


SCANNER_CASES = {
    # a file whose filename holds '; name=model': the greedy regex takes the last name=
    "filename_with_name_param": (
        _part('name="file"; filename="a; name=model"', b"alpha")
        + _part('name="model"', b"beta") + b"--XyZ--\r\n",
        "multipart/form-data; boundary=XyZ"),
    # another header line mentioning content-disposition: the regex is not anchored
    "other_header_mentions_disposition": (
        _part('name="file"; filename="a.wav"', b"alpha",
              extra_head='X-Note: content-disposition: x; name="model"\r\n')
        + _part('name="model"', b"beta") + b"--XyZ--\r\n",
        "multipart/form-data; boundary=XyZ"),
    # parameter names are case-insensitive (RFC 2045 5.1)
    "uppercase_boundary_param": (
        _part('name="model"', b"beta") + b"--XyZ--\r\n",
        "multipart/form-data; BOUNDARY=XyZ"),
    # the first 'boundary=' anywhere in the header, even inside another parameter
    "boundary_inside_other_param": (
        b"--evil\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nalpha\r\n--evil--\r\n"
        + _part('name="model"', b"beta") + b"--XyZ--\r\n",
        "multipart/form-data; x-boundary=evil; boundary=XyZ"),
}


@pytest.mark.parametrize("case", list(SCANNER_CASES))
def test_scanner_reads_the_model_a_standard_parser_reads(case):
    body, ct = SCANNER_CASES[case]
    assert _werkzeug_model(body, ct) == ["beta"]
    try:
        got = model_in(body, ct)
    except BadRequest as e:
        got = f"BadRequest: {e.message}"
    assert got == "beta"


def test_a_filename_param_routes_the_upload_to_the_wrong_consumer(door):
    body, ct = SCANNER_CASES["filename_with_name_param"]
    r = requests.post(door.url + "/v1/audio/transcriptions", data=body,
                      headers={"Content-Type": ct})
    # The service reads model=beta; the broker routed it to llm-a, which refuses it
    # (a real service would load a model the broker never accounted for).
    assert door.servers["llm-a"].asked_for == []
    assert r.status_code == 200, r.text


def test_a_json_body_built_to_make_the_scan_slow_is_refused_in_bounded_time():
    body = b'{"x":[' + b"[]," * (3 << 20) + b'[]],"model":"alpha"}'
    t0 = time.monotonic()
    with pytest.raises(BadRequest, match="too many parts"):
        model_in(body, "application/json")
    assert time.monotonic() - t0 < 5


def test_two_different_model_fields_are_refused():
    """werkzeug/Flask take the first model field, Starlette/FastAPI
    (faster-whisper-server, Kokoro) the last: routing by either would be wrong."""
    body = _part('name="model"', b"alpha") + _part('name="model"', b"beta") + b"--XyZ--\r\n"
    with pytest.raises(BadRequest):
        model_in(body, "multipart/form-data; boundary=XyZ")


# A service that lists many names costs one dict per lookup.

def test_models_listing_is_not_quadratic_in_listed_names(door):
    door.servers["llm-b"].models = ["beta"] + [f"beta-{i:05d}" for i in range(20000)]
    door.broker.models.refresh("llm-b")
    assert len(door.broker.models._listed["llm-b"]) == 10_000     # LISTED_MAX
    t0 = time.monotonic()
    r = requests.get(door.url + "/v1/models", timeout=120)
    took = time.monotonic() - t0
    assert r.status_code == 200
    assert took < 2.0, f"GET /v1/models took {took:.1f} s for 20k names"


def test_unknown_model_404_is_not_quadratic_in_listed_names(door):
    door.servers["llm-b"].models = ["beta"] + [f"beta-{i:05d}" for i in range(20000)]
    door.broker.models.refresh("llm-b")
    door.broker.models._asked_all_at = time.monotonic() + 3600    # no refresh: just the 404
    t0 = time.monotonic()
    r = requests.post(door.url + "/v1/embeddings", json={"model": "nope", "input": "x"},
                      timeout=120)
    took = time.monotonic() - t0
    assert r.status_code == 404
    assert took < 2.0, f"an unknown model's 404 took {took:.1f} s"


# An unknown name asks every service at once, bounded by one timeout.

class _Hanging(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/v1/models":
            time.sleep(5)
        data = b'{"ok": true, "data": []}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_unknown_model_does_not_wait_on_each_hanging_service_in_turn(door_with):
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Hanging) for _ in range(3)]
    for s in servers:
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
    extra = {f"hang{i}": {"url": f"http://127.0.0.1:{s.server_port}", "health": "/health",
                          "vram_resident_mib": 1,
                          "models_from": {"path": "/v1/models", "list": "data", "name": "id"}}
             for i, s in enumerate(servers)}
    b = door_with({"consumers": extra})
    b.broker.models._asked_all_at = float("-inf")
    t0 = time.monotonic()
    r = requests.post(b.url + "/v1/embeddings", json={"model": "nope", "input": "x"},
                      timeout=30)
    took = time.monotonic() - t0
    for s in servers:
        s.shutdown()
        s.server_close()
    assert r.status_code == 404
    # health.timeout_s is 1 s here: three hanging lists cost 3 s, serially, in the
    # request's thread (one such thread every REFRESH_ON_MISS_S, for any client).
    assert took < 1.5, f"an unknown model's 404 waited {took:.1f} s"


# The door's neighbours answer in OpenAI's shape too.

@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions/"),
                                         ("GET", "/v1/models/nope")])
def test_door_neighbour_errors_are_openai_shaped(door, method, path):
    r = requests.request(method, door.url + path, json={"model": "alpha"})
    assert r.status_code in (404, 405)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err


# Valid JSON the service would take is routed.

def test_valid_json_with_a_long_integer_is_routed_not_called_not_json():
    """Python's int_max_str_digits (4300) makes json.loads raise ValueError on a
    valid body; the service (llama.cpp, Go, Rust) would take it."""
    body = b'{"model":"alpha","seed":1' + b"0" * 5000 + b"}"
    assert model_in(body, "application/json") == "alpha"


def test_a_query_string_is_forwarded_and_a_non_ascii_one_refused(door):
    r = door.client.chat.completions.create(model="alpha", max_tokens=1, messages=[],
                                            extra_query={"api-version": "1"})
    assert r.choices[0].message.content == "tok0 "
    assert door.servers["llm-a"].requests_to("/v1/chat/completions")[-1].query == "api-version=1"
    with socket.create_connection(("127.0.0.1", door.port), timeout=5) as s:
        body = b'{"model": "alpha"}'
        s.sendall(b"POST /v1/chat/completions?x=\xc3\xa9 HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 400") and b'"type":"invalid_request_error"' in answer
