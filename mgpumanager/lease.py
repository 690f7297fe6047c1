"""A GPU job's hold on the lock, and the watchdog that ends it.

After ``concurrent.futures.Future`` and Go's ``context``: one object owns a
job's hold from the grant to the release, every transition goes through it,
and ``release()`` is safe from any thread, any number of times. The
``LeaseWatch`` thread ends what the job's own thread cannot: it cuts the
lease when the client hangs up or the deadline passes (both sockets are shut
down, so a thread blocked on either returns at once), and releases it itself
if it is still held a grace period after its deadline. No code path can hold
the GPU lock without a deadline that ends it.

Stdlib only: the broker composes this with the GPU lock; the web layer
attaches sockets to it.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("mgpumanager.lease")

# Why an exchange was cut short.
CLIENT_GONE = "client gone"
JOB_TIMEOUT = "job_timeout_s"
UPSTREAM_BROKE = "upstream broke off"

# How long past its deadline a lease may stay held after it was cut, before
# the watchdog releases it whatever its thread is doing: long enough for a
# thread whose sockets were shut down to notice, short enough that the
# queue moves.
RELEASE_GRACE_S = 2.0


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def shut(sock) -> None:
    """Shut a socket down both ways: a read or write blocked on it returns."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass                  # already closed, or never connected


class Exchange:
    """One proxied exchange's sockets (client and upstream), cut as one.

    ``cut(reason)`` records the first reason and shuts down every attached
    socket, so whatever thread is blocked on either wakes up; a socket
    attached after the cut is shut at once, so nothing is sent after it.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._sockets: list = []              # guarded by _mutex
        self.cut_reason: str | None = None    # set once, under _mutex
        self.upstream_sock = None             # the service's end, once connected

    def attach(self, sock) -> None:
        with self._mutex:
            if self.cut_reason is None:
                self._sockets.append(sock)
                return
        shut(sock)

    def attach_upstream(self, sock) -> None:
        self.upstream_sock = sock
        self.attach(sock)

    def detach(self, sock) -> bool:
        """A socket that must survive a later cut (a connection going back to
        its pool); False if a cut reached it first."""
        with self._mutex:
            if sock in self._sockets:
                self._sockets.remove(sock)
                return True
            return False

    def cut(self, reason: str) -> bool:
        """Shut every attached socket; False if it was cut already."""
        with self._mutex:
            if self.cut_reason is not None:
                return False
            self.cut_reason = reason
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            shut(s)
        return True

    def forget_sockets(self) -> None:
        """Let go of every socket: a later cut reaches none of them."""
        with self._mutex:
            self._sockets = []


class Lease(Exchange):
    """The GPU lock held for one job: its ticket, its deadline, its release.

    ``release()`` hands the lock on exactly once, from whichever thread gets
    there first: the job's own thread when its answer is done, a busy-probe
    thread when the consumer goes idle, or the watchdog past the deadline.
    """

    def __init__(self, label: str, ticket, granted_at: float, deadline: float,
                 on_release: Callable[["Lease"], None]):
        super().__init__()
        self.label = label
        self.ticket = ticket
        self.granted_at = granted_at          # on the clock of the LeaseWatch that watches it
        self.deadline = deadline
        self.job = None                       # the broker's Job, when it is one
        # Its job's turns on other GPUs: released with it, never on their own.
        self.companions: list[Lease] = []
        self.expired = False                  # released by the watchdog
        self._on_release = on_release
        self._released = False                # guarded by _mutex

    @property
    def released(self) -> bool:
        with self._mutex:
            return self._released

    def release(self) -> bool:
        """Give the GPU lock back; False (and nothing done) if it was already."""
        with self._mutex:
            if self._released:
                return False
            self._released = True
        # A socket still attached belongs to a connection that lives on
        # (keep-alive): a late cut must not reach it.
        self.forget_sockets()
        self._on_release(self)
        return True

    def check(self) -> None:
        """Raise if the lease was cut: a thread must not act on a GPU it no longer holds."""
        if self.cut_reason is not None:
            raise LeaseCut(self.cut_reason)

    def __repr__(self) -> str:
        return f"<Lease {self.label} {self.cut_reason or 'held'}>"


class LeaseCut(Exception):
    """Raised in a job's own thread when its lease was cut under it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Entry:
    __slots__ = ("lease", "fd", "due", "phase")

    def __init__(self, lease: Lease):
        self.lease = lease
        self.fd: int | None = None
        self.due = lease.deadline
        self.phase = 0                # 0: before the deadline, 1: cut, waiting out the grace


