"""Prometheus metrics at /metrics, and GPU telemetry: NVML where there is one, Jetson's sysfs on Jetson."""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("appliance")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
JETSON_GPU_LOAD = Path("/sys/devices/gpu.0/load")  # what tegrastats reads: per mille


class GpuCollector:
    """GPU utilisation and memory, read at scrape time; absent (and said once) where there is no GPU."""

    def __init__(self) -> None:
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml if self.handles else None
        except Exception:  # no driver, no NVML (Jetson), no device
            self.handles = []
        self.jetson = self.nvml is None and JETSON_GPU_LOAD.exists()
        if self.nvml is None and not self.jetson:
            log.warning("no GPU found (no NVML device, no Jetson GPU): running on the CPU; GPU metrics are absent")

    def read(self) -> list[dict]:
        """Each GPU now: name, utilisation %, memory used and total bytes; temperature (C) and power (W)
        where the driver gives them (None where not: Jetson's sysfs, NVML's partial answers)."""
        if self.nvml is not None:
            nvml, gpus = self.nvml, []
            for h in self.handles:
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                gpus.append(
                    {
                        "name": _maybe(lambda h=h: nvml.nvmlDeviceGetName(h)),
                        "utilization_percent": nvml.nvmlDeviceGetUtilizationRates(h).gpu,
                        "memory_used_bytes": mem.used,
                        "memory_total_bytes": mem.total,
                        "temperature_c": _maybe(
                            lambda h=h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
                        ),
                        "power_w": _maybe(lambda h=h: nvml.nvmlDeviceGetPowerUsage(h) / 1000),
                    }
                )
            return gpus
        if self.jetson:  # unified memory: the GPU's memory is the system's
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            kib = lambda key: int(info[key].split()[0]) * 1024  # noqa: E731
            return [
                {
                    "name": "Jetson GPU",
                    "utilization_percent": int(JETSON_GPU_LOAD.read_text()) / 10,
                    "memory_used_bytes": kib("MemTotal") - kib("MemAvailable"),
                    "memory_total_bytes": kib("MemTotal"),
                    "temperature_c": None,
                    "power_w": None,
                }
            ]
        return []

    def collect(self):
        util = GaugeMetricFamily("appliance_gpu_utilization_percent", "GPU busy time", labels=["gpu"])
        used = GaugeMetricFamily("appliance_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("appliance_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        gpus = self.read()
        if not gpus:
            return
        for i, gpu in enumerate(gpus):
            util.add_metric([str(i)], gpu["utilization_percent"])
            used.add_metric([str(i)], gpu["memory_used_bytes"])
            total.add_metric([str(i)], gpu["memory_total_bytes"])
        yield from (util, used, total)


def _maybe(read):
    """A reading NVML may not support on this device: None then."""
    try:
        return read()
    except Exception:
        return None


class OffloadCollector:
    """Per worker: seconds spent computing our offloaded layers, and hidden-state bytes sent to it."""

    def __init__(self, coordinator) -> None:
        self.coordinator = coordinator

    def collect(self):
        labels = ["device", "address"]
        seconds = CounterMetricFamily("appliance_offload_compute_seconds", "Worker time on our layers", labels=labels)
        sent = CounterMetricFamily("appliance_offload_bytes", "Hidden-state bytes into each worker", labels=labels)
        for address, usage in list(self.coordinator.usage.items()):
            seconds.add_metric([usage.name, address], usage.seconds)
            sent.add_metric([usage.name, address], usage.bytes)
        probes = CounterMetricFamily(
            "appliance_offload_reprobes", "Passes re-probing dropped workers", value=self.coordinator.reprobes
        )
        yield from (seconds, sent, probes)


class PrefixCacheCollector:
    """The prefix cache (models/prefix_cache.py), read at scrape time."""

    def __init__(self, cache) -> None:
        self.cache = cache

    def collect(self):
        stats = self.cache.stats()
        for name, kind, help_ in (
            ("hits", CounterMetricFamily, "Prompts that reused cached KV"),
            ("misses", CounterMetricFamily, "Prompts that found no cached prefix"),
            ("tokens_reused", CounterMetricFamily, "Prompt tokens not prefilled again"),
            ("evictions", CounterMetricFamily, "Entries evicted (least recently used first)"),
            ("bytes", GaugeMetricFamily, "KV bytes the prefix cache holds"),
            ("max_bytes", GaugeMetricFamily, "The prefix cache's bound"),
            ("entries", GaugeMetricFamily, "Cached prefixes"),
        ):
            yield kind(f"appliance_prefix_cache_{name}", help_, value=stats[name])


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("appliance_requests", "Requests served", ["protocol"], registry=r)
        self.errors = Counter("appliance_errors", "Requests answered with an error", ["protocol", "status"], registry=r)
        self.queue_seconds = Histogram(
            "appliance_queue_seconds", "Wait before joining the batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft_seconds = Histogram(
            "appliance_time_to_first_token_seconds", "Submission to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "appliance_step_seconds", "One batched model step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("appliance_tokens_generated", "Tokens generated (rate() gives tokens/s)", registry=r)
        self.batch_size = Histogram(
            "appliance_batch_size", "Requests in a step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.active = Gauge("appliance_active_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("appliance_waiting_requests", "Requests queued for the batch", registry=r)
        self.kv_bytes = Gauge("appliance_kv_cache_bytes", "KV-cache memory of the running batch", registry=r)
        self.finished = Counter("appliance_finished", "Generations ended", ["reason"], registry=r)
        self.cancelled = Counter(
            "appliance_generations_cancelled", "Generations stopped because their client left", registry=r
        )
        self.failed = Counter("appliance_generations_failed", "Generations ended by a server-side failure", registry=r)
        self.backend = Info("appliance_backend", "The compute backend, its instruction set and threads", registry=r)
        self.gpu = GpuCollector()
        r.register(self.gpu)

    def watch_prefix_cache(self, cache) -> None:
        self.registry.register(PrefixCacheCollector(cache))

    def watch_offload(self, coordinator) -> None:
        self.registry.register(OffloadCollector(coordinator))

    def render(self) -> bytes:
        return generate_latest(self.registry)
