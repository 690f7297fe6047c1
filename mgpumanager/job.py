"""The life of one GPU job, top to bottom.

    start:  health -> its turn on the GPU -> room made     (Jobs.start)
    run:    the caller proxies the request under job.lease
    finish: outcome -> statistics -> release, or hold while busy  (Jobs.finish)

Every way out of ``start`` either returns a running Job, whose lease holds
the GPU, or raises a BrokerError with nothing held and the refusal counted.
Every way out of the run ends in ``Job.finish`` exactly once: the answer
read whole or cut, the client gone, the upstream broken, or the watchdog
past the lease's deadline (``Jobs.expired``). Explicit loads and unloads
(``/v1/consumers/<name>/load``) and the idle unloader take the same turn,
and so does a GPU lease for a program the broker does not proxy
(``Jobs.start_lease``: its ``Tenant`` stands in for a consumer in the
planner; program_leases.py holds the rest of its life).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable

from .clock import Clock
from .config import Config
from .consumers import ConsumerActions, ConsumerRegistry
from .device import Gpu, Gpus
from .errors import (Abandoned, BadRequest, BrokerError, ConsumerCoolingDown, ConsumerUnhealthy,
                     UnloadFailed)
from .lease import JOB_TIMEOUT, Lease, LeaseCut
from .order import QueueOrder
from .room import RoomMaker, Tenant
from .stats import Stats

log = logging.getLogger("mgpumanager.job")

# A GPU lease's job: its kind, and the name its program has in the planner.
LEASE_KIND = "lease"


class Job:
    """One GPU job: what it is for, and its lease on the GPU."""

    def __init__(self, jobs: "Jobs", gpus: list[Gpu], lease: Lease, consumer: str,
                 kind: str | None, tenant: Tenant | None = None):
        self._jobs = jobs
        self.gpu = gpus[0]                   # the first of its GPUs: its watchdog ends the lease
        self.gpus = [g.index for g in gpus]
        self.lease = lease
        lease.job = self
        self.consumer = consumer
        self.kind = kind
        self.tenant = tenant                 # a GPU lease's program, not a consumer
        for companion in lease.companions:   # its turns on other GPUs show it too
            companion.job = self
        self.on_finish: Callable[[], None] | None = None   # as it ends, before the release
        self.started = lease.granted_at
        self.evicted: list[str] = []
        self.was_loaded: bool | None = None  # its consumer's state as the job began
        self.ran_ok = False                  # it reached the consumer and was read whole
        self.run_recorded = False
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
        self._jobs.finish(self, ok=ok, reached=reached, status=status, bytes_in=bytes_in,
                          bytes_out=bytes_out, error=error, hold_busy=hold_busy)


class Jobs:
    def __init__(self, config: Config, registry: ConsumerRegistry, actions: ConsumerActions,
                 gpus: Gpus, order: QueueOrder, room: RoomMaker, stats: Stats, clock: Clock):
        self.config = config
        self.registry = registry
        self.actions = actions
        self.gpus = gpus
        self.order = order
        self.room = room
        self.stats = stats
        self.clock = clock

    # -- start -------------------------------------------------------------------

    def start(self, consumer: str, kind: str | None = None, *,
              cancelled: Callable[[], bool] | None = None, client_sock=None) -> Job:
        """Wait for the GPU (in the queue's order, by one deadline), make room
        for ``consumer``, and return the running Job, whose lease holds the
        GPU and watches ``client_sock``: the client hanging up cuts it. Raises
        a BrokerError, with nothing held, if refused."""
        job = self._room_for(consumer, kind, f"{consumer}:{kind or 'upstream'}", cancelled)
        if client_sock is not None:
            job.lease.attach(client_sock)
            job.gpu.watch.watch_client(job.lease, client_sock)
        job.started = self.clock.now()
        job.was_loaded = self.registry.loaded(consumer)
        self.registry.job_started(consumer)
        self.stats.job_started(job.wait_s)
        return job

    def start_lease(self, tenant: Tenant, label: str, hold_s: float,
                    cancelled: Callable[[], bool] | None = None) -> Job:
        """A GPU lease for a program the broker does not proxy: the same
        queue, deadline and room making as a job, for ``tenant.vram_mib``,
        held at most ``hold_s`` from its turn."""
        job = self._room_for(tenant.name, LEASE_KIND, label, cancelled, tenant, hold_s)
        job.started = self.clock.now()
        self.stats.job_started(job.wait_s)
        return job

    def _room_for(self, consumer: str, kind: str | None, label: str,
                  cancelled: Callable[[], bool] | None, tenant: Tenant | None = None,
                  hold_s: float | None = None) -> Job:
        """Health, the turn, room made: a Job holding the GPU (not yet counted as begun)."""
        deadline = self.clock.now() + self.config.scheduler.queue_timeout_s
        try:
            if tenant is None:
                self.check_healthy(consumer, kind)
            if cancelled is not None and cancelled():
                raise Abandoned("the client went away before its job queued")
            priority = self.order.priority(consumer, kind)
            gpus = self.gpus_of(consumer, tenant)
            lease = self.gpus.take_turns(gpus, label, deadline, consumer=consumer, kind=kind,
                                         priority=priority, needs_room=True,
                                         cancelled=cancelled, hold_s=hold_s)
        except BrokerError as e:
            self._refused(e, consumer, kind)
            raise
        job = Job(self, gpus, lease, consumer, kind, tenant)
        try:
            self.room.make_room(consumer, lease, deadline, cancelled, gpus, evicted=job.evicted,
                                tenant=tenant)
        except BaseException as e:
            lease.release()
            if isinstance(e, LeaseCut):
                e = Abandoned(f"the job was cut while it made room ({e.reason})")
                self._refused(e, consumer, kind)
                raise e from None
            if isinstance(e, BrokerError):
                self._refused(e, consumer, kind)
            raise
        return job

    def gpus_of(self, consumer: str, tenant: Tenant | None = None) -> list[Gpu]:
        return self.gpus.of(tenant.gpus if tenant is not None
                            else self.config.consumers[consumer].gpus)

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
            ago = self.clock.wall() - probed_at if probed_at else 0.0
            raise ConsumerUnhealthy(f"{name} failed its last health probe {ago:.1f} s ago: {error}",
                                    consumer=name, kind=kind)

    def _refused(self, e: BrokerError, consumer: str, kind: str | None) -> None:
        self.stats.refused(e, consumer, kind)
        if not isinstance(e, Abandoned) and consumer in self.config.consumers:
            self.registry.job_refused(consumer)

    # -- finish ------------------------------------------------------------------

    def finish(self, job: Job, *, ok: bool, reached: bool | None, status: int | None,
               bytes_in: int, bytes_out: int, error: str | None, hold_busy: bool) -> None:
        run_s = self.clock.now() - job.started
        job.ran_ok = ran_ok = ok and reached is True
        if job.tenant is None:
            self.registry.job_finished(job.consumer, ok=ok, reached=reached, error=error)
        self.stats.job_counted(job.consumer, ok, run_s)
        busy = self.config.consumers[job.consumer].busy if job.tenant is None else None
        if busy is not None and hold_busy and reached is not False:
            # The consumer may still be working on the GPU (ComfyUI renders
            # after /prompt returns, and goes on when its client has left):
            # hold the turn until it is idle, on a thread of our own so the
            # client's thread is free. The lease's deadline still bounds it.
            job.gpu.watch.forget_client(job.lease)
            job.lease.forget_sockets()    # the client's connection lives on without us
            threading.Thread(target=self._release_when_idle, args=(job, ran_ok), daemon=True,
                             name=f"busy-{job.consumer}").start()
        else:
            if job.on_finish is not None:
                job.on_finish()           # before the release: the next job's planner sees it gone
            self._release(job, ran_ok)    # first: the next job need not wait for the log
        fields = {"consumer": job.consumer, "kind": job.kind, "status": status, "ok": ok,
                  "wait_ms": round(job.wait_s * 1000, 1), "run_ms": round(run_s * 1000, 1),
                  "bytes_in": bytes_in, "bytes_out": bytes_out, "evicted": job.evicted,
                  "gpus": job.gpus}
        if job.tenant is not None:
            fields["label"] = job.lease.label
        if error:
            fields["error"] = error
        self.stats.job_done(fields)

    def _release(self, job: Job, ran_ok: bool) -> None:
        released_at = self.clock.now()    # before the hand-off: it is the next job's time
        if job.lease.release():
            self._record_run(job, ran_ok, released_at)

    def _record_run(self, job: Job, ran_ok: bool, released_at: float) -> None:
        with job._finish_lock:            # once, by whichever release came first
            if job.run_recorded:
                return
            job.run_recorded = True
        if ran_ok and job.was_loaded is not None and job.tenant is None:
            # Its hold, busy time included, is what the next job waits for;
            # from an unknown state, it is neither a warm run nor a load.
            self.registry.record_run(job.consumer, released_at - job.started,
                                     cold=job.was_loaded is False)

    def _release_when_idle(self, job: Job, ran_ok: bool) -> None:
        c = self.config.consumers[job.consumer]
        lease = job.lease
        try:
            idle = self.clock.wait_until(lambda: lease.released or not self.actions.is_busy(c),
                                         lease.deadline, self.config.scheduler.busy_poll_s)
            if lease.expired or not idle:
                self.stats.events.add("job_timeout", f"{c.name} was still busy after "
                                      "job_timeout_s; releasing the GPU", consumer=c.name)
        except Exception:
            log.exception("busy probe of %s failed; releasing the GPU", c.name)
        finally:
            self._release(job, ran_ok)

    def expired(self, lease: Lease) -> None:
        """The watchdog's last resort: a lease still held past its deadline
        and the grace after it. Its sockets were shut at the deadline; it is
        released right after this, whatever its thread is doing."""
        lease.expired = True
        lease.cut(JOB_TIMEOUT)
        self.stats.leases_expired.inc()
        message = (f"{lease.label} still held the GPU {self.gpus.first.watch.grace_s:g} s past "
                   f"scheduler.job_timeout_s; the watchdog released it")
        log.warning("%s", message)
        self.stats.events.add("lease_expired", message, label=lease.label)
        job = lease.job
        if job is not None:
            job.finish(ok=False, reached=None, error="released by the watchdog after "
                       "scheduler.job_timeout_s", hold_busy=False)
            # A busy hold the watchdog ends: the run it had was whole.
            self._record_run(job, job.ran_ok, self.clock.now())

    # -- explicit load and unload, and the idle unloader ---------------------------

    def load(self, name: str, *, cancelled: Callable[[], bool] | None = None) -> dict:
        """Make room for ``name`` and call its load route, under the turn.
        Without a load route it still makes room: it loads on its first job."""
        job = self._room_for(name, None, f"{name}:load", cancelled)
        job.lease.release()
        return {"consumer": name, "loaded": self.registry.loaded(name), "evicted": job.evicted}

    def unload(self, name: str, *, cancelled: Callable[[], bool] | None = None) -> dict:
        if self.config.consumers[name].unload is None:
            raise BadRequest(f"{name} has no unload route", consumer=name)
        deadline = self.clock.now() + self.config.scheduler.queue_timeout_s
        try:
            lease = self.gpus.take_turns(self.gpus_of(name), f"{name}:unload", deadline,
                                         consumer=name, kind=None,
                                         priority=self.order.priority(name, None),
                                         needs_room=False, cancelled=cancelled)
        except BrokerError as e:
            self._refused(e, name, None)
            raise
        try:
            if not self.room.swaps.unload(name, "on request", None, lease):
                raise UnloadFailed(f"unloading {name} failed: "
                                   f"{self.registry.snapshot()[name]['last_error']}",
                                   consumer=name)
            return {"consumer": name, "loaded": False}
        finally:
            lease.release()

    def unload_idle(self) -> None:
        """Unload every consumer idle past its idle_unload_s, if the GPU is free now."""
        now = self.clock.now()
        for name, c in self.config.consumers.items():
            if not c.idle_unload_s or c.unload is None:
                continue
            since = self.registry.idle_since(name)
            if since is None or now - since < c.idle_unload_s:
                continue
            lease = self.gpus.try_turns(self.gpus_of(name), f"{name}:idle-unload", name)
            if lease is None:
                continue                  # the GPU is busy, here or elsewhere: try later
            try:
                self.room.swaps.unload(name, f"after {c.idle_unload_s:g} s idle", None, lease)
            finally:
                lease.release()
