"""The config file, read once into frozen dataclasses.

Every default lives in this module. ``load_config`` reads the whole file and
reports every problem in one ``ConfigError``, each naming the key path
(``consumers.comfyui.unload.path``) and what was expected, so an operator
fixes a config in one pass instead of one restart per typo.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

import yaml

from .errors import ConfigError
from .presets import TYPES, with_preset
from .procs import PidsFrom
from .schedule import POLICIES

DEFAULT_CONFIG = "etc/consumers.yaml"
CONFIG_ENV = "MGPUMANAGER_CONFIG"
KINDS_HINT = "a kind such as tts, stt, llm or image"
GPU_BACKENDS = ("auto", "nvml", "nvidia-smi", "ledger", "sim")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
# Threads gunicorn keeps beyond the queue: one runs the current job, the rest
# answer /v1/status, /healthz, /metrics and /audio while the queue is full.
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

    max_streams: int = 16                   # non-GPU passthrough requests at once

    def thread_count(self, max_queue: int) -> int:
        """Every queued job holds a thread, so do non-GPU streams (an ollama
        pull, /audio): the queue, the running job, the streams, and spare
        threads for status, health and metrics."""
        if self.threads is not None:
            return self.threads
        return max_queue + 1 + self.max_streams + MIN_SPARE_THREADS

    def stream_limit(self, max_queue: int) -> int:
        """How many non-GPU streams may run at once: never the threads the
        queue, the running job and the status page need."""
        return max(1, min(self.max_streams,
                          self.thread_count(max_queue) - max_queue - 1 - MIN_SPARE_THREADS))


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
    policy: str = "affinity"            # fifo | affinity (schedule.py)
    max_bypass: int = 4                 # affinity: no job is passed more often
    max_delay_s: float = 120.0          # affinity: nor waits longer beyond its FIFO turn
    # kind -> priority (higher first, within the bounds above); unnamed kinds 0
    priority: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 300.0
    max_body_mib: int = 1024            # a GPU job's body above this: 413
    client_timeout_s: float = 60.0      # a client silent this long, sending or reading, is cut
    # After a GPU job's answer is cut short, the GPU stays held until the
    # service has let go of the connection, at most this long.
    cut_hold_s: float = 2.0

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mib * 1024 * 1024


@dataclass(frozen=True)
class ModelsFrom:
    """Where a service lists its loaded models: GET ``path``, the JSON list
    under ``list``, each model's name under ``name`` (and its VRAM in bytes
    under ``vram_bytes``, where the service says); with ``where``, only the
    models whose value at that dotted key is ``equals`` (llama-server's
    router lists every model it knows, running or not)."""
    path: str
    list: str = "models"
    name: str = "name"
    vram_bytes: str | None = None
    where: str | None = None
    equals: str | None = None

    def listed(self, model: Any) -> bool:
        return self.where is None or str(dotted(model, self.where)) == self.equals


def dotted(body: Any, key: str) -> Any:
    """The value at a dotted key (``devices.0.vram_free``), or None."""
    for part in key.split("."):
        if isinstance(body, list) and part.isdigit() and int(part) < len(body):
            body = body[int(part)]
        elif isinstance(body, dict):
            body = body.get(part)
        else:
            return None
    return body


@dataclass(frozen=True)
class FreeVram:
    """Where a service reports its device's free VRAM in bytes: GET ``path``,
    the number at the dotted ``key`` (``devices.0.vram_free``), and, if it
    says, what it holds itself at ``held_key`` (ComfyUI's
    ``devices.0.torch_vram_total``)."""
    path: str
    key: str
    held_key: str | None = None

    def read(self, body: Any, key: str | None = None) -> int | None:
        body = dotted(body, key or self.key)
        return body if isinstance(body, int) and not isinstance(body, bool) else None


@dataclass(frozen=True)
class Call:
    """A load or unload action: a route (``{method: POST, path: /free, json:
    {...}}``), once or ``for_each`` loaded model (``"{model}"`` in the JSON is
    its name; ``until_empty``: then poll the list until it is empty), or a
    ``command`` run without a shell."""
    method: str = "POST"
    path: str | None = None
    json: Any = None
    timeout_s: float = 60.0
    command: tuple[str, ...] | None = None
    for_each: ModelsFrom | None = None
    until_empty: bool = False
    until_freed: FreeVram | None = None   # then poll the service's own free VRAM until it rises

    def describe(self) -> str:
        return " ".join(self.command) if self.command else f"{self.method} {self.path}"


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
    not_gpu_routes: tuple[GpuRoute, ...] = ()   # exceptions to gpu_routes: no lock
    vram_managed: bool = False
    idle_unload_s: float | None = None
    read_timeout_s: float | None = None
    pids_from: PidsFrom | None = None   # how to find its processes, for measured VRAM
    upstream_allow: tuple[GpuRoute, ...] | None = None   # None: /upstream/<name>/ forwards all
    loaded_from: ModelsFrom | None = None   # its loaded models (and their VRAM), for its state
    type: str = "generic"                   # the preset its defaults came from

    def upstream_allows(self, method: str, raw_path: str) -> bool:
        """Whether /upstream/<name>/ may forward this: every form of the path
        the service may take it for must be allowed."""
        if self.upstream_allow is None:
            return True
        return all(any(r.matches(method, form) for r in self.upstream_allow)
                   for form in route_forms(raw_path))

    def is_gpu_route(self, method: str, raw_path: str) -> bool:
        """Whether a request to this path (as sent, escapes and all) is a GPU
        job: some form of it matches ``gpu_routes``, and not every form is
        one of the ``not_gpu_routes`` (when in doubt, it is a GPU job)."""
        forms = route_forms(raw_path)
        if not any(r.matches(method, form) for r in self.gpu_routes for form in forms):
            return False
        return not all(any(r.matches(method, form) for r in self.not_gpu_routes)
                       for form in forms)


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

    def warnings(self) -> list[str]:
        """Settings that load but do nothing: said by check-config and at start."""
        q, d = self.scheduler, SchedulerConfig()
        found = []
        idle = [k for k, set_ in (("priority", bool(q.priority)),
                                  ("max_bypass", q.max_bypass != d.max_bypass),
                                  ("max_delay_s", q.max_delay_s != d.max_delay_s)) if set_]
        if q.policy == "fifo" and idle:
            found.append(f"scheduler.{', scheduler.'.join(idle)}: no effect with "
                         "scheduler.policy fifo (they bound and order policy affinity)")
        for c in self.consumers.values():
            if c.upstream_allow is None and not any(r.pattern == "*" for r in c.gpu_routes):
                found.append(f"consumers.{c.name}.gpu_routes lists only some routes: any other "
                             f"request through /upstream/{c.name}/ runs without the GPU lock "
                             "(list the exceptions in not_gpu_routes instead)")
        return found

    def summary(self) -> str:
        lines = [f"{self.path}: OK",
                 f"  gpu: backend {self.gpu.backend}, index {self.gpu.index}, "
                 f"cushion {self.gpu.cushion_mib} MiB"
                 + (f", total {self.gpu.total_mib} MiB" if self.gpu.total_mib else ""),
                 f"  scheduler: max_queue {self.scheduler.max_queue}, "
                 f"queue_timeout {self.scheduler.queue_timeout_s:g} s, "
                 f"policy {self.scheduler.policy}"
                 + (f" (max_bypass {self.scheduler.max_bypass}, max_delay "
                    f"{self.scheduler.max_delay_s:g} s)" if self.scheduler.policy == "affinity"
                    else "") + ", "
                 f"threads {self.server.thread_count(self.scheduler.max_queue)}",
                 "  routes: " + ", ".join(f"{k} -> {v}" for k, v in sorted(self.routes.items()))]
        lines += [f"  warning: {w}" for w in self.warnings()]
        for c in self.consumers.values():
            flags = [f"{c.vram_resident_mib} MiB"]
            if c.vram_managed:
                flags.append("vram_managed")
            if c.type != "generic":
                flags.append(f"type {c.type}")
            if c.unload:
                flags.append("unload " + c.unload.describe())
            if c.load:
                flags.append("load " + c.load.describe())
            if c.busy:
                flags.append("busy " + c.busy.path)
            if c.can_coexist_with:
                flags.append("coexists with " + ", ".join(c.can_coexist_with))
            lines.append(f"  consumer {c.name}: {c.url} ({'; '.join(flags)})")
        return "\n".join(lines)


_MISSING = object()


# Sane bounds: a week for any duration, thousands for a queue, a TiB of VRAM.
MAX_SECONDS = 7 * 24 * 3600.0
MAX_QUEUE = 4096
MAX_MIB = 1024 * 1024
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def short(value: Any) -> str:
    """A value as a message shows it: its repr, in 80 characters at most."""
    text = _SHORT.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def listing(names: list[str]) -> str:
    text = ", ".join(names) or "none"
    return text if len(text) <= 80 else text[:77] + "..."


def key_path(path: str, key: Any) -> str:
    name = key if isinstance(key, str) else repr(key)
    name = name if len(name) <= 40 else name[:37] + "..."
    return f"{path}.{name}" if path else name


class _Reader:
    """Walks the YAML tree, collecting problems instead of stopping at the
    first. Each value is checked for its type and bounds; where a key is
    given as null, an optional setting takes its default and a required
    one is a problem."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, expected: str, got: Any = _MISSING) -> None:
        path = path or "(top level)"
        if got is _MISSING:
            self.problems.append(f"{path}: {expected}")
        else:
            self.problems.append(f"{path}: expected {expected}, got {short(got)}")

    def section(self, node: Any, path: str, allowed: tuple[str, ...]) -> dict:
        if node is None:
            return {}
        if not isinstance(node, dict):
            self.problem(path, "a mapping", node)
            return {}
        for key in node:
            if key not in allowed:
                self.problem(key_path(path, key),
                             f"unknown key (allowed here: {', '.join(allowed)})")
        return node

    def integer(self, node: dict, key: str, path: str, default: Any, minimum: int = 0,
                what: str = "a whole number", maximum: int = MAX_MIB) -> Any:
        value = node.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) \
                or not minimum <= value <= maximum:
            self.problem(f"{path}.{key}", f"{what} from {minimum} to {maximum}", value)
            return default
        return value

    def seconds(self, node: dict, key: str, path: str, default: Any, positive: bool = True) -> Any:
        value = node.get(key)
        if value is None:
            return default
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and math.isfinite(value) and (0 < value if positive else 0 <= value)
              and value <= MAX_SECONDS)
        if not ok:
            self.problem(f"{path}.{key}", "a number of seconds " + ("> 0" if positive else ">= 0")
                         + f" and at most {MAX_SECONDS:g} (a week)", value)
            return default
        return float(value)

    def string(self, node: dict, key: str, path: str, default: Any,
               choices: tuple[str, ...] | None = None, required: bool = False) -> Any:
        value = node.get(key)
        if value is None:
            if required:
                self.problem(f"{path}.{key}", "a value (required; it is missing or null)")
            return default
        if not isinstance(value, str) or not value:
            self.problem(f"{path}.{key}", "a non-empty string", value)
            return default
        if choices and value not in choices:
            self.problem(f"{path}.{key}", "one of " + " | ".join(choices), value)
            return default
        return value

    def upstream_path(self, node: dict, key: str, path: str, default: Any,
                      required: bool = False) -> Any:
        value = self.string(node, key, path, default, required=required)
        if isinstance(value, str) and (not value.startswith("/") or not value.isascii()
                                       or any(c.isspace() or ord(c) < 32 for c in value)):
            self.problem(f"{path}.{key}", "an ASCII path starting with '/', without spaces",
                         value)
            return default
        return value

    def boolean(self, node: dict, key: str, path: str, default: bool) -> bool:
        value = node.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(f"{path}.{key}", "true or false", value)
            return default
        return value

    def url(self, node: dict, key: str, path: str, required: bool = True) -> str | None:
        value = node.get(key)
        expected = "an http:// or https:// URL with a host, an optional port and no path"
        if value is None:
            if required:
                self.problem(f"{path}.{key}", expected + " (required)")
            return None
        if not isinstance(value, str):
            self.problem(f"{path}.{key}", expected, value)
            return None
        try:
            parts = urlsplit(value)
            port = parts.port             # ValueError on a port that is not a number
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not value.isascii() \
                or not HOST_RE.fullmatch(parts.netloc.rpartition("@")[2].rsplit(":", 1)[0]
                                         if not parts.netloc.endswith("]")
                                         else parts.netloc.rpartition("@")[2]) \
                or "@" in parts.netloc or parts.path not in ("", "/") or parts.query \
                or parts.fragment or (port is not None and not 0 < port < 65536):
            self.problem(f"{path}.{key}", expected, value)
            return None
        return value.rstrip("/")

    def bind(self, node: dict, key: str, path: str, default: str) -> str:
        value = self.string(node, key, path, default)
        if value.startswith("unix:") and len(value) > 5:
            return value
        host, _, port = value.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not (host and port.isdigit() and 0 <= int(port) < 65536
                and (HOST_RE.fullmatch(host) or ":" in host)):
            self.problem(f"{path}.{key}", "HOST:PORT (127.0.0.1:8770, [::1]:8770) or unix:PATH",
                         value)
            return default
        return value


