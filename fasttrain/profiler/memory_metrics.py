"""HF's memory metrics (`skip_memory_metrics=False`): the same keys, measured without a
busy thread.

Per stage (init: Trainer construction; train; eval; test = predict), as transformers 5.24
names them: `<stage>_mem_cpu_alloc_delta` (resident memory at the end minus at the start),
`<stage>_mem_cpu_peaked_delta` (the stage's peak above its end, >= 0) and, when a CUDA device
is used, the same for `_mem_gpu_` (torch's allocated bytes and their peak). The init figures
ride with the first stage that reports, with `before_init_mem_cpu`/`before_init_mem_gpu`
(memory in use when the Trainer was built). A stage nested in another (evaluation during
training) is not measured on its own, as in HF.

How: HF polls the resident set size in a thread that spins for the whole stage (a core
busy for the whole run). Here the CPU peak is the kernel's own high-water mark: reset at
the stage's start (`/proc/self/clear_refs`, Linux) and read at its end (`VmHWM`), exact and
free; it also resets what `getrusage` reports as this process's peak. Where that reset is
not available (not Linux) the peak is `ru_maxrss`, the process's peak since it started: an
upper bound, logged once. GPU: `torch.cuda.reset_peak_memory_stats` and
`max_memory_allocated`, as HF.
"""
from __future__ import annotations

import gc
import logging
from typing import Optional

import torch

from fasttrain.profiler.sampler import peak_rss_bytes, rss_bytes

logger = logging.getLogger("fasttrain")


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the resident high-water mark (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _cpu_now() -> int:
    rss = rss_bytes()
    return rss if rss is not None else peak_rss_bytes()


def _cpu_peak() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else peak_rss_bytes()


class MemoryMetrics:
    """start(stage) ... stop_and_update(stage, metrics) around each of HF's stages."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.stage: Optional[str] = None
        self.figures: dict = {}  # stage -> {"cpu": (begin, end, peak), "gpu": (...)}
        self.init_reported = False
        self._warned = False

    def start(self, stage: str) -> None:
        if not self.enabled or self.stage is not None:  # nested (eval inside train): not measured alone
            return
        self.stage = stage
        gc.collect()
        if not _reset_cpu_peak() and not self._warned:
            self._warned = True
            logger.info("memory metrics: this OS cannot reset the peak RSS; *_mem_cpu_peaked_delta is "
                        "measured from the process's lifetime peak (an upper bound)")
        self._begin = {"cpu": _cpu_now()}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.empty_cache()
            self._begin["gpu"] = torch.cuda.memory_allocated(self.device)

    def stop(self, stage: str) -> None:
        if not self.enabled or self.stage != stage:
            return
        gc.collect()
        figures = {"cpu": (self._begin["cpu"], _cpu_now(), _cpu_peak())}
        if self.cuda:
            torch.cuda.empty_cache()
            figures["gpu"] = (self._begin["gpu"], torch.cuda.memory_allocated(self.device),
                              torch.cuda.max_memory_allocated(self.device))
        self.figures[stage] = figures
        self.stage = None

    def stop_and_update(self, stage: str, metrics: Optional[dict] = None) -> None:
        """End `stage` and add its figures (and, the first time, init's) to `metrics`."""
        if not self.enabled or self.stage != stage:
            return
        self.stop(stage)
        if metrics is None:
            return
        stages = [stage]
        if not self.init_reported and "init" in self.figures:
            stages.insert(0, "init")
            self.init_reported = True
        for name in stages:
            for kind, (begin, end, peak) in self.figures[name].items():
                metrics[f"{name}_mem_{kind}_alloc_delta"] = end - begin
                metrics[f"{name}_mem_{kind}_peaked_delta"] = max(0, peak - end)
        if stages[0] == "init":
            for kind, (begin, _, _) in self.figures["init"].items():
                metrics[f"before_init_mem_{kind}"] = begin
