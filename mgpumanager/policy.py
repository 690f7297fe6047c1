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


@dataclass(frozen=True)
class ConsumerView:
    """What the planner may know of one consumer."""
    name: str
    resident_mib: int
    loaded: bool | None          # None: unknown, so possibly resident
    last_used: float | None      # end of its last successful job; None: never used
    vram_managed: bool = False
    can_unload: bool = False


@dataclass(frozen=True)
class Plan:
    need_mib: int                # VRAM the target still needs free (0: already resident)
    free_mib: int
    victims: tuple[str, ...]     # unload these, in this order
    fits: bool                   # after the victims go, the target fits by estimate
    never_fits: bool             # it cannot fit whatever is unloaded
    reason: str


def lru_key(view: ConsumerView) -> tuple:
    """Never-used first, then by the end of the last job, oldest first."""
    return (view.last_used is not None, view.last_used or 0.0, view.name)


def eviction_candidates(target: str, views: Mapping[str, ConsumerView],
                        coexist: Callable[[str, str], bool]) -> list[ConsumerView]:
    return sorted((v for v in views.values()
                   if v.name != target and not v.vram_managed and v.can_unload
                   and v.loaded is not False and not coexist(v.name, target)),
                  key=lru_key)


def plan_room(target: str, views: Mapping[str, ConsumerView], *, free_mib: int,
              total_mib: int, cushion_mib: int,
              coexist: Callable[[str, str], bool]) -> Plan:
    """Decide which consumers to unload so that ``target`` fits.

    A resident target needs nothing. Otherwise it needs its resident VRAM
    plus the cushion free. The fewest possible victims are chosen among the
    loaded (or possibly loaded) consumers that have an unload route, are not
    vram_managed and may not coexist with the target; among equally few, the
    least recently used. If even all of them would not make room, nothing is
    unloaded: the caller waits for VRAM instead of evicting in vain.
    """
    me = views[target]
    if me.loaded is True:
        return Plan(0, free_mib, (), True, False, f"{target} is already resident")
    need = me.resident_mib + cushion_mib
    managed = sum(v.resident_mib for v in views.values()
                  if v.vram_managed and v.loaded and v.name != target)
    if need > total_mib - managed:
        return Plan(need, free_mib, (), False, True,
                    f"{target} needs {need} MiB ({me.resident_mib} resident + {cushion_mib} "
                    f"cushion) but the GPU has {total_mib} MiB"
                    + (f", {managed} MiB of it held by vram_managed consumers" if managed else ""))
    if free_mib >= need:
        return Plan(need, free_mib, (), True, False, f"{need} MiB needed, {free_mib} MiB free")

    candidates = eviction_candidates(target, views, coexist)
    victims = _fewest_victims(candidates, need - free_mib)
    if victims is None:
        evictable = sum(c.resident_mib for c in candidates)
        return Plan(need, free_mib, (), False, False,
                    f"{target} needs {need} MiB, {free_mib} MiB free, and unloading every "
                    f"consumer that may be unloaded would free only {evictable} MiB more")
    names = tuple(v.name for v in victims)
    return Plan(need, free_mib, names, True, False,
                f"{target} needs {need} MiB, {free_mib} MiB free: unload {', '.join(names)}")


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