def _read_call(r: _Reader, node: Any, path: str, default_method: str) -> Call | None:
    if node is None:
        return None
    if not isinstance(node, dict):
        r.problem(path, "a mapping like {method: POST, path: /api/unload}", node)
        return None
    node = r.section(node, path, ("method", "path", "json", "timeout_s", "command", "for_each",
                                  "until_empty", "until_freed"))
    method = r.string(node, "method", path, default_method, HTTP_METHODS)
    timeout = r.seconds(node, "timeout_s", path, 60.0)
    command = node.get("command")
    if command is not None:
        if node.get("path") is not None or node.get("for_each") is not None:
            r.problem(path, "either a command or a path (with for_each), not both")
            return None
        if not isinstance(command, list) or not command or \
                not all(isinstance(a, str) and a for a in command):
            r.problem(f"{path}.command", "a list like [systemctl, stop, whisper-server] "
                      "(run without a shell)", command)
            return None
        return Call(method=method, timeout_s=timeout, command=tuple(command))
    upath = r.upstream_path(node, "path", path, None, required=True)
    for_each = _read_models_from(r, node.get("for_each"), f"{path}.for_each")
    until_empty = r.boolean(node, "until_empty", path, False)
    if until_empty and for_each is None:
        r.problem(f"{path}.until_empty", "only with for_each (the list it waits to be empty)")
    if upath is None:
        return None
    until_freed = None
    freed = node.get("until_freed")
    if freed is not None:
        freed = r.section(freed, f"{path}.until_freed", ("path", "key", "held_key"))
        fpath = r.upstream_path(freed, "path", f"{path}.until_freed", None, required=True)
        fkey = r.string(freed, "key", f"{path}.until_freed", None, required=True)
        hkey = r.string(freed, "held_key", f"{path}.until_freed", None)
        until_freed = FreeVram(fpath, fkey, hkey) if fpath and fkey else None
    return Call(method=method, path=upath, json=node.get("json"), timeout_s=timeout,
                for_each=for_each, until_empty=until_empty, until_freed=until_freed)


