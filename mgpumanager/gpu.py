"""GPU readers: where free VRAM comes from.

``nvml`` (pynvml from nvidia-ml-py, imported lazily: this is the only module
that touches it), ``nvidia-smi`` (its CSV output), ``sim`` (the simulated GPU
of ``mgpumanager.sim``, over HTTP) and ``ledger`` (no reading at all: the
total less what the broker believes is loaded). ``auto`` takes the first of
nvml, nvidia-smi, ledger that works. A reader never raises out of ``read``:
a failure is a reading with ``error`` set, so a flaky driver degrades the
status page instead of the broker.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import requests

from .clock import Clock, iso_utc
from .config import DeviceConfig, GpuConfig

log = logging.getLogger("mgpumanager.gpu")
MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReading:
    source: str
    index: int = 0
    name: str | None = None
    total_mib: int | None = None
    used_mib: int | None = None
    free_mib: int | None = None
    util_pct: int | None = None
    sampled_at: float = field(default_factory=time.time)     # wall clock, for people
    error: str | None = None
    # (pid, used MiB) of every process on the GPU; None: this reader cannot tell.
    processes: tuple[tuple[int, int | None], ...] | None = None

    @property
    def usable_mib(self) -> int | None:
        """What processes can ever hold: the total less what the driver keeps
        for itself (about 480 MiB on an H100, which nvidia-smi leaves out of
        both used and free). Planning against the whole total would take that
        reserve for some consumer's memory."""
        if self.total_mib is None or self.used_mib is None or self.free_mib is None:
            return self.total_mib
        return min(self.total_mib, self.used_mib + self.free_mib)

    def to_json(self) -> dict:
        usable = self.usable_mib
        return {"source": self.source, "index": self.index, "name": self.name,
                "total_mib": self.total_mib, "used_mib": self.used_mib,
                "free_mib": self.free_mib,
                "reserved_mib": None if usable is None else self.total_mib - usable,
                "util_pct": self.util_pct,
                "sampled_at": iso_utc(self.sampled_at), "error": self.error,
                "processes": (None if self.processes is None else
                              [{"pid": p, "used_mib": m} for p, m in self.processes])}


