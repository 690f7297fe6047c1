"""What a config is: frozen dataclasses, their defaults, and what they answer.

Read from YAML by config_reader.py and config.py; nothing here parses.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import unquote

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


def setting(default: Any, kind: str, **how: Any) -> Any:
    """A config field, declared once: its default, and how a value is read
    and checked (``kind`` names a reader of config_reader's ``_Reader``:
    integer, seconds, string, bind, url; ``how`` its bounds). A key left out
    or given as null takes the default; a required one says so."""
    return field(default=default, metadata={"setting": (kind, how)})


# Sane bounds: a week for any duration, thousands for a queue, a TiB of VRAM.
MAX_SECONDS = 7 * 24 * 3600.0
MAX_QUEUE = 4096
MAX_MIB = 1024 * 1024
MIB = "a whole number of MiB"


@dataclass(frozen=True)
class ServerConfig:
    bind: str = setting("127.0.0.1:8770", "bind")
    # The GPU lock lives in one process: config.py refuses any other number.
    workers: int = setting(1, "integer", minimum=1, maximum=64)
    # None: derived from scheduler.max_queue
    threads: int | None = setting(None, "integer", minimum=1, maximum=MAX_QUEUE + 1024)
    log_format: str = setting("text", "string", choices=("text", "json"))
    allowed_hosts: tuple[str, ...] = ()     # Host headers accepted besides the bound one, localhost
    allowed_origins: tuple[str, ...] = ()   # browser origins that may change state
    auth_token: str | None = None           # every route but /healthz needs it, when set
    # non-GPU passthrough requests at once
    max_streams: int = setting(16, "integer", minimum=1, maximum=1024)

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
    backend: str = setting("auto", "string", choices=GPU_BACKENDS)
    index: int = setting(0, "integer", minimum=0, maximum=63)
    total_mib: int | None = setting(None, "integer", minimum=1, what=MIB)
    cushion_mib: int = setting(256, "integer", minimum=0, what=MIB)
    sample_interval_s: float = setting(2.0, "seconds")
    sim_url: str | None = setting(None, "url", required=False)   # backend sim: its GPU's URL
    nvidia_smi: str = setting("nvidia-smi", "string")


@dataclass(frozen=True)
class DeviceConfig:
    """One GPU the broker watches: by its index (NVML's, nvidia-smi's), and
    for the ledger backend its total. With no ``gpus:`` list there is one,
    ``gpu.index``."""
    index: int = setting(0, "integer", minimum=0, maximum=63)
    total_mib: int | None = setting(None, "integer", minimum=1, what=MIB)


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = setting(5.0, "seconds")
    timeout_s: float = setting(2.0, "seconds")


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = setting(32, "integer", minimum=1, maximum=MAX_QUEUE)
    queue_timeout_s: float = setting(300.0, "seconds")
    evict_attempts: int = setting(5, "integer", minimum=0, maximum=100)
    evict_settle_s: float = setting(10.0, "seconds", positive=False)
    job_timeout_s: float = setting(1800.0, "seconds")
    busy_poll_s: float = setting(0.25, "seconds")
    lock_file: str | None = None        # None: /run/mgpumanager/gpu.lock or the user's runtime dir
    # consecutive failed loads before a consumer cools down
    load_failures_to_cooldown: int = setting(3, "integer", minimum=1, maximum=1000)
    # the first cooldown; it doubles on each further failure
    load_cooldown_s: float = setting(30.0, "seconds")
    load_cooldown_max_s: float = setting(600.0, "seconds")
    policy: str = setting("affinity", "string", choices=POLICIES)     # schedule.py
    max_bypass: int = setting(4, "integer", minimum=0, maximum=1000)  # affinity: no job passed more
    max_delay_s: float = setting(120.0, "seconds", positive=False)   # nor waits longer past its turn
    # kind -> priority (higher first, within the bounds above); unnamed kinds 0
    priority: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout_s: float = setting(3.0, "seconds")
    read_timeout_s: float = setting(300.0, "seconds")
    max_body_mib: int = setting(1024, "integer", minimum=1, what=MIB)   # a GPU job's body above: 413
    # a client silent this long, sending or reading, is cut
    client_timeout_s: float = setting(60.0, "seconds")
    # After a GPU job's answer is cut short, the GPU stays held until the
    # service has let go of the connection, at most this long.
    cut_hold_s: float = setting(2.0, "seconds", positive=False)

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
    path: str = setting(None, "upstream_path", required=True)
    list: str = setting("models", "string")
    name: str = setting("name", "string")
    vram_bytes: str | None = setting(None, "string")
    where: str | None = setting(None, "string")
    equals: str | None = setting(None, "string")

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
    # The OpenAI door: the model names (and globs) it serves there, where
    # its own OpenAI API lives, and where it lists the models it can serve.
    models: tuple[str, ...] = ()
    openai_base: str = "/v1"
    models_from: ModelsFrom | None = None
    # The GPUs it runs on, by index (several: split evenly, taken together);
    # always set by the reader, to the only GPU's where there is one.
    gpus: tuple[int, ...] = (0,)

    def share_mib(self, mib: int | None = None) -> int:
        """What it holds on each of its GPUs: ``mib`` (its size) split evenly,
        rounded up."""
        mib = self.vram_resident_mib if mib is None else mib
        return -(-mib // len(self.gpus))

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
    # Every GPU watched, in index order: ``gpus:``, or the one ``gpu.index``.
    devices: tuple[DeviceConfig, ...] = (DeviceConfig(),)

    @property
    def several_gpus(self) -> bool:
        return len(self.devices) > 1

    def on_gpu(self, index: int) -> list[str]:
        """The consumers that run on GPU ``index``."""
        return [n for n, c in self.consumers.items() if index in c.gpus]

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
            apart = [o for o in c.can_coexist_with if not set(c.gpus) & set(self.consumers[o].gpus)]
            if apart:
                found.append(f"consumers.{c.name}.can_coexist_with: {', '.join(apart)} "
                             "run on other GPUs: they are never in each other's way")
            if c.upstream_allow is None and not any(r.pattern == "*" for r in c.gpu_routes):
                found.append(f"consumers.{c.name}.gpu_routes lists only some routes: any other "
                             f"request through /upstream/{c.name}/ runs without the GPU lock "
                             "(list the exceptions in not_gpu_routes instead)")
        return found

    def summary(self) -> str:
        lines = [f"{self.path}: OK",
                 f"  gpu: backend {self.gpu.backend}, "
                 + ", ".join(f"index {d.index}" + (f" ({d.total_mib} MiB)" if d.total_mib else "")
                             for d in self.devices)
                 + f", cushion {self.gpu.cushion_mib} MiB",
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
            if self.several_gpus:
                flags.append("gpu " + ", ".join(map(str, c.gpus)))
            lines.append(f"  consumer {c.name}: {c.url} ({'; '.join(flags)})")
        return "\n".join(lines)