class LeaseWatch:
    """One daemon thread that ends leases: on the client's hang-up, at the
    deadline (cut), and at the deadline plus a grace (``on_expired``, which
    must release the lease).

    The client socket is watched through epoll for EPOLLRDHUP: the peer's
    FIN shows even while the thread that owns the socket is blocked reading
    a silent upstream.
    """

    def __init__(self, on_expired: Callable[[Lease], None], grace_s: float = RELEASE_GRACE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.grace_s = grace_s
        self._on_expired = on_expired
        self._clock = clock
        self._mutex = threading.Lock()
        self._entries: dict[int, _Entry] = {}    # id(lease) -> entry; guarded by _mutex
        self._by_fd: dict[int, _Entry] = {}      # guarded by _mutex
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._wakes_at = float("inf")            # guarded by _mutex
        self._thread: threading.Thread | None = None
        self.alive = True                        # False if the thread died

    def watch(self, lease: Lease) -> None:
        """Watch the lease's deadline from now until ``unwatch``."""
        with self._mutex:
            entry = _Entry(lease)
            self._entries[id(lease)] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-watch",
                                                daemon=True)
                self._thread.start()
            # Wake the thread only if it would sleep past this deadline: a
            # wake-up per job costs a thread switch on every request.
            wake = entry.due < self._wakes_at
        if wake:
            self.wake()

    def watch_client(self, lease: Lease, sock) -> None:
        """Cut the lease when this client socket's peer hangs up."""
        if sock is None:
            return
        with self._mutex:
            entry = self._entries.get(id(lease))
            if entry is None or entry.fd is not None:
                return
            try:
                fd = sock.fileno()
                self._epoll.register(fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
            except (OSError, ValueError):
                return
            entry.fd = fd
            self._by_fd[fd] = entry

    def forget_client(self, lease: Lease) -> None:
        """Stop watching the client (its answer is done; the lease may live on)."""
        with self._mutex:
            entry = self._entries.get(id(lease))
            if entry is not None:
                self._drop_fd(entry)

    def unwatch(self, lease: Lease) -> None:
        with self._mutex:
            entry = self._entries.pop(id(lease), None)
            if entry is not None:
                self._drop_fd(entry)

    def held(self) -> list[Lease]:
        with self._mutex:
            return [e.lease for e in self._entries.values()]

    def _drop_fd(self, entry: _Entry) -> None:
        if entry.fd is None:
            return
        self._by_fd.pop(entry.fd, None)
        try:
            self._epoll.unregister(entry.fd)
        except (OSError, ValueError):
            pass
        entry.fd = None

    def clock_moved(self) -> None:
        """The clock jumped (a fake one): look again if it passed the time
        the thread sleeps until."""
        with self._mutex:
            due = self._clock() >= self._wakes_at
        if due:
            self.wake()

    def wake(self) -> None:
        """Look at the deadlines again now (one came sooner than the thread sleeps)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        try:
            while True:
                self._step()
        except BaseException:
            self.alive = False
            log.exception("the lease watchdog died")
            raise

    def _step(self) -> None:
        with self._mutex:
            now = self._clock()
            due = min((e.due for e in self._entries.values()), default=now + 60.0)
            timeout = min(60.0, max(0.0, due - now))
            self._wakes_at = now + timeout
        events = self._epoll.poll(timeout)
        gone, cut, expired = [], [], []
        with self._mutex:
            for fd, _ in events:
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                elif fd in self._by_fd and _hung_up(fd):
                    # Checked again now: between the poll and here the fd
                    # may have been closed and reused by another client.
                    entry = self._by_fd[fd]
                    self._drop_fd(entry)
                    gone.append(entry.lease)
            now = self._clock()
            for entry in list(self._entries.values()):
                if now < entry.due:
                    continue
                if entry.phase == 0:
                    entry.phase, entry.due = 1, entry.lease.deadline + self.grace_s
                    cut.append(entry.lease)
                else:
                    del self._entries[id(entry.lease)]
                    self._drop_fd(entry)
                    expired.append(entry.lease)
        for lease in gone:
            lease.cut(CLIENT_GONE)
        for lease in cut:
            lease.cut(JOB_TIMEOUT)
        for lease in expired:
            try:
                self._on_expired(lease)
            except Exception:
                log.exception("ending the expired lease %r failed; releasing it", lease)
            lease.release()
