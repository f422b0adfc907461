"""Hardware sampling off the training thread: NVML on a GPU, RSS and CPU% on the host.

A daemon thread reads the host process (resident memory, CPU utilisation) and, when the
profiled device is a CUDA GPU and NVML opens, the GPU (memory used/total, utilisation,
power, temperature, SM clock) every `interval_s`. Nothing here touches a CUDA stream.
The training thread only reads the latest values and running aggregates under a lock.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time

import torch

from fasttrain.profiler.nvml import GIB, GpuSample, NvmlUnavailable, format_sample, open_device


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_metrics(sample: GpuSample) -> dict[str, float]:
    """Flat, float-only metrics from one NVML sample (keys used in logs and profile.json)."""
    values = {
        "gpu_memory_used_gib": None if sample.memory_used_bytes is None else sample.memory_used_bytes / GIB,
        "gpu_memory_total_gib": None if sample.memory_total_bytes is None else sample.memory_total_bytes / GIB,
        "gpu_util_percent": sample.gpu_util_percent,
        "gpu_power_w": sample.power_w,
        "gpu_temperature_c": sample.temperature_c,
        "gpu_sm_clock_mhz": sample.sm_clock_mhz,
    }
    return {k: float(v) for k, v in values.items() if v is not None}


class HardwareSampler:
    """Samples host (always) and GPU (when NVML opens) metrics on a background thread."""

    def __init__(self, device: torch.device, interval_s: float = 1.0, nvml_lib=None):
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s!r}: must be > 0 seconds")
        self.interval_s = interval_s
        self.nvml_status = "NVML not used: device is not a CUDA GPU"
        self.gpu_name: str | None = None
        self.last_gpu_line: str | None = None
        self._gpu = None
        if device.type == "cuda":
            try:
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._gpu = open_device(index, lib=nvml_lib)
                self.nvml_status = "NVML ok"
            except NvmlUnavailable as exc:
                self.nvml_status = f"{exc}; GPU utilisation/power/temperature/clock not reported"
        self._cores = _available_cores()
        self._lock = threading.Lock()
        self._latest: dict[str, float] = {}
        self._sums: dict[str, float] = {}
        self._maxes: dict[str, float] = {}
        self._count = 0
        self._last_cpu = (time.perf_counter(), _process_cpu_seconds())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="fasttrain-hw-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def sample_once(self) -> dict[str, float]:
        """Take one sample now (also called by the thread); returns the flat metrics."""
        metrics = self._host_metrics()
        if self._gpu is not None:
            try:
                sample = self._gpu.sample()
                self.gpu_name = sample.name
                self.last_gpu_line = format_sample(sample)
                metrics.update(gpu_metrics(sample))
            except Exception as exc:  # a failing sensor must never stop training
                self.nvml_status = f"NVML sampling failed ({exc}); GPU sensors not reported"
                self._gpu = None
        with self._lock:
            self._latest = metrics
            self._count += 1
            for key, value in metrics.items():
                self._sums[key] = self._sums.get(key, 0.0) + value
                self._maxes[key] = max(self._maxes.get(key, value), value)
        return metrics

    def _host_metrics(self) -> dict[str, float]:
        now, cpu = time.perf_counter(), _process_cpu_seconds()
        last_now, last_cpu = self._last_cpu
        self._last_cpu = (now, cpu)
        rss = rss_bytes()
        metrics = {"host_rss_peak_gib": max(peak_rss_bytes(), rss or 0) / GIB}
        if rss is not None:
            metrics["host_rss_gib"] = rss / GIB
        if now - last_now > 1e-3:
            metrics["cpu_util_percent"] = 100.0 * (cpu - last_cpu) / ((now - last_now) * self._cores)
        return metrics

    def latest(self) -> dict[str, float]:
        with self._lock:
            return dict(self._latest)

    def aggregates(self) -> dict[str, float]:
        """Means and maxima over all samples: '<key>_mean' and '<key>_max'."""
        with self._lock:
            out = {}
            for key, total in self._sums.items():
                out[f"{key}_mean"] = total / self._count
                out[f"{key}_max"] = self._maxes[key]
            return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
            self._thread = None
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None


def _process_cpu_seconds() -> float:
    """CPU time of every thread of this process, at the clock's full resolution (os.times()
    counts 10 ms ticks: over a short sampling interval that alone read 125% on 2 busy cores)."""
    return time.process_time()
