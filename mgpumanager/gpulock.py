"""The process-wide GPU lock: one holder, a strict FIFO queue of waiters.

Modelled on CPython's ``queue.py``: one mutex, a condition on it, a deadline
loop on ``time.monotonic`` that re-checks its predicate after every wake.
``Condition.notify`` does not wake threads in arrival order, so the order is
kept in a deque of tickets and only the head may take the lock. Each ticket
waits on a condition of its own (all on the one mutex) and a release wakes
only the head: waking every waiter would have them all fight for the GIL
while the one that matters waits its turn, which measured as milliseconds
of hand-off with 16 waiters.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .errors import Abandoned, QueueFull, QueueTimeout, ShuttingDown


class Ticket:
    """One job's place in the queue, then its hold on the lock."""

    __slots__ = ("id", "label", "enqueued_at", "granted_at", "turn")

    def __init__(self, id: int, label: str, enqueued_at: float,
                 turn: threading.Condition | None = None):
        self.id = id
        self.label = label
        self.enqueued_at = enqueued_at
        self.granted_at: float | None = None
        self.turn = turn             # notified when this ticket reaches a free lock

    @property
    def waited_s(self) -> float:
        return (self.granted_at or self.enqueued_at) - self.enqueued_at

    def __repr__(self) -> str:
        return f"<Ticket {self.id} {self.label}>"


@dataclass(frozen=True)
class LockSnapshot:
    queue_depth: int
    holder: str | None
    oldest_queued_s: float | None
    waiting: tuple[str, ...]


class GpuLock:
    def __init__(self, max_queue: int, *, clock: Callable[[], float] = time.monotonic):
        self.max_queue = max_queue
        self._clock = clock
        self._mutex = threading.Lock()
        self._ids = itertools.count(1)
        # All fields below are guarded by _mutex.
        self._waiting: deque[Ticket] = deque()
        self._holder: Ticket | None = None
        self._recent_holds: deque[float] = deque(maxlen=20)
        self._closed: str | None = None          # why no more jobs are granted

    def acquire(self, label: str, timeout: float, *,
                cancelled: Callable[[], bool] | None = None, poll_s: float = 0.5) -> Ticket:
        """Wait for the lock in arrival order; return the granted ticket.

        Raises QueueFull at once when max_queue jobs already wait,
        QueueTimeout after ``timeout`` seconds, and Abandoned as soon as
        ``cancelled()`` (checked at least every ``poll_s``) says the client left.
        Whatever it raises, the ticket is gone from the queue.
        """
        with self._mutex:
            now = self._clock()
            ticket = Ticket(next(self._ids), label, now)
            self._check_open()
            if self._holder is None and not self._waiting:
                return self._grant(ticket, now)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} jobs already wait for the GPU (max_queue "
                    f"{self.max_queue}); try again later",
                    retry_after=self._estimate_wait(len(self._waiting)))
            ticket.turn = threading.Condition(self._mutex)
            self._waiting.append(ticket)
            deadline = now + timeout
            try:
                while not (self._holder is None and self._waiting[0] is ticket):
                    self._check_open()
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        raise QueueTimeout(
                            f"waited {timeout:g} s for the GPU (queue_timeout_s) behind "
                            f"{self._position(ticket)} job(s)",
                            retry_after=self._estimate_wait(len(self._waiting)))
                    if cancelled is not None and cancelled():
                        raise Abandoned("the client went away while its job waited")
                    ticket.turn.wait(min(remaining, poll_s))
                if cancelled is not None and cancelled():
                    # Its turn came, but nobody would read the answer.
                    raise Abandoned("the client went away while its job waited")
                self._waiting.popleft()
                return self._grant(ticket, self._clock())
            except BaseException:
                if ticket in self._waiting:
                    was_head = self._waiting[0] is ticket
                    self._waiting.remove(ticket)
                    if was_head:
                        # The next waiter may now be the head of a free lock.
                        self._wake_head()
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

    def try_acquire(self, label: str) -> Ticket | None:
        """The lock if it is free and nobody waits, else None at once."""
        with self._mutex:
            if self._holder is None and not self._waiting and self._closed is None:
                return self._grant(Ticket(next(self._ids), label, self._clock()), self._clock())
            return None

    def release(self, ticket: Ticket) -> None:
        with self._mutex:
            if self._holder is not ticket:
                raise RuntimeError(f"{ticket!r} does not hold the GPU lock")
            self._holder = None
            self._recent_holds.append(self._clock() - (ticket.granted_at or 0.0))
            self._wake_head()

    def snapshot(self) -> LockSnapshot:
        with self._mutex:
            now = self._clock()
            holder = self._holder
            return LockSnapshot(
                queue_depth=len(self._waiting),
                holder=holder.label if holder else None,
                oldest_queued_s=(now - self._waiting[0].enqueued_at) if self._waiting else None,
                waiting=tuple(t.label for t in self._waiting))

    def _wake_head(self) -> None:
        if self._holder is None and self._waiting:
            self._waiting[0].turn.notify()

    def _grant(self, ticket: Ticket, now: float) -> Ticket:
        ticket.granted_at = now
        self._holder = ticket
        return ticket

    def _position(self, ticket: Ticket) -> int:
        return self._waiting.index(ticket) + (self._holder is not None)

    def _estimate_wait(self, ahead: int) -> int:
        """Retry-After in whole seconds: recent mean hold time times the jobs ahead."""
        mean = (sum(self._recent_holds) / len(self._recent_holds)) if self._recent_holds else 1.0
        return max(1, math.ceil(mean * (ahead + 1)))
