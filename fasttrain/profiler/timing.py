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

    def add_host_steps(self, steps: list) -> None:
        """Steps timed on the host clock, many at once (the logging step folds the steps kept
        since the last one): each (begin, end, data_s, phases as (name, start, end) marks,
        tokens, samples). Host time is step time here."""
        durations = [step[1] - step[0] for step in steps]
        self.step_s.extend(durations)
        self.n += len(steps)
        total = sum(durations)
        self.time_s += total
        self.host_s += total
        data = sum(step[2] for step in steps)
        self.data_s += data
        self.tokens += sum(step[4] for step in steps)
        self.samples += sum(step[5] for step in steps)
        sums = self.phases
        for step in steps:
            for name, start, end in step[3]:
                sums[name] = sums.get(name, 0.0) + (end - start)
        if data:
            sums["data"] = sums.get("data", 0.0) + data

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
