"""The process-wide GPU lock: one holder, a queue of waiters in arrival order.

Modelled on CPython's ``queue.py``: one mutex, a condition on it, a deadline
loop on ``time.monotonic`` that re-checks its predicate after every wake.
``Condition.notify`` does not wake threads in a chosen order, so the order
is kept in a list of tickets, and when the lock comes free the lock names
the one ticket that may take it (``_next``): the oldest, or, with a
``chooser`` (schedule.py's affinity), the one it picks. The choice is made
under the mutex, so no two waiters can both think it is their turn. Each
ticket waits on a condition of its own (all on the one mutex) and a release
wakes only the chosen one: waking every waiter would have them all fight
for the GIL while the one that matters waits its turn, which measured as
milliseconds of hand-off with 16 waiters.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .errors import Abandoned, QueueFull, QueueTimeout, ShuttingDown
from .schedule import mark_turn, take

log = logging.getLogger("mgpumanager.gpulock")


class Ticket:
    """One job's place in the queue, then its hold on the lock."""

    __slots__ = ("id", "label", "enqueued_at", "granted_at", "turn", "consumer", "kind",
                 "priority", "needs_room", "head_since", "bypassed", "saved_swap")

    def __init__(self, id: int, label: str, enqueued_at: float,
                 turn: threading.Condition | None = None, *, consumer: str | None = None,
                 kind: str | None = None, priority: int = 0, needs_room: bool = True):
        self.id = id
        self.label = label
        self.enqueued_at = enqueued_at
        self.granted_at: float | None = None
        self.turn = turn             # notified when this ticket is chosen for a free lock
        self.consumer = consumer
        self.kind = kind
        self.priority = priority
        self.needs_room = needs_room
        self.head_since: float | None = None    # its FIFO turn (schedule.mark_turn)
        self.bypassed = 0
        self.saved_swap = False      # the chooser: it runs without the oldest's eviction

    @property
    def waited_s(self) -> float:
        return (self.granted_at or self.enqueued_at) - self.enqueued_at

    def __repr__(self) -> str:
        return f"<Ticket {self.id} {self.label}>"


@dataclass(frozen=True)
class WaitingJob:
    label: str
    consumer: str | None
    kind: str | None
    priority: int
    waited_s: float
    bypassed: int


@dataclass(frozen=True)
class LockSnapshot:
    queue_depth: int
    holder: str | None
    oldest_queued_s: float | None
    waiting: tuple[str, ...]
    jobs: tuple[WaitingJob, ...] = ()
    reordered: int = 0           # grants to other than the oldest waiting job
    swaps_saved: int = 0         # ... of a job that needed no eviction the oldest needed


# chooser(waiting, now) -> the index of the ticket to grant next.
Chooser = Callable[[list[Ticket], float], int]
# estimator(tickets ahead, mean hold) -> seconds until a new job could start.
Estimator = Callable[[list[Ticket], float], float]


