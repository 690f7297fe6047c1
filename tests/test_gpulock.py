"""The FIFO GPU lock, without HTTP."""

import threading
import time

import pytest

from mgpumanager.errors import Abandoned, QueueFull, QueueTimeout
from mgpumanager.gpulock import GpuLock


def hold_in_thread(lock: GpuLock, label: str, order: list, release: threading.Event,
                   timeout: float = 10):
    def run():
        t = lock.acquire(label, timeout)
        order.append(label)
        release.wait(10)
        lock.release(t)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def wait_for_depth(lock: GpuLock, depth: int, timeout: float = 5):
    deadline = time.monotonic() + timeout
    while lock.snapshot().queue_depth != depth:
        assert time.monotonic() < deadline, f"queue depth {lock.snapshot().queue_depth} != {depth}"
        time.sleep(0.001)


def test_free_lock_is_granted_at_once_and_released():
    lock = GpuLock(4)
    t = lock.acquire("a", 1)
    assert lock.snapshot().holder == "a"
    lock.release(t)
    assert lock.snapshot().holder is None


def test_waiters_are_served_in_arrival_order_under_many_threads():
    lock = GpuLock(64)
    first = lock.acquire("holder", 1)
    order: list[str] = []
    go = threading.Event()
    go.set()                     # each waiter releases as soon as it has the lock
    threads = []
    for i in range(40):
        threads.append(hold_in_thread(lock, f"w{i:02d}", order, go))
        wait_for_depth(lock, i + 1)   # arrival order is the order we enqueued them
    lock.release(first)
    for th in threads:
        th.join(10)
    assert order == [f"w{i:02d}" for i in range(40)]
    assert lock.snapshot().queue_depth == 0 and lock.snapshot().holder is None


def test_full_queue_refuses_at_once_with_retry_after():
    lock = GpuLock(2)
    held = lock.acquire("holder", 1)
    release = threading.Event()
    waiters = [hold_in_thread(lock, f"w{i}", [], release) for i in range(2)]
    wait_for_depth(lock, 2)
    t0 = time.monotonic()
    with pytest.raises(QueueFull) as info:
        lock.acquire("third", 10)
    assert time.monotonic() - t0 < 2           # not the 10 s it would wait
    assert info.value.retry_after >= 1
    lock.release(held)
    release.set()
    for w in waiters:
        w.join(5)


def test_timeout_removes_ticket_and_wakes_next():
    lock = GpuLock(8)
    held = lock.acquire("holder", 1)
    with pytest.raises(QueueTimeout):
        t0 = time.monotonic()
        lock.acquire("impatient", 0.2)
    assert 0.19 <= time.monotonic() - t0 < 1.0
    assert lock.snapshot().queue_depth == 0          # no ticket left behind
    lock.release(held)
    assert lock.acquire("next", 0.1).label == "next"


def test_timed_out_head_leaves_the_next_waiter_first_in_line():
    lock = GpuLock(8)
    held = lock.acquire("holder", 1)
    errors, got = [], []

    def head():
        try:
            lock.acquire("head", 0.2)
        except QueueTimeout as e:
            errors.append(e)
    h = threading.Thread(target=head, daemon=True)
    h.start()
    wait_for_depth(lock, 1)
    # A lost wake-up would leave it asleep until its 20 s poll.
    p = threading.Thread(target=lambda: got.append(lock.acquire("patient", 20, poll_s=20)),
                         daemon=True)
    p.start()
    wait_for_depth(lock, 2)
    h.join(2)
    assert errors and lock.snapshot().waiting == ("patient",)
    t0 = time.monotonic()
    lock.release(held)
    p.join(5)
    assert got[0].label == "patient" and time.monotonic() - t0 < 3


def test_a_head_that_leaves_a_free_lock_wakes_the_waiter_behind_it():
    """The lock is free but its head gives up: the next waiter must not sleep on."""
    lock = GpuLock(8)
    held = lock.acquire("holder", 1)
    leave = threading.Event()
    got = []

    def head():
        with pytest.raises(Abandoned):
            lock.acquire("head", 10, cancelled=leave.is_set, poll_s=10)
    h = threading.Thread(target=head, daemon=True)
    h.start()
    wait_for_depth(lock, 1)
    # poll_s=10: the waiter behind only wakes on a notify, never by its own timer.
    p = threading.Thread(target=lambda: got.append(lock.acquire("next", 10, poll_s=10)),
                         daemon=True)
    p.start()
    wait_for_depth(lock, 2)
    leave.set()
    lock.release(held)             # wakes the head, which sees it must leave
    p.join(2)
    h.join(2)
    assert got and got[0].label == "next"


