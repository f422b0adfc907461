"""HF's `greedy` lr_scheduler_type: GreedyLR (arXiv 2512.14527), stepped on evaluation metrics.

The rule, as transformers 5.24 applies it on every evaluation (`step(metric)`):
- the metric (optionally a running mean over the last `window_size` values, `smooth`) is
  better than the best so far by more than `threshold` (absolute, or relative with
  threshold_mode='rel') -> a good evaluation, else a bad one; a good one resets the bad
  count and vice versa;
- more than `patience` good evaluations in a row: every LR is divided by `factor` (capped at
  `max_lr`), then `warmup` evaluations are not counted; more than `patience` bad ones: every
  LR is multiplied by `factor` (floored at `min_lr`), then `cooldown` evaluations are not
  counted; a change of at most `eps` is not applied;
- after `reset_start` reductions with every LR at its floor, the scheduler starts over from
  the initial LRs and forgets its best value.
The state_dict uses HF's keys, so a checkpoint moves between the two trainers. An LR held
as a tensor (fasttrain's fused optimizers) is written in place.
"""
from __future__ import annotations

from collections import deque
from typing import Union

import torch

Bound = Union[float, list, tuple]


def _per_group(name: str, value: Bound, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"lr_scheduler_kwargs {name} has {len(value)} values for {n} parameter groups; "
                             "give one value or one per group")
        return [float(v) for v in value]
    return [float(value)] * n


class GreedyLR:
    """Raises the LR while the metric keeps improving, lowers it when it stalls."""

    def __init__(self, optimizer, mode: str = "min", factor: float = 0.95, patience: int = 10,
                 threshold: float = 1e-6, threshold_mode: str = "abs", cooldown: int = 0, warmup: int = 0,
                 min_lr: Bound = 1e-3, max_lr: Bound = 1.0, eps: float = 1e-8, verbose: bool = False,
                 smooth: bool = False, window_size: int = 50, reset_start: int = 500):
        if not factor < 1.0:
            raise ValueError(f"lr_scheduler_kwargs factor={factor} is invalid: greedy multiplies the LR by "
                             "factor on a plateau and divides by it on improvement, so it must be < 1")
        if mode not in ("min", "max"):
            raise ValueError(f"lr_scheduler_kwargs mode={mode!r} is invalid: 'min' or 'max'")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"lr_scheduler_kwargs threshold_mode={threshold_mode!r} is invalid: 'rel' or 'abs'")
        self.optimizer = optimizer
        n = len(optimizer.param_groups)
        self.mode, self.factor, self.patience = mode, factor, patience
        self.threshold, self.threshold_mode, self.eps, self.verbose = threshold, threshold_mode, eps, verbose
        self.cooldown, self.warmup = cooldown, warmup
        self.min_lrs, self.max_lrs = _per_group("min_lr", min_lr, n), _per_group("max_lr", max_lr, n)
        self.smooth, self.window_size = smooth, window_size
        self.reset_start = self.reset_start_original = reset_start
        self._init_lrs = self._lrs()
        self._last_lr = list(self._init_lrs)
        self._window: deque = deque()
        self._start_over()
        self.last_epoch = 0

    def _start_over(self) -> None:
        self.best = float("inf") if self.mode == "min" else float("-inf")
        self.num_bad_epochs = self.num_good_epochs = 0
        self.cooldown_counter = self.warmup_counter = 0
        self._window.clear()
        self._window_sum = 0.0

    def _lrs(self) -> list:
        return [float(g["lr"]) for g in self.optimizer.param_groups]  # sync: evaluation steps only

    def _set_lr(self, group: dict, value: float) -> None:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value

    def _smoothed(self, value: float) -> float:
        # a running sum, updated as HF's StreamingAverage does (the same rounding)
        self._window.append(value)
        self._window_sum += value
        if len(self._window) > self.window_size:
            self._window_sum -= self._window.popleft()
        return self._window_sum / len(self._window)

    def _improves(self, value: float) -> bool:
        if self.mode == "min":
            bound = self.best * (1.0 - self.threshold) if self.threshold_mode == "rel" else self.best - self.threshold
            return value < bound
        bound = self.best * (1.0 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold
        return value > bound

    def step(self, metrics, epoch=None) -> None:
        value = float(metrics)
        if self.smooth:
            value = self._smoothed(value)
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        if self.cooldown_counter > 0 or self.warmup_counter > 0:  # a pause after a change
            if self.cooldown_counter > 0:
                self.cooldown_counter -= 1
            else:
                self.warmup_counter -= 1
            self.num_bad_epochs = self.num_good_epochs = 0
        else:
            if self._improves(value):
                self.best, self.num_good_epochs, self.num_bad_epochs = value, self.num_good_epochs + 1, 0
            else:
                self.num_bad_epochs, self.num_good_epochs = self.num_bad_epochs + 1, 0
            if self.num_good_epochs > self.patience:
                self._raise()
                self.warmup_counter, self.num_good_epochs = self.warmup, 0
            elif self.num_bad_epochs > self.patience:
                self._lower()
                self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0
        self._last_lr = self._lrs()

    def _raise(self) -> None:
        for group, old, ceiling in zip(self.optimizer.param_groups, self._lrs(), self.max_lrs):
            new = min(old / self.factor, ceiling)
            if new - old > self.eps:
                self._set_lr(group, new)
        self.reset_start = self.reset_start_original

    def _lower(self) -> None:
        for group, old, floor in zip(self.optimizer.param_groups, self._lrs(), self.min_lrs):
            new = max(old * self.factor, floor)
            if old - new > self.eps:
                self._set_lr(group, new)
        if all(self._at_floor(g, floor) for g, floor in zip(self.optimizer.param_groups, self.min_lrs)):
            self.reset_start -= 1
            if self.reset_start <= 0:
                for group, lr in zip(self.optimizer.param_groups, self._init_lrs):
                    self._set_lr(group, lr)
                self._start_over()
                self.reset_start = self.reset_start_original

    @staticmethod
    def _at_floor(group: dict, floor: float) -> bool:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):  # the floor as the tensor holds it (float32 rounds 0.05 up)
            return bool(lr <= torch.tensor(floor, dtype=lr.dtype, device=lr.device))  # sync: evaluation only
        return lr <= floor

    def get_last_lr(self) -> list:
        return list(self._last_lr)

    _KEYS = ("factor", "min_lrs", "max_lrs", "patience", "verbose", "cooldown", "warmup", "cooldown_counter",
             "warmup_counter", "mode", "threshold", "threshold_mode", "best", "num_bad_epochs",
             "num_good_epochs", "eps", "last_epoch", "smooth", "window_size", "reset_start",
             "reset_start_original", "_last_lr", "_init_lrs")

    def state_dict(self) -> dict:
        state = {key: getattr(self, key) for key in self._KEYS}
        if self.smooth:
            state["_streaming_avg"] = {"window_size": self.window_size, "values": list(self._window),
                                       "sum": self._window_sum}
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in self._KEYS:
            if key in state:
                setattr(self, key, state[key])
        if "_streaming_avg" in state:
            self._window = deque(state["_streaming_avg"].get("values", []))
            self._window_sum = float(state["_streaming_avg"].get("sum", 0.0))
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            self._set_lr(group, float(lr))
