"""GPU leases for programs the broker does not proxy (``/v1/leases``,
``mgpumanager run``): a training script, an NVENC encode, a notebook.

A lease is a GPU job whose work happens elsewhere: it waits its turn in
the same queue, room is made for its ``vram_mib`` by the same planner, and
it holds the GPU until one of: ``end`` (DELETE, or the connection of a
streamed lease closing), its ``ttl_s``, the lock's own deadline (the
watchdog), or the broker stopping. Each lease's life is here, top to
bottom: ``take`` -> held -> ``_ended``.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable

from .clock import Clock
from .errors import BadRequest, NotFound
from .gpu import GpuReading
from .job import LEASE_KIND, Job, Jobs
from .procs import ProcessTable
from .room import Tenant

log = logging.getLogger("mgpumanager.program_leases")

TTL = "ttl"
RELEASED = "released"
DISCONNECTED = "connection closed"
STOPPING = "the broker is stopping"
MAX_LEASE_MIB = 1 << 24                  # 16 TiB: past any card, still a number
MAX_PID = 1 << 22                        # Linux's pid_max at most
# How long a streamed lease that was told to end may keep the GPU while its
# wrapper stops the program (mgpumanager run: SIGTERM, --grace, SIGKILL).
STOP_S = 30.0
LABEL_RE = re.compile(r"[A-Za-z0-9._ -]{1,64}")


@dataclass
class ProgramLease:
    id: str
    label: str
    vram_mib: int
    ttl_s: float
    granted_at: float
    job: Job
    pid: int | None = None               # the program's process (its tree is the lease's)
    stream: bool = False                 # held by a connection: released when it closes
    # Asked to end (ttl, DELETE, the stop): a streamed lease is told and
    # released when its program has stopped and closed the connection.
    ending: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    end_reason: str | None = None
    gpus: tuple[int, ...] = (0,)         # the GPUs it holds (vram_mib split evenly)
    # What its processes hold on each GPU, by the last live reading of each.
    measured: dict[int, int | None] = field(default_factory=dict)
    # Its processes holding memory on each GPU, by the last reading of each.
    pids_by_gpu: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(sorted({p for pids in self.pids_by_gpu.values() for p in pids}))

    @property
    def measured_mib(self) -> int | None:
        values = list(self.measured.values())
        return None if not values or None in values else sum(values)

    def to_json(self, now: float) -> dict:
        return {"id": self.id, "label": self.label, "vram_mib": self.vram_mib,
                "ttl_s": self.ttl_s, "held_s": round(now - self.granted_at, 3),
                "expires_in_s": round(max(0.0, self.granted_at + self.ttl_s - now), 3),
                "evicted": list(self.job.evicted), "waited_s": round(self.job.wait_s, 3),
                "pid": self.pid, "measured_mib": self.measured_mib, "pids": list(self.pids),
                "gpus": list(self.gpus)}


class ProgramLeases:
    def __init__(self, jobs: Jobs, clock: Clock):
        self.jobs = jobs
        self.clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, ProgramLease] = {}

    def take(self, *, vram_mib: int, label: str, ttl_s: float, coexist: frozenset[str],
             pid: int | None = None, stream: bool = False, gpus: tuple[int, ...] | None = None,
             cancelled: Callable[[], bool] | None = None) -> ProgramLease:
        """Wait for the GPU (``gpus``; default every one) and make room; the
        lease, held. A BrokerError (queue_full, queue_timeout,
        insufficient_vram, ...) with nothing held."""
        gpus = gpus or tuple(g.index for g in self.jobs.gpus)
        # The ttl counts from the turn, as the lock's own deadline does; that
        # one comes after the ttl and the stop, for a lease whose end stuck.
        job = self.jobs.start_lease(Tenant(LEASE_KIND, vram_mib, coexist, gpus),
                                    f"{LEASE_KIND}:{label}", ttl_s + STOP_S + 5.0, cancelled)
        lease = ProgramLease(secrets.token_hex(8), label, vram_mib, ttl_s, job.lease.granted_at,
                             job, pid, stream, gpus=gpus)
        # Whoever ends the job (end(), the ttl, the watchdog) ends the lease.
        job.on_finish = lambda: self._ended(lease)
        with self._lock:
            self._held[lease.id] = lease
        threading.Thread(target=self._expire_at_ttl, args=(lease,), daemon=True,
                         name=f"lease-ttl-{lease.id}").start()
        return lease

    def _expire_at_ttl(self, lease: ProgramLease) -> None:
        if not lease.ended.wait(max(0.0, lease.granted_at + lease.ttl_s - self.clock.now())):
            try:
                self.end(lease.id, TTL)
            except NotFound:
                pass                  # a DELETE got there first

    def get(self, lease_id: str) -> ProgramLease:
        with self._lock:
            lease = self._held.get(lease_id)
        if lease is None:
            raise NotFound(f"no lease {lease_id[:40]!r} is held (it ended, or never was)")
        return lease

    def end(self, lease_id: str, reason: str = RELEASED) -> None:
        """End a lease. A streamed one is told first and keeps the GPU until
        its connection closes (the wrapper has stopped its program), or
        STOP_S later: the program may still be on the GPU until then."""
        lease = self.get(lease_id)
        if lease.end_reason is None:
            lease.end_reason = reason
        if lease.stream and reason != DISCONNECTED:
            if not lease.ending.is_set():
                lease.ending.set()
                threading.Thread(target=self._release_after_stop, args=(lease,), daemon=True,
                                 name=f"lease-stop-{lease.id}").start()
            return
        self._release(lease)

    def _release_after_stop(self, lease: ProgramLease) -> None:
        if not lease.ended.wait(STOP_S):
            log.warning("lease %s (%s): its connection stayed open %g s after the lease "
                        "ended; releasing the GPU", lease.id, lease.label, STOP_S)
            self._release(lease)

    def _release(self, lease: ProgramLease) -> None:
        lease.job.finish(ok=True, reached=True, status=200, hold_busy=False)

    def _ended(self, lease: ProgramLease) -> None:
        if lease.end_reason is None:            # the watchdog, past job_timeout_s
            lease.end_reason = "released by the watchdog after scheduler.job_timeout_s"
        with self._lock:
            self._held.pop(lease.id, None)
        lease.ended.set()
        log.info("lease %s (%s) ended after %.1f s: %s", lease.id, lease.label,
                 self.clock.now() - lease.granted_at, lease.end_reason)

    def end_all(self, reason: str = STOPPING) -> None:
        with self._lock:
            ids = list(self._held)
        for lease_id in ids:
            try:
                self.end(lease_id, reason)
            except NotFound:
                pass

    def held(self) -> list[ProgramLease]:
        with self._lock:
            return list(self._held.values())

    def measure(self, reading: GpuReading, gpu: int = 0, proc_root: str = "/proc") -> None:
        """A live reading's per-process memory on ``gpu``, given to the leases
        whose program's process tree holds it (so it is explained, not foreign)."""
        leases = [lease for lease in self.held() if lease.pid is not None and gpu in lease.gpus]
        if not leases or reading.processes is None:
            return
        table = ProcessTable(proc_root)
        usage = dict(reading.processes)
        for lease in leases:
            tree = table.with_descendants({lease.pid})
            held = [usage[p] for p in tree if p in usage]
            lease.pids_by_gpu[gpu] = tuple(sorted(p for p in tree if p in usage))
            lease.measured[gpu] = None if any(m is None for m in held) else sum(held)

    def held_mib(self, gpu: int = 0) -> int:
        """What the leased programs are counted to hold on ``gpu`` (the ledger's share)."""
        return sum(-(-lease.vram_mib // len(lease.gpus)) for lease in self.held()
                   if gpu in lease.gpus)


# -- what a client asks for ---------------------------------------------------------

@dataclass(frozen=True)
class LeaseRequest:
    vram_mib: int
    label: str
    ttl_s: float
    coexist: frozenset[str]
    stream: bool                 # held while this connection lasts; the answer streams
    pid: int | None = None       # the program's process, for its measured memory
    gpus: tuple[int, ...] = (0,)


def read_lease_request(body, *, job_timeout_s: float, consumers: list[str],
                       gpus: tuple[int, ...] = (0,)) -> LeaseRequest:
    """A POST /v1/leases body, checked: BadRequest naming each problem."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object like {\"vram_mib\": 8000, "
                         "\"label\": \"train\", \"ttl_s\": 3600}")
    problems = []
    unknown = sorted(set(body) - {"vram_mib", "label", "ttl_s", "coexist", "stream", "pid",
                                  "gpu"})
    if unknown:
        problems.append(f"unknown keys {unknown} (vram_mib, label, ttl_s, coexist, stream, "
                        "pid, gpu)")
    vram = body.get("vram_mib", 0)
    if isinstance(vram, bool) or not isinstance(vram, int) or not 0 <= vram <= MAX_LEASE_MIB:
        problems.append(f"vram_mib: a whole number of MiB from 0 to {MAX_LEASE_MIB}, "
                        f"not {vram!r:.40}")
        vram = 0
    label = body.get("label", "lease")
    if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
        problems.append("label: 1 to 64 letters, digits, '.', '_', '-' or spaces")
        label = "lease"
    ttl = body.get("ttl_s", job_timeout_s)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or \
            not 0 < ttl <= job_timeout_s or ttl != ttl:
        problems.append(f"ttl_s: seconds in (0, {job_timeout_s:g}] (scheduler.job_timeout_s), "
                        f"not {ttl!r:.40}")
        ttl = job_timeout_s
    coexist = body.get("coexist", [])
    if not isinstance(coexist, list) or not all(isinstance(c, str) and c in consumers
                                                for c in coexist):
        problems.append(f"coexist: a list of consumer names ({', '.join(consumers)})")
        coexist = []
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        problems.append("stream: true or false")
        stream = False
    pid = body.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)
                            or not 0 < pid <= MAX_PID):
        problems.append("pid: the program's process id, a whole number above 0")
        pid = None
    # Without one, every GPU: the program can see them all.
    chosen = body.get("gpu", list(gpus))
    chosen = [chosen] if isinstance(chosen, int) and not isinstance(chosen, bool) else chosen
    if not isinstance(chosen, list) or not chosen or len(set(map(repr, chosen))) != len(chosen) \
            or not all(isinstance(g, int) and not isinstance(g, bool) and g in gpus
                       for g in chosen):
        problems.append(f"gpu: a GPU's index or a list of them ({', '.join(map(str, gpus))})")
        chosen = list(gpus)
    if problems:
        raise BadRequest("; ".join(problems))
    return LeaseRequest(vram, label, float(ttl), frozenset(coexist), stream, pid,
                        tuple(sorted(chosen)))
