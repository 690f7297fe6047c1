"""The eviction planner: a pure function from a snapshot to a plan.

It does no I/O and keeps no state, so every rule is tested with a table
(tests/test_policy.py). The broker calls it under the GPU lock with a fresh
reading, carries out the plan, re-reads, and asks again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Mapping

# Above this many candidates the exact search would take noticeable time;
# the greedy LRU walk is used instead.
EXACT_SEARCH_LIMIT = 12

# Every CUDA process holds a context, loaded or not: about 500-700 MiB on an
# H100 with torch (bench/GPU.md), up to a GiB with larger workspaces.
CONTEXT_MIB = 1024


def context_allowance(resident_mib: int) -> int:
    """The most a consumer measured without its model may hold: a context,
    and never more than half its configured size (a small consumer's whole
    footprint is not a context)."""
    return min(CONTEXT_MIB, resident_mib // 2)


@dataclass(frozen=True)
class ConsumerView:
    """What the planner may know of one consumer."""
    name: str
    resident_mib: int
    loaded: bool | None          # None: unknown, so possibly resident
    last_used: float | None      # end of its last successful job; None: never used
    vram_managed: bool = False
    can_unload: bool = False
    reload_s: float | None = None   # measured cost of loading it again; None: unmeasured
    measured_mib: int | None = None  # what its processes hold now; None: not measured
    waiting: int = 0                 # jobs for it waiting in the queue now
    reports: bool = False            # asking it tells whether it is loaded


@dataclass(frozen=True)
class Plan:
    need_mib: int                # VRAM the target still needs free (0: already resident)
    free_mib: int                # what is free for it: the reading, plus its own share
    victims: tuple[str, ...]     # unload these, in this order
    fits: bool                   # after the victims go, the target fits by estimate
    never_fits: bool             # it cannot fit whatever is unloaded
    reason: str
    contradicted: bool = False   # the reading shows the target cannot be resident as believed
    # It does not fit now, but memory may come free without the broker: a
    # vram_managed consumer expires its own models, or a live reading shows
    # memory no belief explains (another program's, a late free). Without
    # either, waiting cannot help: refuse at once.
    may_free: bool = False


def lru_key(view: ConsumerView) -> tuple:
    """Those no waiting job needs first (evict what is needed furthest
    ahead); then never-used first, then by the end of the last job, oldest
    first; between equally recent ones (never used, say), the cheaper to
    load again first (unmeasured counts as dearest), then by name."""
    return (view.waiting > 0, view.last_used is not None, view.last_used or 0.0,
            view.reload_s if view.reload_s is not None else float("inf"), view.name)


def eviction_candidates(target: str, views: Mapping[str, ConsumerView],
                        coexist: Callable[[str, str], bool]) -> list[ConsumerView]:
    """Who may be unloaded for ``target``: a loaded consumer that may not
    stay beside it, and one of unknown state even if it may (every sum
    counts it, and unloading it settles what it holds). Those that must go
    anyway first."""
    return sorted((v for v in views.values()
                   if v.name != target and not v.vram_managed and v.can_unload
                   and (v.loaded is None or (v.loaded and not coexist(v.name, target)))),
                  key=lambda v: (coexist(v.name, target), lru_key(v)))


@dataclass(frozen=True)
class Resident:
    """A consumer believed loaded on one GPU, as the short path checks it."""
    mib: int                 # its share of the GPU
    others_mib: int          # the shares of every other consumer loaded or possibly there
    surely_mib: int          # of those surely loaded
    changed_at: float        # when a belief of any consumer there last changed

    @classmethod
    def among(cls, mib: int, others: list[tuple[int, bool | None]],
              changed_at: float) -> Resident:
        """Of ``mib`` beside ``others``, (share, loaded) of each other consumer there."""
        return cls(mib, sum(m for m, loaded in others if loaded is not False),
                   sum(m for m, loaded in others if loaded), changed_at)


def resident_agrees(resident_mib: int, others_mib: int, surely_mib: int, *, free_mib: int,
                    total_mib: int) -> bool:
    """Whether a reading agrees that a target believed resident is: the
    memory in use beyond what the others hold (``others_mib``) can be its,
    and it fits beside those surely loaded (``surely_mib``). Free memory
    does not enter: a resident target needs none more. The short path
    counts the possibly loaded among the others: memory one may hold is
    not taken for the target's there (the planner settles which it is)."""
    used = total_mib - free_mib
    return used - others_mib >= resident_mib and surely_mib + resident_mib <= total_mib


