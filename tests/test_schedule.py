"""Which waiting job goes next (schedule.py), without threads or HTTP:
tables for each rule, and hypothesis for the starvation bounds under
adversarial arrivals."""

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpumanager.schedule import Rules, alike, choose_next, mark_turn, take

AFFINITY = Rules("affinity", max_bypass=4, max_delay_s=120)


@dataclass
class W:
    """A waiting job, as the lock's Ticket shows it to the choice."""
    id: int
    consumer: str
    priority: int = 0
    needs_room: bool = True
    head_since: float | None = None
    bypassed: int = 0
    duration: float = 1.0


def queue(*consumers, **fields):
    return [W(i, c, **fields) for i, c in enumerate(consumers)]


# -- the rules, one by one -------------------------------------------------------

def test_fifo_takes_the_oldest_whatever_fits():
    w = queue("comfyui", "mvoice")
    assert choose_next(w, {"mvoice": True}, Rules("fifo"), 0).index == 0


def test_affinity_takes_a_job_that_fits_ahead_of_one_that_needs_an_eviction():
    w = queue("comfyui", "comfyui", "mvoice", "mvoice")
    choice = choose_next(w, {"comfyui": False, "mvoice": True}, AFFINITY, 0)
    assert (choice.index, choice.saved_swap) == (2, True)
    assert "without an eviction" in choice.reason


def test_affinity_keeps_arrival_order_when_the_oldest_fits_or_nothing_does():
    w = queue("comfyui", "mvoice", "ollama")
    assert choose_next(w, {"comfyui": True, "mvoice": True}, AFFINITY, 0).index == 0
    assert choose_next(w, {}, AFFINITY, 0).index == 0


def test_among_jobs_that_fit_the_oldest_goes_first():
    w = queue("comfyui", "ollama", "mvoice")
    assert choose_next(w, {"ollama": True, "mvoice": True}, AFFINITY, 0).index == 1


def test_a_job_passed_max_bypass_times_goes_next_whatever_it_costs():
    w = queue("comfyui", "mvoice")
    w[0].bypassed = 4
    choice = choose_next(w, {"mvoice": True}, AFFINITY, 0)
    assert choice.index == 0 and "max_bypass" in choice.reason
    w[0].bypassed = 3
    assert choose_next(w, {"mvoice": True}, AFFINITY, 0).index == 1


def test_a_job_max_delay_s_past_its_turn_goes_next():
    w = queue("comfyui", "mvoice")
    w[0].head_since = 10.0
    assert choose_next(w, {"mvoice": True}, AFFINITY, 129.9).index == 1
    choice = choose_next(w, {"mvoice": True}, AFFINITY, 130.0)
    assert choice.index == 0 and "max_delay_s" in choice.reason


def test_of_two_due_jobs_the_older_goes_first():
    w = queue("comfyui", "ollama", "mvoice")
    w[1].bypassed = w[0].bypassed = 4
    assert choose_next(w, {"mvoice": True}, AFFINITY, 0).index == 0


def test_a_higher_priority_goes_first_even_if_it_needs_an_eviction():
    w = queue("comfyui", "mvoice", "whisper")
    w[2].priority = 5
    choice = choose_next(w, {"mvoice": True}, AFFINITY, 0)
    assert choice.index == 2 and "priority" in choice.reason and not choice.saved_swap


def test_priority_gives_way_to_the_bounds():
    w = queue("comfyui", "mvoice")
    w[1].priority = 5
    w[0].bypassed = 4
    assert choose_next(w, {}, AFFINITY, 0).index == 0


def test_an_unload_needs_no_room():
    w = queue("comfyui", "ollama")
    w[1].needs_room = False
    assert choose_next(w, {}, AFFINITY, 0).index == 1


def test_a_grant_passes_every_older_job():
    w = queue("a", "b", "c", "d")
    assert take(w, 2).consumer == "c"
    assert [(x.consumer, x.bypassed) for x in w] == [("a", 1), ("b", 1), ("d", 0)]


def test_a_turn_starts_once_for_the_oldest():
    w = queue("a", "b")
    mark_turn(w, 7.0)
    mark_turn(w, 9.0)
    assert (w[0].head_since, w[1].head_since) == (7.0, None)
    take(w, 0)
    mark_turn(w, 11.0)
    assert w[0].head_since == 11.0


def test_nobody_waiting_is_an_error_not_a_guess():
    with pytest.raises(ValueError):
        choose_next([], {}, AFFINITY, 0)


# -- the bounds, under any arrivals ------------------------------------------------

SIZES = {"comfyui": 13, "mvoice": 3, "ollama": 8, "whisper": 2}


class Gpu:
    """Residency on a 15-unit GPU: a job's consumer loads on its turn,
    evicting the least recently used until it fits."""

    def __init__(self, capacity=15):
        self.capacity = capacity
        self.resident: dict[str, float] = {}       # consumer -> last used
        self.swaps = 0

    def fits(self, consumer):
        free = self.capacity - sum(SIZES[c] for c in self.resident)
        return consumer in self.resident or SIZES[consumer] <= free

    def run(self, consumer, now):
        while not self.fits(consumer):
            victim = min(self.resident, key=self.resident.get)
            del self.resident[victim]
            self.swaps += 1
        self.resident[consumer] = now
        assert sum(SIZES[c] for c in self.resident) <= self.capacity   # never over-committed


