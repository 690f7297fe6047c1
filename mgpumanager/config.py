"""The config file, read once into frozen dataclasses.

The dataclasses and their defaults are in config_model.py, the section
readers in config_reader.py, the YAML hardening in yamlsafe.py; this module
is the face the rest of the package imports. ``load_config`` reads the
whole file and reports every problem in one ``ConfigError``, each naming
the key path
(``consumers.comfyui.unload.path``) and what was expected, so an operator
fixes a config in one pass instead of one restart per typo.
"""

from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType
from typing import Any

from .config_model import (CONFIG_ENV, DEFAULT_CONFIG, KINDS_HINT, MIN_SPARE_THREADS, Config,
                           ConsumerConfig, DeviceConfig, GpuConfig, HealthConfig, ProxyConfig,
                           SchedulerConfig, ServerConfig)
# The rest of the package imports these from here.
from .config_model import Call, ModelsFrom, route_forms  # noqa: F401
from .config_reader import (_MISSING, NAME_RE, _read_consumer, _read_lock_file, _Reader,
                            _read_strings, _read_token, key_path, listing, read_settings)
from .errors import ConfigError
from .yamlsafe import read_yaml


def parse_config(data: Any, path: str = "<config>") -> Config:
    """Turn the parsed YAML of one config file into a Config, or raise ConfigError."""
    r = _Reader()
    top = r.section(data, "", ("server", "gpu", "gpus", "health", "scheduler", "proxy",
                              "routes", "audio_proxy", "consumers"))
    if data is not None and not isinstance(data, dict):
        raise ConfigError(path, r.problems)

    def mapping(name: str) -> dict:
        node = top.get(name)
        return node if isinstance(node, dict) else {}

    s = mapping("server")
    server = read_settings(
        r, top.get("server"), "server", ServerConfig, extra_keys=("auth_token_file",),
        allowed_hosts=_read_strings(r, s.get("allowed_hosts"), "server.allowed_hosts",
                                    "a list of host names or addresses ('*': any)"),
        allowed_origins=_read_strings(r, s.get("allowed_origins"), "server.allowed_origins",
                                      "a list of origins like 'http://dash.local:3000'"),
        auth_token=_read_token(r, s))
    if server.workers != 1:
        r.problem("server.workers", "1 (the GPU lock lives in one process; a second worker "
                  "would run GPU jobs beside the first and over-commit VRAM)", server.workers)
        server = dataclasses.replace(server, workers=1)

    gpu = read_settings(r, top.get("gpu"), "gpu", GpuConfig)
    devices = _read_devices(r, top.get("gpus"), gpu, mapping("gpu"))
    if gpu.backend == "sim" and gpu.sim_url is None:
        r.problem("gpu.sim_url", "the simulated GPU's URL (required for backend sim)")

    health = read_settings(r, top.get("health"), "health", HealthConfig)

    q = mapping("scheduler")
    scheduler = read_settings(r, top.get("scheduler"), "scheduler", SchedulerConfig,
                              extra_keys=("priority",), lock_file=_read_lock_file(r, q))
    if server.threads is not None and \
            server.threads < scheduler.max_queue + 1 + MIN_SPARE_THREADS:
        r.problem("server.threads", f"at least scheduler.max_queue + {1 + MIN_SPARE_THREADS} = "
                  f"{scheduler.max_queue + 1 + MIN_SPARE_THREADS} (every queued job holds a "
                  f"thread; one runs the job and {MIN_SPARE_THREADS} must stay free for status, "
                  "health and audio), or leave it out to derive it", server.threads)

    proxy = read_settings(r, top.get("proxy"), "proxy", ProxyConfig)

    raw_consumers = top.get("consumers")
    consumers: dict[str, ConsumerConfig] = {}
    if not isinstance(raw_consumers, dict) or not raw_consumers:
        r.problem("consumers", "a mapping of at least one consumer name -> settings",
                  raw_consumers if raw_consumers is not None else _MISSING)
        raw_consumers = {}
    names = [n for n in raw_consumers if isinstance(n, str)]
    for name, node in raw_consumers.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            r.problem(key_path("consumers", name), "consumer names of letters, digits, '.', "
                      "'_' and '-' (it appears in /upstream/<name>/ URLs), starting with a "
                      "letter or digit", name)
            continue
        if name in RESERVED_CONSUMERS:
            r.problem(key_path("consumers", name), "a consumer name other than "
                      f"{' or '.join(sorted(RESERVED_CONSUMERS))} (the GPU leases' own)", name)
            continue
        c = _read_consumer(r, name, node, names, [d.index for d in devices])
        if c is not None:
            consumers[c.name] = c

    routes_node = top.get("routes")
    routes: dict[str, str] = {}
    if routes_node is None:
        r.problem("routes", f"a mapping of kind -> consumer ({KINDS_HINT})")
    elif not isinstance(routes_node, dict):
        r.problem("routes", f"a mapping of kind -> consumer ({KINDS_HINT})", routes_node)
    else:
        for kind, target in routes_node.items():
            kpath = key_path("routes", kind)
            if not isinstance(kind, str) or not NAME_RE.fullmatch(kind):
                r.problem(kpath, "a kind name (letters, digits, '.', '_', '-')", kind)
            elif kind in RESERVED_KINDS:
                r.problem(kpath, f"a kind name that is none of the broker's own /v1/ routes "
                          f"({', '.join(sorted(RESERVED_KINDS))})", kind)
            elif not isinstance(target, str) or target not in names:
                r.problem(kpath, f"the name of a consumer ({listing(names)})", target)
            elif target not in consumers:
                pass                  # that consumer's own problems are reported already
            elif str(kind) not in consumers[target].paths:
                r.problem(kpath, f"a consumer with a paths.{kind} entry (consumers.{target}.paths "
                          f"has {', '.join(consumers[target].paths) or 'none'})", target)
            else:
                routes[str(kind)] = target

    _check_model_claims(r, consumers)

    priority = _read_priority(r, q.get("priority"),
                              list(routes_node) if isinstance(routes_node, dict) else None)
    if priority:
        scheduler = dataclasses.replace(scheduler, priority=MappingProxyType(priority))

    audio = top.get("audio_proxy")
    if audio is not None and (not isinstance(audio, str) or audio not in names):
        r.problem("audio_proxy", f"the name of a consumer ({listing(names)})", audio)
        audio = None

    if r.problems:
        raise ConfigError(path, r.problems)
    return Config(path=path, server=server, gpu=gpu, health=health, scheduler=scheduler,
                  proxy=proxy, routes=MappingProxyType(routes), audio_proxy=audio,
                  consumers=MappingProxyType(consumers), devices=devices)


