"""One GPU: whose turn it is, and what it holds.

A ``Gpu`` owns everything there is one of per card: the in-process queue
(``GpuLock``), the machine-wide turn (``OsLock``), the watchdog over the
turn's lease (``LeaseWatch``), and the reading with its sampler (NVML,
nvidia-smi, the simulator, or the ledger). A job's turn is ``take_turn``:
its place in the queue, then the OS lock, then a lease with a deadline,
watched; ``Lease.release()`` gives all three back in the reverse order.
Making room and planning are not here (room.py): this is the turn, not
what is done with it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .clock import Clock
from .config import Config
from .gpu import GpuReader, GpuReading, GpuSampler, make_reader
from .gpulock import Chooser, Estimator, GpuLock, Ticket
from .lease import Lease, LeaseWatch
from .oslock import OsLock, default_lock_file

log = logging.getLogger("mgpumanager.device")


class Gpu:
    def __init__(self, config: Config, clock: Clock, *, held_mib: Callable[[], int],
                 on_expired: Callable[[Lease], None], reader: GpuReader | None = None,
                 on_sample: Callable[[GpuReading, float], None] | None = None,
                 on_foreign_turn: Callable[[], None] | None = None):
        self.clock = clock
        # Called as a turn begins that another process had since this one's last.
        self.on_foreign_turn = on_foreign_turn
        sched = config.scheduler
        self.job_timeout_s = sched.job_timeout_s
        fallback_total = sum(c.vram_resident_mib for c in config.consumers.values())
        self.reader = reader or make_reader(config.gpu, held_mib, fallback_total)
        self.sampler = GpuSampler(self.reader, config.gpu.sample_interval_s, clock=clock,
                                  on_sample=on_sample)
        self.lock = GpuLock(sched.max_queue, clock=clock.now)
        self.oslock = OsLock(sched.lock_file or default_lock_file(), clock=clock)
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
                  cancelled: Callable[[], bool] | None, hold_s: float | None = None) -> Lease:
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
        return self._lease(ticket, hold_s)

    def try_turn(self, label: str, consumer: str) -> Lease | None:
        """The turn if nobody holds or waits for it, here or in another process."""
        ticket = self.lock.try_acquire(label, consumer=consumer)
        if ticket is None:
            return None
        if not self.oslock.try_acquire():
            self.lock.release(ticket)
            return None
        if self.oslock.others_held_since_last and self.on_foreign_turn is not None:
            self.on_foreign_turn()
        return self._lease(ticket)

    def _lease(self, ticket: Ticket, hold_s: float | None = None) -> Lease:
        now = self.clock.now()
        lease = Lease(ticket.label, ticket, now, now + (hold_s or self.job_timeout_s),
                      self._released)
        self.watch.watch(lease)
        with self._mutex:
            self.current = lease
            self.max_bypassed = max(self.max_bypassed, ticket.bypassed)
            if ticket.head_since is not None and ticket.granted_at is not None:
                self.max_late_s = max(self.max_late_s, ticket.granted_at - ticket.head_since)
        return lease

    def _released(self, lease: Lease) -> None:
        self.watch.unwatch(lease)
        with self._mutex:
            if self.current is lease:
                self.current = None
        self.oslock.release()
        self.lock.release(lease.ticket)
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