def _read_models_from(r: _Reader, node: Any, path: str) -> ModelsFrom | None:
    if node is None:
        return None
    if not isinstance(node, dict):
        r.problem(path, "a mapping like {path: /api/ps, list: models, name: name}", node)
        return None
    node = r.section(node, path, ("path", "list", "name", "vram_bytes", "where", "equals"))
    upath = r.upstream_path(node, "path", path, None, required=True)
    found = ModelsFrom(path=upath or "/", list=r.string(node, "list", path, "models"),
                       name=r.string(node, "name", path, "name"),
                       vram_bytes=r.string(node, "vram_bytes", path, None),
                       where=r.string(node, "where", path, None),
                       equals=r.string(node, "equals", path, None))
    if (found.where is None) != (found.equals is None):
        r.problem(f"{path}.where", "where and equals together (a dotted key and the value "
                  "a loaded model has there)", node.get("where"))
    return found if upath else None


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
    upath = r.upstream_path(node, "path", path, None, required=True)
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
        port = r.integer(node, "port", path, None, 1, "a TCP port", 65535)
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


def _read_lock_file(r: _Reader, q: dict) -> str | None:
    value = r.string(q, "lock_file", "scheduler", None)
    if value is not None and (not value.startswith("/") or "\0" in value
                              or value.endswith("/") or os.path.isdir(value)):
        r.problem("scheduler.lock_file", "an absolute path to a file (not a directory)", value)
        return None
    return value


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
    if token is not None and (len(token) < 16 or not token.isascii() or not token.isprintable()
                              or " " in token):
        r.problem("server.auth_token" if "auth_token" in s else "server.auth_token_file",
                  "a token of at least 16 printable ASCII characters without spaces")
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
        "type", "url", "health", "paths", "vram_resident_mib", "can_coexist_with", "load",
        "unload", "busy", "gpu_routes", "not_gpu_routes", "vram_managed", "idle_unload_s",
        "read_timeout_s",
        "pids_from", "upstream_allow", "loaded_from"))
    preset = r.string(node, "type", path, "generic", TYPES)
    node = with_preset({**node, "type": preset})
    url = r.url(node, "url", path)
    health = r.upstream_path(node, "health", path, "/")
    paths = node.get("paths", {})
    if not isinstance(paths, dict):
        r.problem(f"{path}.paths", "a mapping of kind -> upstream path", paths)
        paths = {}
    good_paths = {}
    for kind, p in paths.items():
        if not isinstance(kind, str) or not NAME_RE.fullmatch(kind):
            r.problem(key_path(f"{path}.paths", kind), "a kind name (letters, digits, '.', '_', "
                      "'-')")
        elif r.upstream_path(paths, kind, f"{path}.paths", None, required=True) is not None:
            good_paths[kind] = p
    resident = r.integer(node, "vram_resident_mib", path, None, 0, "a whole number of MiB")
    if node.get("vram_resident_mib") is None:           # absent, or `null`
        r.problem(f"{path}.vram_resident_mib", f"a whole number of MiB from 0 to {MAX_MIB} "
                  "(required)")
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
    idle = r.seconds(node, "idle_unload_s", path, None)
    read_timeout = r.seconds(node, "read_timeout_s", path, None)
    if idle is not None and node.get("unload") is None:
        r.problem(f"{path}.idle_unload_s", "no idle_unload_s without an unload route to call "
                  "(it could never take effect)")
    consumer = dict(
        load=_read_call(r, node.get("load"), f"{path}.load", "POST"),
        unload=_read_call(r, node.get("unload"), f"{path}.unload", "POST"),
        busy=_read_busy(r, node.get("busy"), f"{path}.busy"),
        gpu_routes=_read_gpu_routes(r, node.get("gpu_routes"), f"{path}.gpu_routes"),
        not_gpu_routes=_read_gpu_routes(r, node.get("not_gpu_routes"),
                                        f"{path}.not_gpu_routes", ()),
        vram_managed=r.boolean(node, "vram_managed", path, False),
        pids_from=_read_pids_from(r, node.get("pids_from"), f"{path}.pids_from"),
        upstream_allow=(None if node.get("upstream_allow") is None else _read_gpu_routes(
            r, node.get("upstream_allow"), f"{path}.upstream_allow", None)),
        loaded_from=_read_models_from(r, node.get("loaded_from"), f"{path}.loaded_from"),
        type=preset)
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


