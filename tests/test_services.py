"""The real services' ways, through presets: ollama unloaded model by model,
whisper.cpp stopped and started by commands, ComfyUI's late /free, and the
services' own client libraries talking through /upstream/."""

import os
import sys
import time

import ollama
import openai
import pytest
import requests
import yaml

from conftest import ROOT, deep_merge, sim_config, wait_until
from mgpumanager.config import parse_config


def preset_config(sim, echo=None) -> dict:
    """The tests' layout with each consumer described by its type."""
    cfg = sim_config(sim, echo)
    c = cfg["consumers"]
    c["ollama"] = {"type": "ollama", "url": sim.ollama.url, "paths": {"llm": "/api/generate"},
                   "vram_resident_mib": 8000}
    c["comfyui"] = {"type": "comfyui", "url": sim.comfyui.url, "paths": {"image": "/prompt"},
                    "vram_resident_mib": 13500}
    stop = f"import urllib.request as u; u.urlopen(u.Request('{sim.whisper.url}/sim/stop', method='POST'))"
    start = stop.replace("/sim/stop", "/sim/start")
    c["whisper"] = {"type": "whisper.cpp", "url": sim.whisper.url, "paths": {"stt": "/inference"},
                    "vram_resident_mib": 1800, "can_coexist_with": ["mvoice"],
                    "unload": {"command": [sys.executable, "-c", stop], "timeout_s": 10},
                    "load": {"command": [sys.executable, "-c", start], "timeout_s": 10}}
    return cfg


BASE = {"routes": {"llm": "x"}, "consumers": {"x": {"url": "http://127.0.0.1:1",
                                                   "vram_resident_mib": 1,
                                                   "paths": {"llm": "/api/generate"}}}}


@pytest.mark.parametrize("kind,check", [
    ("ollama", lambda c: c.unload.for_each.path == "/api/ps" and c.unload.until_empty
     and c.loaded_from.vram_bytes == "size_vram" and not c.is_gpu_route("POST", "/api/pull")
     and c.is_gpu_route("POST", "/api/chat") and not c.vram_managed),
    ("comfyui", lambda c: c.unload.path == "/free" and c.busy.path == "/queue"
     and c.is_gpu_route("POST", "/api/prompt") and c.health == "/system_stats"),
    ("whisper.cpp", lambda c: c.unload is None and c.is_gpu_route("POST", "/inference")),
    ("llama.cpp", lambda c: c.unload.path == "/models/unload" and c.unload.for_each.list == "data"),
    ("vllm", lambda c: c.unload.path == "/sleep?level=1" and c.load.path == "/wake_up"),
    ("openai", lambda c: c.health == "/v1/models"
     and c.is_gpu_route("POST", "/v1/chat/completions") and not c.is_gpu_route("GET", "/v1/models")),
    ("generic", lambda c: c.unload is None and c.is_gpu_route("PUT", "/x")),
])
def test_a_type_fills_in_the_services_defaults(kind, check):
    cfg = parse_config(deep_merge(BASE, {"consumers": {"x": {"type": kind}}}))
    assert check(cfg.consumers["x"]), cfg.consumers["x"]


def test_the_configs_own_keys_replace_the_presets():
    cfg = parse_config(deep_merge(BASE, {"consumers": {"x": {
        "type": "comfyui", "health": "/ping", "unload": {"command": ["true"]}}}}))
    c = cfg.consumers["x"]
    assert c.health == "/ping" and c.unload.command == ("true",) and c.busy.path == "/queue"


