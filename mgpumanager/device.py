"""The GPUs: whose turn it is on each, and what each holds.

A ``Gpu`` owns everything there is one of per card: the in-process queue
(``GpuLock``), the machine-wide turn (``OsLock``, a lock file per card),
the watchdog over the turn's lease (``LeaseWatch``), and the reading with
its sampler (NVML, nvidia-smi, the simulator, or the ledger). A job's turn
is ``take_turn``: its place in the queue, then the OS lock, then a lease
with a deadline, watched; ``Lease.release()`` gives all three back in the
reverse order.

``Gpus`` is the box: every card in index order. A job whose consumer spans
several cards takes their turns in index order (two such jobs can never
each hold a card the other waits for) and holds them under one lease, the
first card's; the others are its companions, given back with it. Making
room and planning are not here (room.py): this is the turn, not what is
done with it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .clock import Clock
from .config import Config, DeviceConfig
from .gpu import GpuReader, GpuReading, GpuSampler, make_reader
from .gpulock import Chooser, Estimator, GpuLock, Ticket
from .lease import Lease, LeaseWatch
from .oslock import OsLock, default_lock_file, device_lock_file

log = logging.getLogger("mgpumanager.device")


class Gpu:
    def __init__(self, config: Config, device: DeviceConfig, clock: Clock, *,
                 held_mib: Callable[[], int], on_expired: Callable[[Lease], None],
                 reader: GpuReader | None = None,
                 on_sample: Callable[[GpuReading, float], None] | None = None,
                 on_foreign_turn: Callable[[], None] | None = None):
        self.index = device.index
        self.total_mib = device.total_mib        # the ledger's, when configured
        self.clock = clock
        # Called as a turn begins that another process had since this one's last.
        self.on_foreign_turn = on_foreign_turn
        sched = config.scheduler
        self.job_timeout_s = sched.job_timeout_s
        fallback_total = sum(config.consumers[n].share_mib() for n in config.on_gpu(self.index))
        self.reader = reader or make_reader(config.gpu, held_mib, fallback_total, device)
        self.sampler = GpuSampler(self.reader, config.gpu.sample_interval_s, clock=clock,
                                  on_sample=on_sample)
        self.lock = GpuLock(sched.max_queue, clock=clock.now)
        self.oslock = OsLock(device_lock_file(sched.lock_file or default_lock_file(),
                                              self.index), clock=clock)
        self.watch = LeaseWatch(on_expired, clock=clock.now)
        clock.on_advance(self.watch.clock_moved)
        self._mutex = threading.Lock()
        # Guarded by _mutex:
        self.current: Lease | None = None        # whoever holds the turn
        self.max_bypassed = 0                    # the most any granted job was passed
        self.max_late_s = 0.0                    # the longest past its FIFO turn
        self._foreign_since: float | None = None  # another process seen holding the OS lock

    @property
    def live(self) -> bool:
        return self.reader.live

    def order_by(self, chooser: Chooser | None, estimator: Estimator) -> None:
        self.lock.order_by(chooser, estimator)

    def start(self) -> None:
        self.sampler.start()

    def stop(self) -> None:
        self.sampler.stop()
        self.reader.close()
        self.oslock.close()

    # -- the turn ----------------------------------------------------------------

    def take_turn(self, label: str, deadline: float, *, consumer: str, kind: str | None,
                  priority: int, needs_room: bool,
                  cancelled: Callable[[], bool] | None, hold_s: float | None = None,
                  watched: bool = True) -> Lease:
        """This process's turn (the queue), then the machine's (the OS lock),
        by one deadline; a lease watched until it is released, at most
        ``hold_s`` (default scheduler.job_timeout_s). Raises a BrokerError
        with nothing held."""
        ticket = self.lock.acquire(label, max(0.0, deadline - self.clock.now()),
                                   cancelled=cancelled, consumer=consumer, kind=kind,
                                   priority=priority, needs_room=needs_room)
        try:
            self.oslock.acquire(deadline, cancelled)
        except BaseException:
            self.lock.release(ticket)
            raise
        if self.oslock.others_held_since_last and self.on_foreign_turn is not None:
            self.on_foreign_turn()
        return self._lease(ticket, hold_s, watched)

    def try_turn(self, label: str, consumer: str, watched: bool = True) -> Lease | None:
        """The turn if nobody holds or waits for it, here or in another process."""
        ticket = self.lock.try_acquire(label, consumer=consumer)
        if ticket is None:
            return None
        if not self.oslock.try_acquire():
            self.lock.release(ticket)
            return None
        if self.oslock.others_held_since_last and self.on_foreign_turn is not None:
            self.on_foreign_turn()
        return self._lease(ticket, watched=watched)

    def _lease(self, ticket: Ticket, hold_s: float | None = None, watched: bool = True) -> Lease:
        now = self.clock.now()
        lease = Lease(ticket.label, ticket, now, now + (hold_s or self.job_timeout_s),
                      self._released)
        if watched:             # a companion is ended by the lease it belongs to
            self.watch.watch(lease)
        with self._mutex:
            self.current = lease
            self.max_bypassed = max(self.max_bypassed, ticket.bypassed)
            if ticket.head_since is not None and ticket.granted_at is not None:
                self.max_late_s = max(self.max_late_s, ticket.granted_at - ticket.head_since)
        return lease

    def hold_from_now(self, lease: Lease, hold_s: float | None = None) -> None:
        """A spanning job's lease, all its turns held: its hold (and its
        companions') counts from now, watched."""
        now = self.clock.now()
        lease.granted_at = now
        lease.deadline = now + (hold_s or self.job_timeout_s)
        for companion in lease.companions:
            companion.granted_at, companion.deadline = now, lease.deadline
        self.watch.watch(lease)

    def _released(self, lease: Lease) -> None:
        self.watch.unwatch(lease)
        with self._mutex:
            if self.current is lease:
                self.current = None
        self.oslock.release()
        self.lock.release(lease.ticket)
        for companion in reversed(lease.companions):
            companion.release()
        if self.lock.has_waiting:
            # Let the woken head take the GIL now rather than after our
            # bookkeeping (measured: 0.25 ms of every hand-off).
            time.sleep(0)

    # -- what it can say of itself -----------------------------------------------

    def problems(self, queue_timeout_s: float) -> list[str]:
        """Why no more jobs can have their turn, if that is so (empty: they can)."""
        problems = []
        now = self.clock.now()
        for lease in self.watch.held():
            if now > lease.deadline + self.watch.grace_s + 1:
                problems.append(f"{lease.label} holds the GPU {now - lease.deadline:.0f} s past "
                                "its deadline")
        snap = self.lock.snapshot()
        if snap.oldest_queued_s is not None and snap.oldest_queued_s > queue_timeout_s + 10:
            problems.append(f"the queue's head has waited {snap.oldest_queued_s:.0f} s, past "
                            "its deadline")
        foreign = snap.holder is None and self.oslock.held_elsewhere()
        with self._mutex:
            if not foreign:
                self._foreign_since = None
            elif self._foreign_since is None:
                self._foreign_since = now
            foreign_s = now - self._foreign_since if foreign else 0.0
        if foreign_s > queue_timeout_s:
            problems.append(f"another process has held the GPU lock file {self.oslock.path} for "
                            f"{foreign_s:.0f} s: {self.oslock.describe_holder()}")
        if not self.watch.alive:
            problems.append("the lease watchdog thread died")
        if not self.sampler.alive:
            problems.append("the GPU sampler thread died")
        return problems


