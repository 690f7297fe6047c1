"""The config file, read once into frozen dataclasses.

Every default lives in this module. ``load_config`` reads the whole file and
reports every problem in one ``ConfigError``, each naming the key path
(``consumers.comfyui.unload.path``) and what was expected, so an operator
fixes a config in one pass instead of one restart per typo.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

import yaml

from .errors import ConfigError
from .procs import PidsFrom

DEFAULT_CONFIG = "etc/consumers.yaml"
CONFIG_ENV = "MGPUMANAGER_CONFIG"
KINDS_HINT = "a kind such as tts, stt, llm or image"
GPU_BACKENDS = ("auto", "nvml", "nvidia-smi", "ledger", "sim")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
# Threads gunicorn keeps beyond the queue: one runs the current job, the rest
# answer /v1/status, /healthz, /metrics and /audio while the queue is full.
SPARE_THREADS = 8
MIN_SPARE_THREADS = 4
DEFAULT_GPU_ROUTES = ("POST *", "PUT *", "PATCH *")


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "127.0.0.1:8770"
    workers: int = 1
    threads: int | None = None          # None: derived from scheduler.max_queue
    log_format: str = "text"            # text | json
    allowed_hosts: tuple[str, ...] = ()     # Host headers accepted besides the bound one, localhost
    allowed_origins: tuple[str, ...] = ()   # browser origins that may change state
    auth_token: str | None = None           # every route but /healthz needs it, when set

    def thread_count(self, max_queue: int) -> int:
        return self.threads if self.threads is not None else max_queue + 1 + SPARE_THREADS


@dataclass(frozen=True)
class GpuConfig:
    backend: str = "auto"
    index: int = 0
    total_mib: int | None = None
    cushion_mib: int = 256
    sample_interval_s: float = 2.0
    sim_url: str | None = None          # backend sim: the simulated GPU's URL
    nvidia_smi: str = "nvidia-smi"


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 5.0
    timeout_s: float = 2.0


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = 32
    queue_timeout_s: float = 300.0
    evict_attempts: int = 5
    evict_settle_s: float = 10.0
    job_timeout_s: float = 1800.0
    busy_poll_s: float = 0.25
    lock_file: str | None = None        # None: /run/mgpumanager/gpu.lock or the user's runtime dir
    load_failures_to_cooldown: int = 3  # consecutive failed loads before a consumer cools down
    load_cooldown_s: float = 30.0       # the first cooldown; it doubles on each further failure
    load_cooldown_max_s: float = 600.0


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 300.0
    max_body_mib: int = 1024            # a GPU job's body above this: 413
    client_timeout_s: float = 60.0      # a client silent this long, sending or reading, is cut

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mib * 1024 * 1024


@dataclass(frozen=True)
class Call:
    """A load or unload route: ``{method: POST, path: /free, json: {...}}``."""
    method: str
    path: str
    json: Any = None
    timeout_s: float = 60.0


@dataclass(frozen=True)
class BusyProbe:
    """After a job, hold the GPU until GET ``path`` shows every ``keys`` list empty."""
    path: str
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class GpuRoute:
    method: str          # "*" or an HTTP method
    pattern: str         # fnmatch pattern over the upstream path

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method.upper())) and fnmatch.fnmatchcase(path, self.pattern)


def route_forms(raw_path: str) -> set[str]:
    """The paths a service may take ``raw_path`` for, to match gpu_routes on.

    A service decodes percent-escapes, resolves dot segments and, in most
    frameworks, ignores repeated and trailing slashes: ``/%70rompt``,
    ``//prompt`` and ``/x/../prompt/`` are all its ``/prompt``. The path is
    matched in that form, and also decoded twice, since a service (or a
    proxy in front of it) may decode again: when in doubt, a request is a
    GPU job (locking too much is slow, locking too little is an OOM).
    """
    # A fragment never reaches a service's router (aiohttp drops it).
    once = unquote(raw_path.partition("#")[0])
    forms = {_normal_path(once)}
    if "%" in once:
        forms.add(_normal_path(unquote(once)))
    return forms


def _normal_path(path: str) -> str:
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue                    # repeated slashes, trailing slash, "./"
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


@dataclass(frozen=True)
class ConsumerConfig:
    name: str
    url: str
    health: str = "/"
    paths: Mapping[str, str] = field(default_factory=dict)
    vram_resident_mib: int = 0
    can_coexist_with: tuple[str, ...] = ()
    load: Call | None = None
    unload: Call | None = None
    busy: BusyProbe | None = None
    gpu_routes: tuple[GpuRoute, ...] = ()
    vram_managed: bool = False
    idle_unload_s: float | None = None
    read_timeout_s: float | None = None
    pids_from: PidsFrom | None = None   # how to find its processes, for measured VRAM
    upstream_allow: tuple[GpuRoute, ...] | None = None   # None: /upstream/<name>/ forwards all

    def upstream_allows(self, method: str, raw_path: str) -> bool:
        """Whether /upstream/<name>/ may forward this: every form of the path
        the service may take it for must be allowed."""
        if self.upstream_allow is None:
            return True
        return all(any(r.matches(method, form) for r in self.upstream_allow)
                   for form in route_forms(raw_path))

    def is_gpu_route(self, method: str, raw_path: str) -> bool:
        """Whether a request to this path (as sent, escapes and all) is a GPU job."""
        forms = route_forms(raw_path)
        return any(r.matches(method, form) for r in self.gpu_routes for form in forms)


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    gpu: GpuConfig
    health: HealthConfig
    scheduler: SchedulerConfig
    proxy: ProxyConfig
    routes: Mapping[str, str]
    audio_proxy: str | None
    consumers: Mapping[str, ConsumerConfig]

    def may_coexist(self, a: str, b: str) -> bool:
        """Symmetric: either side listing the other is enough."""
        return (b in self.consumers[a].can_coexist_with
                or a in self.consumers[b].can_coexist_with)

    def kinds_of(self, name: str) -> list[str]:
        return sorted(k for k, c in self.routes.items() if c == name)

    def summary(self) -> str:
        lines = [f"{self.path}: OK",
                 f"  gpu: backend {self.gpu.backend}, index {self.gpu.index}, "
                 f"cushion {self.gpu.cushion_mib} MiB"
                 + (f", total {self.gpu.total_mib} MiB" if self.gpu.total_mib else ""),
                 f"  scheduler: max_queue {self.scheduler.max_queue}, "
                 f"queue_timeout {self.scheduler.queue_timeout_s:g} s, "
                 f"threads {self.server.thread_count(self.scheduler.max_queue)}",
                 "  routes: " + ", ".join(f"{k} -> {v}" for k, v in sorted(self.routes.items()))]
        for c in self.consumers.values():
            flags = [f"{c.vram_resident_mib} MiB"]
            if c.vram_managed:
                flags.append("vram_managed")
            if c.unload:
                flags.append("unload " + c.unload.path)
            if c.load:
                flags.append("load " + c.load.path)
            if c.busy:
                flags.append("busy " + c.busy.path)
            if c.can_coexist_with:
                flags.append("coexists with " + ", ".join(c.can_coexist_with))
            lines.append(f"  consumer {c.name}: {c.url} ({'; '.join(flags)})")
        return "\n".join(lines)


_MISSING = object()


class _Reader:
    """Walks the YAML tree, collecting problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, expected: str, got: Any = _MISSING) -> None:
        if got is _MISSING:
            self.problems.append(f"{path}: {expected}")
        else:
            self.problems.append(f"{path}: expected {expected}, got {got!r}")

    def section(self, node: Any, path: str, allowed: tuple[str, ...]) -> dict:
        if node is None:
            return {}
        if not isinstance(node, dict):
            self.problem(path, "a mapping", node)
            return {}
        for key in node:
            if key not in allowed:
                self.problem(f"{path}.{key}" if path else str(key),
                             f"unknown key (allowed here: {', '.join(allowed)})")
        return node

    def integer(self, node: dict, key: str, path: str, default: Any, minimum: int | None = 0,
                what: str = "a whole number") -> Any:
        value = node.get(key, default)
        if value is default:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(f"{path}.{key}", f"{what} >= {minimum}" if minimum is not None else what, value)
            return default
        if minimum is not None and value < minimum:
            self.problem(f"{path}.{key}", f"{what} >= {minimum}", value)
            return default
        return value

    def seconds(self, node: dict, key: str, path: str, default: Any, positive: bool = True) -> Any:
        value = node.get(key, default)
        if value is default:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                or (positive and value == 0):
            self.problem(f"{path}.{key}", "a number of seconds " + ("> 0" if positive else ">= 0"), value)
            return default
        return float(value)

    def string(self, node: dict, key: str, path: str, default: Any,
               choices: tuple[str, ...] | None = None) -> Any:
        value = node.get(key, default)
        if value is default:
            return default
        if not isinstance(value, str) or not value:
            self.problem(f"{path}.{key}", "a non-empty string", value)
            return default
        if choices and value not in choices:
            self.problem(f"{path}.{key}", "one of " + " | ".join(choices), value)
            return default
        return value

    def upstream_path(self, node: dict, key: str, path: str, default: Any) -> Any:
        value = self.string(node, key, path, default)
        if isinstance(value, str) and not value.startswith("/"):
            self.problem(f"{path}.{key}", "a path starting with '/'", value)
            return default
        return value

    def boolean(self, node: dict, key: str, path: str, default: bool) -> bool:
        value = node.get(key, default)
        if not isinstance(value, bool):
            self.problem(f"{path}.{key}", "true or false", value)
            return default
        return value

    def url(self, node: dict, key: str, path: str) -> str | None:
        value = node.get(key)
        if value is None:
            self.problem(f"{path}.{key}", "an http:// or https:// URL (required)")
            return None
        if not isinstance(value, str):
            self.problem(f"{path}.{key}", "an http:// or https:// URL", value)
            return None
        try:
            parts = urlsplit(value)
            _ = parts.port  # raises ValueError on a port that is not a number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
                or parts.path not in ("", "/") or parts.query or parts.fragment:
            self.problem(f"{path}.{key}", "an http:// or https:// URL with a host and "
                         "optional port, and no path", value)
            return None
        return value.rstrip("/")


