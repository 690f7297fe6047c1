"""The GPU lock across processes: ``fcntl.flock`` on one file per box.

The in-process ``GpuLock`` orders one worker's jobs; this makes the turn
exclusive on the machine, so that two workers (gunicorn's SIGTTIN), an old
and a new worker during a SIGHUP reload, or two brokers started on one box
can never run GPU jobs at once: the later ones wait. The holder writes its
pid into the file, so a waiter (and /v1/status) can say who holds it.

flock belongs to the open file, and the kernel drops it when the holder's
process dies, however it dies: a crashed broker never leaves the GPU locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from typing import Callable

from .errors import Abandoned, QueueTimeout

DEFAULT_DIR = "/run/mgpumanager"


LOCK_FILE_ENV = "MGPUMANAGER_LOCK_FILE"


def default_lock_file() -> str:
    """$MGPUMANAGER_LOCK_FILE, else /run/mgpumanager/gpu.lock where it may be
    created (systemd's RuntimeDirectory makes it so), else the user's
    runtime directory."""
    if os.environ.get(LOCK_FILE_ENV):
        return os.environ[LOCK_FILE_ENV]
    candidates = [DEFAULT_DIR]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "mgpumanager"))
    candidates.append(f"/tmp/mgpumanager-{os.getuid()}")
    for directory in candidates:
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK | os.X_OK):
            return os.path.join(directory, "gpu.lock")
    return os.path.join(candidates[-1], "gpu.lock")


class OsLock:
    """An exclusive flock, taken with a deadline and a cancel check, by the
    one thread the in-process FIFO lets through at a time."""

    def __init__(self, path: str, *, poll_s: float = 0.02,
                 clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.poll_s = poll_s
        self._clock = clock
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        # O_CLOEXEC: a child process (a load command) must not inherit the lock.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._held = False
        self._mutex = threading.Lock()

    def acquire(self, timeout: float, cancelled: Callable[[], bool] | None = None) -> None:
        """Wait for the lock; QueueTimeout after ``timeout`` s, Abandoned if cancelled."""
        deadline = self._clock() + timeout
        while not self.try_acquire():
            if self._clock() >= deadline:
                raise QueueTimeout(
                    f"waited {timeout:g} s for the GPU, which another process holds "
                    f"({self.describe_holder()}; lock file {self.path})", retry_after=5)
            if cancelled is not None and cancelled():
                raise Abandoned("the client went away while its job waited for another "
                                "process's GPU job")
            time.sleep(self.poll_s)

    def try_acquire(self) -> bool:
        with self._mutex:
            if self._held:
                raise RuntimeError("the GPU's OS lock is already held by this process")
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            self._held = True
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass                  # the pid is for people; the lock is what matters
        return True

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                return
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def holder_pid(self) -> int | None:
        """The pid that last took the lock (the holder, if it is held)."""
        try:
            text = os.pread(self._fd, 32, 0).decode().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def describe_holder(self) -> str:
        pid = self.holder_pid()
        return f"pid {pid}" if pid else "an unknown process"

    def held_elsewhere(self) -> bool:
        """Whether another process holds it now (a probe: takes and drops it)."""
        with self._mutex:
            if self._held:
                return False
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            return False

    def close(self) -> None:
        self.release()
        os.close(self._fd)
