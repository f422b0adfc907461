"""Throughput, MFU, step-time breakdown and memory of a training run, without per-step syncs.

The trainer calls, per optimizer step:

    prof.step_begin()
    with prof.phase("data"):      batch = next(batches)      # host clock, always
    with prof.phase("forward"):   loss = model(**batch).loss
    with prof.phase("backward"):  loss.backward()
    with prof.phase("optimizer"): optimizer.step(); optimizer.zero_grad()
    prof.step_end(tokens=B * T, samples=B)                    # host ints from shapes

and `prof.log_metrics()` only on logging steps (the one place that waits for the device).
A loop whose phases follow one another can mark each phase's end instead, one call a phase:

    prof.step_begin(); batch = next(batches); prof.lap("data")
    loss = model(**batch).loss;               prof.lap("forward")
    loss.backward();                          prof.lap("backward")
    optimizer.step();                         prof.lap("optimizer")

A lap is the time since the previous lap (or the step's begin); the Trainer times its
steps this way (one mark a boundary: 5 a step where four `phase` blocks take 8).
On a GPU, step and phase boundaries are CUDA events recorded on the current stream and read
later; on a CPU they are `time.perf_counter()`. The first `warmup_steps` steps (compile,
autotuning, allocator growth) and steps passed `exclude=True` are left out of every
statistic. Step time is begin-to-end of one step on the device timeline; throughput is
tokens over the summed step times of the window; data wait is the host time in the "data"
phase over the host time of the step. Phases repeat freely (gradient accumulation) and sum.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import torch

from fasttrain.profiler.flops import FlopsPerToken, device_name_of, dtype_key, peak_flops, user_flops_per_token
from fasttrain.profiler.flops import flops_per_token_for
from fasttrain.profiler.nvml import GIB
from fasttrain.profiler.output import (TraceWindow, cuda_snapshot_supported, dump_memory_snapshot,
                                       format_summary)
from fasttrain.profiler.sampler import HardwareSampler, peak_rss_bytes
from fasttrain.profiler.timing import CudaTimer, HostTimer, Stats

HOST_PHASES = ("data",)  # timed on the host clock even on a GPU: the work is host work


@dataclass
class ProfilerConfig:
    """Settings of `Profiler`. Every field is validated in __post_init__."""

    enabled: bool = True
    warmup_steps: int = 3           # first steps left out of all statistics
    phase_timing: bool = True       # per-phase events; False keeps only step begin/end
    sample_interval_s: float = 1.0  # hardware sampler period (background thread)
    trace_steps: tuple[int, int] | None = None  # (first, last) 1-based steps for torch.profiler
    trace_memory: bool = True       # record allocations in the trace
    memory_snapshot_on_oom: bool = True
    record_memory_history: bool = False  # stack traces in the OOM snapshot (costs ~some %)
    peak_tflops: float | None = None     # per-device peak override for the run's dtype
    peak_overrides: dict | None = None   # {"device name substring": {"bf16": TFLOP/s}}
    max_recorded_steps: int = 100_000    # step times kept for run-level percentiles

    def __post_init__(self):
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"ProfilerConfig.warmup_steps={self.warmup_steps!r}: must be an int >= 0")
        if not self.sample_interval_s > 0:
            raise ValueError(f"ProfilerConfig.sample_interval_s={self.sample_interval_s!r}: must be > 0")
        if self.trace_steps is not None:
            ts = tuple(self.trace_steps)
            if len(ts) != 2 or not all(isinstance(s, int) for s in ts) or not 1 <= ts[0] <= ts[1]:
                raise ValueError(f"ProfilerConfig.trace_steps={self.trace_steps!r}: must be "
                                 "(first, last) with 1 <= first <= last, e.g. (10, 12)")
            self.trace_steps = ts
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"ProfilerConfig.peak_tflops={self.peak_tflops!r}: must be > 0 "
                             "(dense TFLOP/s of one device) or None to use the built-in table")
        if not isinstance(self.max_recorded_steps, int) or self.max_recorded_steps < 1:
            raise ValueError(f"ProfilerConfig.max_recorded_steps={self.max_recorded_steps!r}: must be >= 1")


def trace_steps_from_string(spec: str | None) -> tuple[int, int] | None:
    """TrainingArguments.profiler_trace_steps 'START:END' (0-based, END excluded, like a
    slice of step indices) -> ProfilerConfig.trace_steps (first, last), 1-based inclusive."""
    if spec is None:
        return None
    try:
        start, end = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"profiler_trace_steps={spec!r}: expected 'START:END', e.g. '10:12'") from None
    if not 0 <= start < end:
        raise ValueError(f"profiler_trace_steps={spec!r}: needs 0 <= START < END")
    return (start + 1, end)


def profiler_from_args(args, model: torch.nn.Module, device: torch.device, num_devices: int = 1,
                       rank: int = 0, seq_len: int | None = None) -> "Profiler":
    """Build the Trainer's Profiler from TrainingArguments (profile, profile_warmup_steps,
    profiler_trace_steps, flops_per_token, peak_tflops, bf16/fp16, output_dir)."""
    config = ProfilerConfig(
        enabled=getattr(args, "profile", True),
        warmup_steps=getattr(args, "profile_warmup_steps", 3),
        trace_steps=trace_steps_from_string(getattr(args, "profiler_trace_steps", None)),
        peak_tflops=getattr(args, "peak_tflops", None))
    user_fpt = getattr(args, "flops_per_token", None)
    fpt = user_flops_per_token(user_fpt) if user_fpt else flops_per_token_for(model, seq_len)
    dtype = torch.bfloat16 if getattr(args, "bf16", False) else (
        torch.float16 if getattr(args, "fp16", False) else torch.float32)
    return Profiler(config, device, num_devices=num_devices, flops_per_token=fpt, dtype=dtype,
                    output_dir=args.output_dir, rank=rank)


class _Phase:
    """Context manager for one phase name, made once per name and reused (the Trainer enters
    four phases a step, so this is the whole per-phase cost: a clock read on entry, one on
    exit and an append). Phases of different names nest; one name does not nest in itself."""
    __slots__ = ("_prof", "_name", "_host", "_start")

    def __init__(self, prof: "Profiler", name: str):
        self._prof, self._name, self._host = prof, name, name in HOST_PHASES
        self._start = None

    def __enter__(self):
        prof = self._prof
        if prof._current is None:
            if not prof.config.enabled:
                return
            raise RuntimeError(f"Profiler.phase({self._name!r}) outside a step: call step_begin() first")
        if self._host:
            self._start = perf_counter()
        elif prof.config.phase_timing:
            self._start = prof._timer.mark()

    def __exit__(self, *exc):
        start, self._start = self._start, None
        if start is None:
            return
        current = self._prof._current
        if self._host:
            current[3] += perf_counter() - start
        else:
            current[2].append((self._name, start, self._prof._timer.mark()))


class Profiler:
    """See the module docstring for the calls the trainer makes."""

    def __init__(self, config: ProfilerConfig | None = None, device: torch.device | str = "cpu",
                 num_devices: int = 1, flops_per_token: float | FlopsPerToken | None = None,
                 dtype: torch.dtype | str = torch.float32, output_dir: str | os.PathLike | None = None,
                 rank: int = 0, nvml_lib=None):
        self.config = config or ProfilerConfig()
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Profiler(device={device!r}): CUDA is not available here; "
                             "profile the device the model runs on (e.g. 'cpu')")
        if not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(f"num_devices={num_devices!r}: must be an int >= 1 (the data-parallel world size)")
        self.num_devices, self.rank, self.dtype = num_devices, rank, dtype_key(dtype)
        if flops_per_token is not None and not isinstance(flops_per_token, FlopsPerToken):
            flops_per_token = user_flops_per_token(flops_per_token)
        self.flops_per_token = flops_per_token
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.device_name = device_name_of(self.device) or self.device.type
        self.step = 0
        self.compile_time_s: float | None = None
        self.oom_snapshot: str | None = None
        # every rank's memory_metrics() (with its "rank"), gathered by the caller on logging
        # steps under data/sharded parallelism, where each rank holds a different share
        self.memory_per_rank: list[dict] | None = None
        self.use_timer(CudaTimer() if self.device.type == "cuda" else HostTimer())
        # host-clock steps, kept whole until a logging step folds them into the window (the
        # per-step cost is one append; the arithmetic runs in one pass on the logging step)
        self._host_steps: list = []
        self._pending: deque = deque()
        self._current = None
        self._phases: dict[str, _Phase] = {}
        self._window, self._run = Stats(), Stats(self.config.max_recorded_steps)
        self._excluded = 0
        self._trace = self._build_trace()
        self._plain_after = self._plain_steps_after()
        self._sampler = None
        if self.config.enabled:
            self._sampler = HardwareSampler(self.device, self.config.sample_interval_s, nvml_lib)
            self._sampler.start()
            self._setup_oom_snapshot()

    def use_timer(self, timer) -> None:
        """The clock behind every mark: HostTimer (perf_counter floats) or CudaTimer."""
        self._timer, self._mark = timer, timer.mark
        self._host_clock = isinstance(timer, HostTimer)  # marks are perf_counter floats
        self._plain_after = self._plain_steps_after()

    def _plain_steps_after(self) -> int | None:
        """The step after which step_end takes its short path (every step is measured and
        host-timed, none traced), or None where it never does (a GPU clock)."""
        if not self._host_clock or not self.config.enabled:
            return None
        trace = getattr(self, "_trace", None)
        return max(self.config.warmup_steps, trace.last if trace is not None else 0)

    def _build_trace(self) -> TraceWindow | None:
        if self.config.trace_steps is None or not self.config.enabled:
            return None
        if self.output_dir is None:
            raise ValueError("ProfilerConfig.trace_steps is set but Profiler(output_dir=None): "
                             "pass output_dir so the trace has somewhere to go")
        first, last = self.config.trace_steps
        return TraceWindow(first, last, self.output_dir, self.rank, self.config.trace_memory)

    def _setup_oom_snapshot(self) -> None:
        if self.device.type != "cuda" or not self.config.memory_snapshot_on_oom:
            return
        if self.config.record_memory_history:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is not None and self.output_dir is not None:
            attach(lambda *args: self._write_oom_snapshot())

    # ---------------------------------------------------------------- per step (no syncs)
    def step_begin(self) -> None:
        if not self.config.enabled:
            return
        self.step += 1
        if self._trace is not None:
            self._trace.on_step_begin_labelled(self.step)
        begin = self._mark()
        host = begin if self._host_clock else perf_counter()
        # begin, host begin, phases, data_s, the last lap's mark and host time
        self._current = [begin, host, [], 0.0, begin, host]

    def phase(self, name: str) -> _Phase:
        """Context manager timing one phase of the current step (names may repeat)."""
        ctx = self._phases.get(name)
        if ctx is None:
            ctx = self._phases[name] = _Phase(self, name)
        return ctx

    def lap(self, name: str) -> None:
        """The time since the previous lap (or since step_begin) was phase `name` (names may
        repeat: gradient accumulation laps forward, backward, forward, backward, ...). A host
        phase ("data") is timed on the host clock; on a GPU its end is also a device mark,
        where the next device phase begins. With phase_timing off only host phases count."""
        current = self._current
        if current is None:
            if not self.config.enabled:
                return
            raise RuntimeError(f"Profiler.lap({name!r}) outside a step: call step_begin() first")
        if name in HOST_PHASES:
            host = perf_counter()
            current[3] += host - current[5]
            current[5] = host
            if self.config.phase_timing:
                current[4] = host if self._host_clock else self._mark()
            return
        if not self.config.phase_timing:
            return
        mark = self._mark()
        current[2].append((name, current[4], mark))
        current[4] = mark
        current[5] = mark if self._host_clock else perf_counter()

    def step_end(self, tokens: int, samples: int, exclude: bool = False) -> None:
        """Close the step. `tokens`/`samples` are this rank's host ints (from batch shapes).
        On a GPU, a step whose last call was a device lap ends at that lap's event: work
        launched between it and step_end is not in the step's device time."""
        current = self._current
        if current is None:
            if not self.config.enabled:
                return
            raise RuntimeError("Profiler.step_end() without step_begin()")
        if not isinstance(tokens, int) or not isinstance(samples, int):
            raise TypeError(f"step_end(tokens={tokens!r}, samples={samples!r}): pass host ints "
                            "computed from batch shapes, never tensors (that would sync)")
        self._current = None
        if self._plain_after is not None and self.step > self._plain_after and not exclude:
            # the common step (host clock, past warm-up, no trace window): one append
            self._host_steps.append((current[0], perf_counter(), current[3], current[2], tokens, samples))
            if len(self._host_steps) >= 4096:  # bounded when logging is rare or off
                self._fold_host_steps()
            return
        begin, host_begin, phases, data_s = current[:4]
        traced = self._trace is not None and self._trace.first <= self.step <= self._trace.last
        warm = self.step <= self.config.warmup_steps
        measured = not (warm or exclude or traced)  # traced steps carry torch.profiler's overhead
        if not (measured or warm):
            self._excluded += 1
        if self._trace is not None:
            self._trace.on_step_end(self.step)
        if self._host_clock:  # host marks need no waiting: kept for the logging step's fold
            if measured:
                self._host_steps.append((begin, perf_counter(), data_s, phases, tokens, samples))
                if len(self._host_steps) >= 4096:  # bounded when logging is rare or off
                    self._fold_host_steps()
            return
        # on a GPU the last lap's event ends the step when it closed a device phase (the
        # bookkeeping after it launches nothing): one event record fewer a step
        last = current[4]
        end = last if phases and phases[-1][2] is last else self._timer.mark()
        self._pending.append((begin, end, perf_counter() - host_begin, data_s, phases, tokens, samples, measured))
        while self._pending and self._timer.ready(self._pending[0][1]):
            self._resolve(self._pending.popleft())

    def _resolve(self, record) -> None:
        """A GPU step whose last event has completed: its times into the window."""
        begin, end, host_s, data_s, phases, tokens, samples, measured = record
        elapsed = self._timer.elapsed_s
        if measured:
            per_phase: dict[str, float] = {}
            for name, a, b in phases:
                per_phase[name] = per_phase.get(name, 0.0) + elapsed(a, b)
            if data_s:
                per_phase["data"] = data_s
            # into the window only: the run's totals take each window whole when it is logged
            self._window.add(elapsed(begin, end), host_s, data_s, tokens, samples, per_phase)
        # consecutive laps share an event: each goes back to the pool once
        marks = {id(m): m for m in (begin, end, *(m for _, a, b in phases for m in (a, b)))}
        self._timer.release(list(marks.values()))

    def _fold_host_steps(self) -> None:
        steps, self._host_steps = self._host_steps, []
        self._window.add_host_steps(steps)

    def _drain(self) -> None:
        if self._host_steps:
            self._fold_host_steps()
        if self._pending and isinstance(self._timer, CudaTimer):
            self._pending[-1][1].synchronize()  # sync: logging step (or end of run) only
        while self._pending:
            self._resolve(self._pending.popleft())

    def add_compile_time(self, seconds: float) -> None:
        """Record compile time measured by the caller; reported apart from step time."""
        self.compile_time_s = (self.compile_time_s or 0.0) + float(seconds)

    # ---------------------------------------------------------------- logging steps
    def _throughput(self, stats: Stats) -> dict[str, float]:
        if stats.n == 0 or stats.time_s <= 0:
            return {}
        tps = stats.tokens / stats.time_s
        sps = stats.samples / stats.time_s
        out = {"tokens_per_second": tps * self.num_devices, "tokens_per_second_per_device": tps,
               "samples_per_second": sps * self.num_devices, "samples_per_second_per_device": sps}
        peak = self.peak_flops()
        if peak and self.flops_per_token is not None:
            out["mfu"] = self.flops_per_token.value * tps / peak
        return out

    def peak_flops(self) -> float | None:
        if self.config.peak_tflops is not None:
            return self.config.peak_tflops * 1e12
        name = device_name_of(self.device)
        return peak_flops(name, self.dtype, self.config.peak_overrides)

    def memory_metrics(self) -> dict[str, float]:
        """Allocator peaks (host-side counters: no device sync) and host peak RSS."""
        # getrusage's peak already counts the current RSS (Linux takes the maximum of the two):
        # no /proc/self/statm read here (~10 us alone, more inside a training loop)
        out = {"host_rss_peak_gib": peak_rss_bytes() / GIB}
        if self.device.type == "cuda":
            out["memory_allocated_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            out["memory_reserved_peak_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
            out["memory_allocated_gib"] = torch.cuda.memory_allocated(self.device) / GIB
        return out

    def log_metrics(self) -> dict[str, float]:
        """Flat float metrics over the steps since the last call. Call only on logging steps."""
        if not self.config.enabled:
            return {}
        self._drain()
        window, self._window = self._window, Stats()
        self._run.merge(window)
        out = self._throughput(window)
        if window.n:
            out["step_time_p50"] = window.percentile(0.5)
            out["step_time_p90"] = window.percentile(0.9)
            out["data_wait_fraction"] = window.data_s / window.host_s if window.host_s else 0.0
            for name, seconds in window.phases.items():
                out[f"phase_{name}_s"] = seconds / window.n
        out.update(self._sampler.latest() if self._sampler else {})
        out.update(self.memory_metrics())
        return out

    # ---------------------------------------------------------------- end of run
    def summary(self) -> dict:
        self._drain()  # sync: end of run
        run = Stats(self.config.max_recorded_steps)  # the logged windows and the open one
        run.merge(self._run)
        run.merge(self._window)
        peak = self.peak_flops()
        thr = self._throughput(run)
        fpt = self.flops_per_token
        if fpt is None:
            note = "no FLOPs per token (pass flops_per_token or a model with a known config)"
        elif peak is None:
            note = f"no peak FLOP/s known for {self.device_name!r} ({self.dtype}); set peak_tflops"
        else:
            note = "model FLOPs utilisation = FLOPs/token * tokens/s per device / peak"
        return {
            "device": {"type": self.device.type, "name": self.device_name,
                       "num_devices": self.num_devices},
            "dtype": self.dtype,
            "steps": {"total": self.step, "warmup": min(self.step, self.config.warmup_steps),
                      "excluded": self._excluded, "measured": run.n},
            "throughput": {k: v for k, v in thr.items() if k != "mfu"},
            "step_time_s": {"p50": run.percentile(0.5), "p90": run.percentile(0.9),
                            "mean": run.time_s / run.n if run.n else None},
            "data_wait_fraction": run.data_s / run.host_s if run.host_s else None,
            "phases_s": {k: v / run.n for k, v in run.phases.items()},
            "mfu": {"value": thr.get("mfu"), "note": note, "peak_flops": peak,
                    "flops_per_token": None if fpt is None else fpt.value,
                    "formula": None if fpt is None else fpt.formula},
            "memory": self.memory_metrics(),
            "memory_per_rank": self.memory_per_rank,
            "hardware": self._hardware_summary(),
            "compile_time_s": self.compile_time_s,
            "trace": None if self._trace is None else self._trace.path,
            "oom_snapshot": self.oom_snapshot,
        }

    def _hardware_summary(self) -> dict:
        if self._sampler is None:
            return {"nvml_status": "profiler disabled"}
        return {"nvml_status": self._sampler.nvml_status, "gpu_name": self._sampler.gpu_name,
                **self._sampler.aggregates()}

    def write(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write profile.json into output_dir (default: the constructor's) and return its path."""
        directory = Path(output_dir or self.output_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "profile.json"
        path.write_text(json.dumps(self.summary(), indent=2, default=str))
        return path

    def print_summary(self) -> None:
        print(format_summary(self.summary()), flush=True)

    def close(self) -> None:
        if self._trace is not None:
            self._trace.stop()
        if self.config.record_memory_history and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(enabled=None)
        if self._sampler is not None:
            self._sampler.stop()  # idempotent; its aggregates stay readable for summary()/write()

    # ---------------------------------------------------------------- OOM
    def _write_oom_snapshot(self) -> None:
        if self.oom_snapshot is not None or self.output_dir is None:
            return
        path = self.output_dir / "profiler" / f"oom_snapshot_rank{self.rank}.pickle"
        try:
            self.oom_snapshot = dump_memory_snapshot(path)
        except Exception as exc:  # never mask the OOM itself
            self.oom_snapshot = f"snapshot failed: {exc}"
        print(f"fasttrain: CUDA out of memory; memory snapshot for pytorch.org/memory_viz "
              f"written to {self.oom_snapshot}", flush=True)

    @contextlib.contextmanager
    def oom_guard(self):
        """Wrap the training loop: on CUDA OOM, write a memory snapshot, then re-raise."""
        try:
            yield self
        except torch.OutOfMemoryError:
            if self.config.memory_snapshot_on_oom and cuda_snapshot_supported():
                self._write_oom_snapshot()
            raise
