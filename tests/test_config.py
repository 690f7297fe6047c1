"""Config loading: every problem in one run, each with its file and key path."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from mgpumanager.config import ConfigError, load_config, parse_config

GOOD = {
    "gpu": {"backend": "ledger", "total_mib": 24576},
    "routes": {"tts": "mvoice", "image": "comfyui"},
    "consumers": {
        "mvoice": {"url": "http://127.0.0.1:8766", "paths": {"tts": "/api/tts"},
                   "vram_resident_mib": 2800, "can_coexist_with": ["comfyui"],
                   "unload": {"path": "/api/admin/unload"}},
        "comfyui": {"url": "http://127.0.0.1:8188", "paths": {"image": "/prompt"},
                    "vram_resident_mib": 13000,
                    "unload": {"method": "POST", "path": "/free", "json": {"unload_models": True}},
                    "busy": {"path": "/queue", "keys": ["queue_running"]},
                    "gpu_routes": ["POST /prompt"]},
    },
}


def problems_of(data) -> list[str]:
    """The problems, each without the "test.yaml: " every one starts with."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    assert all(p.startswith("test.yaml: ") for p in info.value.problems)
    return [p.removeprefix("test.yaml: ") for p in info.value.problems]


def test_good_config_loads_into_frozen_objects():
    cfg = parse_config(GOOD, "test.yaml")
    assert cfg.consumers["comfyui"].unload.json == {"unload_models": True}
    assert cfg.consumers["comfyui"].busy.keys == ("queue_running",)
    assert cfg.gpu.cushion_mib == 256 and cfg.scheduler.max_queue == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gpu.cushion_mib = 1


def test_coexistence_is_symmetric():
    cfg = parse_config(GOOD)
    assert cfg.may_coexist("mvoice", "comfyui") and cfg.may_coexist("comfyui", "mvoice")


def test_gpu_routes_default_to_every_write_and_match_globs():
    cfg = parse_config(GOOD)
    mvoice, comfy = cfg.consumers["mvoice"], cfg.consumers["comfyui"]
    assert mvoice.is_gpu_route("POST", "/anything") and mvoice.is_gpu_route("patch", "/x")
    assert not mvoice.is_gpu_route("GET", "/anything")
    assert comfy.is_gpu_route("POST", "/prompt")
    assert not comfy.is_gpu_route("POST", "/free") and not comfy.is_gpu_route("GET", "/history/1")


def test_every_problem_is_reported_at_once_with_its_key_path():
    bad = yaml.safe_load("""
gpu: {backend: cuda, cushion_mib: -5, colour: red}
scheduler: {max_queue: lots, queue_timeout_s: 0}
routes: {tts: mvoice, llm: nobody, image: mvoice}
consumers:
  mvoice:
    url: ftp://x
    paths: {tts: api/tts}
    vram_resident_mib: -1
    can_coexist_with: [ghost]
    unload: {method: FETCH}
  comfyui:
    url: http://127.0.0.1:8188
    vram_resident_mib: 'lots'
    unload: {path: /free, extra: 1}
""")
    problems = problems_of(bad)
    text = "\n".join(problems)
    for expected in [
        "gpu.backend: expected one of auto | nvml | nvidia-smi | ledger | sim, got 'cuda'",
        "gpu.cushion_mib: expected a whole number of MiB from 0 to 1048576, got -5",
        "gpu.colour: unknown key",
        "scheduler.max_queue: expected a whole number from 1 to 4096, got 'lots'",
        "scheduler.queue_timeout_s: expected a number of seconds > 0 and at most 604800 (a week), "
        "got 0",
        "routes.llm: expected the name of a consumer (mvoice, comfyui), got 'nobody'",
        "consumers.mvoice.url: expected an http:// or https:// URL",
        "consumers.mvoice.paths.tts: expected an ASCII path starting with '/', without spaces, "
        "got 'api/tts'",
        "consumers.mvoice.vram_resident_mib: expected a whole number of MiB from 0 to 1048576, got -1",
        "consumers.mvoice.can_coexist_with[0]: expected the name of a consumer",
        "consumers.mvoice.unload.method: expected one of GET | POST",
        "consumers.mvoice.unload.path: a value (required; it is missing or null)",
        "consumers.comfyui.vram_resident_mib: expected a whole number of MiB from 0 to 1048576, got 'lots'",
        "consumers.comfyui.unload.extra: unknown key",
    ]:
        assert expected in text, f"missing {expected!r} in:\n{text}"


