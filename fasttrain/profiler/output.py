"""What the profiler writes: torch.profiler traces, OOM memory snapshots, the summary table.

- Trace: `TraceWindow` runs torch.profiler for steps [first, last] (1-based, inclusive) and
  writes `<output_dir>/profiler/rank<R>.<id>.pt.trace.json`, a Chrome trace that Perfetto
  (ui.perfetto.dev) opens and TensorBoard's profiler plugin reads (`--logdir output_dir/profiler`).
- OOM: `dump_memory_snapshot` writes `<output_dir>/profiler/oom_snapshot_rank<R>.pickle` for
  https://pytorch.org/memory_viz. It is called from a CUDA OOM observer (at the failing
  allocation, when torch exposes one) and from `Profiler.oom_guard()` before the error
  propagates, whichever comes first.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


class TraceWindow:
    """Start torch.profiler at step `first`, stop and export after step `last`."""

    def __init__(self, first: int, last: int, output_dir: str | os.PathLike, rank: int = 0,
                 profile_memory: bool = True):
        self.first, self.last = first, last
        self.directory = Path(output_dir) / "profiler"
        self._rank, self._profile_memory = rank, profile_memory
        self._prof = None
        self._label = None
        self.path: str | None = None

    def on_step_begin(self, step: int) -> None:
        if step != self.first or self._prof is not None:
            return
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._prof = profile(activities=activities, record_shapes=True,
                             profile_memory=self._profile_memory,
                             on_trace_ready=tensorboard_trace_handler(
                                 str(self.directory), worker_name=f"rank{self._rank}"))
        self._prof.start()

    def on_step_begin_labelled(self, step: int) -> None:
        """Open a 'fasttrain_step_<N>' range so each step is one labelled span in the trace."""
        self.on_step_begin(step)
        if self._prof is not None:
            self._label = torch.profiler.record_function(f"fasttrain_step_{step}")
            self._label.__enter__()

    def on_step_end(self, step: int) -> None:
        if self._prof is None:
            return
        if self._label is not None:
            self._label.__exit__(None, None, None)
            self._label = None
        if step >= self.last:
            self.stop()

    def stop(self) -> None:
        if self._prof is None:
            return
        if self._label is not None:
            self._label.__exit__(None, None, None)
            self._label = None
        before = set(self.directory.glob("*.pt.trace.json"))
        self._prof.stop()  # sync: the profiler flushes device activity when it stops
        self._prof = None
        written = sorted(set(self.directory.glob("*.pt.trace.json")) - before)
        self.path = str(written[-1]) if written else None


def cuda_snapshot_supported() -> bool:
    return torch.cuda.is_available()


def dump_memory_snapshot(path: str | os.PathLike) -> str:
    """Write the CUDA caching allocator's snapshot (pickle for pytorch.org/memory_viz)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    return str(path)



def _fmt(value, unit: str = "", spec: str = ".3g") -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:{spec}}{unit}"
    return f"{value}{unit}"


def format_summary(summary: dict) -> str:
    """The end-of-run console table for `Profiler.summary()`."""
    thr, step, mem, mfu = (summary["throughput"], summary["step_time_s"], summary["memory"],
                           summary["mfu"])
    steps = summary["steps"]
    rows = [
        ("device", f"{summary['device']['name']} x{summary['device']['num_devices']} "
                   f"({summary['dtype']})"),
        ("steps measured", f"{steps['measured']} of {steps['total']} "
                           f"(warm-up {steps['warmup']}, excluded {steps['excluded']})"),
        ("tokens/s total", _fmt(thr.get("tokens_per_second"), "", ".4g")),
        ("tokens/s per device", _fmt(thr.get("tokens_per_second_per_device"), "", ".4g")),
        ("samples/s total", _fmt(thr.get("samples_per_second"), "", ".4g")),
        ("step time p50 / p90", f"{_fmt(step.get('p50'), ' s')} / {_fmt(step.get('p90'), ' s')}"),
        ("data wait", _fmt(summary.get("data_wait_fraction"), "", ".1%")),
    ]
    for name, seconds in summary["phases_s"].items():
        rows.append((f"  {name}", f"{_fmt(seconds, ' s')} per step"))
    rows.append(("MFU", _fmt(mfu["value"], "", ".1%") if mfu["value"] is not None
                 else f"null ({mfu['note']})"))
    if mfu.get("formula"):
        rows.append(("  FLOPs/token", mfu["formula"]))
    if mfu.get("peak_flops"):
        rows.append(("  peak", f"{mfu['peak_flops'] / 1e12:.4g} TFLOP/s per device"))
    for key, value in mem.items():
        rows.append((key, _fmt(value, "", ".4g")))
    rows.append(("NVML", summary["hardware"]["nvml_status"]))
    if summary.get("compile_time_s") is not None:
        rows.append(("compile time", _fmt(summary["compile_time_s"], " s")))
    for key in ("trace", "oom_snapshot"):
        if summary.get(key):
            rows.append((key, summary[key]))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    return f"{line}\nfasttrain profile\n{line}\n{body}\n{line}"