# What a config file may be: its size, and the values it may expand to
# (aliases included). A real config is a few KiB and a few hundred values.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_VALUES = 20_000
MAX_CONFIG_DEPTH = 64

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_Loader):
    """YAML's safe loader, refusing a key given twice (naming both lines)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a name, not a list or mapping",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


class _Level:
    """One open collection in the event walk: its size so far and where it is."""
    __slots__ = ("count", "anchor", "mapping", "want_key", "key", "index")

    def __init__(self, anchor, mapping: bool):
        self.count, self.anchor, self.mapping = 1, anchor, mapping
        self.want_key, self.key, self.index = True, None, 0

    def name(self) -> str | None:
        """The key path segment of the value being read in this collection."""
        return self.key if self.mapping else f"[{self.index}]"

    def value_done(self) -> None:
        if self.mapping:
            self.want_key = True
        else:
            self.index += 1


def _check_shape(text: str) -> None:
    """Refuse, from YAML's events alone, a document that nests too deeply or
    expands (through aliases) to too many values, before anything is built:
    a "billion laughs" costs nothing to reject this way. The error names the
    key path where the limit was passed."""
    sizes: dict[str, int] = {}            # anchor -> the number of values it expands to
    stack = [_Level(None, False)]

    def where() -> str:
        parts = [lvl.name() for lvl in stack[1:-1]] + (
            [stack[-1].name()] if len(stack) > 1 and not stack[-1].want_key else [])
        path = ""
        for part in parts:
            if part is None:
                continue
            part = str(part) if len(str(part)) <= 40 else str(part)[:37] + "..."
            path += part if part.startswith("[") or not path else "." + part
        return path or "(top level)"

    def add(n: int) -> None:
        stack[-1].count += n
        if sum(level.count for level in stack) > MAX_CONFIG_VALUES:
            raise _ShapeError(f"{where()}: more than {MAX_CONFIG_VALUES} values (aliases "
                              "expanded); a config has a few hundred")

    for event in yaml.parse(text, Loader=_Loader):
        top = stack[-1]
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if top.mapping and top.want_key:
                raise _ShapeError(f"{where()}: a mapping key must be a name, not a list or "
                                  "mapping")
            top.want_key = False if top.mapping else top.want_key
            stack.append(_Level(event.anchor, isinstance(event, yaml.MappingStartEvent)))
            if len(stack) > MAX_CONFIG_DEPTH:
                raise _ShapeError(f"{where()}: values nested more than {MAX_CONFIG_DEPTH} deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            done = stack.pop()
            if done.anchor:
                sizes[done.anchor] = done.count
            stack[-1].value_done()
            add(done.count)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                sizes[event.anchor] = 1
            if top.mapping and top.want_key:
                top.key, top.want_key = event.value, False
            else:
                top.value_done()
            add(1)
        elif isinstance(event, yaml.AliasEvent):
            if top.mapping and top.want_key:
                top.want_key = False
            else:
                top.value_done()
            add(sizes.get(event.anchor, 1))


class _ShapeError(Exception):
    """A document YAML can read but no config could be: its message leads with the key path."""


def read_yaml(path: str):
    """The YAML document in ``path``, or ConfigError with what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, [f"(file): cannot read it: {e.strerror or e}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(path, ["(file): larger than 1 MiB; a config is a few KiB"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(path, [f"(file): not UTF-8 text (byte {e.start}, line {line})"]) from None
    try:
        _check_shape(text)
        return yaml.load(text, Loader=_StrictLoader)
    except _ShapeError as e:
        raise ConfigError(path, [str(e)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(e, "problem", None) or str(e)
        if "nesting depth" in problem:
            problem = "values nested too deeply"
        raise ConfigError(path, [f"{where}: not valid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError(path, ["(file): values nested too deeply"]) from None


def config_path(path: str | os.PathLike | None = None) -> str:
    """The config file meant: the argument, else $MGPUMANAGER_CONFIG, else etc/consumers.yaml."""
    return os.fspath(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike | None = None, *, copy: str | None = None) -> Config:
    """Read a config file (``config_path``); with ``copy``, read that copy of
    it instead (the one the master validated), named as the file itself."""
    path = config_path(path)
    return parse_config(read_yaml(copy or path), path)
