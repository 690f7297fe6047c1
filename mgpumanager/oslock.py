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
import stat
import threading
from typing import Callable

from .clock import Clock
from .errors import Abandoned, QueueTimeout

DEFAULT_DIR = "/run/mgpumanager"
# Where the broker falls back to without /run/mgpumanager: one path for the
# box, whoever runs the broker (a lock path per user would let two users'
# brokers run GPU jobs at once). /tmp is sticky, so a file planted there by
# another user is theirs, and is opened as the lock file below allows.
FALLBACK_FILE = "/tmp/mgpumanager-gpu.lock"
LOCK_FILE_ENV = "MGPUMANAGER_LOCK_FILE"


class LockFileError(Exception):
    """The lock file cannot be used; the message says why and what to do."""


def default_lock_file() -> str:
    """$MGPUMANAGER_LOCK_FILE, else /run/mgpumanager/gpu.lock where it can
    be opened (systemd's RuntimeDirectory makes the directory; a broker of
    another user there opens the file read-only), else
    /tmp/mgpumanager-gpu.lock."""
    if os.environ.get(LOCK_FILE_ENV):
        return os.environ[LOCK_FILE_ENV]
    preferred = os.path.join(DEFAULT_DIR, "gpu.lock")
    try:
        os.makedirs(DEFAULT_DIR, mode=0o755, exist_ok=True)
        fd, _ = open_lock_file(preferred, create_dir=False)
    except (OSError, LockFileError):
        return FALLBACK_FILE
    os.close(fd)
    return preferred


def device_lock_file(path: str, index: int) -> str:
    """GPU ``index``'s lock file: ``path`` itself for GPU 0 (a broker from
    before several GPUs shares it), ``gpu.1.lock`` beside ``gpu.lock`` for
    GPU 1."""
    if index == 0:
        return path
    stem, dot, ext = path.rpartition(".")
    if not dot or "/" in ext:
        return f"{path}.{index}"
    return f"{stem}.{index}.{ext}"


def open_lock_file(path: str, *, create_dir: bool = True) -> tuple[int, bool]:
    """Open the lock file safely: never through a symbolic link, only a
    regular file, read-only where it is another user's (flock needs no
    write access). Returns (fd, whether the pid may be written into it:
    only a file of our own with one name). LockFileError says why not."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    directory = os.path.dirname(path)
    try:
        if create_dir and directory and not os.path.isdir(directory):
            os.makedirs(directory, exist_ok=True)
        try:
            # O_CLOEXEC: a child process (a load command) must not inherit the lock.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockFileError(f"{path} is a symbolic link: refusing it (another user may "
                                "have planted it); remove it, or set scheduler.lock_file") from None
        raise LockFileError(f"cannot open the GPU lock file {path}: {e.strerror}; set "
                            "scheduler.lock_file to a path this user can create") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise LockFileError(f"{path} is not a regular file: refusing it; remove it, or set "
                            "scheduler.lock_file")
    os.set_blocking(fd, True)
    writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    return fd, writable and st.st_uid == os.geteuid() and st.st_nlink == 1


def flock_holders(path_fd: int) -> list[int]:
    """The pids the kernel says hold an flock on this file (/proc/locks)."""
    st = os.fstat(path_fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == inode \
                        and parts[4].isdigit():
                    pids.append(int(parts[4]))
    except OSError:
        pass
    return pids


def lock_file_problem(cfg) -> str | None:
    """Why the config's lock file cannot be used, as the worker would open
    it at boot; None if it can."""
    try:
        OsLock(cfg.scheduler.lock_file or default_lock_file()).close()
    except LockFileError as e:
        return str(e)
    return None


class OsLock:
    """An exclusive flock, taken with a deadline and a cancel check, by the
    one thread the in-process FIFO lets through at a time."""

    def __init__(self, path: str, *, poll_s: float = 0.02, clock: Clock | None = None):
        self.path = path
        self.poll_s = poll_s
        self._clock = clock or Clock()
        self._fd, self._writable = open_lock_file(path)
        self._held = False
        self._held_since: float | None = None     # monotonic: when we took it
        self._mutex = threading.Lock()
        # Whether another process held the lock since this one last did (its
        # pid was in the file): what this process believes of the GPU may
        # have changed meanwhile. Known only where this process writes its pid.
        self.others_held_since_last = False

    def acquire(self, deadline: float, cancelled: Callable[[], bool] | None = None) -> None:
        """Wait for the lock until ``deadline`` (on its clock): QueueTimeout
        then, Abandoned as soon as ``cancelled()``."""
        started = self._clock.now()
        while not self.try_acquire():
            if self._clock.now() >= deadline:
                raise QueueTimeout(
                    f"waited {self._clock.now() - started:.0f} s for the GPU, which another "
                    f"process holds ({self.describe_holder()}; lock file {self.path})",
                    retry_after=5)
            if cancelled is not None and cancelled():
                raise Abandoned("the client went away while its job waited for another "
                                "process's GPU job")
            self._clock.sleep(self.poll_s)

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
            if not self._same_file():
                # Deleted or replaced while we held it open (systemd removing
                # its RuntimeDirectory, tmpfiles ageing /tmp): another broker
                # may hold the file now at the path. Take that one instead.
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                self._reopen()
                return False
            self._held = True
        if self._writable:
            mine = f"{os.getpid()}\n".encode()
            try:
                last = os.pread(self._fd, 32, 0)
                self.others_held_since_last = last not in (b"", mine)
                if last != mine:
                    os.ftruncate(self._fd, 0)
                    os.pwrite(self._fd, mine, 0)
            except OSError:
                pass              # the pid is for people; the lock is what matters
        return True

    def _same_file(self) -> bool:
        try:
            at_path = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        ours = os.fstat(self._fd)
        return (at_path.st_dev, at_path.st_ino) == (ours.st_dev, ours.st_ino)

    def _reopen(self) -> None:
        old = self._fd
        try:
            self._fd, self._writable = open_lock_file(self.path)
        except LockFileError:
            return                # keep the old one; the next try opens again
        os.close(old)

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                return
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def holder_pid(self) -> int | None:
        """The pid holding the lock, as the kernel says (the file's content
        is what any writer put there, so it only breaks a tie)."""
        holders = flock_holders(self._fd)
        try:
            text = os.pread(self._fd, 32, 0).decode().strip()
        except OSError:
            text = ""
        written = int(text) if text.isdigit() else None
        if holders:
            return written if written in holders else holders[0]
        return None

    def describe_holder(self) -> str:
        pid = self.holder_pid()
        if not pid:
            return "an unknown process"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read(200).split(b"\0")
            command = " ".join(a.decode(errors="replace") for a in argv if a)
        except OSError:
            command = ""
        return f"pid {pid}" + (f" ({command})" if command else "")

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