class GpuReader:
    source = "none"
    live = True          # False: the numbers are the broker's own estimate

    def read(self) -> GpuReading:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NvmlReader(GpuReader):
    source = "nvml"

    def __init__(self, index: int = 0):
        import pynvml  # lazily: a box without the NVIDIA driver never loads it
        self._nvml = pynvml
        pynvml.nvmlInit()
        self.index = index
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self._handle)
        self.name = name.decode() if isinstance(name, bytes) else name

    def read(self) -> GpuReading:
        nv = self._nvml
        try:
            try:
                # v2 reports the driver's reserve apart from used, as nvidia-smi does.
                mem = nv.nvmlDeviceGetMemoryInfo(self._handle, version=nv.nvmlMemory_v2)
            except (AttributeError, TypeError, nv.NVMLError):
                mem = nv.nvmlDeviceGetMemoryInfo(self._handle)
            try:
                util = nv.nvmlDeviceGetUtilizationRates(self._handle).gpu
            except nv.NVMLError:
                util = None
            try:
                procs = tuple(
                    (p.pid, None if p.usedGpuMemory is None else p.usedGpuMemory // MIB)
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(self._handle))
            except nv.NVMLError:
                procs = None
            return GpuReading(self.source, self.index, self.name, mem.total // MIB,
                              mem.used // MIB, mem.free // MIB, util, processes=procs)
        except nv.NVMLError as e:
            return GpuReading(self.source, self.index, self.name, error=f"NVML: {e}")

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


class NvidiaSmiReader(GpuReader):
    source = "nvidia-smi"
    FIELDS = "name,memory.total,memory.used,memory.free,utilization.gpu"

    def __init__(self, index: int = 0, command: str = "nvidia-smi"):
        self.index = index
        self.command = shutil.which(command)
        if self.command is None:
            raise FileNotFoundError(f"{command} is not on PATH")
        first = self.read()
        if first.error:
            raise RuntimeError(first.error)

    def read(self) -> GpuReading:
        try:
            out = subprocess.run(
                [self.command, f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits",
                 f"--id={self.index}"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            return GpuReading(self.source, self.index, error=f"nvidia-smi: {e}")
        if out.returncode != 0:
            return GpuReading(self.source, self.index,
                              error=f"nvidia-smi exited {out.returncode}: {out.stderr.strip()[:200]}")
        return parse_nvidia_smi(out.stdout, self.index)


def parse_nvidia_smi(text: str, index: int = 0) -> GpuReading:
    """Parse one line of ``--query-gpu=name,memory.total,memory.used,memory.free,utilization.gpu``."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    parts = [p.strip() for p in line.rsplit(",", 4)]
    if len(parts) != 5:
        return GpuReading("nvidia-smi", index, error=f"nvidia-smi: unexpected output {line!r}")

    def num(s: str) -> int | None:
        try:
            return int(float(s))
        except ValueError:      # "[N/A]", "[Not Supported]"
            return None
    total, used, free, util = (num(p) for p in parts[1:])
    if total is None or free is None:
        return GpuReading("nvidia-smi", index, parts[0],
                          error=f"nvidia-smi: no memory figures in {line!r}")
    return GpuReading("nvidia-smi", index, parts[0], total,
                      used if used is not None else total - free, free, util)


class LedgerReader(GpuReader):
    """No reading: free = total_mib less the resident VRAM of every consumer
    that is or may be loaded (``held_mib`` asks the broker)."""
    source = "ledger"
    live = False

    def __init__(self, total_mib: int, held_mib: Callable[[], int], index: int = 0,
                 note: str | None = None):
        self.total_mib = total_mib
        self._held = held_mib
        self.index = index
        self.note = note

    def read(self) -> GpuReading:
        held = self._held()
        return GpuReading(self.source, self.index, None, self.total_mib, held,
                          self.total_mib - held, None, error=self.note)


class SimReader(GpuReader):
    """The simulated GPU served by ``mgpumanager.sim`` at ``GET {url}/gpu``."""
    source = "sim"

    def __init__(self, url: str, index: int = 0, timeout_s: float = 2.0):
        # GPU 0 at /gpu, GPU N of a simulated box with several at /gpu/N.
        self.url = url.rstrip("/") + ("/gpu" if index == 0 else f"/gpu/{index}")
        self.index = index
        self.timeout_s = timeout_s
        self._local = threading.local()

    def read(self) -> GpuReading:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            body = session.get(self.url, timeout=self.timeout_s).json()
            return GpuReading(self.source, self.index, body.get("name"), body["total_mib"],
                              body["used_mib"], body["free_mib"], body.get("util_pct"))
        except (requests.RequestException, ValueError, KeyError) as e:
            return GpuReading(self.source, self.index, error=f"simulated GPU: {e}")


def make_reader(cfg: GpuConfig, held_mib: Callable[[], int], fallback_total_mib: int,
                device: DeviceConfig | None = None) -> GpuReader:
    """Build the reader ``cfg.backend`` names for ``device`` (default: the
    one GPU of ``cfg.index``); ``auto`` falls through to the ledger."""
    index, total_mib = (cfg.index, cfg.total_mib) if device is None else \
        (device.index, device.total_mib)
    if cfg.backend == "sim":
        return SimReader(cfg.sim_url, index)
    if cfg.backend == "ledger":
        return LedgerReader(total_mib, held_mib, index)
    failures = []
    if cfg.backend in ("auto", "nvml"):
        try:
            return NvmlReader(index)
        except Exception as e:                      # ImportError, NVMLError_LibraryNotFound...
            failures.append(f"NVML: {e}")
            if cfg.backend == "nvml":
                return _BrokenReader("nvml", index, failures[-1])
    if cfg.backend in ("auto", "nvidia-smi"):
        try:
            return NvidiaSmiReader(index, cfg.nvidia_smi)
        except Exception as e:
            failures.append(f"nvidia-smi: {e}")
            if cfg.backend == "nvidia-smi":
                return _BrokenReader("nvidia-smi", index, failures[-1])
    if total_mib is not None:
        note = None
    else:
        # Without a total the ledger cannot refuse anything: everything fits,
        # and the broker still serialises GPU jobs but never evicts.
        note = ("no GPU reading (" + "; ".join(failures) + ") and gpu.total_mib is unset: "
                "VRAM is not accounted, nothing will be evicted")
    log.info("gpu backend auto: using the ledger (%s)", "; ".join(failures))
    return LedgerReader(total_mib or fallback_total_mib, held_mib, index, note)


class _BrokenReader(GpuReader):
    """The named backend failed to start: report it on every reading."""

    def __init__(self, source: str, index: int, error: str):
        self.source, self.index, self.error = source, index, error

    def read(self) -> GpuReading:
        return GpuReading(self.source, self.index, error=self.error)


class GpuSampler:
    """A daemon thread that keeps a recent reading for status and metrics."""

    def __init__(self, reader: GpuReader, interval_s: float, *, clock: Clock | None = None,
                 on_sample: Callable[[GpuReading, float], None] | None = None):
        self.reader = reader
        self._clock = clock or Clock()
        self.interval_s = interval_s
        self._on_sample = on_sample
        self._latest: GpuReading | None = None      # replaced whole; reads need no lock
        # The latest reading whose memory was given to whom it belongs (by
        # on_sample), with when it was taken: what a decision may use.
        self._attributed: tuple[GpuReading, float] | None = None
        self._attributed_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        """False only if the thread was started and has died."""
        return self._thread.ident is None or self._thread.is_alive() or self._stop.is_set()

    def sample(self) -> GpuReading:
        taken_at = self._clock.now()
        reading = self.reader.read()
        self._latest = reading
        if self._on_sample is not None:
            self._on_sample(reading, taken_at)
        self.offer(reading, taken_at)
        return reading

    def offer(self, reading: GpuReading, taken_at: float) -> None:
        """A reading taken (and attributed) elsewhere, a decision's own: the
        newest one taken is what ``recent`` gives, never an older one."""
        with self._attributed_lock:
            if self._attributed is None or taken_at >= self._attributed[1]:
                self._attributed = (reading, taken_at)

    def latest(self) -> GpuReading:
        return self._latest or self.sample()

    def recent(self, max_age_s: float, after: float) -> GpuReading | None:
        """The latest reading if it was taken after ``after`` and at most
        ``max_age_s`` ago, and has the memory figures; None if not."""
        last = self._attributed
        if last is None:
            return None
        reading, taken_at = last
        if taken_at <= after or self._clock.now() - taken_at > max_age_s \
                or reading.free_mib is None or reading.total_mib is None:
            return None
        return reading

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:        # a reader bug must not kill the thread
                log.exception("GPU sampling failed")
