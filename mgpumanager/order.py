"""The order of the queue: a job's priority, who goes next, how long a wait is.

``QueueOrder.choose`` and ``estimate_wait`` are called by the GPU lock
under its mutex, so nothing here blocks or takes that lock: they read the
sampler's latest reading and the registry's beliefs, never a fresh reading
(one can take an HTTP call or a subprocess, too slow to hold every waiter
for). A wrong guess here costs order, not safety: the job granted still
makes room against a fresh reading (room.py).
"""

from __future__ import annotations

import logging
from typing import Callable

from .config import Config
from .consumers import ConsumerRegistry
from .gpu import GpuReading
from .gpulock import Ticket
from .policy import context_allowance, plan_room
from .schedule import Rules, alike, choose_next

log = logging.getLogger("mgpumanager.order")


class QueueOrder:
    """The policy over every GPU's queue; ``choose`` and ``estimate_wait``
    for one GPU are bound to it with ``functools.partial`` (the lock calls
    them with the queue alone)."""

    def __init__(self, config: Config, registry: ConsumerRegistry):
        self.config = config
        self.registry = registry
        sched = config.scheduler
        self.rules = Rules(sched.policy, sched.max_bypass, sched.max_delay_s)

    @property
    def reorders(self) -> bool:
        return self.rules.policy != "fifo"

    def priority(self, consumer: str, kind: str | None) -> int:
        """A kind's configured priority; a job without a kind (passthrough,
        load) the highest of its consumer's kinds."""
        table = self.config.scheduler.priority
        if kind is not None:
            return table.get(kind, 0)
        return max((table.get(k, 0) for k in self.config.kinds_of(consumer)), default=0)

    def choose(self, waiting: list[Ticket], now: float, *, gpu: int = 0,
               latest: Callable[[], GpuReading], live: bool,
               total_mib: int | None = None) -> int:
        """Which job waiting for GPU ``gpu`` runs next, by schedule.py.

        Whether a job fits without an eviction is judged by the latest
        reading and the beliefs. The latest reading may predate the last
        load, so free memory is taken as at most the total less what is
        surely loaded; without a live reading it is the ledger's sum.
        """
        if alike(waiting):            # a burst for one consumer: nothing to judge
            waiting[0].saved_swap = False
            return 0
        views = self.registry.views(gpu)
        latest_reading = latest()
        live = live and latest_reading.free_mib is not None
        total = latest_reading.usable_mib or total_mib or sum(
            v.resident_mib for v in views.values())
        if live:
            surely = sum(v.resident_mib if v.loaded else min(v.measured_mib or 0,
                                                              context_allowance(v.resident_mib))
                         for v in views.values() if v.loaded is not None)
            free = min(latest_reading.free_mib, total - surely)
        else:
            free = total - sum(v.resident_mib for v in views.values() if v.loaded is not False)
        fits = {}
        for name in {t.consumer for t in waiting if t.consumer in views}:
            plan = plan_room(name, views, free_mib=max(0, free), total_mib=total,
                             cushion_mib=self.config.gpu.cushion_mib,
                             coexist=self.config.may_coexist, live=live)
            fits[name] = plan.fits and not plan.victims
        choice = choose_next(waiting, fits, self.rules, now)
        # Counted by the lock if this job is granted (it may yet leave).
        waiting[choice.index].saved_swap = choice.saved_swap
        if choice.index:
            log.debug("choosing %s ahead of %d older job(s): %s", waiting[choice.index].label,
                      choice.index, choice.reason)
        return choice.index

    def estimate_wait(self, ahead: list[Ticket], mean_hold_s: float, *, gpu: int = 0) -> float:
        """Seconds until a job queued behind ``ahead`` could start: the
        running job, then each job ahead at its consumer's measured run
        time, plus a measured swap (load, and an unload) wherever the
        consumer changes to one not resident. Unmeasured: the mean hold."""
        costs = self.registry.costs()
        resident = {n for n, v in self.registry.views(gpu).items() if v.loaded is True}
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