def test_route_to_a_consumer_without_that_path_is_refused():
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["routes"]["stt"] = "mvoice"
    assert problems_of(data) == [
        "routes.stt: expected a consumer with a paths.stt entry (consumers.mvoice.paths has tts), "
        "got 'mvoice'"]


def test_ledger_needs_a_total_and_workers_must_be_one():
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    del data["gpu"]["total_mib"]
    data["server"] = {"workers": 2}
    problems = problems_of(data)
    assert any(p.startswith("gpu.total_mib: a whole number of MiB (required for backend ledger")
               for p in problems)
    assert any(p.startswith("server.workers: expected 1 (the GPU lock lives in one process")
               for p in problems)


def test_threads_that_would_starve_status_are_refused():
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["server"] = {"threads": 10}
    data["scheduler"] = {"max_queue": 32}
    assert problems_of(data)[0].startswith("server.threads: expected at least "
                                           "scheduler.max_queue + 5 = 37")
    cfg = parse_config(GOOD)
    # the queue, the running job, 16 streams (server.max_streams), 4 spare
    assert cfg.server.thread_count(cfg.scheduler.max_queue) == 32 + 1 + 16 + 4
    assert cfg.server.stream_limit(cfg.scheduler.max_queue) == 16


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value) and "cannot read it" in str(info.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("gpu: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    assert str(broken) in str(info.value) and "line 2" in info.value.problems[0]


def test_shipped_configs_are_valid():
    for name in ("etc/consumers.yaml", "etc/demo.yaml"):
        cfg = load_config(name)
        assert set(cfg.routes) == {"tts", "stt", "llm", "image"}


def test_check_config_command_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "mgpumanager.cli", "check-config",
                         "etc/consumers.yaml"], capture_output=True, text=True)
    assert ok.returncode == 0 and "consumer comfyui" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: {tts: ghost}\nconsumers: {a: {url: 'http://x', vram_resident_mib: 1}}\n")
    out = subprocess.run([sys.executable, "-m", "mgpumanager.cli", "check-config", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert str(bad) in out.stderr and "routes.tts: expected the name of a consumer (a)" in out.stderr


def test_a_null_required_key_is_a_problem_not_a_silently_dropped_consumer():
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["consumers"]["mvoice"]["vram_resident_mib"] = None
    assert problems_of(data) == [
        "consumers.mvoice.vram_resident_mib: a whole number of MiB from 0 to 1048576 "
        "(required)"]


def test_a_null_key_is_a_key_left_out_in_every_section():
    """The null rule, for every field declared with setting() and the lists
    that used to refuse a null: the config equals the one without the keys."""
    import dataclasses

    from mgpumanager.config_model import (GpuConfig, HealthConfig, ProxyConfig, SchedulerConfig,
                                          ServerConfig)
    base = {"gpu": {"backend": "ledger", "total_mib": 1000}, "routes": {"tts": "a"},
            "consumers": {"a": {"url": "http://127.0.0.1:1", "paths": {"tts": "/t"},
                                "vram_resident_mib": 10, "busy": {"path": "/q"}}}}
    nulls = {"gpu": {"backend": "ledger", "total_mib": 1000}, "routes": {"tts": "a"},
             "consumers": {"a": {"url": "http://127.0.0.1:1", "paths": {"tts": "/t"},
                                 "vram_resident_mib": 10, "can_coexist_with": None,
                                 "busy": {"path": "/q", "keys": None}}}}
    for section, cls in (("server", ServerConfig), ("health", HealthConfig),
                         ("scheduler", SchedulerConfig), ("proxy", ProxyConfig),
                         ("gpu", GpuConfig)):
        declared = [f.name for f in dataclasses.fields(cls) if "setting" in f.metadata]
        assert declared, cls
        nulls.setdefault(section, {}).update({k: None for k in declared
                                              if k not in nulls.get(section, {})})
    nulls["gpu"].update(backend="ledger", total_mib=1000)
    without, with_nulls = parse_config(base, "t.yaml"), parse_config(nulls, "t.yaml")
    assert with_nulls.server == without.server and with_nulls.scheduler == without.scheduler
    assert with_nulls.proxy == without.proxy and with_nulls.health == without.health
    assert with_nulls.gpu == without.gpu
    assert with_nulls.consumers["a"] == without.consumers["a"]
    assert without.scheduler.queue_timeout_s == SchedulerConfig().queue_timeout_s
