"""Making room on the GPU for a job's consumer, always with the GPU's turn held.

``RoomMaker.make_room`` plans against a fresh reading and the registry's
beliefs (policy.py decides; this module acts), unloads one victim at a
time, waits for its memory to show, and loads the target; a target
believed resident that a recent reading agrees with takes the short path
(``still_resident``) and none of that. ``Swaps`` makes
the load and unload calls, each bounded by the lease, with their
bookkeeping. ``MemoryAttribution`` gives each reading's per-process memory
to the consumers it belongs to.

Why it asks before it unloads: right after a start, or when beliefs leave
no room, the beliefs may be stale (a service unloaded by itself, or was
restarted); what the consumers say of themselves comes first, so that room
is made by knowledge, not by unloading what may hold nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Callable

from .clock import Clock
from .config import Call, Config, ConsumerConfig
from .consumers import ConsumerActions, ConsumerRegistry, HealthMonitor
from .device import Gpu, Gpus
from .errors import Abandoned, InsufficientVram
from .gpu import GpuReading
from .lease import Lease
from .policy import ConsumerView, context_allowance, plan_room, resident_agrees
from .procs import Attribution
from .stats import Stats

log = logging.getLogger("mgpumanager.room")

# How long to wait for the memory of a victim that was only possibly
# loaded: if it held nothing, nothing will show.
UNSURE_SETTLE_S = 1.5

# The oldest sampler reading the short path takes (and never more than one
# and a half sampling intervals, so that with a short interval it is fresher).
FRESH_READING_S = 3.0


@dataclasses.dataclass(frozen=True)
class Tenant:
    """A program the broker does not proxy (a GPU lease), as the planner
    sees it: ``vram_mib`` to make room for (split evenly over its ``gpus``,
    as a consumer's is), and the consumers it may stay beside (none unless
    named)."""
    name: str
    vram_mib: int
    coexist: frozenset[str] = frozenset()
    gpus: tuple[int, ...] = (0,)

    def view(self) -> ConsumerView:
        """As the planner sees it on each of its GPUs."""
        return ConsumerView(self.name, -(-self.vram_mib // len(self.gpus)), loaded=False,
                            last_used=None)

    def may_coexist(self, others: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
        def may(a: str, b: str) -> bool:
            if a == self.name:
                return b in self.coexist
            if b == self.name:
                return a in self.coexist
            return others(a, b)
        return may


def settleable(c: ConsumerConfig, live: bool) -> bool:
    """Whether a consumer's unknown state can be settled: by unloading it,
    or by asking (a list of its models, its processes on a live reading; a
    health `loaded` is known only once it answers)."""
    return c.unload is not None or c.loaded_from is not None or (c.pids_from is not None
                                                                and live)


class MemoryAttribution:
    """Per-process VRAM from a reading, given to the consumers it belongs to.

    A consumer is measured on its first GPU: one spanning several holds
    about its share on each, and more than a CUDA context there means
    loaded, as it does on one."""

    def __init__(self, config: Config, registry: ConsumerRegistry, stats: Stats):
        self.attributions: dict[int, Attribution] = {}
        for d in config.devices:
            sources = {n: c.pids_from for n, c in config.consumers.items()
                       if c.pids_from and c.gpus[0] == d.index}
            if sources:
                self.attributions[d.index] = Attribution(sources)
        self.config = config
        self.registry = registry
        self.stats = stats

    def __call__(self, reading: GpuReading, taken_at: float, gpu: int = 0) -> None:
        attribution = self.attributions.get(gpu)
        if attribution is None or reading.processes is None:
            return
        measured = attribution.measure(reading.processes)
        # One spanning n GPUs holds about n times its first GPU's figure: a
        # measurement is of its whole size, as vram_resident_mib is.
        for name, m in list(measured.items()):
            n = len(self.config.consumers[name].gpus)
            if n > 1 and m.mib is not None:
                measured[name] = dataclasses.replace(m, mib=m.mib * n)
        for warning in self.registry.record_measured(measured, taken_at):
            log.warning("%s", warning)
            self.stats.events.add("measured_above_config", warning)


class Swaps:
    """Unload and load calls under a lease, and what they change."""

    def __init__(self, config: Config, registry: ConsumerRegistry, health: HealthMonitor,
                 actions: ConsumerActions, stats: Stats, clock: Clock):
        self.config = config
        self.registry = registry
        self.health = health
        self.actions = actions
        self.stats = stats
        self.clock = clock

    def call(self, c: ConsumerConfig, call: Call, lease: Lease) -> str | None:
        """An admin call under a lease ends by the lease's deadline: it must
        not run on beside the next job once the watchdog has moved on."""
        left = lease.deadline - self.clock.now()
        if left <= 0 or lease.cut_reason is not None:
            return f"{call.describe()}: not sent, the GPU lease has ended"
        return self.actions.call(c, call, timeout_s=left)

    def unload(self, victim: str, why: str, for_whom: str | None, lease: Lease) -> bool:
        c = self.config.consumers[victim]
        t0 = self.clock.now()
        error = self.call(c, c.unload, lease)
        if error:
            self.registry.unload_failed(victim, error)
            self.stats.events.add("unload_failed", f"unloading {victim} failed: {error}",
                                  consumer=victim)
            log.warning("unload of %s failed: %s", victim, error)
            return False
        self.registry.mark_loaded(victim, False, counted="eviction")
        self.stats.evicted(victim, for_whom, why, (self.clock.now() - t0) * 1000, c.gpus)
        return True

    def load(self, target: str, deadline: float, lease: Lease) -> None:
        c = self.config.consumers[target]
        sched = self.config.scheduler
        t0 = self.clock.now()
        error = self.call(c, c.load, lease)
        cooldown = self.registry.load_result(target, error, after=sched.load_failures_to_cooldown,
                                             base_s=sched.load_cooldown_s,
                                             max_s=sched.load_cooldown_max_s)
        if cooldown:
            message = (f"{target} failed to load {sched.load_failures_to_cooldown} or more times "
                       f"in a row: refusing its jobs for {cooldown:g} s")
            log.warning("%s", message)
            self.stats.events.add("cooling_down", message, consumer=target, cooldown_s=cooldown)
        if error:
            # Not fatal: a consumer that did not preload cold-starts on the job.
            self.stats.events.add("load_failed", f"loading {target} failed: {error}",
                                  consumer=target)
            log.warning("load of %s failed: %s", target, error)
            return
        until = min(self.clock.now() + sched.evict_settle_s, deadline)
        probes = []

        def confirmed() -> bool:
            probes.append(self.health.probe(target))
            # It says nothing of its state: the load stays unconfirmed, at once.
            return probes[-1].ok and probes[-1].loaded is not False
        self.clock.wait_until(confirmed, until, 0.1)    # at least one probe, however short
        result = probes[-1]
        sure = result.ok and result.loaded is True
        if result.ok and result.loaded is not False:     # not timed out unconfirmed
            self.registry.record_cost(target, "load", self.clock.now() - t0)
        # A load no probe confirmed leaves it possibly loaded: counted as
        # resident everywhere, but never believed over a reading.
        self.registry.mark_loaded(target, True if sure else None, counted="load")
        self.stats.loaded(target, (self.clock.now() - t0) * 1000)


def still_resident(registry: ConsumerRegistry, gpu: Gpu, target: str,
                   fresh_s: float) -> bool:
    """The short path: ``target`` is believed loaded on ``gpu``, and a
    reading taken since any belief there last changed agrees (policy's
    ``resident_agrees``, with the possibly loaded counted among the
    others: stricter than the planner, which settles them). Then nothing
    is read afresh, planned, unloaded or loaded.

    Fresh enough is the sampler's latest reading, at most ``fresh_s`` old
    (3 s by default), on a live reader; on the ledger the reading is the
    beliefs themselves, taken now. It cannot over-commit where the full
    path would not: it loads and unloads nothing; whatever the broker does
    that changes what the card holds (a load, an unload, a job that loaded
    its consumer, another process's turn) changes a belief, after which no
    reading from before counts; and every reading the full path takes (a
    GPU lease's too, which changes no belief) becomes the sampler's newest,
    so one that showed a belief wrong is never passed over for an older
    one. A reading from during a coexisting consumer's job shows more in
    use, never less. What it can miss is a change behind the broker's back
    within that age (a service that freed, and another program that took
    the memory), which the full path misses too when it comes just after
    its reading, and a cold start's load takes seconds after it.
    """
    believed = registry.believed_resident(target, gpu.index)
    if believed is None:
        return False
    reading = (gpu.sampler.recent(fresh_s, after=believed.changed_at) if gpu.live
               else gpu.reader.read())
    return reading is not None and reading.free_mib is not None \
        and reading.total_mib is not None \
        and resident_agrees(believed.mib, believed.others_mib, believed.surely_mib,
                            free_mib=reading.free_mib, total_mib=reading.usable_mib)


@dataclasses.dataclass
class _Progress:
    """One job's room making, over every GPU it needs."""
    # Unloaded (or tried) once for this job: never again. A consumer
    # believed unloaded can be a candidate when memory is unexplained,
    # and unloading it again frees no more the second time.
    tried: set[str] = dataclasses.field(default_factory=set)
    attempts: int = 0
    asked: bool = False                  # the consumers on its GPUs asked what they hold
    gpus: tuple[int, ...] = ()


class RoomMaker:
    def __init__(self, config: Config, registry: ConsumerRegistry, health: HealthMonitor,
                 actions: ConsumerActions, gpus: Gpus, swaps: Swaps, stats: Stats,
                 attribute: MemoryAttribution):
        self.config = config
        self.registry = registry
        self.health = health
        self.actions = actions
        self.gpus = gpus
        self.swaps = swaps
        self.stats = stats
        self.attribute = attribute
        self.clock = gpus.first.clock
        self._busy_checked: set[int] = set()  # GPUs checked, each with its turn held
        self._last_belief_problem: dict[int, tuple] = {}   # per GPU, with its turn held
        self.fresh_s = min(FRESH_READING_S, 1.5 * config.gpu.sample_interval_s)

    def make_room(self, target: str, lease: Lease, deadline: float,
                  cancelled: Callable[[], bool] | None = None, gpus: list[Gpu] | None = None,
                  *, evicted: list[str] | None = None, tenant: Tenant | None = None
                  ) -> list[str]:
        """On each of ``gpus`` (the target's, whose turns ``lease`` holds),
        unload what may not stay beside ``target`` until it fits; then load
        it. Each victim is appended to ``evicted`` as it goes (the status
        page shows them mid-swap); the list is returned. Raises
        InsufficientVram, Abandoned, or LeaseCut (the lease was cut under it).
        With ``tenant`` (a GPU lease), the target is that program: room is
        made for its ``vram_mib`` and nothing is loaded."""
        evicted = [] if evicted is None else evicted
        # Waiting for VRAM ends with the queue's deadline or the lease's.
        deadline = min(deadline, lease.deadline)
        self.health.wait_first_round(self.config.health.timeout_s + 1.0)
        gpus = gpus or [self.gpus.first]
        unchecked = {g.index for g in gpus} - self._busy_checked
        if unchecked:
            self._wait_until_idle(deadline, unchecked)
        if tenant is None and len(gpus) == 1:
            lease.check()
            if still_resident(self.registry, gpus[0], target, self.fresh_s):
                self._last_belief_problem[gpus[0].index] = None
                return evicted
        if len(gpus) > 1:
            # Nothing is unloaded on one card for a job that can never fit
            # on another.
            for gpu in gpus:
                self._refuse_if_never_fits(gpu, target, tenant)
        progress = _Progress(gpus=tuple(g.index for g in gpus))
        for gpu in gpus:
            self._fit(gpu, target, lease, deadline, cancelled, evicted, tenant, progress)
        c = self.config.consumers.get(target) if tenant is None else None
        if c is not None and c.load is not None and self.registry.loaded(target) is not True:
            lease.check()
            self.swaps.load(target, deadline, lease)
        return evicted

    def _refuse_if_never_fits(self, gpu: Gpu, target: str, tenant: Tenant | None) -> None:
        reading = gpu.reader.read()
        if reading.free_mib is None or reading.total_mib is None:
            return
        views = self.registry.views(gpu.index)
        if tenant is not None:
            views[target] = tenant.view()
        plan = self.plan(target, views, reading, tenant, gpu.live)
        if plan.never_fits:
            raise InsufficientVram(plan.reason + "; " + self.holders(reading, gpu.index),
                                   need_mib=plan.need_mib, free_mib=reading.free_mib)

    def _fit(self, gpu: Gpu, target: str, lease: Lease, deadline: float,
             cancelled: Callable[[], bool] | None, evicted: list[str], tenant: Tenant | None,
             progress: _Progress) -> None:
        """Room for ``target`` on one GPU: only what runs on it is unloaded."""
        clock, sched, reader = self.clock, self.config.scheduler, gpu.reader
        tried = progress.tried
        # Unloaded, memory not yet shown: victim -> (free before, its size,
        # until when to wait on, whether it was surely loaded). A service can
        # free after evict_settle_s: unloading a second consumer beside one
        # surely loaded would be needless, and with nothing more to unload,
        # any of them is worth waiting for.
        unshown: dict[str, tuple[int, int, float, bool]] = {}
        while True:
            lease.check()
            # Every decision here is checked against a fresh reading, also
            # for a target believed resident that the short path could not
            # confirm: beliefs say who may be evicted, the reading how much
            # is free.
            taken_at = clock.now()
            reading = reader.read()
            if reading.free_mib is None or reading.total_mib is None:
                log.warning("no GPU reading (%s): running %s without a VRAM check",
                            reading.error, target)
                return
            self.attribute(reading, taken_at, gpu.index)
            # The newest reading the broker has: the short path never decides
            # by an older one than this (which may have shown a belief wrong).
            gpu.sampler.offer(reading, taken_at)
            for name, (before, size, until, _) in list(unshown.items()):
                if reading.free_mib - before >= size // 2 or clock.now() >= until:
                    del unshown[name]
            views = self._with_waiting(gpu, self.registry.views(gpu.index))
            self._check_beliefs(gpu, views, reading)
            for name in tried:
                if name in views:
                    views[name] = dataclasses.replace(views[name], can_unload=False)
            if tenant is not None:
                views[target] = tenant.view()
            plan = self.plan(target, views, reading, tenant, gpu.live)
            if not progress.asked and (plan.contradicted or not plan.fits):
                progress.asked = True
                self.health.ask_all(self.config.health.timeout_s, list(dict.fromkeys(
                    n for g in progress.gpus for n in self.config.on_gpu(g))))
                continue
            if plan.contradicted:
                message = (f"{target} was believed resident, but the reading "
                           f"({reading.free_mib} MiB free of {reading.total_mib}, "
                           f"{reading.source}) has no room for it: treating it as not resident")
                log.warning("%s", message)
                self.stats.events.add("belief_corrected", message, consumer=target)
                self.registry.mark_loaded(target, None)
            if plan.never_fits:
                raise InsufficientVram(plan.reason + "; " + self.holders(reading, gpu.index),
                                       need_mib=plan.need_mib, free_mib=reading.free_mib)
            if plan.fits and not plan.victims:
                return
            if plan.fits and any(sure for *_, sure in unshown.values()) and clock.now() < deadline:
                clock.sleep(0.1)            # a victim's memory may still come
                continue
            if plan.fits and progress.attempts < sched.evict_attempts:
                progress.attempts += 1
                victim = plan.victims[0]
                tried.add(victim)
                t0 = clock.now()
                if not self.swaps.unload(victim, f"to make room for {target}: {plan.reason}",
                                         target, lease):
                    continue
                evicted.append(victim)
                sure = views[victim].loaded is True
                if reader.live:
                    # A victim only possibly loaded may have had nothing to
                    # free: wait less for its memory to show.
                    settle_s = sched.evict_settle_s if sure else min(sched.evict_settle_s,
                                                                     UNSURE_SETTLE_S)
                    if not self._settle(gpu, reading.free_mib, views[victim].resident_mib,
                                        plan.need_mib, min(deadline, clock.now() + settle_s)):
                        unshown[victim] = (reading.free_mib, views[victim].resident_mib,
                                           clock.now() + sched.evict_settle_s, sure)
                if sure:          # a real unload: its cost, settle included
                    self.registry.record_cost(victim, "unload", clock.now() - t0)
                continue
            # Nothing more may be evicted. Wait for VRAM only where something
            # may free it by itself (ollama expires its own models, another
            # program exits, a victim frees late), until the deadline; a
            # ledger that nothing will change refuses at once. A victim
            # measured still holding its memory was asked to free it.
            freeing = any((views[n].measured_mib or 0) > context_allowance(views[n].resident_mib)
                          for n in tried if n in views)
            if not (plan.may_free or unshown or freeing) or clock.now() >= deadline:
                raise InsufficientVram(f"{plan.reason}; {self.holders(reading, gpu.index)}",
                                       need_mib=plan.need_mib, free_mib=reading.free_mib)
            if cancelled is not None and cancelled():
                raise Abandoned("the client went away while its job waited for VRAM")
            clock.sleep(min(1.0, max(0.0, deadline - clock.now())))

    def plan(self, target: str, views: dict[str, ConsumerView], reading: GpuReading,
             tenant: Tenant | None = None, live: bool = True):
        """What making room for target takes, by this reading and these beliefs."""
        coexist = self.config.may_coexist if tenant is None else \
            tenant.may_coexist(self.config.may_coexist)
        return plan_room(target, views, free_mib=reading.free_mib, total_mib=reading.usable_mib,
                         cushion_mib=self.config.gpu.cushion_mib, coexist=coexist, live=live)

    def _wait_until_idle(self, deadline: float, gpus: set[int]) -> None:
        """Before this broker's first job on each GPU: a service may still
        work for the one before it (a render ComfyUI began for the old
        worker of a reload, or for a broker that was restarted), which held
        the GPU until its busy probe said idle. Wait for every busy probe on
        ``gpus`` (whose turns are held), once per GPU."""
        self._busy_checked |= gpus
        for c in self.config.consumers.values():
            if c.busy is None or not gpus & set(c.gpus):
                continue
            if not self.actions.is_busy(c):
                continue
            self.clock.wait_until(lambda: not self.actions.is_busy(c), deadline,
                                  self.config.scheduler.busy_poll_s)
            self.stats.events.add("busy_at_start", f"waited for {c.name} to finish work it "
                                  "began before this worker started", consumer=c.name)

    def _with_waiting(self, gpu: Gpu, views: dict[str, ConsumerView]
                      ) -> dict[str, ConsumerView]:
        """The views with how many queued jobs each consumer has: of equally
        few victims, one the queue needs next is spared."""
        consumers = gpu.lock.waiting_consumers()
        if not consumers:
            return views
        waiting = Counter(consumers)
        return {n: dataclasses.replace(v, waiting=waiting[n]) if waiting[n] else v
                for n, v in views.items()}

    def _settle(self, gpu: Gpu, free_before: int, freed_mib: int, need_mib: int,
                deadline: float) -> bool:
        """Poll the reading until the unload shows (drivers free memory late);
        False if it did not by ``deadline``."""
        def shown() -> bool:
            r = gpu.reader.read()
            return r.free_mib is not None and (r.free_mib >= need_mib
                                               or r.free_mib - free_before >= freed_mib // 2)
        return self.clock.wait_until(shown, deadline, 0.05)

    def _check_beliefs(self, gpu: Gpu, views: dict[str, ConsumerView],
                       reading: GpuReading) -> None:
        """Beliefs that cannot all be true are an event and a warning (once
        per distinct state); the planner resolves them before the job runs."""
        believed = sum(v.resident_mib for v in views.values() if v.loaded is True)
        problem = None
        if believed > reading.usable_mib:
            problem = (f"the consumers believed loaded hold {believed} MiB, more than the "
                       f"GPU's {reading.usable_mib} MiB")
        elif gpu.live and reading.used_mib is not None and \
                believed > reading.used_mib + self.config.gpu.cushion_mib:
            problem = (f"the consumers believed loaded hold {believed} MiB, but the reading "
                       f"shows only {reading.used_mib} MiB in use")
        signature = (problem is not None,
                     tuple(sorted(n for n, v in views.items() if v.loaded is True)))
        if problem is None or signature == self._last_belief_problem.get(gpu.index):
            self._last_belief_problem[gpu.index] = signature if problem else None
            return
        self._last_belief_problem[gpu.index] = signature
        log.warning("beliefs contradicted: %s", problem)
        self.stats.events.add("beliefs_contradicted", problem, believed_mib=believed,
                              used_mib=reading.used_mib, total_mib=reading.total_mib)

    def holders(self, reading: GpuReading, gpu: int | None = None) -> str:
        held = [f"{v.name} {v.resident_mib} MiB"
                + (" (vram_managed)" if v.vram_managed else "")
                + ("" if v.loaded else " (maybe)")
                for v in self.registry.views(gpu).values() if v.loaded is not False]
        return (f"{reading.free_mib} MiB free of {reading.total_mib} ({reading.source}); "
                f"held: {', '.join(held) or 'nothing the broker knows of'}")
