"""The OpenAI door: one base URL for every OpenAI client, routed by model,
each request a GPU job under the one lock. Driven by the real openai SDK."""

import io
import threading

import openai
import pytest
import requests

from conftest import (TIME_SCALE, background, deep_merge, hold_gpu, queued_depth,
                      sim_config, wait_idle, wait_until)
from mgpumanager.config import ConfigError, parse_config
from mgpumanager.models import _multipart_field, model_of
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


def test_a_long_unknown_model_name_is_answered_at_once_and_shown_cut(door):
    r = requests.post(door.url + "/v1/embeddings", json={"model": "m" * 1_000_000, "input": "x"},
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
    assert _multipart_field(pieces, b"XyZ", b"model") == "whisper-1"


def test_a_multipart_body_without_a_model_field_is_a_bad_request():
    body = _form([("file", b"abc", "a.wav")])
    with pytest.raises(Exception) as raised:
        model_of(lambda: iter([body]), len(body), "multipart/form-data; boundary=XyZ")
    assert raised.value.code == "bad_request"
