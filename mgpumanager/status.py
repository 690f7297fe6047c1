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
from .device import Gpu
from .order import QueueOrder
from .stats import Stats


class StatusView:
    def __init__(self, config: Config, registry: ConsumerRegistry, health: HealthMonitor,
                 gpu: Gpu, order: QueueOrder, stats: Stats, clock: Clock):
        self.config = config
        self.registry = registry
        self.health = health
        self.gpu = gpu
        self.order = order
        self.stats = stats
        self.clock = clock
        self.started_at = clock.wall()

    def liveness(self) -> list[str]:
        """Why the broker cannot schedule any more, if it cannot (empty: it can)."""
        problems = self.gpu.problems(self.config.scheduler.queue_timeout_s)
        dead = self.health.dead()
        if dead:
            problems.append(f"the health probe thread of {', '.join(dead)} died")
        return problems

    def scheduler(self) -> dict:
        """The queue, the running job and the counters: /v1/status's ``scheduler``."""
        gpu, now = self.gpu, self.clock.now()
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
        rules = self.order.rules
        return {
            "queue_depth": snap.queue_depth,
            "in_flight": 1 if snap.holder else 0,
            "running": running,
            "waiting": list(snap.waiting),
            # Per waiting job, oldest first: how often a younger job went ahead of it.
            "waiting_jobs": [dataclasses.asdict(w) for w in snap.jobs],
            "policy": rules.policy,
            "max_bypass": rules.max_bypass,
            "max_delay_s": rules.max_delay_s,
            "priority": dict(self.config.scheduler.priority),
            "reordered": snap.reordered,
            "swaps_saved": snap.swaps_saved,
            "max_bypassed": gpu.max_bypassed,
            "max_late_s": round(gpu.max_late_s, 3),
            "oldest_queued_s": round(snap.oldest_queued_s, 3)
            if snap.oldest_queued_s is not None else None,
            "lock_file": {"path": gpu.oslock.path, "holder_pid": holder_pid},
            **self.stats.counts(),
        }

    def status(self, *, config_error: str | None, shutting_down: bool) -> dict:
        stats = self.scheduler()
        for private in ("evictions_by_consumer", "loads_by_consumer"):
            stats.pop(private)
        reading = self.gpu.sampler.latest()
        gpu = reading.to_json()
        gpu["live"] = self.gpu.live
        gpu["age_s"] = round(max(0.0, self.clock.wall() - reading.sampled_at), 3)
        gpu["cushion_mib"] = self.config.gpu.cushion_mib
        consumers = self.registry.snapshot()
        gpu["holders"] = holders = [
            {"consumer": n, "mib": c["vram_resident_mib"], "loaded": c["loaded"]}
            for n, c in consumers.items() if c["loaded"] is not False and c["vram_resident_mib"]]
        # What the reading shows in use beyond what the broker accounts for:
        # a desktop, another program, or a consumer larger than its config says.
        gpu["other_mib"] = (max(0, reading.used_mib - sum(h["mib"] for h in holders))
                            if reading.used_mib is not None else None)
        problems = self.liveness()
        return {
            "broker": {"version": __version__, "pid": os.getpid(),
                       "uptime_s": round(self.clock.wall() - self.started_at, 3),
                       "started_at": iso_utc(self.started_at), "config": self.config.path,
                       "config_error": config_error,
                       "live": not problems, "problems": problems,
                       "shutting_down": shutting_down},
            "gpu": gpu,
            "consumers": consumers,
            "routes": dict(self.config.routes),
            "scheduler": stats,
        }
