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

from .config_model import (CONFIG_ENV, DEFAULT_CONFIG, GPU_BACKENDS, KINDS_HINT, MIN_SPARE_THREADS,
                           Config, ConsumerConfig, GpuConfig, HealthConfig, ProxyConfig,
                           SchedulerConfig, ServerConfig)
# The rest of the package imports these from here.
from .config_model import Call, ModelsFrom, route_forms  # noqa: F401
from .config_reader import (_MISSING, MAX_QUEUE, NAME_RE, _read_consumer, _read_lock_file,
                            _Reader, _read_strings, _read_token, key_path, listing)
from .errors import ConfigError
from .schedule import POLICIES
from .yamlsafe import read_yaml


def parse_config(data: Any, path: str = "<config>") -> Config:
    """Turn the parsed YAML of one config file into a Config, or raise ConfigError."""
    r = _Reader()
    top = r.section(data, "", ("server", "gpu", "health", "scheduler", "proxy", "routes",
                              "audio_proxy", "consumers"))
    if data is not None and not isinstance(data, dict):
        raise ConfigError(path, r.problems)

    s = r.section(top.get("server"), "server", ("bind", "workers", "threads", "log_format",
                                                "allowed_hosts", "allowed_origins", "auth_token",
                                                "auth_token_file", "max_streams"))
    d = ServerConfig()
    workers = r.integer(s, "workers", "server", d.workers, 1, maximum=64)
    if workers != 1:
        r.problem("server.workers", "1 (the GPU lock lives in one process; a second worker "
                  "would run GPU jobs beside the first and over-commit VRAM)", workers)
    server = ServerConfig(
        bind=r.bind(s, "bind", "server", d.bind),
        workers=1,
        threads=r.integer(s, "threads", "server", None, 1, maximum=MAX_QUEUE + 1024),
        max_streams=r.integer(s, "max_streams", "server", d.max_streams, 1, maximum=1024),
        log_format=r.string(s, "log_format", "server", d.log_format, ("text", "json")),
        allowed_hosts=_read_strings(r, s.get("allowed_hosts"), "server.allowed_hosts",
                                    "a list of host names or addresses ('*': any)"),
        allowed_origins=_read_strings(r, s.get("allowed_origins"), "server.allowed_origins",
                                      "a list of origins like 'http://dash.local:3000'"),
        auth_token=_read_token(r, s))

    g = r.section(top.get("gpu"), "gpu", ("backend", "index", "total_mib", "cushion_mib",
                                          "sample_interval_s", "sim_url", "nvidia_smi"))
    d = GpuConfig()
    gpu = GpuConfig(
        backend=r.string(g, "backend", "gpu", d.backend, GPU_BACKENDS),
        index=r.integer(g, "index", "gpu", d.index, 0, maximum=63),
        total_mib=r.integer(g, "total_mib", "gpu", None, 1, "a whole number of MiB"),
        cushion_mib=r.integer(g, "cushion_mib", "gpu", d.cushion_mib, 0, "a whole number of MiB"),
        sample_interval_s=r.seconds(g, "sample_interval_s", "gpu", d.sample_interval_s),
        sim_url=r.url(g, "sim_url", "gpu", required=False),
        nvidia_smi=r.string(g, "nvidia_smi", "gpu", d.nvidia_smi))
    if gpu.backend == "ledger" and gpu.total_mib is None:
        r.problem("gpu.total_mib", "a whole number of MiB (required for backend ledger: "
                  "there is no reading to take the total from)")
    if gpu.backend == "sim" and gpu.sim_url is None:
        r.problem("gpu.sim_url", "the simulated GPU's URL (required for backend sim)")

    h = r.section(top.get("health"), "health", ("interval_s", "timeout_s"))
    d = HealthConfig()
    health = HealthConfig(interval_s=r.seconds(h, "interval_s", "health", d.interval_s),
                          timeout_s=r.seconds(h, "timeout_s", "health", d.timeout_s))

    q = r.section(top.get("scheduler"), "scheduler", (
        "max_queue", "queue_timeout_s", "evict_attempts", "evict_settle_s", "job_timeout_s",
        "busy_poll_s", "lock_file", "load_failures_to_cooldown", "load_cooldown_s",
        "load_cooldown_max_s", "policy", "max_bypass", "max_delay_s", "priority"))
    d = SchedulerConfig()
    scheduler = SchedulerConfig(
        max_queue=r.integer(q, "max_queue", "scheduler", d.max_queue, 1, maximum=MAX_QUEUE),
        queue_timeout_s=r.seconds(q, "queue_timeout_s", "scheduler", d.queue_timeout_s),
        evict_attempts=r.integer(q, "evict_attempts", "scheduler", d.evict_attempts, 0,
                                 maximum=100),
        evict_settle_s=r.seconds(q, "evict_settle_s", "scheduler", d.evict_settle_s, positive=False),
        job_timeout_s=r.seconds(q, "job_timeout_s", "scheduler", d.job_timeout_s),
        busy_poll_s=r.seconds(q, "busy_poll_s", "scheduler", d.busy_poll_s),
        lock_file=_read_lock_file(r, q),
        load_failures_to_cooldown=r.integer(q, "load_failures_to_cooldown", "scheduler",
                                            d.load_failures_to_cooldown, 1, maximum=1000),
        load_cooldown_s=r.seconds(q, "load_cooldown_s", "scheduler", d.load_cooldown_s),
        load_cooldown_max_s=r.seconds(q, "load_cooldown_max_s", "scheduler",
                                      d.load_cooldown_max_s),
        policy=r.string(q, "policy", "scheduler", d.policy, POLICIES),
        max_bypass=r.integer(q, "max_bypass", "scheduler", d.max_bypass, 0, maximum=1000),
        max_delay_s=r.seconds(q, "max_delay_s", "scheduler", d.max_delay_s, positive=False))
    if server.threads is not None and \
            server.threads < scheduler.max_queue + 1 + MIN_SPARE_THREADS:
        r.problem("server.threads", f"at least scheduler.max_queue + {1 + MIN_SPARE_THREADS} = "
                  f"{scheduler.max_queue + 1 + MIN_SPARE_THREADS} (every queued job holds a "
                  f"thread; one runs the job and {MIN_SPARE_THREADS} must stay free for status, "
                  "health and audio), or leave it out to derive it", server.threads)

    p = r.section(top.get("proxy"), "proxy", ("connect_timeout_s", "read_timeout_s",
                                              "max_body_mib", "client_timeout_s", "cut_hold_s"))
    d = ProxyConfig()
    proxy = ProxyConfig(
        connect_timeout_s=r.seconds(p, "connect_timeout_s", "proxy", d.connect_timeout_s),
        read_timeout_s=r.seconds(p, "read_timeout_s", "proxy", d.read_timeout_s),
        max_body_mib=r.integer(p, "max_body_mib", "proxy", d.max_body_mib, 1,
                               "a whole number of MiB"),
        client_timeout_s=r.seconds(p, "client_timeout_s", "proxy", d.client_timeout_s),
        cut_hold_s=r.seconds(p, "cut_hold_s", "proxy", d.cut_hold_s, positive=False))

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
        c = _read_consumer(r, name, node, names)
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
            elif not isinstance(target, str) or target not in names:
                r.problem(kpath, f"the name of a consumer ({listing(names)})", target)
            elif target not in consumers:
                pass                  # that consumer's own problems are reported already
            elif str(kind) not in consumers[target].paths:
                r.problem(kpath, f"a consumer with a paths.{kind} entry (consumers.{target}.paths "
                          f"has {', '.join(consumers[target].paths) or 'none'})", target)
            else:
                routes[str(kind)] = target

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
                  consumers=MappingProxyType(consumers))


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
