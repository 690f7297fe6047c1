"""``/metrics``: a Prometheus collector over the broker's live state.

Nothing here counts anything: each scrape reads ``Broker.stats()``, the
registry's snapshot and the latest GPU reading, the same numbers
``/v1/status`` shows, so the two can never drift apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)

MIB = 1024 * 1024


class BrokerCollector:
    def __init__(self, broker):
        self.broker = broker

    def collect(self):
        b = self.broker
        stats = b.stats()
        reading = b.sampler.latest()
        consumers = b.registry.snapshot()

        info = InfoMetricFamily("mgpumanager_gpu", "The GPU reading's source and device.",
                                labels=["source"])
        info.add_metric([reading.source], {"name": reading.name or "", "index": str(reading.index),
                                           "live": str(b.reader.live).lower(),
                                           "error": reading.error or ""})
        yield info
        for field, help_text in (("total", "VRAM on the GPU."), ("used", "VRAM in use."),
                                 ("free", "VRAM free.")):
            value = getattr(reading, f"{field}_mib")
            g = GaugeMetricFamily(f"mgpumanager_gpu_memory_{field}_bytes", help_text,
                                  labels=["source"])
            if value is not None:
                g.add_metric([reading.source], value * MIB)
            yield g
        util = GaugeMetricFamily("mgpumanager_gpu_utilization_ratio",
                                 "GPU utilisation, 0 to 1.", labels=["source"])
        if reading.util_pct is not None:
            util.add_metric([reading.source], reading.util_pct / 100)
        yield util
        age = GaugeMetricFamily("mgpumanager_gpu_reading_timestamp_seconds",
                                "When the last GPU reading was taken (Unix time).")
        age.add_metric([], reading.sampled_at)
        yield age

        up = GaugeMetricFamily("mgpumanager_consumer_up",
                               "1 if the consumer passed its last health probe.", labels=["consumer"])
        loaded = GaugeMetricFamily("mgpumanager_consumer_loaded",
                                   "1 loaded, 0 not loaded, 0.5 unknown (possibly resident).",
                                   labels=["consumer"])
        resident = GaugeMetricFamily("mgpumanager_consumer_resident_bytes",
                                     "VRAM the consumer holds when loaded (from the config).",
                                     labels=["consumer"])
        active = GaugeMetricFamily("mgpumanager_consumer_active_jobs",
                                   "GPU jobs running for the consumer.", labels=["consumer"])
        for name, c in consumers.items():
            up.add_metric([name], 1.0 if c["healthy"] else 0.0)
            loaded.add_metric([name], {True: 1.0, False: 0.0, None: 0.5}[c["loaded"]])
            resident.add_metric([name], c["vram_resident_mib"] * MIB)
            active.add_metric([name], c["active"])
        yield from (up, loaded, resident, active)

        jobs = CounterMetricFamily("mgpumanager_jobs", "GPU jobs finished, by consumer and outcome.",
                                   labels=["consumer", "outcome"])
        for (name, outcome), n in sorted(stats["outcomes"].items()):
            jobs.add_metric([name, outcome], n)
        yield jobs
        for key, name, help_text in (
                ("evictions_by_consumer", "mgpumanager_evictions", "Unloads the broker made, by victim."),
                ("loads_by_consumer", "mgpumanager_loads", "Load calls the broker made, by consumer.")):
            c = CounterMetricFamily(name, help_text, labels=["consumer"])
            for consumer, n in sorted(stats[key].items()):
                c.add_metric([consumer], n)
            yield c
        for key, name, help_text in (
                ("rejected_by_code", "mgpumanager_rejected", "Jobs refused, by error code."),
                ("client_errors_by_code", "mgpumanager_client_errors",
                 "Requests refused for the client's own fault (bad, oversized or stalled "
                 "bodies), by error code.")):
            c = CounterMetricFamily(name, help_text, labels=["code"])
            for code, n in sorted(stats[key].items()):
                c.add_metric([code], n)
            yield c
        for key, name, help_text in (
                ("abandoned", "mgpumanager_abandoned",
                 "Queued jobs dropped because their client left."),
                ("leases_expired", "mgpumanager_leases_expired",
                 "GPU leases the watchdog released past their deadline."),
                ("reordered", "mgpumanager_jobs_reordered",
                 "Jobs granted the GPU ahead of an older waiting job (policy affinity)."),
                ("swaps_saved", "mgpumanager_swaps_saved",
                 "Reordered jobs that ran without an eviction the oldest job needed.")):
            c = CounterMetricFamily(name, help_text)
            c.add_metric([], stats[key])
            yield c

        depth = GaugeMetricFamily("mgpumanager_queue_depth", "Jobs waiting for the GPU.")
        depth.add_metric([], stats["queue_depth"])
        yield depth
        flight = GaugeMetricFamily("mgpumanager_in_flight", "Jobs holding the GPU (0 or 1).")
        flight.add_metric([], stats["in_flight"])
        yield flight
        oldest = GaugeMetricFamily("mgpumanager_oldest_queued_seconds",
                                   "How long the oldest waiting job has waited.")
        oldest.add_metric([], stats["oldest_queued_s"] or 0.0)
        yield oldest
        for key, name, help_text in (("wait_seconds", "mgpumanager_job_wait_seconds",
                                      "Time a job waited for the GPU."),
                                     ("run_seconds", "mgpumanager_job_run_seconds",
                                      "Time a job held the GPU.")):
            h = HistogramMetricFamily(name, help_text)
            snap = stats[key]
            h.add_metric([], [(_le(bound), count) for bound, count in snap["buckets"]],
                         sum_value=snap["sum"])
            yield h


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def metrics_registry(broker) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