def plan_room(target: str, views: Mapping[str, ConsumerView], *, free_mib: int,
              total_mib: int, cushion_mib: int,
              coexist: Callable[[str, str], bool], live: bool = False) -> Plan:
    """Decide which consumers to unload so that ``target`` fits.

    Measurement first: ``free_mib`` and ``total_mib`` are the reading (for
    the ledger, the ledger's own). Beliefs (who is loaded) say who may be
    evicted and what each would free, and give way where the reading
    contradicts them:

    - The target's *share* is what the reading can attribute to it: what is
      in use beyond everyone else believed resident, up to its own size. A
      possibly-resident target is never counted against itself: with the
      ledger its share is free for it (if it is resident it needs nothing
      more; if not, what the ledger gave it is free). A live reading cannot
      tell its memory from another program's, so there a possibly-resident
      target that does not fit is itself a candidate to unload: that
      settles what it holds.
    - With a live reading, memory in use that no belief explains means a
      belief is stale (another process loaded something): consumers
      believed not loaded become candidates too. What consumers believed
      not loaded are measured holding, up to a CUDA context
      (``context_allowance``), is theirs and explained; a target's own is
      its room.
    - A target believed resident needs nothing, unless the reading shows it
      cannot be (its share falls short of its size, or the beliefs add up to
      more than the GPU): then it is treated as not resident, and the plan
      says so (``contradicted``).
    - It needs its resident VRAM plus the cushion. It never fits if that is
      more than the total less what vram_managed consumers hold, as far as
      the reading confirms them.
    - Otherwise the fewest victims among the consumers that have an unload
      route, are not vram_managed, and are loaded and may not coexist with
      the target or are of unknown state (unloading settles it); among
      equally few, those that must go anyway, then the least recently used.
      If even all of them would not make room, nothing is unloaded: the
      caller waits for VRAM if something may free it by itself
      (``may_free``) and refuses at once if not; except that a
      possibly-resident target nobody else can make room for is its own
      last candidate (unloading it settles what it holds).
    """
    me = views[target]
    need = me.resident_mib + cushion_mib
    used = total_mib - free_mib
    others = [v for v in views.values() if v.name != target and v.loaded is not False]
    # What unloaded consumers are measured still holding (a CUDA context, a
    # cache) is theirs, not unexplained; at most its context allowance, the
    # most a consumer "not loaded" holds.
    residue = sum(min(v.measured_mib or 0, context_allowance(v.resident_mib))
                  for v in views.values() if v.name != target and v.loaded is False)
    others_mib = sum(v.resident_mib for v in others) + residue
    # Not the residue: a stale figure there must not deny a resident target.
    surely_mib = sum(v.resident_mib for v in others if v.loaded is True)
    # Credit only what no possibly-loaded consumer could be holding: a live
    # reading cannot tell whose memory is whose.
    if me.loaded is False:
        # Its measured context is its own, part of its configured size.
        share = min(me.measured_mib or 0, context_allowance(me.resident_mib)) if live else 0
    elif live and me.loaded is None:
        share = 0
    else:
        share = min(me.resident_mib, max(0, used - others_mib))
    room = free_mib + share
    contradicted = False
    if me.loaded is True:
        if resident_agrees(me.resident_mib, surely_mib, surely_mib,
                           free_mib=free_mib, total_mib=total_mib):
            # The memory in use may yet be a possibly loaded consumer's and
            # not the target's: unloading enough of them settles which.
            short = me.resident_mib - (used - (others_mib - residue))
            unsure = [v for v in eviction_candidates(target, views, coexist)
                      if v.loaded is None] if short > 0 else []
            settle = _fewest_victims(unsure, short) if unsure else None
            if settle:
                # Its need, were it not resident: an unload waits for that
                # room or for the victim's memory to show, not for nothing.
                names = tuple(v.name for v in settle)
                return Plan(need, room, names, True, False,
                            f"{target} is resident only if {', '.join(names)} hold nothing: "
                            "unloading settles it")
            return Plan(0, room, (), True, False, f"{target} is already resident")
        contradicted = True       # the reading has no room for it: it is not what we believe
    managed_believed = sum(v.resident_mib for v in others if v.vram_managed)
    managed = min(managed_believed,
                  max(0, used - share - (others_mib - managed_believed)))
    if room >= need:
        return Plan(need, room, (), True, False, f"{need} MiB needed, {room} MiB free",
                    contradicted)
    if need > total_mib - managed:
        return Plan(need, room, (), False, True,
                    f"{target} needs {need} MiB ({me.resident_mib} resident + {cushion_mib} "
                    f"cushion) but the GPU has {total_mib} MiB"
                    + (f", {managed} MiB of it held by vram_managed consumers" if managed else ""),
                    contradicted)

    candidates = eviction_candidates(target, views, coexist)
    unexplained = live and used - others_mib - share > cushion_mib
    # Memory no belief explains may come free by itself, unless it may be
    # the target's own; a vram_managed consumer frees by itself, and a
    # ledger sees it only if asking says so.
    managed_believed_mib = sum(v.resident_mib for v in others if v.vram_managed)
    may_free = (live and used - others_mib - share
                - (me.resident_mib if me.loaded is None else 0) > cushion_mib) \
        or any(v.vram_managed and v.reports for v in others) \
        or (live and managed_believed_mib > 0
            and used - share >= others_mib - cushion_mib)   # the reading can hold it
    if live:
        extra = [v for v in views.values()
                 if v.can_unload and not v.vram_managed and v not in candidates and (
                     (v.name == target and me.loaded is None and unexplained) or
                     (unexplained and v.name != target and v.loaded is False
                      and not coexist(v.name, target)))]
        # The target itself last: if it is resident, unloading it is the dearest.
        candidates = sorted(candidates + extra, key=lambda v: (
            v.name == target, coexist(v.name, target), lru_key(v)))
    victims = _fewest_victims(candidates, need - room)
    if victims is None and live and me.loaded is None and me.can_unload \
            and not me.vram_managed and me not in candidates:
        # Nobody else can make room, and the reading cannot say the target
        # holds nothing: unloading it settles what it holds (last resort).
        candidates = candidates + [me]
        victims = _fewest_victims(candidates, need - room)
    if victims is None:
        evictable = sum(c.resident_mib for c in candidates)
        return Plan(need, room, (), False, False,
                    f"{target} needs {need} MiB, {room} MiB free, and unloading every "
                    f"consumer that may be unloaded would free only {evictable} MiB more",
                    contradicted, may_free)
    names = tuple(v.name for v in victims)
    return Plan(need, room, names, True, False,
                f"{target} needs {need} MiB, {room} MiB free: unload {', '.join(names)}",
                contradicted)


def _fewest_victims(candidates: list[ConsumerView], short_mib: int) -> list[ConsumerView] | None:
    if sum(c.resident_mib for c in candidates) < short_mib:
        return None
    if len(candidates) <= EXACT_SEARCH_LIMIT:
        # combinations() keeps the LRU order of its input, so the first set
        # that fits at the smallest size is also the least recently used one.
        for size in range(1, len(candidates) + 1):
            for combo in itertools.combinations(candidates, size):
                if sum(c.resident_mib for c in combo) >= short_mib:
                    return list(combo)
    chosen, freed = [], 0
    for c in candidates:
        if freed >= short_mib:
            break
        chosen.append(c)
        freed += c.resident_mib
    # Drop any victim the others make unnecessary, sparing the most recent first.
    for c in reversed(list(chosen)):
        if freed - c.resident_mib >= short_mib:
            chosen.remove(c)
            freed -= c.resident_mib
    return chosen
