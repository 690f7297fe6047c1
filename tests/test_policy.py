"""The eviction planner as a table: snapshot in, plan out."""

import pytest

from mgpumanager.policy import ConsumerView, plan_room

TOTAL = 24576


def view(name, mib, loaded=True, last_used=None, managed=False, unload=True, measured=None):
    return ConsumerView(name, mib, loaded, last_used, managed, unload, measured_mib=measured)


def plan(target, views, free, coexist=(), total=TOTAL, cushion=256):
    pairs = {frozenset(p) for p in coexist}
    return plan_room(target, {v.name: v for v in views}, free_mib=free, total_mib=total,
                     cushion_mib=cushion, coexist=lambda a, b: frozenset((a, b)) in pairs)


CASES = [
    pytest.param("tts", [view("tts", 3000, loaded=True), view("img", 13000)], 0, (),
                 (), True, id="resident-target-needs-nothing"),
    # 13000 MiB in use: the target's 3000 beside it only if the possibly
    # loaded img holds less than 10000 of it. Unloading img settles which.
    pytest.param("tts", [view("tts", 3000, loaded=True), view("img", 13000, loaded=None)],
                 TOTAL - 13000, [("tts", "img")], ("img",), True,
                 id="a-resident-target-is-not-credited-with-what-one-possibly-loaded-holds"),
    pytest.param("tts", [view("tts", 3000, loaded=True), view("img", 13000, loaded=None)],
                 TOTAL - 16000, [("tts", "img")], (), True,
                 id="room-in-use-for-both-a-resident-and-one-possibly-loaded-settles-nothing"),
    pytest.param("tts", [view("tts", 3000, loaded=False), view("img", 13000)], 5000, (),
                 (), True, id="fits-in-free-vram-without-eviction"),
    pytest.param("tts", [view("tts", 3000, False), view("img", 13000, last_used=5),
                         view("stt", 2500, last_used=1)], 1000, (),
                 ("stt",), True, id="least-recently-used-goes-first"),
    pytest.param("tts", [view("tts", 3000, False), view("img", 13000, last_used=5),
                         view("stt", 2500, last_used=None)], 1000, (),
                 ("stt",), True, id="never-used-counts-as-oldest"),
    pytest.param("tts", [view("tts", 3000, False), view("img", 13000, last_used=5),
                         view("stt", 2000, last_used=1)], 1000, [("tts", "stt")],
                 ("img",), True, id="coexisting-consumer-is-spared"),
    pytest.param("tts", [view("tts", 3000, False), view("img", 13000, last_used=5),
                         view("stt", 2000, last_used=1)], 1000, [("stt", "tts")],
                 ("img",), True, id="coexistence-holds-both-ways"),
    pytest.param("img", [view("img", 13000, False), view("llm", 8000, managed=True),
                         view("tts", 3000, last_used=9)], 10500, (),
                 ("tts",), True, id="vram-managed-is-never-chosen"),
    pytest.param("img", [view("img", 10000, False), view("a", 2000, last_used=1),
                         view("b", 12000, last_used=2)], 0, (),
                 ("b",), True, id="fewest-evictions-beat-strict-lru"),
    pytest.param("img", [view("img", 10000, False), view("a", 6000, last_used=1),
                         view("b", 6000, last_used=2), view("c", 12000, last_used=3)], 0, (),
                 ("c",), True, id="one-big-victim-beats-two-older-ones"),
    pytest.param("img", [view("img", 10000, False), view("a", 6000, last_used=1),
                         view("b", 6000, last_used=2)], 0, (),
                 ("a", "b"), True, id="several-victims-in-lru-order-when-needed"),
    pytest.param("tts", [view("tts", 3000, False), view("img", 13000, loaded=False)], 1000, (),
                 (), False, id="unloaded-consumers-free-nothing"),
    pytest.param("tts", [view("tts", 3000, False), view("img", 13000, loaded=None, last_used=1)],
                 1000, (), ("img",), True, id="unknown-state-counts-as-possibly-resident"),
    pytest.param("tts", [view("tts", 3000, False), view("stt", 2000, unload=False)], 1000, (),
                 (), False, id="no-unload-route-no-eviction"),
    pytest.param("tts", [view("tts", 3000, False), view("img", 1000, last_used=1)], 1000, (),
                 (), False, id="no-pointless-eviction-when-it-still-would-not-fit"),
]