def _read_call(r: _Reader, node: Any, path: str, default_method: str) -> Call | None:
    if node is None:
        return None
    if not isinstance(node, dict):
        r.problem(path, "a mapping like {method: POST, path: /api/unload}", node)
        return None
    node = r.section(node, path, ("method", "path", "json", "timeout_s"))
    method = r.string(node, "method", path, default_method, HTTP_METHODS)
    timeout = r.seconds(node, "timeout_s", path, 60.0)
    if "path" not in node:
        r.problem(f"{path}.path", "an upstream path starting with '/' (required)")
        return None
    upath = r.upstream_path(node, "path", path, None)
    if upath is None:
        return None
    return Call(method=method, path=upath, json=node.get("json"), timeout_s=timeout)


def _read_busy(r: _Reader, node: Any, path: str) -> BusyProbe | None:
    if node is None:
        return None
    if not isinstance(node, dict):
        r.problem(path, "a mapping like {path: /queue, keys: [queue_running]}", node)
        return None
    node = r.section(node, path, ("path", "keys"))
    keys = node.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        r.problem(f"{path}.keys", "a list of JSON keys whose lists must be empty", keys)
        keys = []
    if "path" not in node:
        r.problem(f"{path}.path", "an upstream path starting with '/' (required)")
        return None
    upath = r.upstream_path(node, "path", path, None)
    return BusyProbe(path=upath, keys=tuple(keys)) if upath else None


