"""Clocks and accumulators behind the Profiler.

`HostTimer` marks are `time.perf_counter()` floats. `CudaTimer` marks are CUDA events
recorded on the current stream: recording never waits; `ready()` polls without blocking;
reading an elapsed time is only done once the later event has completed.
"""
from __future__ import annotations

from collections import deque
from time import perf_counter

import torch


class HostTimer:
    # the clock itself (a builtin: no Python frame for the eight marks of a step)
    mark = staticmethod(perf_counter)

    def elapsed_s(self, a, b) -> float:
        return b - a

    def ready(self, mark) -> bool:
        return True


class CudaTimer:
    """CUDA events on the current stream; a pool avoids creating events every step."""

    def __init__(self):
        self._pool: list = []

    def mark(self):
        event = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_s(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3

    def ready(self, mark) -> bool:
        return mark.query()  # non-blocking

    def release(self, marks) -> None:
        self._pool.extend(marks)


class Stats:
    """Sums over measured steps (a window, or the whole run)."""

    def __init__(self, maxlen: int | None = None):
        self.step_s: deque = deque(maxlen=maxlen)
        self.n = 0
        self.time_s = self.host_s = self.data_s = 0.0
        self.tokens = self.samples = 0
        self.phases: dict[str, float] = {}

    def add(self, step_s, host_s, data_s, tokens, samples, phases) -> None:
        self.step_s.append(step_s)
        self.n += 1
        self.time_s += step_s
        self.host_s += host_s
        self.data_s += data_s
        self.tokens += tokens
        self.samples += samples
        for name, seconds in phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + seconds

    def add_marks(self, step_s, host_s, data_s, tokens, samples, phases) -> None:
        """`add` for a step timed on the host clock, its phases as (name, start, end) marks
        (run on logging steps, over the steps kept since the last one)."""
        per_phase: dict[str, float] = {}
        for name, start, end in phases:
            per_phase[name] = per_phase.get(name, 0.0) + (end - start)
        if data_s:
            per_phase["data"] = data_s
        self.add(step_s, host_s, data_s, tokens, samples, per_phase)

    def merge(self, other: "Stats") -> None:
        """Add every step of `other` (a logged window into the run's totals)."""
        self.step_s.extend(other.step_s)
        self.n += other.n
        self.time_s += other.time_s
        self.host_s += other.host_s
        self.data_s += other.data_s
        self.tokens += other.tokens
        self.samples += other.samples
        for name, seconds in other.phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + seconds

    def percentile(self, q: float) -> float | None:
        if not self.step_s:
            return None
        ordered = sorted(self.step_s)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