class GpuLock:
    def __init__(self, max_queue: int, *, clock: Callable[[], float] = time.monotonic,
                 chooser: Chooser | None = None, estimator: Estimator | None = None):
        self.max_queue = max_queue
        self._clock = clock
        self._chooser = chooser         # None: arrival order
        self._estimator = estimator
        self._mutex = threading.Lock()
        self._ids = itertools.count(1)
        # All fields below are guarded by _mutex.
        self._waiting: list[Ticket] = []       # arrival order
        self._holder: Ticket | None = None
        self._next: Ticket | None = None       # chosen to take the free lock
        self._recent_holds: deque[float] = deque(maxlen=20)
        self._closed: str | None = None          # why no more jobs are granted
        self._reordered = 0
        self._swaps_saved = 0

    def order_by(self, chooser: Chooser | None, estimator: Estimator | None) -> None:
        """Who goes next when the lock comes free (None: arrival order), and
        how long a new job would wait. Set once, before the first job."""
        self._chooser = chooser
        self._estimator = estimator

    def acquire(self, label: str, timeout: float, *,
                cancelled: Callable[[], bool] | None = None, poll_s: float = 0.5,
                consumer: str | None = None, kind: str | None = None, priority: int = 0,
                needs_room: bool = True) -> Ticket:
        """Wait for the lock until chosen (see the module); return the granted ticket.

        Raises QueueFull at once when max_queue jobs already wait,
        QueueTimeout after ``timeout`` seconds, and Abandoned as soon as
        ``cancelled()`` (checked at least every ``poll_s``) says the client left.
        Whatever it raises, the ticket is gone from the queue.
        """
        with self._mutex:
            now = self._clock()
            ticket = Ticket(next(self._ids), label, now, consumer=consumer, kind=kind,
                            priority=priority, needs_room=needs_room)
            self._check_open()
            if self._holder is None and not self._waiting:
                return self._grant(ticket, now)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} jobs already wait for the GPU (max_queue "
                    f"{self.max_queue}); try again later",
                    retry_after=self._estimate_wait(self._waiting))
            ticket.turn = threading.Condition(self._mutex)
            self._waiting.append(ticket)
            self._choose()           # the lock may be free with nobody chosen
            deadline = now + timeout
            try:
                while not (self._holder is None and self._next is ticket):
                    self._check_open()
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        raise QueueTimeout(
                            f"waited {timeout:g} s for the GPU (queue_timeout_s) behind "
                            f"{self._position(ticket)} job(s)",
                            retry_after=self._estimate_wait(self._waiting))
                    if cancelled is not None and cancelled():
                        raise Abandoned("the client went away while its job waited")
                    ticket.turn.wait(min(remaining, poll_s))
                self._check_open()       # chosen just before a close: granted nothing
                if cancelled is not None and cancelled():
                    # Its turn came, but nobody would read the answer.
                    raise Abandoned("the client went away while its job waited")
                passed = self._waiting.index(ticket)
                take(self._waiting, passed)
                self._next = None
                if passed:
                    self._reordered += 1
                    self._swaps_saved += ticket.saved_swap
                return self._grant(ticket, self._clock())
            except BaseException:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    if self._next is ticket:
                        # Chosen, but gone: choose again for the free lock.
                        self._next = None
                        self._choose()
                raise

    def close(self, why: str) -> None:
        """Grant nothing more: every waiter, and every later caller, gets
        ShuttingDown. The holder keeps the lock until it releases it."""
        with self._mutex:
            self._closed = why
            for ticket in self._waiting:
                ticket.turn.notify()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise ShuttingDown(self._closed, retry_after=5)

    def try_acquire(self, label: str, *, consumer: str | None = None) -> Ticket | None:
        """The lock if it is free and nobody waits, else None at once."""
        with self._mutex:
            if self._holder is None and not self._waiting and self._closed is None:
                now = self._clock()
                return self._grant(Ticket(next(self._ids), label, now, consumer=consumer), now)
            return None

    def release(self, ticket: Ticket) -> None:
        with self._mutex:
            if self._holder is not ticket:
                raise RuntimeError(f"{ticket!r} does not hold the GPU lock")
            self._holder = None
            self._recent_holds.append(self._clock() - (ticket.granted_at or 0.0))
            self._choose()

    @property
    def has_waiting(self) -> bool:
        """A hint, read without the mutex: whether a job was waiting just now."""
        return bool(self._waiting)

    def waiting_consumers(self) -> list[str]:
        """The consumer of each waiting job: for the planner, without a snapshot."""
        with self._mutex:
            return [t.consumer for t in self._waiting]

    def snapshot(self) -> LockSnapshot:
        with self._mutex:
            now = self._clock()
            holder = self._holder
            return LockSnapshot(
                queue_depth=len(self._waiting),
                holder=holder.label if holder else None,
                oldest_queued_s=(now - self._waiting[0].enqueued_at) if self._waiting else None,
                waiting=tuple(t.label for t in self._waiting),
                jobs=tuple(WaitingJob(t.label, t.consumer, t.kind, t.priority,
                                      round(now - t.enqueued_at, 3), t.bypassed)
                           for t in self._waiting),
                reordered=self._reordered, swaps_saved=self._swaps_saved)

    def _choose(self) -> None:
        """Name the ticket that takes a free lock, and wake it."""
        if self._holder is not None or self._next is not None or not self._waiting \
                or self._closed is not None:
            return
        now = self._clock()
        mark_turn(self._waiting, now)
        index = 0
        if self._chooser is not None and len(self._waiting) > 1:    # one waiter: no choice
            try:
                index = self._chooser(self._waiting, now)
                if not 0 <= index < len(self._waiting):
                    raise IndexError(f"chose {index} of {len(self._waiting)}")
            except Exception:
                # A broken choice must not wedge the queue: arrival order.
                log.exception("choosing the next GPU job failed; taking the oldest")
                index = 0
        self._next = self._waiting[index]
        self._next.turn.notify()

    def _grant(self, ticket: Ticket, now: float) -> Ticket:
        ticket.granted_at = now
        self._holder = ticket
        return ticket

    def _position(self, ticket: Ticket) -> int:
        return self._waiting.index(ticket) + (self._holder is not None)

    def _estimate_wait(self, ahead: list[Ticket]) -> int:
        """Retry-After in whole seconds: what the jobs ahead will take, by the
        estimator (measured run and swap costs) or by the recent mean hold."""
        mean = (sum(self._recent_holds) / len(self._recent_holds)) if self._recent_holds else 1.0
        seconds = mean * (len(ahead) + 1)
        if self._estimator is not None:
            try:
                seconds = self._estimator(list(ahead), mean)
            except Exception:
                log.exception("estimating the wait failed; using the mean hold")
        return max(1, math.ceil(seconds))