def _read_devices(r: _Reader, node: Any, gpu: GpuConfig, gpu_node: dict
                  ) -> tuple[DeviceConfig, ...]:
    """``gpus:``, in index order; without it, the one GPU of ``gpu.index``."""
    ledger = gpu.backend == "ledger"
    if node is None:
        if ledger and gpu.total_mib is None:
            r.problem("gpu.total_mib", "a whole number of MiB (required for backend ledger: "
                      "there is no reading to take the total from)")
        return (DeviceConfig(gpu.index, gpu.total_mib),)
    for key in ("index", "total_mib"):
        if gpu_node.get(key) is not None:
            r.problem(f"gpu.{key}", f"no gpu.{key} beside a gpus list (give each GPU's {key} "
                      "in its gpus entry)")
    if not isinstance(node, list) or not node:
        r.problem("gpus", "a list of GPUs, each {index: N} (and total_mib for the ledger)",
                  node)
        return (DeviceConfig(gpu.index, gpu.total_mib),)
    devices: dict[int, DeviceConfig] = {}
    for i, entry in enumerate(node):
        path = f"gpus[{i}]"
        if not isinstance(entry, dict):
            r.problem(path, "a GPU like {index: 0, total_mib: 24576}", entry)
            continue
        if entry.get("index") is None:
            r.problem(f"{path}.index", "the GPU's index (required; as nvidia-smi numbers it)")
            continue
        d = read_settings(r, entry, path, DeviceConfig)
        if d.index in devices:
            r.problem(f"{path}.index", "an index no other entry of gpus has", d.index)
            continue
        if ledger and d.total_mib is None:
            r.problem(f"{path}.total_mib", "a whole number of MiB (required for backend "
                      "ledger: there is no reading to take the total from)")
        devices[d.index] = d
    return tuple(devices[i] for i in sorted(devices)) or (DeviceConfig(gpu.index, gpu.total_mib),)


# /v1/<kind> shares its first segment with these: a kind by one of these
# names could never be reached, or would shadow the broker's own route.
RESERVED_KINDS = frozenset({"chat", "completions", "embeddings", "audio", "images", "models",
                            "leases", "status", "events", "consumers", "metrics"})


RESERVED_CONSUMERS = frozenset({"lease", "leases"})


def _check_model_claims(r: _Reader, consumers: dict[str, ConsumerConfig]) -> None:
    """A model name two consumers list would route by config order: refused,
    naming both. (Globs may overlap: exact names go first, then the names
    the services list, then the longest glob; see models.py.)"""
    claimed: dict[str, str] = {}
    for name, c in consumers.items():
        for i, model in enumerate(c.models):
            other = claimed.setdefault(model, name)
            if other != name:
                r.problem(f"consumers.{name}.models[{i}]",
                          f"a model no other consumer lists (consumers.{other}.models has "
                          f"{model!r} too)", model)


def _read_priority(r: _Reader, node: Any, kinds: list | None) -> dict[str, int]:
    """scheduler.priority: kind -> a whole number, higher first."""
    if node is None:
        return {}
    expected = "a mapping of kind -> priority (a whole number, higher goes first)"
    if not isinstance(node, dict):
        r.problem("scheduler.priority", expected, node)
        return {}
    out = {}
    for kind, value in node.items():
        kpath = key_path("scheduler.priority", kind)
        if kinds is not None and kind not in kinds:
            r.problem(kpath, f"a kind in routes ({listing([str(k) for k in kinds])})", kind)
        elif isinstance(value, bool) or not isinstance(value, int) or not -1000 <= value <= 1000:
            r.problem(kpath, "a whole number from -1000 to 1000", value)
        else:
            out[kind] = value
    return out


def config_path(path: str | os.PathLike | None = None) -> str:
    """The config file meant: the argument, else $MGPUMANAGER_CONFIG, else etc/consumers.yaml."""
    return os.fspath(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike | None = None, *, copy: str | None = None) -> Config:
    """Read a config file (``config_path``); with ``copy``, read that copy of
    it instead (the one the master validated), named as the file itself."""
    path = config_path(path)
    return parse_config(read_yaml(copy or path), path)