def _read_pids_from(r: _Reader, node: Any, path: str) -> PidsFrom | None:
    if node is None:
        return None
    expected = "a mapping with one of {port: 8188}, {pidfile: /run/x.pid}, {cmdline: main.py}"
    if not isinstance(node, dict) or len(node) != 1:
        r.problem(path, expected, node)
        return None
    node = r.section(node, path, ("port", "pidfile", "cmdline"))
    if "port" in node:
        port = r.integer(node, "port", path, None, 1, "a TCP port")
        if port is not None and port > 65535:
            r.problem(f"{path}.port", "a TCP port from 1 to 65535", port)
            return None
        return PidsFrom(port=port) if port is not None else None
    if "pidfile" in node:
        pidfile = r.string(node, "pidfile", path, None)
        return PidsFrom(pidfile=pidfile) if pidfile else None
    if "cmdline" in node:
        cmdline = r.string(node, "cmdline", path, None)
        return PidsFrom(cmdline=cmdline) if cmdline else None
    return None


def _read_strings(r: _Reader, node: Any, path: str, expected: str) -> tuple[str, ...]:
    """A list of names, compared without case (an origin without a final /)."""
    if node is None:
        return ()
    if not isinstance(node, list) or not all(isinstance(x, str) and x for x in node):
        r.problem(path, expected, node)
        return ()
    return tuple(x.strip().lower().rstrip("/") for x in node)


