"""What the broker believes of each consumer, and the probes that keep it true.

``ConsumerRegistry`` owns the mutable state behind one small lock of its own
(never held across I/O); ``HealthMonitor`` runs a probe thread per
consumer. The calls themselves are admin.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

# The calls are admin.py's; their names are imported from here too.
from .admin import ConsumerActions, HealthResult, HttpActions  # noqa: F401
from .clock import iso_utc
from .config import Config, ConsumerConfig
from .policy import ConsumerView, Resident, context_allowance
from .procs import Measured

log = logging.getLogger("mgpumanager.consumers")

class MovingCost:
    """How long something takes, as a moving estimate: an exponentially
    weighted mean, the newest sample weighing 0.3 (about the last five
    count), seeded by the first sample."""

    WEIGHT = 0.3
    __slots__ = ("mean_s", "samples", "last_s")

    def __init__(self):
        self.mean_s: float | None = None
        self.samples = 0
        self.last_s: float | None = None

    def add(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.mean_s = seconds if self.mean_s is None else (
            self.mean_s + self.WEIGHT * (seconds - self.mean_s))
        self.samples += 1
        self.last_s = seconds

    def to_json(self) -> dict:
        return {"s": None if self.mean_s is None else round(self.mean_s, 3),
                "samples": self.samples,
                "last_s": None if self.last_s is None else round(self.last_s, 3)}


@dataclass(frozen=True)
class Costs:
    """Measured estimates for one consumer, in seconds (None: not yet measured)."""
    load_s: float | None
    unload_s: float | None
    run_s: float | None


class ConsumerState:
    """One consumer's live state. Every field below ``config`` is guarded by
    the registry's ``_lock``; outside it, read a ``snapshot()``."""

    def __init__(self, config: ConsumerConfig, kinds: list[str],
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.kinds = kinds
        self._clock = clock
        self.healthy: bool | None = None
        self.last_probe_at: float | None = None
        self.last_error: str | None = None
        # Unknown at start, for every consumer: possibly resident, so counted
        # in every sum (over-committing is worse than a needless unload).
        self._loaded: bool | None = None
        # When `loaded` last changed: a reading from before is not of these beliefs.
        self.loaded_changed_at = clock()
        self.reports = False               # its probe has said whether it is loaded
        # Unloaded by the broker, and no probe has passed since: a process
        # its unload command ended fails its probe, by design.
        self.stopped_by_unload = False
        self.state_set_at = float("-inf")  # monotonic: when the broker last set `loaded`
        self.last_used: float | None = None        # monotonic, for LRU
        self.last_used_wall: float | None = None
        self.active = 0
        self.total_requests = 0
        self.failed_requests = 0
        self.evictions = 0
        self.loads = 0
        self.unload_failures = 0
        self.load_failures = 0                    # in a row
        self.cooldown_s = 0.0
        self.cooling_until: float | None = None   # monotonic
        self.measured: Measured | None = None     # from per-process attribution
        self.measured_at = float("-inf")          # monotonic: when that was taken
        self.peak_measured_mib = 0
        # Measured: a load (route and confirmation, or a cold first job), an
        # unload (route and the memory showing free), a warm job's hold.
        self.load_cost = MovingCost()
        self.unload_cost = MovingCost()
        self.run_cost = MovingCost()

    @property
    def loaded(self) -> bool | None:
        return self._loaded

    @loaded.setter
    def loaded(self, value: bool | None) -> None:
        if value is not self._loaded:
            self._loaded = value
            self.loaded_changed_at = self._clock()

    @property
    def planned_mib(self) -> int:
        """What planning counts for it: its configured peak, or the most it was
        ever measured holding if that is more (a measurement is never ignored)."""
        return max(self.config.vram_resident_mib, self.peak_measured_mib)

    def to_json(self) -> dict:
        c = self.config
        return {"url": c.url, "kinds": self.kinds, "healthy": self.healthy,
                "last_probe_at": iso_utc(self.last_probe_at), "last_error": self.last_error,
                "loaded": self.loaded, "vram_resident_mib": c.vram_resident_mib,
                "gpus": list(c.gpus),
                "vram_managed": c.vram_managed, "can_coexist_with": list(c.can_coexist_with),
                "has_unload": c.unload is not None, "has_load": c.load is not None,
                "active": self.active, "total_requests": self.total_requests,
                "failed_requests": self.failed_requests, "last_used": iso_utc(self.last_used_wall),
                "evictions": self.evictions, "loads": self.loads,
                "unload_failures": self.unload_failures,
                "load_failures": self.load_failures,
                "cooling_down_s": (round(max(0.0, self.cooling_until - time.monotonic()), 1)
                                   if self.cooling_until is not None else None),
                "costs": {"load": self.load_cost.to_json(), "unload": self.unload_cost.to_json(),
                          "run": self.run_cost.to_json()},
                "measured_mib": self.measured.mib if self.measured else None,
                "peak_measured_mib": self.peak_measured_mib or None,
                "attribution": (None if c.pids_from is None else {
                    "from": c.pids_from.describe(),
                    "pids": list(self.measured.pids) if self.measured else [],
                    "note": (self.measured.note if self.measured
                             else "no per-process reading yet (needs the nvml backend)")})}


class ConsumerRegistry:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 on_health_change: Callable[[str, bool, str | None], None] | None = None):
        self.config = config
        self.clock = clock
        self._on_health_change = on_health_change
        self._lock = threading.Lock()
        self._states = {name: ConsumerState(c, config.kinds_of(name), clock)
                        for name, c in config.consumers.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._states

    def names(self) -> list[str]:
        return list(self._states)

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {n: s.to_json() for n, s in self._states.items()}

    def health(self, name: str) -> tuple[bool | None, float | None, str | None]:
        with self._lock:
            s = self._states[name]
            return s.healthy, s.last_probe_at, s.last_error

    def stopped_by_unload(self, name: str) -> bool:
        """Unloaded by the broker, and not probed healthy since."""
        with self._lock:
            s = self._states[name]
            return s.stopped_by_unload and s.loaded is False

    def loaded(self, name: str) -> bool | None:
        with self._lock:
            return self._states[name].loaded

    def views(self, gpu: int | None = None) -> dict[str, ConsumerView]:
        """What the planner sees of each consumer; with ``gpu``, of those on
        that GPU, each with its share of it."""
        with self._lock:
            return {n: ConsumerView(n, s.planned_mib if gpu is None else
                                    s.config.share_mib(s.planned_mib), s.loaded, s.last_used,
                                    s.config.vram_managed, s.config.unload is not None,
                                    reload_s=s.load_cost.mean_s,
                                    # Not a measurement older than the last change.
                                    measured_mib=(
                                        (s.measured.mib if gpu is None else
                                         s.config.share_mib(s.measured.mib))
                                        if s.measured and s.measured.mib is not None and
                                        s.measured_at >= s.state_set_at else None),
                                    reports=s.reports)
                    for n, s in self._states.items() if gpu is None or gpu in s.config.gpus}

    def believed_resident(self, name: str, gpu: int) -> Resident | None:
        """The short path's beliefs on ``gpu``, if ``name`` is believed loaded there."""
        with self._lock:
            me = self._states[name]
            here = [s for s in self._states.values() if gpu in s.config.gpus]
            return None if me.loaded is not True else Resident.among(
                me.config.share_mib(me.planned_mib),
                [(s.config.share_mib(s.planned_mib), s.loaded) for s in here if s is not me],
                max(s.loaded_changed_at for s in here))

    def costs(self) -> dict[str, Costs]:
        with self._lock:
            return {n: Costs(s.load_cost.mean_s, s.unload_cost.mean_s, s.run_cost.mean_s)
                    for n, s in self._states.items()}

    def held_mib(self, gpu: int | None = None) -> int:
        """What the ledger counts as used (on ``gpu``: their shares of it):
        every consumer that is or may be loaded."""
        with self._lock:
            return sum(s.planned_mib if gpu is None else s.config.share_mib(s.planned_mib)
                       for s in self._states.values()
                       if s.loaded is not False and (gpu is None or gpu in s.config.gpus))

    # -- updates -------------------------------------------------------------

    def record_health(self, name: str, result: HealthResult, sent_at: float | None = None) -> None:
        """Record a probe's result. Its ``loaded`` is ignored if the broker set
        the state after the probe was sent (``sent_at``, on the registry's
        clock): an answer from before an unload must not undo it."""
        with self._lock:
            s = self._states[name]
            changed = s.healthy is not None and s.healthy != result.ok
            first = s.healthy is None
            s.healthy = result.ok
            s.last_probe_at = time.time()
            if result.ok:
                s.stopped_by_unload = False
            if not result.ok:
                s.last_error = result.error
            if result.loaded is not None:
                s.reports = True
                if sent_at is None or sent_at >= s.state_set_at:
                    s.loaded = result.loaded
            if result.vram_mib is not None and s.config.pids_from is None:
                # The service's own account (ollama's /api/ps), where no
                # per-process reading is configured.
                s.measured = Measured(result.vram_mib, (), f"as {s.config.health} reports it")
                s.measured_at = sent_at if sent_at is not None else self.clock()
                s.peak_measured_mib = max(s.peak_measured_mib, result.vram_mib)
        if (changed or (first and not result.ok)) and self._on_health_change:
            self._on_health_change(name, result.ok, result.error)

    def record_measured(self, measured: dict[str, Measured], taken_at: float) -> list[str]:
        """Per-process measurements: truth about who holds VRAM. A consumer
        measured holding more than a CUDA context (policy.context_allowance)
        is loaded, one holding no more is not (every CUDA process holds its
        context, loaded or not: about 700 MiB seen on an H100), unless the
        broker changed its state after the reading was taken. Returns
        warnings for consumers measured above their configured size."""
        warnings = []
        with self._lock:
            for name, m in measured.items():
                s = self._states[name]
                s.measured = m
                s.measured_at = taken_at
                if m.mib is None:
                    continue
                if taken_at >= s.state_set_at:
                    # A context on each of its GPUs is still not loaded.
                    s.loaded = m.mib > len(s.config.gpus) * context_allowance(
                        s.config.share_mib())
                    s.state_set_at = taken_at
                if m.mib > s.peak_measured_mib:
                    if m.mib > s.config.vram_resident_mib >= s.peak_measured_mib:
                        warnings.append(f"{name} was measured holding {m.mib} MiB, more than "
                                        f"its vram_resident_mib of {s.config.vram_resident_mib}")
                    s.peak_measured_mib = m.mib
        return warnings

    def job_started(self, name: str) -> None:
        with self._lock:
            s = self._states[name]
            s.active += 1
            s.total_requests += 1

    def job_finished(self, name: str, *, ok: bool, reached: bool | None = True,
                     error: str | None = None) -> None:
        """A job ended. Its load state follows whether it reached the consumer,
        not how it ended: a request that reached it leaves it loaded (whatever
        its status, or what its client did), one that may have (the
        connection broke mid-exchange) leaves it possibly loaded."""
        with self._lock:
            s = self._states[name]
            s.active -= 1
            if reached is True:
                s.last_used = s.state_set_at = self.clock()
                s.last_used_wall = time.time()
                s.loaded = True
            elif reached is None:
                s.state_set_at = self.clock()
                if s.loaded is not True:
                    s.loaded = None
            if not ok:
                s.failed_requests += 1
                if error:
                    s.last_error = error

    def record_cost(self, name: str, what: str, seconds: float) -> None:
        """A timed load or unload (``what``)."""
        with self._lock:
            s = self._states[name]
            (s.load_cost if what == "load" else s.unload_cost).add(seconds)

    def record_run(self, name: str, seconds: float, *, cold: bool) -> None:
        """A job that ran whole held the GPU this long. Without a load route,
        a consumer loads on its first job: a cold job's time beyond a warm
        one's is its load."""
        with self._lock:
            s = self._states[name]
            if not cold:
                s.run_cost.add(seconds)
            elif s.config.load is None:
                s.load_cost.add(seconds - (s.run_cost.mean_s or 0.0))

    def job_refused(self, name: str) -> None:
        with self._lock:
            self._states[name].failed_requests += 1

    def assume_not_loaded(self, unknowable: Callable[[ConsumerConfig], bool]) -> list[str]:
        """Consumers of unknown state that ``unknowable`` says can never be
        settled count as not loaded until their first job; returns their names."""
        with self._lock:
            names = [n for n, s in self._states.items()
                     if s.loaded is None and unknowable(s.config)]
            for n in names:
                self._states[n].loaded = False
        return names

    def forget_loaded(self, unknowable: Callable[[ConsumerConfig], bool]) -> list[str]:
        """Another process had the GPU: every consumer that can be settled is
        possibly loaded again (it may have loaded or unloaded any of them);
        returns the names whose belief changed."""
        with self._lock:
            names = [n for n, s in self._states.items()
                     if s.loaded is not None and not unknowable(s.config)]
            for n in names:
                self._states[n].loaded = None
                self._states[n].state_set_at = self.clock()
        return names

    def mark_loaded(self, name: str, loaded: bool, *, counted: str | None = None) -> None:
        with self._lock:
            s = self._states[name]
            s.loaded = loaded
            s.state_set_at = self.clock()
            if counted == "eviction":
                s.evictions += 1
                s.stopped_by_unload = True
            elif counted == "load":
                s.loads += 1
                s.last_used = s.last_used or self.clock()

    def load_result(self, name: str, error: str | None, *, after: int, base_s: float,
                    max_s: float) -> float | None:
        """Count a load. ``after`` failures in a row start a cooldown of
        ``base_s``, doubling with each further failure up to ``max_s``; one
        success ends it. Returns the cooldown started, if one was."""
        with self._lock:
            s = self._states[name]
            if error is None:
                s.load_failures = 0
                s.cooldown_s = 0.0
                s.cooling_until = None
                return None
            s.load_failures += 1
            s.last_error = error
            if s.load_failures < after:
                return None
            s.cooldown_s = min(max_s, s.cooldown_s * 2 if s.cooldown_s else base_s)
            s.cooling_until = self.clock() + s.cooldown_s
            return s.cooldown_s

    def cooling_down_for(self, name: str) -> float:
        """Seconds left of its cooldown (0: none)."""
        with self._lock:
            until = self._states[name].cooling_until
            return max(0.0, until - self.clock()) if until is not None else 0.0

    def unload_failed(self, name: str, error: str) -> None:
        with self._lock:
            s = self._states[name]
            s.unload_failures += 1
            s.last_error = error

    def idle_since(self, name: str) -> float | None:
        with self._lock:
            s = self._states[name]
            return s.last_used if s.loaded is not False else None


class HealthMonitor:
    """One daemon thread per consumer, so a consumer that hangs until its
    probe times out delays nobody else's probe."""

    def __init__(self, registry: ConsumerRegistry, actions: ConsumerActions, interval_s: float,
                 on_probe: Callable[[str, bool], None] | None = None):
        self.registry = registry
        self.actions = actions
        self.interval_s = interval_s
        self._on_probe = on_probe           # after each probe: (name, healthy)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(name,), daemon=True,
                                          name=f"health-{name}") for name in registry.names()]
        self._unprobed = set(registry.names())
        self._first_round = threading.Event()     # every consumer answered (or not) once
        self._first_waited = False
        self._started = False
        # Probes ask_all started, still running: a second asker waits for them too.
        self._asking: dict[str, threading.Thread] = {}
        self._asking_lock = threading.Lock()

    def start(self) -> None:
        self._started = True
        for t in self._threads:
            t.start()

    def wait_first_round(self, timeout_s: float) -> bool:
        """Wait until every consumer has been probed once (what they say of
        their load state is the broker's first knowledge), at most
        ``timeout_s``, and only the first time: a probe that never ends
        must not delay every job. At once if the probes were never started."""
        if not self._started or self._first_round.is_set() or self._first_waited:
            return True
        self._first_waited = True
        return self._first_round.wait(timeout_s)

    def ask_all(self, within_s: float, names: list[str] | None = None) -> None:
        """Probe every consumer (or ``names``) now, all at once, and wait at
        most ``within_s`` in all: a probe is bounded per read, not whole (an
        answer can trickle), so a slow one is left to finish by itself. One
        still being asked (from the last time, or by a job on another GPU)
        is waited for, not asked again."""
        threads = []
        for name in self.registry.names() if names is None else names:
            with self._asking_lock:
                t = self._asking.get(name)
                if t is None:
                    t = self._asking[name] = threading.Thread(
                        target=self._ask, args=(name,), daemon=True, name=f"ask-{name}")
                    t.start()
            threads.append(t)
        deadline = time.monotonic() + within_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _ask(self, name: str) -> None:
        try:
            self.probe(name)
        except Exception:
            log.exception("health probe of %s failed", name)
        finally:
            with self._asking_lock:
                self._asking.pop(name, None)
            close = getattr(self.actions, "close_thread_session", None)
            if close is not None:
                close()                   # this thread ends here

    def stop(self) -> None:
        self._stop.set()

    def dead(self) -> list[str]:
        """Consumers whose probe thread was started and has died."""
        return [t.name.removeprefix("health-") for t in self._threads
                if t.ident is not None and not t.is_alive() and not self._stop.is_set()]

    def probe(self, name: str) -> HealthResult:
        sent_at = self.registry.clock()
        result = self.actions.probe_health(self.registry.config.consumers[name])
        self.registry.record_health(name, result, sent_at)
        if self._on_probe is not None:
            self._on_probe(name, result.ok)
        return result

    def _run(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                self.probe(name)
            except Exception:
                log.exception("health probe of %s failed", name)
            if name in self._unprobed:
                self._unprobed.discard(name)
                if not self._unprobed:
                    self._first_round.set()
            self._stop.wait(self.interval_s)