@pytest.mark.parametrize("target,views,free,coexist,victims,fits", CASES)
def test_plan(target, views, free, coexist, victims, fits):
    p = plan(target, views, free, coexist)
    assert p.victims == victims
    assert p.fits is fits
    assert not p.never_fits


def test_a_job_larger_than_the_gpu_never_fits_and_evicts_nothing():
    p = plan("img", [view("img", 30000, False), view("tts", 3000)], 0)
    assert p.never_fits and p.victims == () and "30256 MiB" in p.reason


def test_vram_managed_holdings_count_against_what_could_ever_fit():
    p = plan("img", [view("img", 20000, False), view("llm", 8000, managed=True)], 0)
    assert p.never_fits and "vram_managed" in p.reason
    p = plan("img", [view("img", 20000, False), view("llm", 8000, loaded=False, managed=True)], 0)
    assert not p.never_fits


def test_the_cushion_is_part_of_the_need():
    views = [view("tts", 3000, False), view("img", 13000, last_used=1)]
    assert plan("tts", views, 3100, cushion=0).victims == ()
    assert plan("tts", views, 3100, cushion=256).victims == ("img",)


# The five ways beliefs went wrong (issue 10): measurement decides.
TRUTH_CASES = [
    pytest.param("img", [view("img", 13000, loaded=None), view("stt", 1800, loaded=None,
                                                               unload=False)],
                 16000, 16000 - 13000 - 1800, [("img", "stt")], (), True, False,
                 id="possibly-resident-target-is-not-counted-against-itself"),
    pytest.param("img", [view("img", 17000, loaded=False), view("llm", 6000, managed=True)],
                 24576, 24000, (), (), True, False,
                 id="managed-belief-gives-way-to-a-reading-with-room"),
    pytest.param("img", [view("img", 13000, loaded=True, last_used=1),
                         view("tts", 3200, last_used=2)],
                 16000, 16000 - 3200, (), ("tts",), True, True,
                 id="resident-belief-the-reading-contradicts-is-not-resident"),
    pytest.param("img", [view("img", 13000, loaded=True, last_used=1),
                         view("tts", 4000, last_used=2)],
                 16000, 16000 - 17000, (), ("tts",), True, True,
                 id="beliefs-above-the-total-are-resolved-by-eviction"),
    pytest.param("img", [view("img", 13000, loaded=False), view("llm", 6000, loaded=None,
                                                                managed=True)],
                 16000, 16000 - 6000, (), (), False, False,
                 id="unknown-managed-consumer-counts-against-what-could-ever-fit"),
]


@pytest.mark.parametrize("target,views,total,free,coexist,victims,fits,contradicted",
                         TRUTH_CASES)
def test_measurement_decides(target, views, total, free, coexist, victims, fits, contradicted):
    p = plan(target, views, free, coexist, total=total)
    assert (p.victims, p.fits, p.contradicted) == (victims, fits, contradicted)


def test_an_unknown_managed_consumer_the_reading_confirms_means_never_fits():
    p = plan("img", [view("img", 13000, loaded=False),
                     view("llm", 6000, loaded=None, managed=True)], 16000 - 6000, total=16000)
    assert p.never_fits and "vram_managed" in p.reason


def test_a_believed_resident_target_the_reading_confirms_needs_nothing():
    p = plan("img", [view("img", 13000, loaded=True), view("tts", 3000)], 0, total=16000)
    assert p.need_mib == 0 and p.victims == () and not p.contradicted


