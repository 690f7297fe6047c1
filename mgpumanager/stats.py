"""What happened: the counters and histograms, the event ring, the job log.

The counters are prometheus-client's own metric objects, in a registry of
the broker's (one per broker, so that a test's second broker starts from
zero): ``/metrics`` exposes them as they are, and ``/v1/status`` reads the
same objects, so the two can never disagree.

Every refusal, job and eviction is recorded here and only here; nothing in
this module blocks on I/O, so it may be called with the GPU held.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram

from .clock import Clock, iso_utc
from .errors import Abandoned, BrokerError

job_log = logging.getLogger("mgpumanager.jobs")

# Seconds: the bucket bounds of the wait and run time histograms.
TIME_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class EventLog:
    """A bounded ring of recent scheduler events, numbered for ``?since=``.

    An event keeps its wall time as a number; the ISO form is written when
    the event is read (the status page reads a few, jobs add many)."""

    def __init__(self, clock: Clock, size: int = 500):
        self._clock = clock
        self._lock = threading.Lock()
        self._events: deque[dict] = deque(maxlen=size)     # guarded by _lock
        self._ids = itertools.count(1)

    def add(self, type: str, message: str, **fields) -> None:
        at = self._clock.wall()
        with self._lock:
            self._events.append({"id": next(self._ids), "at": at, "type": type,
                                 "message": message, **fields})

    def since(self, last_id: int = 0, limit: int | None = None) -> list[dict]:
        with self._lock:
            picked = [e for e in self._events if e["id"] > last_id]
        picked = picked[-limit:] if limit else picked
        return [{**e, "at": iso_utc(e["at"])} for e in picked]


def _by_label(metric) -> dict:
    """A labelled counter's values: {label value(s): count}."""
    out = {}
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                key = tuple(s.labels.values())
                out[key if len(key) > 1 else key[0]] = int(s.value)
    return out


def _total(metric) -> int:
    return int(sum(s.value for f in metric.collect() for s in f.samples
                   if s.name.endswith("_total")))


