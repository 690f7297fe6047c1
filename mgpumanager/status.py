"""What the broker shows of itself: ``/v1/status``, ``/healthz``'s liveness,
and the scheduler figures ``/metrics`` shares with them.

Read-only: nothing here changes state or waits on a service; a look at
the lock file is a syscall or two.
"""

from __future__ import annotations

import dataclasses
import os

from . import __version__
from .clock import Clock, iso_utc
from .config import Config
from .consumers import ConsumerRegistry, HealthMonitor
from .device import Gpu, Gpus
from .order import QueueOrder
from .stats import Stats


class StatusView:
    def __init__(self, config: Config, registry: ConsumerRegistry, health: HealthMonitor,
                 gpus: Gpus, order: QueueOrder, stats: Stats, clock: Clock):
        self.config = config
        self.registry = registry
        self.health = health
        self.gpus = gpus
        self.order = order
        self.stats = stats
        self.clock = clock
        self.started_at = clock.wall()

    def liveness(self) -> list[str]:
        """Why the broker cannot schedule any more, if it cannot (empty: it can)."""
        problems = self.gpus.problems(self.config.scheduler.queue_timeout_s)
        dead = self.health.dead()
        if dead:
            problems.append(f"the health probe thread of {', '.join(dead)} died")
        return problems

    def _queue(self, gpu: Gpu, now: float) -> tuple[dict, object]:
        """One GPU's queue and running job, and the lease it holds (or None)."""
        snap = gpu.lock.snapshot()
        holder_pid = (gpu.oslock.holder_pid()
                      if snap.holder or gpu.oslock.held_elsewhere() else None)
        lease = gpu.current
        job = lease.job if lease is not None else None
        running = None
        if lease is not None:
            running = {"label": lease.label,
                       "consumer": job.consumer if job else lease.label.split(":")[0],
                       "kind": job.kind if job else None,
                       "running_s": round(now - lease.granted_at, 3),
                       "deadline_in_s": round(lease.deadline - now, 3),
                       "cut": lease.cut_reason,
                       "evicted": list(job.evicted) if job else []}
        return {
            "queue_depth": snap.queue_depth,
            "in_flight": 1 if snap.holder else 0,
            "running": running,
            "waiting": list(snap.waiting),
            # Per waiting job, oldest first: how often a younger job went ahead of it.
            "waiting_jobs": [dataclasses.asdict(w) for w in snap.jobs],
            "reordered": snap.reordered,
            "swaps_saved": snap.swaps_saved,
            "max_bypassed": gpu.max_bypassed,
            "max_late_s": round(gpu.max_late_s, 3),
            "oldest_queued_s": round(snap.oldest_queued_s, 3)
            if snap.oldest_queued_s is not None else None,
            "lock_file": {"path": gpu.oslock.path, "holder_pid": holder_pid},
        }, lease

    def scheduler(self, queues: list[tuple[dict, object]]) -> dict:
        """The queues, the running jobs and the counters: /v1/status's
        ``scheduler``, over every GPU (each GPU's own is in ``gpus``)."""
        rules = self.order.rules
        return {**self._summed(queues), "policy": rules.policy,
                "max_bypass": rules.max_bypass, "max_delay_s": rules.max_delay_s,
                "priority": dict(self.config.scheduler.priority), **self.stats.counts()}

    @staticmethod
    def _summed(with_leases: list[tuple[dict, object]]) -> dict:
        """The GPUs' queues as one: a job spanning several is one job."""
        queues = [q for q, _ in with_leases]
        first = queues[0]
        if len(queues) == 1:
            return dict(first)
        # A turn held without a job (an unload) counts too; a companion,
        # the turn on another card of a lease counted already, does not.
        leases = [lease for _, lease in with_leases if lease is not None]
        companions = {id(c) for lease in leases for c in lease.companions}
        jobs = {id(lease) for lease in leases if id(lease) not in companions}
        ages = [q["oldest_queued_s"] for q in queues if q["oldest_queued_s"] is not None]
        return {
            "queue_depth": sum(q["queue_depth"] for q in queues),
            "in_flight": len(jobs),
            "running": next((q["running"] for q in queues if q["running"]), None),
            "waiting": [w for q in queues for w in q["waiting"]],
            "waiting_jobs": [w for q in queues for w in q["waiting_jobs"]],
            "reordered": sum(q["reordered"] for q in queues),
            "swaps_saved": sum(q["swaps_saved"] for q in queues),
            "max_bypassed": max(q["max_bypassed"] for q in queues),
            "max_late_s": max(q["max_late_s"] for q in queues),
            "oldest_queued_s": max(ages) if ages else None,
            "lock_file": first["lock_file"],
        }

    def _reading(self, gpu: Gpu, consumers: dict[str, dict]) -> dict:
        reading = gpu.sampler.latest()
        out = reading.to_json()
        out["live"] = gpu.live
        out["age_s"] = round(max(0.0, self.clock.wall() - reading.sampled_at), 3)
        out["cushion_mib"] = self.config.gpu.cushion_mib
        on_it = set(self.config.on_gpu(gpu.index))
        out["holders"] = holders = [
            {"consumer": n, "mib": self.config.consumers[n].share_mib(c["vram_resident_mib"]),
             "loaded": c["loaded"]}
            for n, c in consumers.items()
            if n in on_it and c["loaded"] is not False and c["vram_resident_mib"]]
        # What the reading shows in use beyond what the broker accounts for:
        # a desktop, another program, or a consumer larger than its config says.
        out["other_mib"] = (max(0, reading.used_mib - sum(h["mib"] for h in holders))
                            if reading.used_mib is not None else None)
        return out

    def status(self, *, config_error: str | None, shutting_down: bool) -> dict:
        now = self.clock.now()
        queues = [self._queue(g, now) for g in self.gpus]
        stats = self.scheduler(queues)
        for private in ("evictions_by_consumer", "loads_by_consumer"):
            stats.pop(private)
        consumers = self.registry.snapshot()
        gpus = [{**self._reading(gpu, consumers), "consumers": self.config.on_gpu(gpu.index),
                 "queue": queue} for gpu, (queue, _) in zip(self.gpus, queues)]
        problems = self.liveness()
        first = {k: v for k, v in gpus[0].items() if k not in ("queue", "consumers")}
        return {
            "broker": {"version": __version__, "pid": os.getpid(),
                       "uptime_s": round(self.clock.wall() - self.started_at, 3),
                       "started_at": iso_utc(self.started_at), "config": self.config.path,
                       "config_error": config_error,
                       "live": not problems, "problems": problems,
                       "shutting_down": shutting_down},
            "gpu": first,
            "gpus": gpus,
            "consumers": consumers,
            "routes": dict(self.config.routes),
            "scheduler": stats,
        }
