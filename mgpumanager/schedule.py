"""Which waiting job takes the GPU next: a pure choice over a snapshot.

``fifo`` grants in arrival order. ``affinity`` saves swaps: it takes the
waiting job that runs without any eviction (its consumer resident, or
loadable into free VRAM) ahead of an older one that would need one, the
way a careful person would batch the jobs of a loaded model. Two bounds
keep it from starving anyone:

- no job is passed more than ``max_bypass`` times: a job passed that often
  goes next, whatever it costs;
- nor does a job wait more than ``max_delay_s`` beyond its FIFO turn (the
  first time the GPU came free while it was the oldest waiting job, when
  FIFO would have run it): then it goes at the next grant.

Among jobs that are due, the oldest goes first. Otherwise a higher
``priority`` goes first, then a job that needs no eviction, then the older.
Both bounds are checked when the GPU comes free, so from its turn a job
waits for at most ``max_bypass`` other jobs, and at most ``max_delay_s``
plus the one job running when that time passed.

The lock (gpulock.py) keeps the waiting jobs in arrival order and calls
``choose_next`` with the mutex held; ``take`` does the bookkeeping of a
grant. Nothing here blocks, reads a clock or does I/O: the tests drive it
with tables and with hypothesis (tests/test_schedule.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, MutableSequence, Protocol, Sequence

POLICIES = ("fifo", "affinity")


@dataclass(frozen=True)
class Rules:
    policy: str = "affinity"
    max_bypass: int = 4
    max_delay_s: float = 120.0


class Waiter(Protocol):
    """What the choice reads of a waiting job (gpulock.Ticket has these)."""
    id: int                      # arrival order
    consumer: str | None         # None: no VRAM decision (runs anywhere)
    priority: int
    needs_room: bool             # False for an unload: it frees VRAM, needs none
    head_since: float | None     # when it became the oldest waiting job: its FIFO turn
    bypassed: int                # how often a younger job was granted before it


@dataclass(frozen=True)
class Choice:
    index: int                   # into the waiting jobs, oldest first
    reason: str
    saved_swap: bool = False     # the oldest needed an eviction, the chosen one none


def choose_next(waiting: Sequence[Waiter], fits: Mapping[str, bool], rules: Rules,
                now: float) -> Choice:
    """The job to grant next. ``fits[consumer]``: whether a job of that
    consumer runs now without evicting anything (a missing consumer
    counts as needing an eviction)."""
    if not waiting:
        raise ValueError("nobody waits")
    if rules.policy == "fifo" or len(waiting) == 1:
        return Choice(0, "oldest")
    for i, w in enumerate(waiting):
        if w.bypassed >= rules.max_bypass:
            return Choice(i, f"passed {w.bypassed} times (max_bypass)")
        if w.head_since is not None and now - w.head_since >= rules.max_delay_s:
            return Choice(i, f"{now - w.head_since:.1f} s past its turn (max_delay_s)")

    def free(w: Waiter) -> bool:
        return not w.needs_room or w.consumer is None or fits.get(w.consumer, False)

    best = min(range(len(waiting)),
               key=lambda i: (-waiting[i].priority, not free(waiting[i]), i))
    if best == 0:
        return Choice(0, "oldest")
    chosen, oldest = waiting[best], waiting[0]
    saved = free(chosen) and not free(oldest)
    if chosen.priority > oldest.priority:
        return Choice(best, f"priority {chosen.priority} over {oldest.priority}", saved)
    return Choice(best, f"{chosen.consumer} runs without an eviction", saved)


def alike(waiting: Sequence[Waiter]) -> bool:
    """Whether every waiting job has the same consumer, priority and need
    of room: then ``choose_next`` takes the oldest whatever fits (its
    order ties), and no bound names another (a younger job is never passed
    more often than an older one, and only the oldest has a turn), so the
    caller need not judge what fits."""
    first = waiting[0]
    return all(w.consumer == first.consumer and w.priority == first.priority
               and w.needs_room == first.needs_room for w in waiting)


def take(waiting: MutableSequence[Waiter], index: int) -> Waiter:
    """Remove ``waiting[index]`` for a grant: every older job was passed
    once more."""
    chosen = waiting[index]
    del waiting[index]
    for w in waiting[:index]:
        w.bypassed += 1
    return chosen


def mark_turn(waiting: Sequence[Waiter], now: float) -> None:
    """Called as the GPU comes free, before the choice: the oldest waiting
    job has reached its FIFO turn, under FIFO it would go now (once)."""
    if waiting and waiting[0].head_since is None:
        waiting[0].head_since = now
