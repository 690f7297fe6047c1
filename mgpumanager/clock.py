"""Time as the core sees it: one injected clock for every deadline and wait.

The broker's decisions compare deadlines (the queue's, a lease's, a
settle bound) and wait for the world to change (memory to show, a busy
service to go idle). Both go through one ``Clock`` so that a test can hand
the core a ``FakeClock`` whose time moves only when the core waits: a wait
that would take minutes runs in microseconds, and a wait that never ends
fails instead of hanging.

Wall time (``wall()``) is for display only: what the status page shows as
"when"; no deadline is ever taken from it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable


class Clock:
    """Monotonic seconds, a sleep on the same time line, and wall time for display."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def wall(self) -> float:
        return time.time()

    def on_advance(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever time jumps: a thread that sleeps in the
        kernel until a deadline (the lease watchdog) must look again. Real
        time never jumps."""

    def wait_until(self, done: Callable[[], bool], deadline: float, every_s: float) -> bool:
        """Poll ``done`` every ``every_s`` until it is true (True) or
        ``deadline`` passes (False). ``done`` is asked at least once."""
        while True:
            if done():
                return True
            left = deadline - self.now()
            if left <= 0:
                return False
            self.sleep(min(every_s, left))


class FakeClock(Clock):
    """Time moves only when the core sleeps; a wait that never ends fails.

    Wall time moves with it, from a fixed start, so that anything shown is
    reproducible too. The lease watchdog is woken whenever time moves
    (``on_advance``); the GPU queue's condition wait and the health probes
    still wait real time.
    """

    def __init__(self, start: float = 1000.0, *, max_sleeps: int = 200_000):
        self.t = start
        self._wall_offset = 1.7e9 - start
        self.sleeps = 0
        self.max_sleeps = max_sleeps
        self._wakes: list[Callable[[], None]] = []

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t + self._wall_offset

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        if self.sleeps >= self.max_sleeps:
            raise AssertionError(f"waited {self.sleeps} times: a wait that never ends")
        self.advance(max(seconds, 0.001))

    def on_advance(self, wake: Callable[[], None]) -> None:
        self._wakes.append(wake)

    def advance(self, seconds: float) -> None:
        self.t += seconds
        for wake in self._wakes:
            wake()


def iso_utc(t: float | None) -> str | None:
    """A wall time as ISO 8601 in UTC with milliseconds: 2026-12-02T10:49:12.345Z."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"