def _read_token(r: _Reader, s: dict) -> str | None:
    if "auth_token" in s and "auth_token_file" in s:
        r.problem("server.auth_token_file", "only one of auth_token and auth_token_file")
        return None
    if s.get("auth_token") is not None:
        token = r.string(s, "auth_token", "server", None)
    elif s.get("auth_token_file") is not None:
        name = r.string(s, "auth_token_file", "server", None)
        if name is None:
            return None
        try:
            with open(name, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            r.problem("server.auth_token_file", f"a readable file holding the token ({e})")
            return None
    else:
        return None
    if token is not None and (len(token) < 16 or not token.isprintable() or " " in token):
        r.problem("server.auth_token" if "auth_token" in s else "server.auth_token_file",
                  "a token of at least 16 printable characters without spaces")
        return None
    return token


def _read_gpu_routes(r: _Reader, node: Any, path: str,
                     default: tuple[str, ...] | None = DEFAULT_GPU_ROUTES) -> tuple[GpuRoute, ...]:
    if node is None:
        node = list(default or ())
    if not isinstance(node, list):
        r.problem(path, 'a list like ["POST /prompt", "* /api/*"]', node)
        return ()
    routes = []
    for i, item in enumerate(node):
        parts = item.split() if isinstance(item, str) else []
        if len(parts) != 2 or (parts[0] != "*" and parts[0].upper() not in HTTP_METHODS) \
                or not (parts[1].startswith("/") or parts[1] == "*"):
            r.problem(f"{path}[{i}]", "'METHOD /path-pattern' (METHOD may be *; the "
                      "pattern may use * and ?)", item)
            continue
        # Patterns are matched against normalised paths (route_forms): normalise them alike.
        pattern = parts[1] if parts[1] == "*" else _normal_path(parts[1])
        routes.append(GpuRoute(parts[0].upper(), pattern))
    return tuple(routes)


def _read_consumer(r: _Reader, name: str, node: Any, names: list[str]) -> ConsumerConfig | None:
    path = f"consumers.{name}"
    node = r.section(node, path, (
        "url", "health", "paths", "vram_resident_mib", "can_coexist_with", "load", "unload",
        "busy", "gpu_routes", "vram_managed", "idle_unload_s", "read_timeout_s", "pids_from",
        "upstream_allow"))
    url = r.url(node, "url", path)
    health = r.upstream_path(node, "health", path, "/")
    paths = node.get("paths", {})
    if not isinstance(paths, dict):
        r.problem(f"{path}.paths", "a mapping of kind -> upstream path", paths)
        paths = {}
    good_paths = {}
    for kind, p in paths.items():
        if not isinstance(p, str) or not p.startswith("/"):
            r.problem(f"{path}.paths.{kind}", "an upstream path starting with '/'", p)
        else:
            good_paths[str(kind)] = p
    resident = r.integer(node, "vram_resident_mib", path, None, 0, "a whole number of MiB")
    if node.get("vram_resident_mib") is None:           # absent, or `null`
        r.problem(f"{path}.vram_resident_mib", "a whole number of MiB >= 0 (required)")
    coexist = node.get("can_coexist_with", [])
    if not isinstance(coexist, list) or not all(isinstance(c, str) for c in coexist):
        r.problem(f"{path}.can_coexist_with", "a list of consumer names", coexist)
        coexist = []
    for i, other in enumerate(coexist):
        if other not in names:
            r.problem(f"{path}.can_coexist_with[{i}]",
                      f"the name of a consumer ({', '.join(names)})", other)
        elif other == name:
            r.problem(f"{path}.can_coexist_with[{i}]", "another consumer's name, not its own", other)
    idle = node.get("idle_unload_s")
    idle = r.seconds(node, "idle_unload_s", path, None) if idle is not None else None
    read_timeout = node.get("read_timeout_s")
    read_timeout = r.seconds(node, "read_timeout_s", path, None) if read_timeout is not None else None
    consumer = dict(
        load=_read_call(r, node.get("load"), f"{path}.load", "POST"),
        unload=_read_call(r, node.get("unload"), f"{path}.unload", "POST"),
        busy=_read_busy(r, node.get("busy"), f"{path}.busy"),
        gpu_routes=_read_gpu_routes(r, node.get("gpu_routes"), f"{path}.gpu_routes"),
        vram_managed=r.boolean(node, "vram_managed", path, False),
        pids_from=_read_pids_from(r, node.get("pids_from"), f"{path}.pids_from"),
        upstream_allow=(None if node.get("upstream_allow") is None else _read_gpu_routes(
            r, node.get("upstream_allow"), f"{path}.upstream_allow", None)))
    if url is None or resident is None:
        return None
    return ConsumerConfig(
        name=name, url=url, health=health, paths=MappingProxyType(good_paths),
        vram_resident_mib=resident, can_coexist_with=tuple(coexist),
        idle_unload_s=idle, read_timeout_s=read_timeout, **consumer)


def parse_config(data: Any, path: str = "<config>") -> Config:
    """Turn the parsed YAML of one config file into a Config, or raise ConfigError."""
    r = _Reader()
    top = r.section(data, "", ("server", "gpu", "health", "scheduler", "proxy", "routes",
                              "audio_proxy", "consumers"))
    if data is not None and not isinstance(data, dict):
        raise ConfigError(path, r.problems)

    s = r.section(top.get("server"), "server", ("bind", "workers", "threads", "log_format",
                                                "allowed_hosts", "allowed_origins", "auth_token",
                                                "auth_token_file"))
    d = ServerConfig()
    workers = r.integer(s, "workers", "server", d.workers, 1)
    if workers != 1:
        r.problem("server.workers", "1 (the GPU lock lives in one process; a second worker "
                  "would run GPU jobs beside the first and over-commit VRAM)", workers)
    server = ServerConfig(
        bind=r.string(s, "bind", "server", d.bind),
        workers=1,
        threads=r.integer(s, "threads", "server", None, 1),
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
        index=r.integer(g, "index", "gpu", d.index, 0),
        total_mib=r.integer(g, "total_mib", "gpu", None, 1, "a whole number of MiB"),
        cushion_mib=r.integer(g, "cushion_mib", "gpu", d.cushion_mib, 0, "a whole number of MiB"),
        sample_interval_s=r.seconds(g, "sample_interval_s", "gpu", d.sample_interval_s),
        sim_url=r.url(g, "sim_url", "gpu") if "sim_url" in g else None,
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
        "load_cooldown_max_s"))
    d = SchedulerConfig()
    scheduler = SchedulerConfig(
        max_queue=r.integer(q, "max_queue", "scheduler", d.max_queue, 1),
        queue_timeout_s=r.seconds(q, "queue_timeout_s", "scheduler", d.queue_timeout_s),
        evict_attempts=r.integer(q, "evict_attempts", "scheduler", d.evict_attempts, 0),
        evict_settle_s=r.seconds(q, "evict_settle_s", "scheduler", d.evict_settle_s, positive=False),
        job_timeout_s=r.seconds(q, "job_timeout_s", "scheduler", d.job_timeout_s),
        busy_poll_s=r.seconds(q, "busy_poll_s", "scheduler", d.busy_poll_s),
        lock_file=r.string(q, "lock_file", "scheduler", None),
        load_failures_to_cooldown=r.integer(q, "load_failures_to_cooldown", "scheduler",
                                            d.load_failures_to_cooldown, 1),
        load_cooldown_s=r.seconds(q, "load_cooldown_s", "scheduler", d.load_cooldown_s),
        load_cooldown_max_s=r.seconds(q, "load_cooldown_max_s", "scheduler",
                                      d.load_cooldown_max_s))
    if server.threads is not None and \
            server.threads < scheduler.max_queue + 1 + MIN_SPARE_THREADS:
        r.problem("server.threads", f"at least scheduler.max_queue + {1 + MIN_SPARE_THREADS} = "
                  f"{scheduler.max_queue + 1 + MIN_SPARE_THREADS} (every queued job holds a "
                  f"thread; one runs the job and {MIN_SPARE_THREADS} must stay free for status, "
                  "health and audio), or leave it out to derive it", server.threads)

    p = r.section(top.get("proxy"), "proxy", ("connect_timeout_s", "read_timeout_s",
                                              "max_body_mib", "client_timeout_s"))
    d = ProxyConfig()
    proxy = ProxyConfig(
        connect_timeout_s=r.seconds(p, "connect_timeout_s", "proxy", d.connect_timeout_s),
        read_timeout_s=r.seconds(p, "read_timeout_s", "proxy", d.read_timeout_s),
        max_body_mib=r.integer(p, "max_body_mib", "proxy", d.max_body_mib, 1,
                               "a whole number of MiB"),
        client_timeout_s=r.seconds(p, "client_timeout_s", "proxy", d.client_timeout_s))

    raw_consumers = top.get("consumers")
    consumers: dict[str, ConsumerConfig] = {}
    if not isinstance(raw_consumers, dict) or not raw_consumers:
        r.problem("consumers", "a mapping of at least one consumer name -> settings",
                  raw_consumers if raw_consumers is not None else _MISSING)
        raw_consumers = {}
    names = [str(n) for n in raw_consumers]
    for name, node in raw_consumers.items():
        c = _read_consumer(r, str(name), node, names)
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
            kpath = f"routes.{kind}"
            if not isinstance(target, str) or target not in raw_consumers:
                r.problem(kpath, f"the name of a consumer ({', '.join(raw_consumers)})", target)
            elif target not in consumers:
                pass                  # that consumer's own problems are reported already
            elif str(kind) not in consumers[target].paths:
                r.problem(kpath, f"a consumer with a paths.{kind} entry (consumers.{target}.paths "
                          f"has {', '.join(consumers[target].paths) or 'none'})", target)
            else:
                routes[str(kind)] = target

    audio = top.get("audio_proxy")
    if audio is not None and (not isinstance(audio, str) or audio not in raw_consumers):
        r.problem("audio_proxy", f"the name of a consumer ({', '.join(raw_consumers)})", audio)
        audio = None

    if r.problems:
        raise ConfigError(path, r.problems)
    return Config(path=path, server=server, gpu=gpu, health=health, scheduler=scheduler,
                  proxy=proxy, routes=MappingProxyType(routes), audio_proxy=audio,
                  consumers=MappingProxyType(consumers))


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read a config file: the argument, else $MGPUMANAGER_CONFIG, else etc/consumers.yaml."""
    path = os.fspath(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(path, [f"cannot read the file: {e.strerror or e}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(path, [f"{where}not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
    return parse_config(data, path)