def test_ollama_is_unloaded_model_by_model_to_make_room(broker_with, sim, start_broker):
    b = start_broker(preset_config(sim))
    b.wait_healthy("ollama", "comfyui", "mvoice", "whisper")
    assert requests.post(b.url + "/v1/llm", json={"model": "sim:latest", "prompt": "hi",
                                                  "stream": False}).ok
    # The job ends (and ollama counts as loaded) as its answer closes, just after the client has it.
    wait_until(lambda: b.status()["consumers"]["ollama"]["loaded"] is True, what="ollama loaded")
    assert sim.ollama.loaded
    # 24576 MiB: ollama's 8000 and ComfyUI's 13500 (+ cushion) do not fit beside mvoice's.
    assert requests.post(b.url + "/v1/tts", json={"text": "hi"}).ok
    assert requests.post(b.url + "/v1/image", json={"prompt": {"1": {}}}).ok
    unloads = [s for s in sim.ollama.requests_to("/api/generate") if s.body_bytes]
    assert not sim.ollama.loaded and sim.gpu.ooms == 0
    events = requests.get(b.url + "/v1/events").json()["events"]
    assert any(e["type"] == "evicted" and e["consumer"] == "ollama" for e in events)
    assert unloads, "ollama was asked to unload through /api/generate with keep_alive 0"


def test_whisper_is_stopped_and_started_by_its_commands(sim, start_broker):
    cfg = preset_config(sim)
    b = start_broker(cfg)
    b.wait_healthy("whisper", "comfyui")
    r = requests.post(b.url + "/v1/consumers/whisper/unload")
    assert r.status_code == 200, r.text
    assert not sim.whisper.loaded and sim.whisper.requests_to("/sim/stop")
    r = requests.post(b.url + "/v1/consumers/whisper/load")
    assert r.status_code == 200 and sim.whisper.loaded and sim.whisper.requests_to("/sim/start")
    log = b.log()
    assert "exited 0" in log


def test_a_failing_command_is_an_unload_failure_with_its_output(sim, start_broker):
    cfg = preset_config(sim)
    cfg["consumers"]["whisper"]["unload"] = {"command": [sys.executable, "-c",
                                                         "import sys; sys.exit('no such unit')"]}
    b = start_broker(cfg)
    r = requests.post(b.url + "/v1/consumers/whisper/unload")
    assert r.status_code == 502 and r.json()["error"]["code"] == "unload_failed"
    assert "exited 1" in r.json()["error"]["message"] and "no such unit" in r.json()["error"]["message"]


def test_a_chatty_or_hanging_command_is_bounded_in_memory_and_time():
    from mgpumanager.commands import run_command
    t0 = time.monotonic()
    error = run_command("x", (sys.executable, "-c",
                              "import sys, time\n"
                              "sys.stdout.buffer.write(b'\\xff' * 10_000_000)\n"
                              "sys.stdout.flush(); time.sleep(30)"), 1.0)
    assert "no exit within 1 s" in error and time.monotonic() - t0 < 5
    error = run_command("x", (sys.executable, "-c",
                              "import sys; sys.stdout.buffer.write(b'\\xff done'); sys.exit(3)"), 5)
    assert error.endswith("exited 3: '\ufffd done'")


def test_a_commands_setsid_grandchild_dies_with_it_at_the_timeout(tmp_path):
    """A grandchild in a session of its own left the process group, and
    survived the timeout's kill."""
    from mgpumanager.commands import run_command
    pidfile = tmp_path / "grandchild.pid"
    error = run_command("x", (sys.executable, "-c",
                              "import os, subprocess, sys, time\n"
                              "p = subprocess.Popen([sys.executable, '-c', "
                              "'import os, time; os.setsid(); time.sleep(60)'])\n"
                              f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
                              "time.sleep(60)"), 1.0)
    assert "no exit within 1 s" in error
    pid = int(pidfile.read_text())

    def gone():
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True
    wait_until(gone, timeout=5, what="the grandchild to die")


def test_a_commands_output_cannot_forge_log_lines(caplog):
    from mgpumanager.commands import run_command
    with caplog.at_level("INFO", logger="mgpumanager.consumers"):
        run_command("x", (sys.executable, "-c",
                          "print('ok\\n[2026-01-01] [INFO] job consumer=evil status=200')"), 5)
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_the_ollama_client_works_through_upstream(sim, start_broker):
    b = start_broker(preset_config(sim))
    b.wait_healthy("ollama")
    client = ollama.Client(host=b.url + "/upstream/ollama")
    parts = [p["response"] for p in client.generate(model="sim:latest", prompt="hi", stream=True)]
    assert len(parts) == 13 and parts[0] == "tok0 "
    assert [m.model for m in client.ps().models] == ["sim:latest"]
    assert client.list().models
    assert [j.kind for j in sim.gpu.jobs] == ["llm"]
    client._client.close()


