"""The Trainer's measuring instruments behind one object: the profiler (throughput, MFU,
step breakdown, memory) and the compile monitor (compiles, recompiles and their causes).

Per step nothing here synchronises with the device; `log_metrics()` runs on logging steps.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

logger = logging.getLogger("fasttrain")


def _nothing(*args) -> None:
    return None


def _seq_len_of(dataset) -> Optional[int]:
    try:
        ids = dataset[0].get("input_ids")
    except Exception:  # noqa: BLE001 - iterable or exotic datasets: MFU then needs flops_per_token
        return None
    return len(ids) if ids is not None else None


class Instruments:
    def __init__(self, args, model: torch.nn.Module, dist, train_dataset):
        from fasttrain.compile.apply import SequenceLengthWatcher, compile_from_args
        from fasttrain.profiler.profiler import profiler_from_args
        self.args = args
        self.monitor = compile_from_args(model, args)  # compiles model in place; None when off
        self.lengths = SequenceLengthWatcher(model) if self.monitor is not None else None
        self.profiler = profiler_from_args(args, model, dist.device, num_devices=dist.world_size,
                                           rank=dist.rank, seq_len=_seq_len_of(train_dataset))
        self.enabled = bool(args.profile)
        self.dist = dist
        self._warm = False
        # per step: step_begin(), then lap(name) at the end of each phase (data, forward,
        # backward, optimizer): the profiler's own methods, or no-ops when profiling is off
        self.step_begin = self.profiler.step_begin if self.enabled else _nothing
        self.lap = self.profiler.lap if self.enabled else _nothing

    def observe_batch(self, batch) -> None:
        """A compiled model switches to dynamic lengths when batch lengths start to vary."""
        if self.lengths is not None:
            self.lengths.observe(batch)

    def step_end(self, global_step: int, tokens: int, samples: int) -> None:
        if self.enabled:
            self.profiler.step_end(tokens, samples)
        if self.monitor is not None and not self._warm and global_step >= self.args.profile_warmup_steps:
            self.monitor.end_warmup()  # a recompile from now on is warned about, with its cause
            self._warm = True

    def expect_compiles(self, why: str):
        """Evaluation switches dropout off: its compiles are expected, not regressions."""
        if self.monitor is None:
            return contextlib.nullcontext()
        return self.monitor.expect_compiles(why)

    def log_metrics(self) -> dict:
        out = {}
        if self.enabled:
            out.update(self.profiler.log_metrics())
            out.update(self._memory_over_ranks(out))
        if self.monitor is not None:
            out.update({k if k.startswith("compile_") else f"compile_{k}": v
                        for k, v in self.monitor.stats().items()})
        return out

    def _memory_over_ranks(self, logged: dict) -> dict:
        """Every rank's memory figures (under FSDP each rank holds a different share; the
        largest is the one that runs out), gathered on logging steps, which every rank takes:
        the maximum over ranks goes into the log, every rank's figures into profile.json.
        `logged`: this rank's metrics of this logging step (the figures are taken from it)."""
        if not self.dist.enabled:
            return {}
        mine = {"rank": self.dist.rank, **{k: logged[k] for k in self.profiler.memory_metrics() if k in logged}}
        per_rank = self.dist.all_gather_object(mine)  # sync: logging step (object sizes)
        self.profiler.memory_per_rank = per_rank
        return {f"{key}_max_over_ranks": max(r.get(key, 0.0) for r in per_rank) for key in mine if key != "rank"}

    def oom_guard(self):
        return self.profiler.oom_guard() if self.enabled else contextlib.nullcontext()

    def finish(self, is_main: bool, quiet: bool) -> Optional[dict]:
        """Stop the compile monitor and the profiler's sampler thread first (they must stop
        even when writing the profile fails), then summarise and write profile.json."""
        summary = None
        try:
            if self.monitor is not None:
                stats = self.monitor.stats()
                self.profiler.add_compile_time(stats.get("compile_time_s", 0.0) or 0.0)
                self.monitor.stop()
        finally:
            self.profiler.close()
        if self.enabled:
            summary = self.profiler.summary()
            if is_main:
                self.profiler.write(self.args.output_dir)
                if not quiet:
                    self.profiler.print_summary()
        return summary
