"""The one protocol for an optimizer step skipped on a device-side flag.

`found_inf` is a 0-d fp32 device tensor (1.0 = skip the step: overflow, a non-finite
gradient norm or loss); `grad_scale` a 0-d fp32 device tensor the gradients are divided by
inside the update (the loss scale, the clipping factor, or both). Used by the Trainer and
by `DynamicLossScaler.step`, so there is one place that knows how each optimizer takes them:

- fasttrain's FusedAdamW takes `found_inf=` / `grad_scale=` arguments;
- torch's fused Adam/AdamW (`_step_supports_amp_scaling`) read the attributes GradScaler
  sets; both skip inside the kernel (step counter included) with no host read;
- any other optimizer (foreach/for-loop AdamW, SGD) cannot skip on a device flag: the flag
  is read on the host (one sync per step) and a grad_scale is applied to the gradients first.

Every step goes through `step_merged`: param groups with equal hyperparameters (HF's two
groups when weight_decay=0) are stepped as one.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from fasttrain.optim.merged_groups import step_merged


_NO_FLAGS = frozenset()


@functools.lru_cache(maxsize=64)
def _interface_of(step_fn) -> frozenset:
    """The flag interface of a step function (decided once per function: asked every step)."""
    try:
        params = frozenset(inspect.signature(step_fn).parameters)
    except (TypeError, ValueError):
        params = frozenset()
    if "found_inf" in params:
        return frozenset({"kwargs"} | ({"grad_scale"} & params))
    return frozenset({"attrs", "grad_scale"})


def flag_interface(optimizer) -> frozenset:
    """How `optimizer.step` takes the flags: {'kwargs'} plus 'grad_scale' when it accepts
    one (FusedAdamW), {'attrs', 'grad_scale'} (torch's fused optimizers), or {} (none)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return _NO_FLAGS
    step = optimizer.step
    return _interface_of(getattr(step, "__func__", step))


def takes_grad_scale(optimizer) -> bool:
    return "grad_scale" in flag_interface(optimizer)


def step_skipping(optimizer, found_inf: Optional[torch.Tensor] = None,
                  grad_scale: Optional[torch.Tensor] = None, *args, **kwargs):
    """optimizer.step(*args, **kwargs) with gradients divided by `grad_scale`, skipped when
    `found_inf` is nonzero; returns what step returns (None when skipped on the host).
    `found_inf` may be a python number when the caller has already read it."""
    if isinstance(found_inf, torch.Tensor) and found_inf.dim() != 0:
        found_inf = found_inf.reshape(())
    interface = flag_interface(optimizer)
    if "kwargs" in interface:
        extra = {"grad_scale": grad_scale} if grad_scale is not None else {}
        if found_inf is not None:
            extra["found_inf"] = found_inf
        return step_merged(optimizer, *args, **extra, **kwargs)
    if "attrs" in interface and (found_inf is not None or grad_scale is not None):
        optimizer.grad_scale, optimizer.found_inf = grad_scale, found_inf
        try:
            return step_merged(optimizer, *args, **kwargs)
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    if grad_scale is not None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_div_(grads, grad_scale)
    if found_inf is not None and bool(found_inf):  # sync: optimizers that cannot skip on a device flag
        return None
    return step_merged(optimizer, *args, **kwargs)
