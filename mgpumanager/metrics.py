"""``/metrics``: the broker's counters, and gauges over its live state.

The counters and histograms are prometheus-client objects that stats.py
increments (the same objects /v1/status reads); the gauges here are read
at each scrape from the lock, the registry's snapshot and the latest GPU
reading, the numbers ``/v1/status`` shows, so the two never drift apart.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

# The broker's process is its own: no `_created` series beside each counter.
prometheus_client.disable_created_metrics()

MIB = 1024 * 1024


class BrokerCollector:
    def __init__(self, broker):
        self.broker = broker

    def describe(self):
        return []         # registered without a scrape: a reading can be an HTTP call

    def collect(self):
        """Every GPU's series carry its index in the ``gpu`` label."""
        b = self.broker
        gpus = [(str(g.index), g, g.lock.snapshot(), g.sampler.latest()) for g in b.gpus]
        consumers = b.registry.snapshot()

        info = InfoMetricFamily("mgpumanager_gpu", "The GPU reading's source and device.",
                                labels=["source", "gpu"])
        for index, g, _, reading in gpus:
            info.add_metric([reading.source, index], {
                "name": reading.name or "", "index": index, "live": str(g.live).lower(),
                "error": reading.error or ""})
        yield info
        for field, help_text in (("total", "VRAM on the GPU."), ("used", "VRAM in use."),
                                 ("free", "VRAM free.")):
            g = GaugeMetricFamily(f"mgpumanager_gpu_memory_{field}_bytes", help_text,
                                  labels=["source", "gpu"])
            for index, _, _, reading in gpus:
                value = getattr(reading, f"{field}_mib")
                if value is not None:
                    g.add_metric([reading.source, index], value * MIB)
            yield g
        util = GaugeMetricFamily("mgpumanager_gpu_utilization_ratio",
                                 "GPU utilisation, 0 to 1.", labels=["source", "gpu"])
        age = GaugeMetricFamily("mgpumanager_gpu_reading_timestamp_seconds",
                                "When the last GPU reading was taken (Unix time).",
                                labels=["gpu"])
        for index, _, _, reading in gpus:
            if reading.util_pct is not None:
                util.add_metric([reading.source, index], reading.util_pct / 100)
            age.add_metric([index], reading.sampled_at)
        yield util
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

        for key, name, help_text in (
                ("reordered", "mgpumanager_jobs_reordered",
                 "Jobs granted the GPU ahead of an older waiting job (policy affinity)."),
                ("swaps_saved", "mgpumanager_swaps_saved",
                 "Reordered jobs that ran without an eviction the oldest job needed.")):
            c = CounterMetricFamily(name, help_text, labels=["gpu"])
            for index, _, snap, _ in gpus:
                c.add_metric([index], getattr(snap, key))
            yield c

        depth = GaugeMetricFamily("mgpumanager_queue_depth", "Jobs waiting for the GPU.",
                                  labels=["gpu"])
        flight = GaugeMetricFamily("mgpumanager_in_flight", "Jobs holding the GPU (0 or 1).",
                                   labels=["gpu"])
        oldest = GaugeMetricFamily("mgpumanager_oldest_queued_seconds",
                                   "How long the oldest waiting job has waited.", labels=["gpu"])
        for index, _, snap, _ in gpus:
            depth.add_metric([index], snap.queue_depth)
            flight.add_metric([index], 1 if snap.holder else 0)
            oldest.add_metric([index], snap.oldest_queued_s or 0.0)
        yield from (depth, flight, oldest)


def metrics_registry(broker) -> CollectorRegistry:
    """The broker's own counters, with the live gauges beside them."""
    registry = broker.stats.registry
    registry.register(BrokerCollector(broker))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
