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
        b = self.broker
        snap = b.gpu.lock.snapshot()
        reading = b.gpu.sampler.latest()
        consumers = b.registry.snapshot()

        info = InfoMetricFamily("mgpumanager_gpu", "The GPU reading's source and device.",
                                labels=["source"])
        info.add_metric([reading.source], {"name": reading.name or "", "index": str(reading.index),
                                           "live": str(b.gpu.live).lower(),
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

        for key, name, help_text in (
                ("reordered", "mgpumanager_jobs_reordered",
                 "Jobs granted the GPU ahead of an older waiting job (policy affinity)."),
                ("swaps_saved", "mgpumanager_swaps_saved",
                 "Reordered jobs that ran without an eviction the oldest job needed.")):
            c = CounterMetricFamily(name, help_text)
            c.add_metric([], getattr(snap, key))
            yield c

        depth = GaugeMetricFamily("mgpumanager_queue_depth", "Jobs waiting for the GPU.")
        depth.add_metric([], snap.queue_depth)
        yield depth
        flight = GaugeMetricFamily("mgpumanager_in_flight", "Jobs holding the GPU (0 or 1).")
        flight.add_metric([], 1 if snap.holder else 0)
        yield flight
        oldest = GaugeMetricFamily("mgpumanager_oldest_queued_seconds",
                                   "How long the oldest waiting job has waited.")
        oldest.add_metric([], snap.oldest_queued_s or 0.0)
        yield oldest


def metrics_registry(broker) -> CollectorRegistry:
    """The broker's own counters, with the live gauges beside them."""
    registry = broker.stats.registry
    registry.register(BrokerCollector(broker))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
