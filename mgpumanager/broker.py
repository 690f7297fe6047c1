"""The broker: the GPU lock, the eviction policy, the consumers and the GPU
reading composed into ``Broker.start_job`` / ``Job.finish``.

Threading rules (docs/design.md has the long form):

- The GPU lock (``GpuLock``) is held from ``start_job`` until ``Job.finish``;
  every eviction decision and every load/unload call happens while it is
  held, on a fresh reading, so no two jobs can plan against the same free
  VRAM.
- ``Broker._stats_lock`` guards the counters below it and is never held
  across I/O; ``status()`` copies them under it and builds JSON outside.
- Consumer state lives in ``ConsumerRegistry`` behind its own small lock.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import math
import os
import threading
import time
from collections import Counter, deque
from typing import Callable

from . import __version__
from .config import Config
from .consumers import ConsumerActions, ConsumerRegistry, HealthMonitor, HttpActions
from .errors import (Abandoned, BadRequest, BrokerError, ConsumerCoolingDown, ConsumerUnhealthy,
                     InsufficientVram, UnknownConsumer, UnknownKind, UnloadFailed)
from .gpu import GpuReader, GpuReading, GpuSampler, iso_utc, make_reader
from .gpulock import GpuLock, Ticket
from .lease import JOB_TIMEOUT, Lease, LeaseCut, LeaseWatch
from .oslock import OsLock, default_lock_file
from .policy import ConsumerView, context_allowance, plan_room
from .procs import Attribution
from .proxy import UpstreamPool
from .schedule import Rules, choose_next

log = logging.getLogger("mgpumanager.broker")
job_log = logging.getLogger("mgpumanager.jobs")

# How long to wait for the memory of a victim that was only possibly
# loaded: if it held nothing, nothing will show.
UNSURE_SETTLE_S = 1.5

# Seconds: the bucket bounds of the wait and run time histograms.
TIME_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class Histogram:
    """Cumulative buckets, a sum and a count: enough for Prometheus, no more."""

    def __init__(self, bounds=TIME_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1    # first bound >= value
        self.sum += value

    def snapshot(self) -> dict:
        cumulative = list(itertools.accumulate(self.counts))
        return {"buckets": list(zip(self.bounds + (float("inf"),), cumulative)),
                "sum": self.sum, "count": cumulative[-1]}


class EventLog:
    """A bounded ring of recent scheduler events, numbered for ``?since=``."""

    def __init__(self, size: int = 500):
        self._lock = threading.Lock()
        self._events: deque[dict] = deque(maxlen=size)     # guarded by _lock
        self._ids = itertools.count(1)

    def add(self, type: str, message: str, **fields) -> dict:
        with self._lock:
            event = {"id": next(self._ids), "at": iso_utc(time.time()), "type": type,
                     "message": message, **fields}
            self._events.append(event)
        return event

    def since(self, last_id: int = 0, limit: int | None = None) -> list[dict]:
        with self._lock:
            out = [e for e in self._events if e["id"] > last_id]
        return out[-limit:] if limit else out


class Job:
    """One GPU job: what it is for, and its lease on the GPU lock."""

    def __init__(self, broker: "Broker", lease: Lease, consumer: str, kind: str | None):
        self.broker = broker
        self.lease = lease
        lease.job = self
        self.consumer = consumer
        self.kind = kind
        self.started = broker.clock()
        self.evicted: list[str] = []
        self.was_loaded: bool | None = None  # its consumer's state as the job began
        self.ran_ok = False                  # it reached the consumer and was read whole
        self._finished = False
        self._finish_lock = threading.Lock()

    @property
    def wait_s(self) -> float:
        return self.lease.ticket.waited_s

    def finish(self, *, ok: bool, reached: bool | None = True, status: int | None = None,
               bytes_in: int = 0, bytes_out: int = 0, error: str | None = None,
               hold_busy: bool = True) -> None:
        """Record the job once and end its lease.

        ``ok``: the whole answer was read from the consumer (statistics).
        ``reached``: the request reached the consumer (True), surely did not
        (False), or may have (None: the connection broke mid-exchange). A
        consumer with a busy probe keeps the GPU until it is idle after any
        job that may have reached it.
        """
        with self._finish_lock:
            if self._finished:
                return
            self._finished = True
        self.broker._job_done(self, ok=ok, reached=reached, status=status, bytes_in=bytes_in,
                              bytes_out=bytes_out, error=error, hold_busy=hold_busy)


class Broker:
    def __init__(self, config: Config, *, reader: GpuReader | None = None,
                 actions: ConsumerActions | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self.started_at = time.time()
        self.events = EventLog()
        self.upstream = UpstreamPool(config.proxy.connect_timeout_s, config.proxy.read_timeout_s)
        self.watch = LeaseWatch(self._lease_expired)
        self.registry = ConsumerRegistry(config, clock=clock,
                                         on_health_change=self._health_changed)
        self.actions = actions or HttpActions(config.proxy.connect_timeout_s,
                                              config.health.timeout_s)
        fallback_total = sum(c.vram_resident_mib for c in config.consumers.values())
        self.reader = reader or make_reader(config.gpu, self.registry.held_mib, fallback_total)
        sources = {n: c.pids_from for n, c in config.consumers.items() if c.pids_from}
        self.attribution = Attribution(sources) if sources else None
        self.sampler = GpuSampler(self.reader, config.gpu.sample_interval_s,
                                  on_sample=self._attribute)
        self.health = HealthMonitor(self.registry, self.actions, config.health.interval_s)
        # Possibly loaded is counted held until settled. One that can be
        # neither asked (a health `loaded`, a list of its models, its
        # processes on a live reading) nor unloaded would never be settled:
        # on a ledger it would refuse jobs that fit forever, and on a live
        # reading it would make any memory in use look like its own. It
        # counts as not loaded until its first job.
        self.registry.assume_not_loaded(lambda c: not self._settleable(c))
        sched = config.scheduler
        self.rules = Rules(sched.policy, sched.max_bypass, sched.max_delay_s)
        self.lock = GpuLock(sched.max_queue, clock=clock, estimator=self._estimate_wait,
                            chooser=self._choose if sched.policy != "fifo" else None)
        self.oslock = OsLock(config.scheduler.lock_file or default_lock_file())
        self._stop = threading.Event()
        self.shutting_down = False
        self._shutdown_requested = threading.Event()
        self._graceful_deadline = 0.0
        self._shutdown_first: Callable[[], None] | None = None
        self._stats_lock = threading.Lock()
        # Guarded by _stats_lock:
        self._total_jobs = 0
        self._outcomes: Counter = Counter()          # (consumer, "ok" | "error")
        self._rejected: Counter = Counter()          # contract code -> count
        self._abandoned = 0                          # queued jobs whose client left
        self._client_errors: Counter = Counter()     # code -> count (the client's fault)
        self._leases_expired = 0                     # released by the watchdog
        self._evictions: Counter = Counter()         # victim -> count
        self._loads: Counter = Counter()
        self._last_wait_ms: float | None = None
        self._last_run_ms: float | None = None
        self._wait_hist = Histogram()
        self._run_hist = Histogram()
        self._current: Lease | None = None           # whoever holds the GPU lock
        self._max_bypassed = 0                       # the most any granted job was passed
        self._max_late_s = 0.0                       # the longest past its FIFO turn
        self._last_belief_problem = None             # under the GPU lock only
        # Non-GPU passthrough streams hold threads too; they may never take
        # the ones the queue and the status page need.
        self.streams = threading.BoundedSemaphore(
            config.server.stream_limit(config.scheduler.max_queue))
        self._foreign_since: float | None = None     # another process seen holding the OS lock
        self._busy_checked = False                   # under the GPU lock only
        # Why the last config reload failed (the old config still serves), or None.
        self.config_error: str | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self.sampler.start()
        self.health.start()
        threading.Thread(target=self._shutdown_watcher, name="shutdown", daemon=True).start()
        if any(c.idle_unload_s for c in self.config.consumers.values()):
            threading.Thread(target=self._idle_unloader, name="idle-unload", daemon=True).start()
        self.events.add("started", f"broker {__version__} started with {self.config.path}; "
                        f"GPU reading from {self.reader.source}")
        for warning in self.config.warnings():
            log.warning("%s: %s", self.config.path, warning)
            self.events.add("config_warning", warning)

    def begin_shutdown(self, graceful_deadline: float,
                       first: Callable[[], None] | None = None) -> None:
        """The worker is stopping (SIGTERM) and will be ended at
        ``graceful_deadline`` (time.monotonic()). The running job and the
        queue go on in order until shortly before it; then every job still
        queued is answered 503 shutting_down, so no client is left without
        an answer. Called from a signal handler: it only sets an event that
        a thread started with the broker waits on (starting a thread here
        could deadlock on threading's own locks)."""
        self._graceful_deadline = graceful_deadline
        self._shutdown_first = first
        self._shutdown_requested.set()

    def _shutdown_watcher(self) -> None:
        self._shutdown_requested.wait()
        if self._stop.is_set():
            return
        if self._shutdown_first is not None:
            try:
                self._shutdown_first()
            except Exception:
                log.exception("stopping: refusing new connections failed")
        self._shut_down(self._graceful_deadline)

    def _shut_down(self, graceful_deadline: float) -> None:
        left = graceful_deadline - time.monotonic()
        # Time enough for the refused to get their answers out.
        margin = min(5.0, max(0.5, left / 4))
        self.events.add("shutting_down", f"stopping: queued jobs run for {left - margin:.0f} s "
                        "more, then are refused")
        log.info("stopping: serving the queue for %.0f s more", left - margin)
        self.shutting_down = True
        self._stop.wait(max(0.0, left - margin))
        self.lock.close("the broker is stopping; this job could not run before it does")

    def stop(self) -> None:
        self._stop.set()
        self._shutdown_requested.set()
        self.sampler.stop()
        self.health.stop()
        self.reader.close()
        self.oslock.close()

    # -- routing -------------------------------------------------------------

    def consumer_for_kind(self, kind: str) -> str:
        try:
            return self.config.routes[kind]
        except KeyError:
            raise UnknownKind(f"no route for kind {kind!r} (routes: "
                              f"{', '.join(sorted(self.config.routes)) or 'none'})",
                              kind=kind) from None

    def check_consumer(self, name: str) -> None:
        if name not in self.registry:
            raise UnknownConsumer(f"no consumer named {name!r} (consumers: "
                                  f"{', '.join(self.registry.names())})", consumer=name)

    def check_healthy(self, name: str, kind: str | None = None) -> None:
        cooling = self.registry.cooling_down_for(name)
        if cooling > 0:
            raise ConsumerCoolingDown(
                f"{name}'s loads kept failing; refused for {cooling:.0f} s more "
                f"(last error: {self.registry.snapshot()[name]['last_error']})",
                consumer=name, kind=kind, retry_after=math.ceil(cooling))
        healthy, probed_at, error = self.registry.health(name)
        # One the broker unloaded with a load to call fails its probe by
        # design when the unload ended its process (whisper.cpp stopped by
        # command): its load starts it again.
        if healthy is False and not (self.config.consumers[name].load is not None
                                     and self.registry.stopped_by_unload(name)):
            ago = time.time() - probed_at if probed_at else 0.0
            raise ConsumerUnhealthy(f"{name} failed its last health probe {ago:.1f} s ago: {error}",
                                    consumer=name, kind=kind)

    # -- jobs ----------------------------------------------------------------

    def start_job(self, consumer: str, kind: str | None = None, *,
                  cancelled: Callable[[], bool] | None = None) -> Job:
        """Wait for the GPU in arrival order, make room for ``consumer``, and
        return the running Job, whose lease holds the lock. Raises a
        BrokerError (nothing held) if refused."""
        job = self._room_for(consumer, kind, f"{consumer}:{kind or 'upstream'}", cancelled)
        job.started = self.clock()
        job.was_loaded = self.registry.loaded(consumer)
        self.registry.job_started(consumer)
        with self._stats_lock:
            self._last_wait_ms = job.wait_s * 1000
            self._wait_hist.observe(job.wait_s)
        return job

    def _room_for(self, consumer: str, kind: str | None, label: str,
                  cancelled: Callable[[], bool] | None) -> Job:
        """Health check, the GPU lock, room made: a Job holding the lock."""
        try:
            self.check_healthy(consumer, kind)
            if cancelled is not None and cancelled():
                raise Abandoned("the client went away before its job queued")
        except BrokerError as e:
            self._refused(e, consumer, kind)
            raise
        deadline = self.clock() + self.config.scheduler.queue_timeout_s
        job = Job(self, self._acquire(consumer, kind, label, cancelled, needs_room=True),
                  consumer, kind)
        try:
            self._make_room(job, deadline, cancelled)
        except BaseException as e:
            job.lease.release()
            if isinstance(e, LeaseCut):
                e = Abandoned(f"the job was cut while it made room ({e.reason})")
                self._refused(e, consumer, kind)
                raise e from None
            if isinstance(e, BrokerError):
                self._refused(e, consumer, kind)
            raise
        return job

    def _acquire(self, consumer: str, kind: str | None, label: str,
                 cancelled: Callable[[], bool] | None, *, needs_room: bool) -> Lease:
        """This process's turn (the queue), then the machine's (the OS lock)."""
        deadline = self.clock() + self.config.scheduler.queue_timeout_s
        try:
            ticket = self.lock.acquire(label, self.config.scheduler.queue_timeout_s,
                                       cancelled=cancelled, consumer=consumer, kind=kind,
                                       priority=self.priority(consumer, kind),
                                       needs_room=needs_room)
        except BrokerError as e:
            self._refused(e, consumer, kind)
            raise
        try:
            self.oslock.acquire(max(0.0, deadline - self.clock()), cancelled)
        except BaseException as e:
            self.lock.release(ticket)
            if isinstance(e, BrokerError):
                self._refused(e, consumer, kind)
            raise
        return self._lease(ticket, label)

    def _lease(self, ticket: Ticket, label: str) -> Lease:
        """Every grant of the GPU lock becomes a lease with a deadline, watched."""
        lease = Lease(label, ticket, time.monotonic() + self.config.scheduler.job_timeout_s,
                      self._lease_released)
        self.watch.watch(lease)
        with self._stats_lock:
            self._current = lease
            self._max_bypassed = max(self._max_bypassed, ticket.bypassed)
            if ticket.head_since is not None and ticket.granted_at is not None:
                self._max_late_s = max(self._max_late_s, ticket.granted_at - ticket.head_since)
        return lease

    def _lease_released(self, lease: Lease) -> None:
        self.watch.unwatch(lease)
        released_at = self.clock()
        with self._stats_lock:
            if self._current is lease:
                self._current = None
        self.oslock.release()
        self.lock.release(lease.ticket)
        # Let the woken head take the GIL now rather than after our
        # bookkeeping (measured: 0.25 ms of every hand-off).
        time.sleep(0)
        job = lease.job
        if job is not None and job.ran_ok and job.was_loaded is not None:
            # Its hold, busy time included, is what the next job waits for;
            # from an unknown state, it is neither a warm run nor a load.
            self.registry.record_run(job.consumer, released_at - job.started,
                                     cold=job.was_loaded is False)

    def _lease_expired(self, lease: Lease) -> None:
        """The watchdog's last resort: a lease still held past its deadline
        and the grace after it. Its sockets were shut at the deadline; it is
        released right after this, whatever its thread is doing."""
        lease.expired = True
        lease.cut(JOB_TIMEOUT)
        with self._stats_lock:
            self._leases_expired += 1
        message = (f"{lease.label} still held the GPU {self.watch.grace_s:g} s past "
                   f"scheduler.job_timeout_s; the watchdog released it")
        log.warning("%s", message)
        self.events.add("lease_expired", message, label=lease.label)
        if lease.job is not None:
            lease.job.finish(ok=False, reached=None, error="released by the watchdog after "
                             "scheduler.job_timeout_s", hold_busy=False)

    def _refused(self, e: BrokerError, consumer: str, kind: str | None) -> None:
        """Count and record a GPU job that will not run (the one place that does)."""
        e.consumer = e.consumer or consumer
        e.kind = e.kind or kind
        if isinstance(e, Abandoned):
            with self._stats_lock:
                self._abandoned += 1
            self.events.add("abandoned", f"a {consumer} job was dropped: {e.message}",
                            consumer=consumer)
            return
        with self._stats_lock:
            self._rejected[e.code] += 1
        self.registry.job_refused(consumer)
        self.events.add("refused", f"a {consumer} job was refused ({e.code}): {e.message}",
                        consumer=consumer, code=e.code)

    def client_error(self, e: BrokerError, consumer: str | None, kind: str | None) -> None:
        """A request refused for the client's own fault (a bad or stalled body):
        counted and shown, never against the consumer."""
        e.consumer = e.consumer or consumer
        e.kind = e.kind or kind
        with self._stats_lock:
            self._client_errors[e.code] += 1
        self.events.add("client_error", f"a request for {consumer or 'the broker'} was "
                        f"refused ({e.code}): {e.message}", consumer=consumer, code=e.code)

    def _job_done(self, job: Job, *, ok: bool, reached: bool | None, status: int | None,
                  bytes_in: int, bytes_out: int, error: str | None, hold_busy: bool) -> None:
        run_s = self.clock() - job.started
        job.ran_ok = ok and reached is True
        self.registry.job_finished(job.consumer, ok=ok, reached=reached, error=error)
        with self._stats_lock:
            self._total_jobs += 1
            self._outcomes[(job.consumer, "ok" if ok else "error")] += 1
            self._last_run_ms = run_s * 1000
            self._run_hist.observe(run_s)
        busy = self.config.consumers[job.consumer].busy
        if busy is not None and hold_busy and reached is not False:
            # The consumer may still be working on the GPU (ComfyUI renders
            # after /prompt returns, and goes on when its client has left):
            # hold the lock until it is idle, on a thread of our own so the
            # client's thread is free. The lease's deadline still bounds it.
            self.watch.forget_client(job.lease)
            job.lease.forget_sockets()    # the client's connection lives on without us
            threading.Thread(target=self._release_when_idle, args=(job,), daemon=True,
                             name=f"busy-{job.consumer}").start()
        else:
            job.lease.release()           # first: the next job need not wait for the log
        fields = {"consumer": job.consumer, "kind": job.kind, "status": status, "ok": ok,
                  "wait_ms": round(job.wait_s * 1000, 1), "run_ms": round(run_s * 1000, 1),
                  "bytes_in": bytes_in, "bytes_out": bytes_out, "evicted": job.evicted}
        if error:
            fields["error"] = error
        self.events.add("job", f"{job.consumer} {job.kind or 'upstream'} job "
                        f"{'finished' if ok else 'failed'} ({status}) after "
                        f"{run_s * 1000:.0f} ms, waited {job.wait_s * 1000:.0f} ms", **fields)
        self._log_job(fields)

    def _release_when_idle(self, job: Job) -> None:
        c = self.config.consumers[job.consumer]
        lease = job.lease
        try:
            while time.monotonic() < lease.deadline and not lease.released \
                    and self.actions.is_busy(c):
                self.sleep(self.config.scheduler.busy_poll_s)
            if time.monotonic() >= lease.deadline:
                self.events.add("job_timeout", f"{c.name} was still busy after job_timeout_s; "
                                "releasing the GPU", consumer=c.name)
        except Exception:
            log.exception("busy probe of %s failed; releasing the GPU", c.name)
        finally:
            lease.release()

    @staticmethod
    def _log_job(fields: dict) -> None:
        # With log_format json, JsonFormatter merges ``fields`` into the line.
        job_log.info("job consumer=%s kind=%s status=%s wait_ms=%s run_ms=%s bytes_in=%s "
                     "bytes_out=%s evicted=%s", fields["consumer"], fields["kind"],
                     fields["status"], fields["wait_ms"], fields["run_ms"], fields["bytes_in"],
                     fields["bytes_out"], ",".join(fields["evicted"]) or "-",
                     extra={"fields": {"event": "job", **fields}})

    # -- the order of the queue ------------------------------------------------

    def priority(self, consumer: str, kind: str | None) -> int:
        """A kind's configured priority; a job without a kind (passthrough,
        load) the highest of its consumer's kinds."""
        table = self.config.scheduler.priority
        if kind is not None:
            return table.get(kind, 0)
        return max((table.get(k, 0) for k in self.config.kinds_of(consumer)), default=0)

    def _choose(self, waiting: list[Ticket], now: float) -> int:
        """The GpuLock's chooser (under its mutex, so nothing here may block
        or take the lock): which waiting job runs next, by schedule.py.

        Whether a job fits without an eviction is judged by the sampler's
        latest reading and the beliefs, not a fresh reading (one can take an
        HTTP call or a subprocess, too slow to hold every waiter for). The
        latest reading may predate the last load, so free memory is taken as
        at most the total less what is surely loaded; without a live reading
        it is the ledger's sum. A wrong guess costs order, not safety: the
        job granted still makes room against a fresh reading.
        """
        views = self.registry.views()
        latest = self.sampler.latest()
        live = self.reader.live and latest.free_mib is not None
        total = latest.usable_mib or self.config.gpu.total_mib or sum(
            v.resident_mib for v in views.values())
        if live:
            surely = sum(v.resident_mib if v.loaded else min(v.measured_mib or 0,
                                                              context_allowance(v.resident_mib))
                         for v in views.values() if v.loaded is not None)
            free = min(latest.free_mib, total - surely)
        else:
            free = total - sum(v.resident_mib for v in views.values() if v.loaded is not False)
        fits = {}
        for name in {t.consumer for t in waiting if t.consumer in views}:
            plan = self._plan(name, views, max(0, free), total, live)
            fits[name] = plan.fits and not plan.victims
        choice = choose_next(waiting, fits, self.rules, now)
        # Counted by the lock if this job is granted (it may yet leave).
        waiting[choice.index].saved_swap = choice.saved_swap
        if choice.index:
            log.debug("choosing %s ahead of %d older job(s): %s", waiting[choice.index].label,
                      choice.index, choice.reason)
        return choice.index

    def _estimate_wait(self, ahead: list[Ticket], mean_hold_s: float) -> float:
        """Seconds until a job queued behind ``ahead`` could start: the
        running job, then each job ahead at its consumer's measured run
        time, plus a measured swap (load, and an unload) wherever the
        consumer changes to one not resident. Unmeasured: the mean hold."""
        costs = self.registry.costs()
        resident = {n for n, v in self.registry.views().items() if v.loaded is True}
        unloads = [c.unload_s for c in costs.values() if c.unload_s is not None]
        unload_s = sum(unloads) / len(unloads) if unloads else 0.0
        seconds = mean_hold_s            # the job running now
        for t in ahead:
            c = costs.get(t.consumer)
            run_s = c.run_s if c is not None and c.run_s is not None else mean_hold_s
            seconds += run_s
            if c is not None and t.consumer not in resident:
                # A swap: it loads, and what may not stay beside it goes.
                seconds += (c.load_s or 0.0) + unload_s
                resident = {r for r in resident if self.config.may_coexist(r, t.consumer)}
                resident.add(t.consumer)
        return seconds

    # -- making room (always under the GPU lock) -----------------------------

    def _make_room(self, job: Job, deadline: float,
                   cancelled: Callable[[], bool] | None = None) -> None:
        target = job.consumer
        c = self.config.consumers[target]
        sched = self.config.scheduler
        # Unloaded (or tried) once for this job: never again. A consumer
        # believed unloaded can be a candidate when memory is unexplained,
        # and unloading it again frees no more the second time.
        tried: set[str] = set()
        # Unloaded, memory not yet shown: victim -> (free before, its size,
        # until when to wait on, whether it was surely loaded). A service can
        # free after evict_settle_s: unloading a second consumer beside one
        # surely loaded would be needless, and with nothing more to unload,
        # any of them is worth waiting for.
        unshown: dict[str, tuple[int, int, float, bool]] = {}
        attempts = 0
        asked = False
        # Waiting for VRAM ends with the queue deadline or the lease's, whichever comes first.
        deadline = min(deadline, self.clock() + max(0.0, job.lease.deadline - time.monotonic()))
        # The first jobs after a start: what the consumers say of themselves
        # first (a health `loaded`, ollama's list), so that room is made by
        # knowledge, not by unloading what may hold nothing.
        self.health.wait_first_round(self.config.health.timeout_s + 1.0)
        if not self._busy_checked:
            self._wait_until_idle(deadline)
        while True:
            job.lease.check()
            # Every decision is checked against a fresh reading, also for a
            # target believed resident: beliefs say who may be evicted, the
            # reading says how much is free.
            taken_at = self.clock()
            reading = self.reader.read()
            if reading.free_mib is None or reading.total_mib is None:
                log.warning("no GPU reading (%s): running %s without a VRAM check",
                            reading.error, target)
                break
            self._attribute(reading, taken_at)
            for name, (before, size, until, _) in list(unshown.items()):
                if reading.free_mib - before >= size // 2 or self.clock() >= until:
                    del unshown[name]
            views = self._with_waiting(self.registry.views())
            self._check_beliefs(views, reading)
            for name in tried:
                views[name] = dataclasses.replace(views[name], can_unload=False)
            plan = self.plan(target, views, reading)
            if not asked and (plan.contradicted or not plan.fits):
                # Beliefs that leave no room may be stale (a service unloaded
                # by itself, or was restarted): ask every consumer once, then
                # plan again.
                asked = True
                self.health.ask_all(self.config.health.timeout_s)
                continue
            if plan.contradicted:
                message = (f"{target} was believed resident, but the reading "
                           f"({reading.free_mib} MiB free of {reading.total_mib}, "
                           f"{reading.source}) has no room for it: treating it as not resident")
                log.warning("%s", message)
                self.events.add("belief_corrected", message, consumer=target)
                self.registry.mark_loaded(target, None)
            if plan.never_fits:
                raise InsufficientVram(plan.reason + "; " + self._holders(reading),
                                       need_mib=plan.need_mib, free_mib=reading.free_mib)
            if plan.fits and not plan.victims:
                break
            if plan.fits and any(sure for *_, sure in unshown.values()) \
                    and self.clock() < deadline:
                self.sleep(0.1)            # a victim's memory may still come
                continue
            if plan.fits and attempts < sched.evict_attempts:
                attempts += 1
                victim = plan.victims[0]
                tried.add(victim)
                t0 = self.clock()
                if not self._unload(victim, f"to make room for {target}: {plan.reason}", job,
                                    job.lease):
                    continue
                if self.reader.live:
                    # A victim only possibly loaded may have had nothing to
                    # free: wait less for its memory to show.
                    settle_s = self.config.scheduler.evict_settle_s
                    if views[victim].loaded is not True:
                        settle_s = min(settle_s, UNSURE_SETTLE_S)
                    shown = self._settle(reading.free_mib, views[victim].resident_mib,
                                         plan.need_mib, min(deadline, self.clock() + settle_s))
                    if not shown:
                        unshown[victim] = (reading.free_mib, views[victim].resident_mib,
                                           self.clock() + self.config.scheduler.evict_settle_s,
                                           views[victim].loaded is True)
                if views[victim].loaded is True:     # a real unload: its cost, settle included
                    self.registry.record_cost(victim, "unload", self.clock() - t0)
                continue
            # Nothing more may be evicted. Wait for VRAM only where something
            # may free it by itself (ollama expires its own models, another
            # program exits, a victim frees late), until the job's queue
            # deadline; a ledger that nothing will change refuses at once.
            # A victim measured still holding its memory was asked to free it.
            freeing = any((views[n].measured_mib or 0) > context_allowance(views[n].resident_mib)
                          for n in tried)
            if not (plan.may_free or unshown or freeing) or self.clock() >= deadline:
                raise InsufficientVram(f"{plan.reason}; {self._holders(reading)}",
                                       need_mib=plan.need_mib, free_mib=reading.free_mib)
            if cancelled is not None and cancelled():
                raise Abandoned("the client went away while its job waited for VRAM")
            self.sleep(min(1.0, max(0.0, deadline - self.clock())))
        if c.load is not None and self.registry.loaded(target) is not True:
            job.lease.check()
            self._load(target, deadline, job.lease)

    def _wait_until_idle(self, deadline: float) -> None:
        """Before this broker's first job: a service may still work for the
        one before it (a render ComfyUI began for the old worker of a
        reload, or for a broker that was restarted), which held the GPU
        until its busy probe said idle. Wait for every busy probe, once."""
        self._busy_checked = True
        for c in self.config.consumers.values():
            if c.busy is None:
                continue
            waited = False
            while self.clock() < deadline and self.actions.is_busy(c):
                waited = True
                self.sleep(self.config.scheduler.busy_poll_s)
            if waited:
                self.events.add("busy_at_start", f"waited for {c.name} to finish work it "
                                "began before this worker started", consumer=c.name)

    def _with_waiting(self, views: dict[str, ConsumerView]) -> dict[str, ConsumerView]:
        """The views with how many queued jobs each consumer has: of equally
        few victims, one the queue needs next is spared."""
        waiting = Counter(j.consumer for j in self.lock.snapshot().jobs)
        return {n: dataclasses.replace(v, waiting=waiting[n]) if waiting[n] else v
                for n, v in views.items()}

    def plan(self, target: str, views: dict[str, ConsumerView], reading: GpuReading):
        """What making room for target takes, by this reading and these beliefs."""
        return self._plan(target, views, reading.free_mib, reading.usable_mib, self.reader.live)

    def _plan(self, target: str, views: dict[str, ConsumerView], free_mib: int,
              total_mib: int, live: bool):
        return plan_room(target, views, free_mib=free_mib, total_mib=total_mib,
                         cushion_mib=self.config.gpu.cushion_mib,
                         coexist=self.config.may_coexist, live=live)

    def _settle(self, free_before: int, freed_mib: int, need_mib: int, deadline: float) -> bool:
        """Poll the reading until the unload shows (drivers free memory late);
        False if it did not by ``deadline``."""
        until = min(self.clock() + self.config.scheduler.evict_settle_s, deadline)
        while self.clock() < until:
            r = self.reader.read()
            if r.free_mib is not None and (r.free_mib >= need_mib
                                           or r.free_mib - free_before >= freed_mib // 2):
                return True
            self.sleep(0.05)
        return False

    def _unload(self, victim: str, why: str, job: Job | None, lease: Lease) -> bool:
        c = self.config.consumers[victim]
        t0 = self.clock()
        error = self._call(c, c.unload, lease)
        if error:
            self.registry.unload_failed(victim, error)
            self.events.add("unload_failed", f"unloading {victim} failed: {error}",
                            consumer=victim)
            log.warning("unload of %s failed: %s", victim, error)
            return False
        self.registry.mark_loaded(victim, False, counted="eviction")
        with self._stats_lock:
            self._evictions[victim] += 1
        for_whom = job.consumer if job else None
        if job:
            job.evicted.append(victim)
        ms = (self.clock() - t0) * 1000
        self.events.add("evicted", f"unloaded {victim} {why} ({ms:.0f} ms)", consumer=victim,
                        for_consumer=for_whom, reason=why, ms=round(ms, 1))
        job_log.info("eviction victim=%s for=%s reason=%r ms=%.0f", victim, for_whom, why, ms,
                     extra={"fields": {"event": "eviction", "victim": victim,
                                       "for": for_whom, "reason": why, "ms": round(ms, 1)}})
        return True

    def _load(self, target: str, deadline: float, lease: Lease) -> None:
        c = self.config.consumers[target]
        t0 = self.clock()
        error = self._call(c, c.load, lease)
        sched = self.config.scheduler
        cooldown = self.registry.load_result(target, error, after=sched.load_failures_to_cooldown,
                                             base_s=sched.load_cooldown_s,
                                             max_s=sched.load_cooldown_max_s)
        if cooldown:
            message = (f"{target} failed to load {sched.load_failures_to_cooldown} or more times "
                       f"in a row: refusing its jobs for {cooldown:g} s")
            log.warning("%s", message)
            self.events.add("cooling_down", message, consumer=target, cooldown_s=cooldown)
        if error:
            # Not fatal: a consumer that did not preload cold-starts on the job.
            self.events.add("load_failed", f"loading {target} failed: {error}", consumer=target)
            log.warning("load of %s failed: %s", target, error)
            return
        until = min(self.clock() + self.config.scheduler.evict_settle_s, deadline)
        confirmed = False
        while True:               # at least one probe, however short the settle time
            result = self.health.probe(target)
            if result.ok and result.loaded is True:
                confirmed = True
                break
            if (result.ok and result.loaded is None) or self.clock() >= until:
                break             # it says nothing of its state: the load stays unconfirmed
            self.sleep(0.1)
        if confirmed or (result.ok and result.loaded is None):   # not timed out unconfirmed
            self.registry.record_cost(target, "load", self.clock() - t0)
        # A load no probe confirmed leaves it possibly loaded: counted as
        # resident everywhere, but never believed over a reading.
        self.registry.mark_loaded(target, True if confirmed else None, counted="load")
        with self._stats_lock:
            self._loads[target] += 1
        ms = (self.clock() - t0) * 1000
        self.events.add("loaded", f"loaded {target} ({ms:.0f} ms)", consumer=target,
                        ms=round(ms, 1))

    def _attribute(self, reading: GpuReading, taken_at: float) -> None:
        """Per-process VRAM from the reading, given to the consumers it belongs to."""
        if self.attribution is None or reading.processes is None:
            return
        measured = self.attribution.measure(reading.processes)
        for warning in self.registry.record_measured(measured, taken_at):
            log.warning("%s", warning)
            self.events.add("measured_above_config", warning)

    def _check_beliefs(self, views: dict[str, ConsumerView], reading: GpuReading) -> None:
        """Beliefs that cannot all be true are an event and a warning (once
        per distinct state); the planner resolves them before the job runs."""
        believed = sum(v.resident_mib for v in views.values() if v.loaded is True)
        problem = None
        if believed > reading.usable_mib:
            problem = (f"the consumers believed loaded hold {believed} MiB, more than the "
                       f"GPU's {reading.usable_mib} MiB")
        elif self.reader.live and reading.used_mib is not None and \
                believed > reading.used_mib + self.config.gpu.cushion_mib:
            problem = (f"the consumers believed loaded hold {believed} MiB, but the reading "
                       f"shows only {reading.used_mib} MiB in use")
        signature = (problem is not None,
                     tuple(sorted(n for n, v in views.items() if v.loaded is True)))
        if problem is None or signature == self._last_belief_problem:
            self._last_belief_problem = signature if problem else None
            return
        self._last_belief_problem = signature
        log.warning("beliefs contradicted: %s", problem)
        self.events.add("beliefs_contradicted", problem, believed_mib=believed,
                        used_mib=reading.used_mib, total_mib=reading.total_mib)

    def _settleable(self, c) -> bool:
        """Whether a consumer's unknown state can be settled: by unloading
        it, or by asking (a list of its models, its processes on a live
        reading; a health `loaded` is known only once it answers)."""
        return (c.unload is not None or c.loaded_from is not None
                or (c.pids_from is not None and self.reader.live))

    def _call(self, c, call, lease: Lease) -> str | None:
        """An admin call under a lease ends by the lease's deadline: it must
        not run on beside the next job once the watchdog has moved on."""
        left = lease.deadline - time.monotonic()
        if left <= 0 or lease.cut_reason is not None:
            return f"{call.describe()}: not sent, the GPU lease has ended"
        return self.actions.call(c, call, timeout_s=left)

    def _holders(self, reading: GpuReading) -> str:
        views = self.registry.views()
        held = [f"{v.name} {v.resident_mib} MiB"
                + (" (vram_managed)" if v.vram_managed else "")
                + ("" if v.loaded else " (maybe)")
                for v in views.values() if v.loaded is not False]
        return (f"{reading.free_mib} MiB free of {reading.total_mib} ({reading.source}); "
                f"held: {', '.join(held) or 'nothing the broker knows of'}")

    # -- explicit load / unload ----------------------------------------------

    def unload(self, name: str, *, cancelled: Callable[[], bool] | None = None) -> dict:
        if self.config.consumers[name].unload is None:
            raise BadRequest(f"{name} has no unload route", consumer=name)
        lease = self._acquire(name, None, f"{name}:unload", cancelled, needs_room=False)
        try:
            if not self._unload(name, "on request", None, lease):
                raise UnloadFailed(f"unloading {name} failed: "
                                   f"{self.registry.snapshot()[name]['last_error']}",
                                   consumer=name)
            return {"consumer": name, "loaded": False}
        finally:
            lease.release()

    def load(self, name: str, *, cancelled: Callable[[], bool] | None = None) -> dict:
        """Make room for ``name`` and call its load route, under the lock.
        Without a load route it still makes room: it loads on its first job."""
        job = self._room_for(name, None, f"{name}:load", cancelled)
        job.lease.release()
        return {"consumer": name, "loaded": self.registry.loaded(name), "evicted": job.evicted}

    def _idle_unloader(self) -> None:
        while not self._stop.wait(1.0):
            now = self.clock()
            for name, c in self.config.consumers.items():
                if not c.idle_unload_s or c.unload is None:
                    continue
                since = self.registry.idle_since(name)
                if since is None or now - since < c.idle_unload_s:
                    continue
                ticket = self.lock.try_acquire(f"{name}:idle-unload", consumer=name)
                if ticket is None:
                    continue              # the GPU is busy: not idle, try later
                if not self.oslock.try_acquire():
                    self.lock.release(ticket)     # busy in another process
                    continue
                lease = self._lease(ticket, ticket.label)
                try:
                    self._unload(name, f"after {c.idle_unload_s:g} s idle", None, lease)
                finally:
                    lease.release()

    # -- status --------------------------------------------------------------

    def _health_changed(self, name: str, ok: bool, error: str | None) -> None:
        self.events.add("health", f"{name} is {'healthy again' if ok else 'unhealthy: ' + str(error)}",
                        consumer=name, healthy=ok)
        (log.info if ok else log.warning)("%s health: %s", name, "ok" if ok else error)

    def liveness(self) -> list[str]:
        """Why the broker cannot schedule any more, if it cannot (empty: it can)."""
        problems = []
        now = time.monotonic()
        for lease in self.watch.held():
            if now > lease.deadline + self.watch.grace_s + 1:
                problems.append(f"{lease.label} holds the GPU {now - lease.deadline:.0f} s past "
                                "its deadline")
        snap = self.lock.snapshot()
        stuck_after = self.config.scheduler.queue_timeout_s + 10
        if snap.oldest_queued_s is not None and snap.oldest_queued_s > stuck_after:
            problems.append(f"the queue's head has waited {snap.oldest_queued_s:.0f} s, past "
                            "its deadline")
        if snap.holder is None and self.oslock.held_elsewhere():
            if self._foreign_since is None:
                self._foreign_since = now
            elif now - self._foreign_since > self.config.scheduler.queue_timeout_s:
                problems.append(
                    f"another process has held the GPU lock file {self.oslock.path} for "
                    f"{now - self._foreign_since:.0f} s: {self.oslock.describe_holder()}")
        else:
            self._foreign_since = None
        if not self.watch.alive:
            problems.append("the lease watchdog thread died")
        if not self.sampler.alive:
            problems.append("the GPU sampler thread died")
        dead = self.health.dead()
        if dead:
            problems.append(f"the health probe thread of {', '.join(dead)} died")
        return problems

    def stats(self) -> dict:
        """A consistent copy of the counters, for /v1/status and /metrics."""
        snap = self.lock.snapshot()
        # Outside _stats_lock: a look at the lock file is a syscall or two.
        holder_pid = (self.oslock.holder_pid()
                      if snap.holder or self.oslock.held_elsewhere() else None)
        with self._stats_lock:
            lease = self._current
            job = lease.job if lease is not None else None
            running = None
            if lease is not None:
                running = {"label": lease.label,
                           "consumer": job.consumer if job else lease.label.split(":")[0],
                           "kind": job.kind if job else None,
                           "running_s": round(time.monotonic() - lease.granted_at, 3),
                           "deadline_in_s": round(lease.deadline - time.monotonic(), 3),
                           "cut": lease.cut_reason,
                           "evicted": list(job.evicted) if job else []}
            return {
                "queue_depth": snap.queue_depth,
                "in_flight": 1 if snap.holder else 0,
                "running": running,
                "waiting": list(snap.waiting),
                # Per waiting job, oldest first: how often a younger job went ahead of it.
                "waiting_jobs": [dataclasses.asdict(w) for w in snap.jobs],
                "policy": self.rules.policy,
                "max_bypass": self.rules.max_bypass,
                "max_delay_s": self.rules.max_delay_s,
                "priority": dict(self.config.scheduler.priority),
                "reordered": snap.reordered,
                "swaps_saved": snap.swaps_saved,
                "max_bypassed": self._max_bypassed,
                "max_late_s": round(self._max_late_s, 3),
                "oldest_queued_s": round(snap.oldest_queued_s, 3)
                if snap.oldest_queued_s is not None else None,
                "total_jobs": self._total_jobs,
                "rejected": sum(self._rejected.values()),
                "rejected_by_code": dict(self._rejected),
                "abandoned": self._abandoned,
                "client_errors": sum(self._client_errors.values()),
                "client_errors_by_code": dict(self._client_errors),
                "leases_expired": self._leases_expired,
                "lock_file": {"path": self.oslock.path, "holder_pid": holder_pid},
                "last_wait_ms": round(self._last_wait_ms, 1) if self._last_wait_ms is not None else None,
                "last_run_ms": round(self._last_run_ms, 1) if self._last_run_ms is not None else None,
                "evictions": sum(self._evictions.values()),
                "loads": sum(self._loads.values()),
                "outcomes": dict(self._outcomes),
                "evictions_by_consumer": dict(self._evictions),
                "loads_by_consumer": dict(self._loads),
                "wait_seconds": self._wait_hist.snapshot(),
                "run_seconds": self._run_hist.snapshot(),
            }

    def status(self) -> dict:
        stats = self.stats()
        reading = self.sampler.latest()
        gpu = reading.to_json()
        gpu["live"] = self.reader.live
        gpu["age_s"] = round(max(0.0, time.time() - reading.sampled_at), 3)
        gpu["cushion_mib"] = self.config.gpu.cushion_mib
        consumers = self.registry.snapshot()
        gpu["holders"] = holders = [
            {"consumer": n, "mib": c["vram_resident_mib"], "loaded": c["loaded"]}
            for n, c in consumers.items() if c["loaded"] is not False and c["vram_resident_mib"]]
        # What the reading shows in use beyond what the broker accounts for:
        # a desktop, another program, or a consumer larger than its config says.
        gpu["other_mib"] = (max(0, reading.used_mib - sum(h["mib"] for h in holders))
                            if reading.used_mib is not None else None)
        for private in ("outcomes", "evictions_by_consumer", "loads_by_consumer",
                        "wait_seconds", "run_seconds"):
            stats.pop(private)
        problems = self.liveness()
        return {
            "broker": {"version": __version__, "pid": os.getpid(),
                       "uptime_s": round(time.time() - self.started_at, 3),
                       "started_at": iso_utc(self.started_at), "config": self.config.path,
                       "config_error": self.config_error,
                       "live": not problems, "problems": problems,
                       "shutting_down": self.shutting_down},
            "gpu": gpu,
            "consumers": consumers,
            "routes": dict(self.config.routes),
            "scheduler": stats,
        }