class Stats:
    """The broker's counters, its events and its job log, written in one place."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.events = EventLog(clock)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("mgpumanager_jobs", "GPU jobs finished, by consumer and outcome.",
                            ["consumer", "outcome"], registry=r)
        self.evictions = Counter("mgpumanager_evictions", "Unloads the broker made, by victim.",
                                 ["consumer"], registry=r)
        self.loads = Counter("mgpumanager_loads", "Load calls the broker made, by consumer.",
                             ["consumer"], registry=r)
        self.rejected = Counter("mgpumanager_rejected", "Jobs refused, by error code.",
                                ["code"], registry=r)
        self.client_errors = Counter(
            "mgpumanager_client_errors", "Requests refused for the client's own fault (bad, "
            "oversized or stalled bodies), by error code.", ["code"], registry=r)
        self.abandoned = Counter("mgpumanager_abandoned",
                                 "Queued jobs dropped because their client left.", registry=r)
        self.leases_expired = Counter("mgpumanager_leases_expired", "GPU leases the watchdog "
                                      "released past their deadline.", registry=r)
        self.wait_seconds = Histogram("mgpumanager_job_wait_seconds",
                                      "Time a job waited for the GPU.", buckets=TIME_BUCKETS,
                                      registry=r)
        self.run_seconds = Histogram("mgpumanager_job_run_seconds", "Time a job held the GPU.",
                                     buckets=TIME_BUCKETS, registry=r)
        self.last_wait_ms: float | None = None
        self.last_run_ms: float | None = None

    # -- recording -------------------------------------------------------------

    def job_started(self, wait_s: float) -> None:
        self.last_wait_ms = wait_s * 1000
        self.wait_seconds.observe(wait_s)

    def job_counted(self, consumer: str, ok: bool, run_s: float) -> None:
        """One finished job, counted before its turn is given back: whoever
        asks /v1/status after the next job starts sees this one counted."""
        self.jobs.labels(consumer, "ok" if ok else "error").inc()
        self.last_run_ms = run_s * 1000
        self.run_seconds.observe(run_s)

    def job_done(self, fields: dict) -> None:
        """One finished job's event and log line, written after the release."""
        if "label" in fields:           # a GPU lease
            what = (f"{fields['label']} held the GPU for {fields['run_ms']:.0f} ms, "
                    f"waited {fields['wait_ms']:.0f} ms")
        else:
            what = (f"{fields['consumer']} {fields['kind'] or 'upstream'} job "
                    f"{'finished' if fields['ok'] else 'failed'} ({fields['status']}) after "
                    f"{fields['run_ms']:.0f} ms, waited {fields['wait_ms']:.0f} ms")
        self.events.add("job", what, **fields)
        # With log_format json, JsonFormatter merges ``fields`` into the line.
        job_log.info("job consumer=%s kind=%s status=%s wait_ms=%s run_ms=%s bytes_in=%s "
                     "bytes_out=%s evicted=%s", fields["consumer"], fields["kind"],
                     fields["status"], fields["wait_ms"], fields["run_ms"], fields["bytes_in"],
                     fields["bytes_out"], ",".join(fields["evicted"]) or "-",
                     extra={"fields": {"event": "job", **fields}})

    def refused(self, e: BrokerError, consumer: str, kind: str | None) -> None:
        """A GPU job that will not run: its client left, or the broker said no."""
        e.consumer = e.consumer or consumer
        e.kind = e.kind or kind
        if isinstance(e, Abandoned):
            self.abandoned.inc()
            self.events.add("abandoned", f"a {consumer} job was dropped: {e.message}",
                            consumer=consumer)
            return
        self.rejected.labels(e.code).inc()
        self.events.add("refused", f"a {consumer} job was refused ({e.code}): {e.message}",
                        consumer=consumer, code=e.code)

    def client_error(self, e: BrokerError, consumer: str | None, kind: str | None) -> None:
        """A request refused for the client's own fault (a bad or stalled body):
        counted and shown, never against the consumer."""
        e.consumer = e.consumer or consumer
        e.kind = e.kind or kind
        self.client_errors.labels(e.code).inc()
        self.events.add("client_error", f"a request for {consumer or 'the broker'} was "
                        f"refused ({e.code}): {e.message}", consumer=consumer, code=e.code)

    def evicted(self, victim: str, for_whom: str | None, why: str, ms: float,
                gpus: tuple[int, ...] = (0,)) -> None:
        self.evictions.labels(victim).inc()
        self.events.add("evicted", f"unloaded {victim} {why} ({ms:.0f} ms)", consumer=victim,
                        for_consumer=for_whom, reason=why, ms=round(ms, 1), gpus=list(gpus))
        job_log.info("eviction victim=%s for=%s reason=%r ms=%.0f", victim, for_whom, why, ms,
                     extra={"fields": {"event": "eviction", "victim": victim,
                                       "for": for_whom, "reason": why, "ms": round(ms, 1)}})

    def loaded(self, target: str, ms: float) -> None:
        self.loads.labels(target).inc()
        self.events.add("loaded", f"loaded {target} ({ms:.0f} ms)", consumer=target,
                        ms=round(ms, 1))

    # -- reading -----------------------------------------------------------------

    def counts(self) -> dict:
        """The counters as /v1/status shows them."""
        rejected, client_errors = _by_label(self.rejected), _by_label(self.client_errors)
        evictions, loads = _by_label(self.evictions), _by_label(self.loads)
        outcomes = _by_label(self.jobs)
        return {
            "total_jobs": sum(outcomes.values()),
            "rejected": sum(rejected.values()),
            "rejected_by_code": rejected,
            "abandoned": _total(self.abandoned),
            "client_errors": sum(client_errors.values()),
            "client_errors_by_code": client_errors,
            "leases_expired": _total(self.leases_expired),
            "last_wait_ms": round(self.last_wait_ms, 1) if self.last_wait_ms is not None else None,
            "last_run_ms": round(self.last_run_ms, 1) if self.last_run_ms is not None else None,
            "evictions": sum(evictions.values()),
            "loads": sum(loads.values()),
            "evictions_by_consumer": evictions,
            "loads_by_consumer": loads,
        }
