"""The broker: its parts wired together, and the threads that outlive a request.

Each part owns one thing (docs/design.md has the long form):

- ``Gpu`` and ``Gpus`` (device.py): the turn on each GPU (the in-process
  queue, the OS lock, the lease and its watchdog) and its reading.
- ``Jobs`` (job.py): the life of one GPU job, top to bottom.
- ``RoomMaker`` and ``Swaps`` (room.py): the planner's decisions acted on,
  with the turn held, on a fresh reading.
- ``QueueOrder`` (order.py): priorities, affinity, wait estimates.
- ``ConsumerRegistry`` and ``HealthMonitor`` (consumers.py): what the
  broker believes of each consumer, and the probes that keep it true.
- ``ProgramLeases`` (program_leases.py): GPU leases for programs the
  broker does not proxy.
- ``ModelDirectory`` (models.py): which consumer serves a model, for the
  OpenAI door.
- ``Stats`` (stats.py): counters, events, the job log.
- ``StatusView`` (status.py): /v1/status and liveness.

What is left here is the wiring, the routing names, and the broker's own
threads: the idle unloader and the stop.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Callable

from . import __version__
from .clock import Clock
from .config import Config
from .consumers import ConsumerActions, ConsumerRegistry, HealthMonitor, HttpActions
from .device import Gpu, Gpus
from .errors import UnknownConsumer, UnknownKind
from .gpu import GpuReader
from .job import Job, Jobs
from .models import ModelDirectory
from .order import QueueOrder
from .program_leases import ProgramLeases
from .proxy import UpstreamPool
from .room import MemoryAttribution, RoomMaker, Swaps, settleable
from .stats import Stats
from .status import StatusView

log = logging.getLogger("mgpumanager.broker")

__all__ = ["Broker", "Job"]


class Broker:
    def __init__(self, config: Config, *, reader: GpuReader | None = None,
                 readers: dict[int, GpuReader] | None = None,
                 actions: ConsumerActions | None = None, clock: Clock | None = None):
        """``reader`` (the one GPU's) or ``readers`` (by index) stand in for
        the config's backend: the tests' simulated GPUs."""
        self.config = config
        self.clock = clock = clock or Clock()
        self.stats = Stats(clock)
        self.events = self.stats.events
        self.upstream = UpstreamPool(config.proxy.connect_timeout_s, config.proxy.read_timeout_s)
        self.registry = ConsumerRegistry(config, clock=clock.now,
                                         on_health_change=self._health_changed)
        self.actions = actions or HttpActions(config.proxy.connect_timeout_s,
                                              config.health.timeout_s)
        self.models = ModelDirectory(config, self.actions, clock, config.health.timeout_s)
        self.health = HealthMonitor(self.registry, self.actions, config.health.interval_s,
                                    on_probe=self.models.probed)
        attribute = MemoryAttribution(config, self.registry, self.stats)
        readers = readers or ({config.devices[0].index: reader} if reader else {})
        self.gpus = Gpus([self._gpu(d, readers.get(d.index), attribute)
                          for d in config.devices])
        self.gpu = self.gpus.first              # card 0: all a one-GPU box has
        self.order = QueueOrder(config, self.registry)
        for gpu in self.gpus:
            live = gpu.live
            gpu.order_by(functools.partial(self.order.choose, gpu=gpu.index,
                                           latest=gpu.sampler.latest, live=live,
                                           total_mib=gpu.total_mib)
                         if self.order.reorders else None,
                         functools.partial(self.order.estimate_wait, gpu=gpu.index))
        swaps = Swaps(config, self.registry, self.health, self.actions, self.stats, clock)
        self.room = RoomMaker(config, self.registry, self.health, self.actions, self.gpus,
                              swaps, self.stats, attribute)
        self.jobs = Jobs(config, self.registry, self.actions, self.gpus, self.order, self.room,
                         self.stats, clock)
        self.leases = ProgramLeases(self.jobs, clock)
        self.view = StatusView(config, self.registry, self.health, self.gpus, self.order,
                               self.stats, clock)
        # Possibly loaded is counted held until settled. One that can be
        # neither asked (a health `loaded`, a list of its models, its
        # processes on a live reading) nor unloaded would never be settled:
        # on a ledger it would refuse jobs that fit forever, and on a live
        # reading it would make any memory in use look like its own. It
        # counts as not loaded until its first job.
        self.registry.assume_not_loaded(lambda c: not settleable(c, self.gpus.live))
        # Non-GPU passthrough streams hold threads too; they may never take
        # the ones the queue and the status page need.
        self.streams = threading.BoundedSemaphore(
            config.server.stream_limit(config.scheduler.max_queue))
        self._stop = threading.Event()
        self.shutting_down = False
        self._shutdown_requested = threading.Event()
        self._graceful_deadline = 0.0
        self._shutdown_first: Callable[[], None] | None = None
        # Why the last config reload failed (the old config still serves), or None.
        self.config_error: str | None = None

    def _gpu(self, device, reader: GpuReader | None, attribute: MemoryAttribution) -> Gpu:
        index = device.index
        # On a ledger, a leased program's vram_mib is counted held while it holds the GPU.
        return Gpu(self.config, device, self.clock, reader=reader,
                   held_mib=lambda: self.registry.held_mib(index) + self.leases.held_mib(index),
                   on_expired=lambda lease: self.jobs.expired(lease),
                   on_sample=lambda reading, at: (attribute(reading, at, index),
                                                  self.leases.measure(reading, index)),
                   on_foreign_turn=lambda: self._gpu_was_elsewhere(index))

    # -- what the web layer calls ---------------------------------------------------

    def start_job(self, consumer: str, kind: str | None = None, *,
                  cancelled: Callable[[], bool] | None = None, client_sock=None) -> Job:
        return self.jobs.start(consumer, kind, cancelled=cancelled, client_sock=client_sock)

    def load(self, name: str, *, cancelled: Callable[[], bool] | None = None) -> dict:
        return self.jobs.load(name, cancelled=cancelled)

    def unload(self, name: str, *, cancelled: Callable[[], bool] | None = None) -> dict:
        return self.jobs.unload(name, cancelled=cancelled)

    def check_healthy(self, name: str, kind: str | None = None) -> None:
        self.jobs.check_healthy(name, kind)

    def client_error(self, e, consumer: str | None, kind: str | None) -> None:
        self.stats.client_error(e, consumer, kind)

    def consumer_for_kind(self, kind: str) -> str:
        try:
            return self.config.routes[kind]
        except KeyError:
            raise UnknownKind(f"no route for kind {kind!r} (routes: "
                              f"{', '.join(sorted(self.config.routes)) or 'none'})",
                              kind=kind) from None

    def check_consumer(self, name: str) -> None:
        if name not in self.registry:
            raise UnknownConsumer(f"no consumer named {name!r} (consumers: "
                                  f"{', '.join(self.registry.names())})", consumer=name)

    def liveness(self) -> list[str]:
        return self.view.liveness()

    def status(self) -> dict:
        status = self.view.status(config_error=self.config_error,
                                  shutting_down=self.shutting_down)
        now = self.clock.now()
        status["leases"] = [lease.to_json(now) for lease in self.leases.held()]
        return status

    # -- the broker's own threads ------------------------------------------------------

    def start(self) -> None:
        self.gpus.start()
        self.health.start()
        threading.Thread(target=self._shutdown_watcher, name="shutdown", daemon=True).start()
        if any(c.idle_unload_s for c in self.config.consumers.values()):
            threading.Thread(target=self._idle_unloader, name="idle-unload", daemon=True).start()
        self.events.add("started", f"broker {__version__} started with {self.config.path}; "
                        "GPU reading from " + ", ".join(
                            f"{g.reader.source} (GPU {g.index})" if len(self.gpus) > 1
                            else g.reader.source for g in self.gpus))
        for warning in self.config.warnings():
            log.warning("%s: %s", self.config.path, warning)
            self.events.add("config_warning", warning)

    def _idle_unloader(self) -> None:
        while not self._stop.wait(1.0):
            self.jobs.unload_idle()

    def _gpu_was_elsewhere(self, index: int) -> None:
        """Another process (a second broker, a second worker) had GPU
        ``index`` since this one's last job: it may have loaded or unloaded
        any consumer there, so what can be asked is asked again before room
        is made."""
        changed = self.registry.forget_loaded(
            lambda c: index not in c.gpus or not settleable(c, self.gpus.live))
        if changed:
            self.events.add("beliefs_reset", f"another process had GPU {index} since this "
                            f"broker's last job there: {', '.join(changed)} possibly loaded "
                            "again", gpu=index)

    def _health_changed(self, name: str, ok: bool, error: str | None) -> None:
        self.events.add("health", f"{name} is {'healthy again' if ok else 'unhealthy: ' + str(error)}",
                        consumer=name, healthy=ok)
        (log.info if ok else log.warning)("%s health: %s", name, "ok" if ok else error)

    def begin_shutdown(self, graceful_deadline: float,
                       first: Callable[[], None] | None = None) -> None:
        """The worker is stopping (SIGTERM) and will be ended at
        ``graceful_deadline`` (the worker's time.monotonic()). The running
        job and the queue go on in order until shortly before it; then every
        job still queued is answered 503 shutting_down, so no client is left
        without an answer. Called from a signal handler: it only sets an
        event that a thread started with the broker waits on (starting a
        thread here could deadlock on threading's own locks)."""
        self._graceful_deadline = graceful_deadline
        self._shutdown_first = first
        self._shutdown_requested.set()

    def _shutdown_watcher(self) -> None:
        self._shutdown_requested.wait()
        if self._stop.is_set():
            return
        if self._shutdown_first is not None:
            try:
                self._shutdown_first()
            except Exception:
                log.exception("stopping: refusing new connections failed")
        # The deadline is the worker's, on the real clock: a stop is real time.
        left = self._graceful_deadline - Clock().now()
        # Time enough for the refused to get their answers out.
        margin = min(5.0, max(0.5, left / 4))
        self.events.add("shutting_down", f"stopping: queued jobs run for {left - margin:.0f} s "
                        "more, then are refused")
        log.info("stopping: serving the queue for %.0f s more", left - margin)
        self.shutting_down = True
        self._stop.wait(max(0.0, left - margin))
        # A leased program's turn ends with the worker that keeps it (a
        # reload too: the lock is this process's), as late as it can; the
        # queue is closed first, so that no lease waiting in it is granted.
        self.gpus.close_queues("the broker is stopping; this job could not run before it does")
        self.leases.end_all()

    def stop(self) -> None:
        self._stop.set()
        self._shutdown_requested.set()
        self.gpus.close_queues("the broker is stopping")
        self.leases.end_all()
        self.health.stop()
        self.gpus.stop()
        self.upstream.close()