class Gpus:
    """Every GPU of the box, in index order; ``first`` is the one a box with
    one GPU has."""

    def __init__(self, gpus: list[Gpu]):
        self.all = sorted(gpus, key=lambda g: g.index)
        self.first = self.all[0]
        self._by_index = {g.index: g for g in self.all}

    def __iter__(self):
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def __getitem__(self, index: int) -> Gpu:
        return self._by_index[index]

    def of(self, indices: tuple[int, ...]) -> list[Gpu]:
        return [self._by_index[i] for i in sorted(indices)]

    @property
    def live(self) -> bool:
        return all(g.live for g in self.all)

    def take_turns(self, gpus: list[Gpu], label: str, deadline: float, *,
                   hold_s: float | None = None, **turn) -> Lease:
        """The turn on each of ``gpus``, in index order, by one deadline: one
        lease, the first card's, whose release gives back the others."""
        if len(gpus) == 1:
            return gpus[0].take_turn(label, deadline, hold_s=hold_s, **turn)
        # Unwatched until every turn is held: its hold begins then. Watched
        # from the first grant, the watchdog could end it while it still
        # waits for a later card, whose turn would then be granted to a
        # lease already released, and never given back.
        lease = gpus[0].take_turn(label, deadline, hold_s=hold_s, watched=False, **turn)
        try:
            for gpu in gpus[1:]:
                lease.companions.append(
                    gpu.take_turn(label, deadline, hold_s=hold_s, watched=False, **turn))
        except BaseException:
            lease.release()
            raise
        gpus[0].hold_from_now(lease, hold_s)
        return lease

    def try_turns(self, gpus: list[Gpu], label: str, consumer: str) -> Lease | None:
        """The turn on each of ``gpus`` if nobody holds or waits for any."""
        lease = gpus[0].try_turn(label, consumer)
        if lease is None:
            return None
        for gpu in gpus[1:]:
            companion = gpu.try_turn(label, consumer, watched=False)
            if companion is None:
                lease.release()
                return None
            lease.companions.append(companion)
        return lease

    def start(self) -> None:
        for g in self.all:
            g.start()

    def stop(self) -> None:
        for g in self.all:
            g.stop()

    def close_queues(self, reason: str) -> None:
        for g in self.all:
            g.lock.close(reason)

    def problems(self, queue_timeout_s: float) -> list[str]:
        several = len(self.all) > 1
        return [f"GPU {g.index}: {p}" if several else p
                for g in self.all for p in g.problems(queue_timeout_s)]