# A live reading cannot tell whose memory is whose.
LIVE_CASES = [
    pytest.param("img", [view("img", 13500, loaded=None), view("llm", 8000, managed=True),
                         view("tts", 3200, loaded=False, last_used=1)],
                 24576, 24576 - 8000 - 3200, (), ("tts",), True,
                 id="memory-no-belief-explains-makes-not-loaded-ones-candidates"),
    pytest.param("img", [view("img", 13000, loaded=None), view("stt", 1800, loaded=True,
                                                               unload=False)],
                 24576, 24576 - 13000 - 1800, [("img", "stt")], ("img",), True,
                 id="a-possibly-resident-target-that-does-not-fit-is-unloaded-to-settle-it"),
    pytest.param("img", [view("img", 13000, loaded=None), view("stt", 1800, loaded=True)],
                 24576, 24576 - 1800, (), (), True,
                 id="a-possibly-resident-target-with-room-needs-nothing"),
    # Seen in the swap benchmark: ComfyUI, never used, was unloaded first
    # (one victim beats two), though every MiB in use was someone else's.
    pytest.param("img", [view("img", 13500, loaded=None),
                         view("tts", 3200, loaded=True, last_used=1),
                         view("llm", 8000, loaded=True, last_used=2),
                         view("stt", 1800, loaded=True, last_used=3)],
                 16384, 16384 - 3200 - 8000 - 1800, [("img", "stt")], ("tts", "llm"), True,
                 id="a-possibly-resident-target-the-reading-leaves-no-room-for-is-no-victim"),
    # Seen on an H100: every torch process holds a 700 MiB context, loaded or
    # not. Measured, that is theirs, not memory that makes unloaded ones suspects.
    pytest.param("img", [view("img", 33000, loaded=False, measured=700),
                         view("tts", 30700, loaded=True, last_used=1, measured=30700),
                         view("stt", 30000, loaded=False, measured=700)],
                 64000, 64000 - 32100, (), ("tts",), True,
                 id="what-unloaded-consumers-are-measured-holding-is-explained"),
]


@pytest.mark.parametrize("target,views,total,free,coexist,victims,fits", LIVE_CASES)
def test_a_live_reading_credits_no_one_it_cannot_see(target, views, total, free, coexist,
                                                     victims, fits):
    pairs = {frozenset(p) for p in coexist}
    p = plan_room(target, {v.name: v for v in views}, free_mib=free, total_mib=total,
                  cushion_mib=256, coexist=lambda a, b: frozenset((a, b)) in pairs, live=True)
    assert (p.victims, p.fits) == (victims, fits)


def test_of_equally_few_victims_one_the_queue_needs_is_spared():
    """LRU would unload tts (used longest ago), but a tts job waits: the
    llm, needed by no waiting job, goes instead."""
    views = [view("img", 14000, loaded=False), view("tts", 6000, last_used=1),
             view("llm", 6000, last_used=2)]
    views[1] = ConsumerView("tts", 6000, True, 1, False, True, waiting=2)
    assert plan("img", views, free=TOTAL - 12000).victims == ("llm",)
    views[1] = ConsumerView("tts", 6000, True, 1, False, True, waiting=0)
    assert plan("img", views, free=TOTAL - 12000).victims == ("tts",)


def test_an_unloaded_consumers_stale_measurement_explains_at_most_a_quarter_of_it():
    """Seen in the OOM storm: ollama's last /api/ps (8000 MiB, from before its
    eviction) made the reading look explained, so ComfyUI, resident, was
    taken for not resident."""
    views = [view("img", 13500, loaded=True, last_used=2),
             view("llm", 8000, loaded=False, measured=8000),
             view("stt", 1800, loaded=True, last_used=1)]
    p = plan("img", views, free=TOTAL - 13500 - 1800, coexist=[("img", "stt")])
    assert p.victims == () and not p.contradicted, p.reason
