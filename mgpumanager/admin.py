"""Talking to a consumer's own routes: its health probe, its busy probe,
and its load and unload calls (HTTP routes or commands).

``HttpActions`` is the only code that calls a consumer's admin routes; the
broker takes a ``ConsumerActions`` as a parameter so that the scheduler can
be tested against a fake that records what it was asked.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import requests

from .commands import run_command
from .config import Call, ConsumerConfig, ModelsFrom
from .errors import BrokerError
from .proxy import describe

log = logging.getLogger("mgpumanager.admin")

# How long an unload waits for the service's own account of free VRAM.
UNLOAD_SETTLE_S = 10.0


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    error: str | None = None
    loaded: bool | None = None      # what the consumer says of itself, if it says
    vram_mib: int | None = None     # what it says it holds (ollama's /api/ps), if it says


class ConsumerActions(Protocol):
    def probe_health(self, c: ConsumerConfig) -> HealthResult: ...
    # None: it worked. ``timeout_s``: at most this long (the lease's time left).
    def call(self, c: ConsumerConfig, call: Call, timeout_s: float | None = None) -> str | None: ...
    def is_busy(self, c: ConsumerConfig) -> bool: ...


class HttpActions:
    """Talks to consumers' own admin routes over HTTP, through requests.

    One Session per thread: requests makes no thread-safety promise for a
    shared one, and a per-thread session still keeps its connections alive.
    """

    def __init__(self, connect_timeout_s: float, health_timeout_s: float):
        self.connect_timeout_s = connect_timeout_s
        self.health_timeout_s = health_timeout_s
        self._local = threading.local()

    def _send(self, method: str, c: ConsumerConfig, path: str, read_timeout_s: float,
              json_body=None) -> requests.Response:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = False    # an environment proxy must not divert loopback calls
        try:
            return session.request(method, c.url + path, json=json_body, allow_redirects=False,
                                   timeout=(self.connect_timeout_s, read_timeout_s))
        except requests.Timeout as e:
            raise BrokerError(f"no answer within {read_timeout_s:g} s", consumer=c.name) from e
        except requests.RequestException as e:
            raise BrokerError(describe(e), consumer=c.name) from e

    def close_thread_session(self) -> None:
        """Close this thread's session: for a thread that ends (its
        connections would otherwise be left to the garbage collector)."""
        session = getattr(self._local, "session", None)
        if session is not None:
            self._local.session = None
            session.close()

    def probe_health(self, c: ConsumerConfig) -> HealthResult:
        try:
            with self._send("GET", c, c.health, self.health_timeout_s) as r:
                if not 200 <= r.status_code < 300:
                    return HealthResult(False, f"health {c.health} answered {r.status_code}")
                loaded = None
                if "json" in r.headers.get("Content-Type", ""):
                    try:
                        body = r.json()
                    except ValueError:
                        body = None
                    if isinstance(body, dict) and isinstance(body.get("loaded"), bool):
                        loaded = body["loaded"]
            if c.loaded_from is None:
                return HealthResult(True, None, loaded)
            models = self.models(c, c.loaded_from, self.health_timeout_s)
            vram = None
            if c.loaded_from.vram_bytes:
                sizes = [m.get(c.loaded_from.vram_bytes) for m in models if isinstance(m, dict)]
                if all(isinstance(x, int) for x in sizes):
                    vram = sum(sizes) // (1024 * 1024)
            return HealthResult(True, None, bool(models), vram)
        except BrokerError as e:
            return HealthResult(False, e.message)

    def models(self, c: ConsumerConfig, where: ModelsFrom, timeout_s: float) -> list:
        """The consumer's loaded models, as it lists them (BrokerError if it cannot)."""
        with self._send("GET", c, where.path, timeout_s) as r:
            try:
                body = r.json() if 200 <= r.status_code < 300 else None
            except ValueError:
                body = None
        found = body.get(where.list) if isinstance(body, dict) else None
        if not isinstance(found, list):
            raise BrokerError(f"GET {where.path} did not list its models under {where.list!r}",
                              consumer=c.name)
        return [m for m in found if where.listed(m)]

    def call(self, c: ConsumerConfig, call: Call, timeout_s: float | None = None) -> str | None:
        timeout = call.timeout_s if timeout_s is None else min(call.timeout_s, timeout_s)
        if call.command:
            return run_command(c.name, call.command, timeout)
        deadline = time.monotonic() + timeout
        try:
            if call.until_freed is not None:
                return self._route_until_freed(c, call, timeout)
            if call.for_each is None:
                return self._route(c, call, call.json, timeout)
            def left() -> float:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(f"not done within {timeout:g} s", consumer=c.name)
                return remaining
            for model in self.models(c, call.for_each, left()):
                name = model.get(call.for_each.name) if isinstance(model, dict) else model
                error = self._route(c, call, _fill(call.json, str(name)), left())
                if error:
                    return error
            while call.until_empty and self.models(c, call.for_each, left()):
                time.sleep(0.1)
            return None
        except BrokerError as e:
            return f"{call.describe()}: {e.message}"

    def _route_until_freed(self, c: ConsumerConfig, call: Call, timeout: float) -> str | None:
        """The route, then the service's own account polled until half of its
        size is free again, or (with ``held_key``) until what it holds
        itself has halved (ComfyUI's /free answers at once and frees later).
        A service that says it holds less than a quarter of its size has
        nothing to wait for. Bounded by UNLOAD_SETTLE_S."""
        where = call.until_freed
        free_before, held_before = self._free_vram(c, where, timeout)
        error = self._route(c, call, call.json, timeout)
        half = c.vram_resident_mib * 1024 * 1024 // 2
        if error or free_before is None or (held_before is not None and held_before < half // 2):
            return error
        until = time.monotonic() + min(timeout, UNLOAD_SETTLE_S)
        while time.monotonic() < until:
            free, held = self._free_vram(c, where, timeout)
            if free is None or free >= free_before + half or (
                    held is not None and held_before is not None and held <= held_before // 2):
                return None
            time.sleep(0.1)
        log.info("%s: %s did not show half its VRAM back within %g s", c.name,
                 where.path, UNLOAD_SETTLE_S)
        return None

    def _free_vram(self, c: ConsumerConfig, where, timeout: float) -> tuple[int | None, int | None]:
        """(free, held by the service itself) in bytes, each None if not told."""
        try:
            with self._send("GET", c, where.path, timeout) as r:
                body = r.json() if r.status_code == 200 else None
        except (BrokerError, ValueError):
            return None, None
        return (where.read(body),
                where.read(body, where.held_key) if where.held_key else None)

    def _route(self, c: ConsumerConfig, call: Call, body, timeout: float) -> str | None:
        with self._send(call.method, c, call.path, timeout, body) as r:
            if 200 <= r.status_code < 300:
                return None
            return f"{call.describe()} answered {r.status_code}: {r.text[:200]}"

    def is_busy(self, c: ConsumerConfig) -> bool:
        """True while the busy probe shows work. A probe that fails counts as
        busy (a ComfyUI slow to answer /queue, or answering 500, may be
        mid-render; the lease's deadline bounds the hold), except when
        nothing listens: a service that is down renders nothing."""
        try:
            with self._send("GET", c, c.busy.path, self.health_timeout_s) as r:
                body = r.json() if r.status_code == 200 else None
        except BrokerError as e:
            if isinstance(e.__cause__, requests.ConnectionError) and not isinstance(
                    e.__cause__, requests.Timeout) and "refused" in str(e.__cause__).lower():
                log.warning("%s: busy probe %s: nothing listens; idle", c.name, c.busy.path)
                return False
            log.warning("%s: busy probe %s failed (%s); counted busy", c.name, c.busy.path, e)
            return True
        except ValueError:                           # not JSON
            body = None
        if not isinstance(body, dict):
            log.warning("%s: busy probe %s gave no JSON object; counted busy", c.name,
                        c.busy.path)
            return True
        keys = c.busy.keys or tuple(body)
        return any(bool(body.get(k)) for k in keys)


def _fill(template, model: str):
    """The JSON template with "{model}" replaced by the model's name."""
    if isinstance(template, str):
        return template.replace("{model}", model)
    if isinstance(template, dict):
        return {k: _fill(v, model) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, model) for v in template]
    return template