def replay(arrivals, rules):
    """Arrivals [(time, consumer, priority, duration)] through one GPU, the
    lock's way: the next job is chosen whenever the GPU comes free.
    Returns [(job, granted at)] and the GPU."""
    gpu, waiting, granted = Gpu(), [], []
    pending = sorted(enumerate(arrivals), key=lambda a: (a[1][0], a[0]))
    busy_until, now, i = None, 0.0, 0

    def grant(now):
        mark_turn(waiting, now)
        fits = {w.consumer: gpu.fits(w.consumer) for w in waiting}
        choice = choose_next(waiting, fits, rules, now)
        # What lets the lock skip judging what fits: alike jobs, the oldest.
        assert choice.index == 0 or not alike(waiting), choice
        job = take(waiting, choice.index)
        granted.append((job, now))
        gpu.run(job.consumer, now)
        return now + job.duration

    while i < len(pending) or waiting or busy_until is not None:
        if busy_until is not None and (i == len(pending) or busy_until <= pending[i][1][0]):
            now, busy_until = busy_until, None
        else:
            n, (t, consumer, priority, duration) = pending[i]
            i += 1
            now = t
            waiting.append(W(n, consumer, priority, duration=duration))
        if busy_until is None and waiting:
            busy_until = grant(now)
    return granted, gpu


arrival = st.tuples(st.floats(0, 60, allow_nan=False), st.sampled_from(sorted(SIZES)),
                    st.integers(0, 2), st.floats(0.1, 10, allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(arrivals=st.lists(arrival, min_size=1, max_size=40),
       max_bypass=st.integers(0, 6), max_delay_s=st.floats(0, 40, allow_nan=False))
def test_no_job_is_passed_or_delayed_beyond_the_bounds(arrivals, max_bypass, max_delay_s):
    rules = Rules("affinity", max_bypass, max_delay_s)
    granted, _ = replay(arrivals, rules)
    assert sorted(j.id for j, _ in granted) == list(range(len(arrivals)))   # everyone ran
    longest = max(d for *_, d in arrivals)
    for job, at in granted:
        assert job.bypassed <= max_bypass
        if job.head_since is not None:     # it was the oldest when the GPU came free
            # From its turn it waits for at most max_bypass other jobs, and at
            # most max_delay_s plus the job running when that passed.
            assert at - job.head_since <= min(max_bypass * longest,
                                              max_delay_s + longest) + 1e-6


@settings(max_examples=300, deadline=None)
@given(arrivals=st.lists(st.tuples(st.floats(0, 60, allow_nan=False),
                                   st.sampled_from(["mvoice", "comfyui"]), st.integers(0, 1),
                                   st.floats(0.1, 10, allow_nan=False)), min_size=1, max_size=40),
       max_bypass=st.integers(0, 6), max_delay_s=st.floats(0, 40, allow_nan=False))
def test_when_every_waiting_job_is_alike_the_oldest_goes_whatever_came_before(
        arrivals, max_bypass, max_delay_s):
    """Bursts of one consumer among others: replay asserts it at every grant."""
    granted, _ = replay(arrivals, Rules("affinity", max_bypass, max_delay_s))
    assert len(granted) == len(arrivals)


@settings(max_examples=100, deadline=None)
@given(arrivals=st.lists(arrival, min_size=1, max_size=40))
def test_without_bounds_to_spend_affinity_is_fifo(arrivals):
    fifo, _ = replay(arrivals, Rules("fifo"))
    tight, _ = replay(arrivals, Rules("affinity", max_bypass=0, max_delay_s=60))
    assert [j.id for j, _ in fifo] == [j.id for j, _ in tight]


def test_alternating_scripts_swap_far_less_with_affinity():
    """Two scripts, one queueing TTS jobs, one image jobs, ten each at once:
    FIFO swaps on every job, affinity in batches of at most max_bypass."""
    arrivals = [(0.01 * n, "comfyui" if n % 2 else "mvoice", 0, 1.0) for n in range(20)]
    _, fifo = replay(arrivals, Rules("fifo"))
    _, affinity = replay(arrivals, AFFINITY)
    assert fifo.swaps == 19
    assert affinity.swaps * 2 <= fifo.swaps


# -- the swap benchmark's lower bound, against brute force ----------------------------

def load_swaps_bench():
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("swaps", ROOT / "bench" / "swaps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def brute_force_fewest_swaps(swaps, consumers, max_bypass):
    """Every order within max_bypass, each with its best evictions."""
    from functools import lru_cache
    from itertools import combinations, permutations
    best = float("inf")
    for order in permutations(range(len(consumers))):
        if any(sum(1 for later in order[:pos] if later > job) > max_bypass
               for pos, job in enumerate(order)):
            continue

        @lru_cache(maxsize=None)
        def cost(pos, resident):
            if pos == len(order):
                return 0
            c = consumers[order[pos]]
            if c in resident:
                return cost(pos + 1, resident)
            out = float("inf")
            evictable = [r for r in resident if not swaps.may_coexist(r, c)]
            for size in range(len(evictable) + 1):
                for victims in combinations(evictable, size):
                    after = (resident - set(victims)) | {c}
                    if sum(swaps.SIZES[x] for x in after) + swaps.CUSHION_MIB <= swaps.GPU_MIB:
                        out = min(out, size + cost(pos + 1, frozenset(after)))
            return out
        best = min(best, cost(0, frozenset()))
    return best


@settings(max_examples=60, deadline=None)
@given(consumers=st.lists(st.sampled_from(["mvoice", "whisper", "ollama", "comfyui"]),
                          min_size=1, max_size=6),
       max_bypass=st.integers(0, 3))
def test_the_offline_lower_bound_is_the_best_order_within_max_bypass(consumers, max_bypass):
    swaps = load_swaps_bench()
    assert swaps.fewest_swaps(consumers, max_bypass) == \
        brute_force_fewest_swaps(swaps, consumers, max_bypass)