def test_cancelled_waiter_is_dropped_and_counted_out_of_the_queue():
    lock = GpuLock(8)
    held = lock.acquire("holder", 1)
    gone = threading.Event()
    errors = []

    def wait():
        try:
            lock.acquire("leaver", 10, cancelled=gone.is_set, poll_s=0.02)
        except Abandoned as e:
            errors.append(e)
    th = threading.Thread(target=wait, daemon=True)
    th.start()
    wait_for_depth(lock, 1)
    t0 = time.monotonic()
    gone.set()
    th.join(2)
    assert errors and time.monotonic() - t0 < 2     # not its 10 s
    assert lock.snapshot().queue_depth == 0
    lock.release(held)


def test_release_by_a_non_holder_is_an_error():
    lock = GpuLock(2)
    t = lock.acquire("a", 1)
    lock.release(t)
    with pytest.raises(RuntimeError):
        lock.release(t)


def test_try_acquire_only_takes_a_free_lock_with_nobody_waiting():
    lock = GpuLock(2)
    held = lock.acquire("a", 1)
    assert lock.try_acquire("idle") is None
    lock.release(held)
    t = lock.try_acquire("idle")
    assert t is not None and lock.snapshot().holder == "idle"
    lock.release(t)


def test_snapshot_reports_depth_and_oldest_wait():
    lock = GpuLock(4)
    held = lock.acquire("holder", 1)
    release = threading.Event()
    th = hold_in_thread(lock, "w", [], release)
    wait_for_depth(lock, 1)
    time.sleep(0.05)
    snap = lock.snapshot()
    assert snap.queue_depth == 1 and snap.waiting == ("w",) and snap.oldest_queued_s >= 0.05
    lock.release(held)
    release.set()
    th.join(2)


# -- a chooser (policy affinity) ------------------------------------------------

def order_of_grants(lock: GpuLock, n: int = 3, before_release=None) -> list[str]:
    """``n`` waiters queue behind a held lock in order w0, w1...; the order
    in which the lock then grants them."""
    first = lock.acquire("holder", 1)
    order: list[str] = []
    go = threading.Event()
    go.set()                     # each waiter releases as soon as it has the lock
    threads = []
    for i in range(n):
        threads.append(hold_in_thread(lock, f"w{i}", order, go))
        wait_for_depth(lock, i + 1)
    if before_release is not None:
        before_release()
    lock.release(first)
    for th in threads:
        th.join(10)
    return order


def test_a_chooser_names_who_takes_the_free_lock_and_the_passed_are_counted():
    lock = GpuLock(8, chooser=lambda waiting, now: len(waiting) - 1)   # the youngest

    def nobody_passed_yet():
        jobs = lock.snapshot().jobs
        assert [(j.label, j.bypassed) for j in jobs] == [("w0", 0), ("w1", 0), ("w2", 0)]
    assert order_of_grants(lock, before_release=nobody_passed_yet) == ["w2", "w1", "w0"]


def test_a_chooser_that_fails_or_answers_nonsense_falls_back_to_arrival_order():
    for chooser in (lambda waiting, now: 1 / 0, lambda waiting, now: 99):
        assert order_of_grants(GpuLock(8, chooser=chooser)) == ["w0", "w1", "w2"]


def test_a_chosen_waiter_that_leaves_hands_the_choice_on():
    chosen = []
    gone = threading.Event()

    def youngest(waiting, now):
        chosen.append(waiting[-1].label)
        if chosen[-1] == "leaves":
            gone.set()          # its client leaves the moment it is chosen
        return len(waiting) - 1
    lock = GpuLock(8, chooser=youngest)
    first = lock.acquire("holder", 1)
    order: list[str] = []
    go = threading.Event()
    go.set()
    stay = hold_in_thread(lock, "stays", order, go)
    wait_for_depth(lock, 1)

    def leaves():
        with pytest.raises(Abandoned):
            lock.acquire("leaves", 10, cancelled=gone.is_set, poll_s=0.01)
    th = threading.Thread(target=leaves, daemon=True)
    th.start()
    wait_for_depth(lock, 2)
    lock.release(first)
    th.join(10)
    stay.join(10)
    # Asked once: with one waiter left there is nothing to choose.
    assert chosen == ["leaves"]
    assert order == ["stays"] and lock.snapshot().holder is None


def test_a_waiter_chosen_just_before_a_close_is_refused_not_granted():
    """close() grants nothing more, also to the waiter the release just
    before it chose and that has not woken yet."""
    import sys
    from mgpumanager.errors import ShuttingDown
    lock = GpuLock(8)
    held = lock.acquire("holder", 1)
    out = {}

    def waiter():
        try:
            out["granted"] = lock.acquire("w", 5, poll_s=0.05)
        except ShuttingDown as e:
            out["refused"] = e
    th = threading.Thread(target=waiter)
    th.start()
    wait_for_depth(lock, 1)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5)      # keep the GIL: the release and the close back to back
    try:
        lock.release(held)
        lock.close("stopping")
    finally:
        sys.setswitchinterval(interval)
    th.join(5)
    assert "refused" in out, out