def test_the_openai_sdk_streams_through_upstream_with_sse_comments_intact(sim, start_broker):
    b = start_broker(preset_config(sim))
    b.wait_healthy("ollama")
    client = openai.OpenAI(base_url=b.url + "/upstream/ollama/v1", api_key="unused",
                           max_retries=0)
    stream = client.chat.completions.create(model="sim:latest", stream=True, max_tokens=4,
                                            messages=[{"role": "user", "content": "hi"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    stream.close()
    assert text == "tok0 tok1 tok2 tok3 "
    with requests.post(b.url + "/upstream/ollama/v1/chat/completions", stream=True,
                       json={"model": "m", "stream": True, "max_tokens": 1,
                             "messages": [{"role": "user", "content": "x"}]}) as r:
        raw = r.raw.read()
    assert raw.startswith(b": keep-alive\n\n") and raw.endswith(b"data: [DONE]\n\n")
    assert [m.id for m in client.models.list()] == ["sim:latest"]
    client.close()


@pytest.mark.parametrize("example", sorted((ROOT / "etc" / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_each_example_is_a_valid_addition_to_the_shipped_config(example):
    base = yaml.safe_load((ROOT / "etc" / "consumers.yaml").read_text())
    extra = yaml.safe_load(example.read_text())
    base["consumers"].update(extra["consumers"])
    base["routes"].update(extra["routes"])
    cfg = parse_config(base, str(example))
    assert set(extra["consumers"]) <= set(cfg.consumers)


def test_comfyuis_late_free_is_waited_for_behind_a_ledger(start_broker):
    from mgpumanager.sim import start_cluster
    sim = start_cluster(16000, time_scale=0.1)     # ComfyUI and mvoice do not fit together
    try:
        sim.comfyui.free_delay_s = 5.0             # frees 0.5 s after /free answered
        cfg = preset_config(sim)
        cfg["gpu"] = {"backend": "ledger", "total_mib": 16000, "cushion_mib": 0}
        cfg["consumers"] = {n: cfg["consumers"][n] for n in ("mvoice", "comfyui")}
        cfg["consumers"]["mvoice"]["can_coexist_with"] = []
        cfg["routes"] = {"tts": "mvoice", "image": "comfyui"}
        b = start_broker(cfg)
        b.wait_healthy("mvoice", "comfyui")
        for kind, payload in [("image", {"prompt": {"1": {}}}), ("tts", {"text": "hi"})] * 2:
            assert requests.post(f"{b.url}/v1/{kind}", json=payload, timeout=30).ok
        assert sim.gpu.ooms == 0, sim.gpu.oom_log
        assert len(sim.comfyui.requests_to("/system_stats")) > 2     # it was watched
    finally:
        sim.stop()


def test_comfyuis_unload_waits_for_its_memory_only_if_it_held_any(sim):
    """/free answers at once and frees later: the broker waits for ComfyUI's
    own account (torch_vram_total) to halve; a ComfyUI that holds nothing
    (possibly loaded, never used) has nothing to wait for. Before held_key,
    that case waited out the 10 s settle bound."""
    from mgpumanager.consumers import HttpActions
    c = parse_config(preset_config(sim)).consumers["comfyui"]
    actions = HttpActions(2, 2)
    t0 = time.monotonic()
    assert actions.call(c, c.unload) is None
    assert time.monotonic() - t0 < 3                  # not the 10 s bound
    time.sleep(0.3)                                   # that /free's own late free is done
    sim.comfyui.ensure_loaded()
    sim.comfyui.free_delay_s = 1.0 / sim.comfyui.time_scale    # frees 1 s after answering
    t0 = time.monotonic()
    assert actions.call(c, c.unload) is None
    assert 0.8 <= time.monotonic() - t0 < 5 and not sim.comfyui.loaded
