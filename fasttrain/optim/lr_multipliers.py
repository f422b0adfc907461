"""The LR multiplier m(step) of every HF `lr_scheduler_type`, vectorised over a float64 step
tensor so a whole schedule is tabulated at once. Each follows transformers 5.24's formula
(optimization.py) and takes its `lr_scheduler_kwargs` by HF's names.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

import torch

Multiplier = Callable[[torch.Tensor], torch.Tensor]


def _ramp(s, w: int):
    """HF's linear warm-up: step / max(1, warmup)."""
    return s / max(1, w)


def _cosine(progress, num_cycles: float):
    return 0.5 * (1.0 + torch.cos(math.pi * float(num_cycles) * 2.0 * progress))


def linear(s, w, n):
    return torch.where(s < w, _ramp(s, w), torch.clamp((n - s) / max(1, n - w), min=0.0))


def cosine(s, w, n, num_cycles: float = 0.5):
    p = (s - w) / max(1, n - w)
    return torch.where(s < w, _ramp(s, w), torch.clamp(_cosine(p, num_cycles), min=0.0))


def cosine_with_restarts(s, w, n, num_cycles: int = 1):
    p = (s - w) / max(1, n - w)
    wave = torch.clamp(0.5 * (1.0 + torch.cos(math.pi * torch.remainder(float(num_cycles) * p, 1.0))), min=0.0)
    return torch.where(s < w, _ramp(s, w), torch.where(p >= 1.0, torch.zeros_like(s), wave))


def polynomial(s, w, n, lr_init: float, lr_end: float = 1e-7, power: float = 1.0):
    if not lr_end < lr_init:
        raise ValueError(f"lr_scheduler_kwargs lr_end={lr_end} must be below the initial learning "
                         f"rate {lr_init} (polynomial decays from the one to the other)")
    remaining = torch.clamp(1.0 - (s - w) / max(1, n - w), min=0.0)
    decay = ((lr_init - lr_end) * remaining ** power + lr_end) / lr_init
    return torch.where(s < w, _ramp(s, w), torch.where(s > n, torch.full_like(s, lr_end / lr_init), decay))


def constant(s, w, n):
    return torch.ones_like(s)


def constant_with_warmup(s, w, n):
    return torch.where(s < w, _ramp(s, w), torch.ones_like(s))


def inverse_sqrt(s, w, n, timescale: Optional[int] = None):
    timescale = timescale if timescale is not None else (w or 10_000)
    return torch.where(s < w, _ramp(s, w), 1.0 / torch.sqrt((s + timescale - w) / timescale))


def _min_lr_rate(lr_init: float, min_lr, min_lr_rate) -> float:
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("lr_scheduler_kwargs sets both min_lr and min_lr_rate; keep one")
    if min_lr is not None:
        return min_lr / lr_init
    if min_lr_rate is None:
        raise ValueError("this lr_scheduler_type needs lr_scheduler_kwargs={'min_lr_rate': 0.1} "
                         "(a fraction of learning_rate) or {'min_lr': 1e-5}")
    return min_lr_rate


def cosine_with_min_lr(s, w, n, lr_init: float, num_cycles: float = 0.5, min_lr=None, min_lr_rate=None):
    floor = _min_lr_rate(lr_init, min_lr, min_lr_rate)
    p = (s - w) / max(1, n - w)
    return torch.where(s < w, _ramp(s, w), torch.clamp(_cosine(p, num_cycles) * (1 - floor) + floor, min=0.0))


def cosine_warmup_with_min_lr(s, w, n, lr_init: float, num_cycles: float = 0.5, min_lr=None,
                              min_lr_rate=None, warmup_lr_rate: Optional[float] = None):
    floor = _min_lr_rate(lr_init, min_lr, min_lr_rate)
    if warmup_lr_rate is None:  # as HF: this one's warm-up counts from step + 1
        up = (s + 1.0) / max(1.0, w)
    else:
        up = warmup_lr_rate + (1.0 - warmup_lr_rate) * s / max(1, w - 1)
    p = (s - w + 1.0) / max(1.0, n - w)
    return torch.where(s < w, up, torch.clamp(_cosine(p, num_cycles) * (1 - floor) + floor, min=0.0))


_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_stable_decay(s, w, n, num_decay_steps: Optional[int] = None, num_stable_steps: Optional[int] = None,
                        warmup_type: str = "linear", decay_type: str = "cosine", min_lr_ratio: float = 0.0,
                        num_cycles: float = 0.5, min_lr_rate: Optional[float] = None):
    """HF's WSD; fasttrain extras: num_decay_steps defaults to 10% of the steps, and
    min_lr_rate is accepted as another name of min_lr_ratio."""
    for name, shape in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if shape not in _SHAPES:
            raise ValueError(f"lr_scheduler_kwargs {name}={shape!r} is invalid: accepted values are {_SHAPES}")
    r = min_lr_rate if min_lr_rate is not None else min_lr_ratio
    decay = num_decay_steps if num_decay_steps is not None else max(1, int(0.1 * n))
    stable = num_stable_steps if num_stable_steps is not None else n - w - decay
    pw = s / max(1, w)
    up = {"linear": pw, "cosine": 0.5 * (1.0 - torch.cos(math.pi * pw)),
          "1-sqrt": 1.0 - torch.sqrt(torch.clamp(1.0 - pw, min=0.0))}[warmup_type]
    pd = torch.clamp((s - w - stable) / max(1, decay), 0.0, 1.0)
    down = {"linear": 1.0 - pd, "cosine": _cosine(pd, num_cycles), "1-sqrt": 1.0 - torch.sqrt(pd)}[decay_type]
    up, down = (torch.clamp(x * (1.0 - r) + r, min=0.0) for x in (up, down))
    return torch.where(s < w, up, torch.where(s < w + stable, torch.ones_like(s),
                                             torch.where(s < w + stable + decay, down, torch.full_like(s, r))))


SCHEDULES = {f.__name__: f for f in (linear, cosine, cosine_with_restarts, polynomial, constant,
                                     constant_with_warmup, inverse_sqrt, cosine_with_min_lr,
                                     cosine_warmup_with_min_lr, warmup_stable_decay)}


def get_multiplier(name: str, num_warmup_steps: int, num_training_steps: int,
                   lr_init: Optional[float] = None, **kwargs) -> Multiplier:
    """The LR multiplier of schedule `name` (HF's lr_scheduler_type) as a function of a float
    step tensor; `kwargs` are HF's lr_scheduler_kwargs for it, `lr_init` the base LR (the
    schedules that take an absolute LR, polynomial and min_lr, need it)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_scheduler_type {name!r}; accepted: {', '.join(SCHEDULES)}, "
                         "reduce_lr_on_plateau, greedy")
    fn = SCHEDULES[name]
    params = inspect.signature(fn).parameters
    accepted = [p for p in params if p not in ("s", "w", "n", "lr_init")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"lr_scheduler_kwargs {unknown} do not apply to lr_scheduler_type={name!r}; "
                         f"it takes {accepted or 'none'}")
    if "lr_init" in params:
        kwargs["lr_init"] = 1.0 if lr_init is None else lr_init
    fn(torch.zeros(1, dtype=torch.float64), num_warmup_steps, num_training_steps, **kwargs)  # errors now
    return lambda s: fn(s, num_warmup_steps, num_training_steps, **kwargs)
