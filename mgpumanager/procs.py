"""Which processes are which consumer's, so that per-process VRAM (NVML
reports it) can be given to the consumer that holds it.

A consumer names how to find its main process (``pids_from``): the port it
listens on, a pidfile, or a substring of its command line. Its children
count too (ollama serves from one process and computes in a ``runner``
child). Linux only, from /proc; stdlib only. Finding a port's owner needs
to read other processes' ``/proc/<pid>/fd``, which a service running as
another user hides unless the broker may (CAP_SYS_PTRACE); a pidfile or a
command line works across users.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping


@dataclass(frozen=True)
class PidsFrom:
    """How to find a consumer's processes: exactly one of the three."""
    port: int | None = None
    pidfile: str | None = None
    cmdline: str | None = None

    def describe(self) -> str:
        if self.port is not None:
            return f"port {self.port}"
        if self.pidfile is not None:
            return f"pidfile {self.pidfile}"
        return f"cmdline {self.cmdline!r}"


@dataclass(frozen=True)
class Measured:
    """One consumer's VRAM as the reading attributes it."""
    mib: int | None            # None: not attributable now (see ``note``)
    pids: tuple[int, ...] = ()
    note: str | None = None    # why there is no figure, for people


class ProcessTable:
    """A snapshot of /proc: parents, command lines, listening sockets."""

    def __init__(self, root: str = "/proc"):
        self.root = root
        self.parents: dict[int, int] = {}
        self.cmdlines: dict[int, str] = {}
        for name in _listdir(root):
            if not name.isdigit():
                continue
            pid = int(name)
            stat = _read(f"{root}/{name}/stat")
            if stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                fields = stat.rpartition(")")[2].split()
                if len(fields) > 1 and fields[1].lstrip("-").isdigit():
                    self.parents[pid] = int(fields[1])
            cmd = _read(f"{root}/{name}/cmdline")
            if cmd:
                self.cmdlines[pid] = cmd.replace("\0", " ").strip()

    def with_descendants(self, pids: Iterable[int]) -> set[int]:
        found = set(pids)
        grew = True
        while grew:
            grew = False
            for pid, parent in self.parents.items():
                if parent in found and pid not in found:
                    found.add(pid)
                    grew = True
        return found

    def listening_on(self, port: int) -> set[int]:
        inodes = set()
        for table in ("tcp", "tcp6"):
            for line in (_read(f"{self.root}/net/{table}") or "").splitlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and parts[3] == "0A" and \
                        int(parts[1].rpartition(":")[2], 16) == port:
                    inodes.add(parts[9])
        if not inodes:
            return set()
        targets = {f"socket:[{i}]" for i in inodes}
        owners = set()
        for pid in self.parents:
            for fd in _listdir(f"{self.root}/{pid}/fd"):
                try:
                    if os.readlink(f"{self.root}/{pid}/fd/{fd}") in targets:
                        owners.add(pid)
                        break
                except OSError:
                    continue
        return owners

    def matching(self, needle: str) -> set[int]:
        me = os.getpid()
        return {pid for pid, cmd in self.cmdlines.items() if needle in cmd and pid != me}


class Attribution:
    """Gives each process's VRAM to the consumer whose processes it is.

    Process sets are found again every ``refresh_s`` (a scan of /proc costs
    milliseconds, more on a busy box, and every GPU job asks), and sooner,
    but at most every ``retry_s``, while a set is empty (a service starting).
    """

    retry_s = 1.0

    def __init__(self, sources: Mapping[str, PidsFrom], *, root: str = "/proc",
                 refresh_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.sources = dict(sources)
        self.root = root
        self.refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pids: dict[str, set[int]] = {}     # guarded by _lock
        self._found_at = float("-inf")           # guarded by _lock

    def pids(self) -> dict[str, set[int]]:
        with self._lock:
            now = self._clock()
            age = now - self._found_at
            if age >= self.refresh_s or (age >= self.retry_s
                                         and any(not p for p in self._pids.values())):
                table = ProcessTable(self.root)
                self._pids = {name: table.with_descendants(self._roots(table, src))
                              for name, src in self.sources.items()}
                self._found_at = now
            return {name: set(p) for name, p in self._pids.items()}

    def _roots(self, table: ProcessTable, src: PidsFrom) -> set[int]:
        if src.port is not None:
            return table.listening_on(src.port)
        if src.pidfile is not None:
            text = (_read(src.pidfile) or "").strip()
            pid = int(text) if text.isdigit() else None
            return {pid} if pid is not None and pid in table.parents else set()
        return table.matching(src.cmdline or "")

    def measure(self, processes: Iterable[tuple[int, int | None]]) -> dict[str, Measured]:
        """``processes``: (pid, MiB) pairs from the reading."""
        usage = dict(processes)
        out = {}
        for name, pids in self.pids().items():
            src = self.sources[name]
            if not pids:
                out[name] = Measured(None, (), f"no process found by {src.describe()}")
                continue
            held = [usage[p] for p in pids if p in usage]
            if any(m is None for m in held):
                out[name] = Measured(None, tuple(sorted(pids)),
                                     "the driver does not report per-process memory here")
            else:
                out[name] = Measured(sum(held), tuple(sorted(pids)))
        return out


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
