"""The end of a training step: unscale, clip and step, skipping on a device-side flag.

Handed what it acts on (arguments, optimizer, loss scaler, LR schedule, the loop's
RunState, the callback event); reads no flag on the host except for optimizers that cannot
skip on a device flag (marked `# sync:`). `GradClipper` owns the trainable parameters and
the clipping function (norm, divisor and skip flag in one op), chosen once per run.
"""
from __future__ import annotations

from typing import Optional

import torch

from fasttrain.ops.dispatch import clip_grad_norm_, grad_norm_clip, grad_norm_clip_for, nonfinite_flag
from fasttrain.optim.schedules import step_scheduler
from fasttrain.optim.skip import flag_interface, step_skipping, takes_grad_scale


def _either(flag: Optional[torch.Tensor], other: torch.Tensor) -> torch.Tensor:
    return other if flag is None else torch.maximum(flag, other)


class GradClipper:
    def __init__(self, trainable: list):
        self.trainable = trainable
        self.sharded = any(hasattr(p, "full_tensor") for p in trainable)  # FSDP: DTensors
        # decided once per run: the per-step call is then the clip op and a list of grads
        self._nonempty = [p for p in trainable if p.numel()]
        self._one_device = len({p.device for p in trainable}) <= 1
        self._clip = self._clip_max_norm = None

    @property
    def one_device(self) -> bool:
        return self._one_device

    def clip(self, max_norm: float, optimizer, scaler):
        """(total gradient norm, divisor for the optimizer or None, non-finite flag or None).
        An optimizer that divides the gradients by a device scalar inside its update (torch's
        fused AdamW, FusedAdamW) gets the clipping factor that way: no pass over the
        gradients, and the same update as clip_grad_norm_ (max_norm / (norm + 1e-6), at most
        1) up to rounding; norm, divisor and flag come from one op (`grad_norm_clip`).
        Callbacks then see the gradients unclipped."""
        if scaler is not None or not takes_grad_scale(optimizer) or self.sharded:
            norm = clip_grad_norm_(self.trainable, max_norm)
            if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor, no comm
                norm = norm.full_tensor()
            return norm, None, None
        grads = [g for p in self._nonempty if (g := p.grad) is not None]
        if not grads:
            return _no_gradients(self.trainable)
        if not self._one_device:  # model parallel across devices: grad_norm_clip says why not
            return grad_norm_clip(grads, max_norm)
        if self._clip_max_norm != max_norm:
            self._clip = grad_norm_clip_for(grads[0].device.type, max_norm)
            self._clip_max_norm = max_norm
        return self._clip(grads)


def _no_gradients(trainable: list):
    """No parameter got a gradient this step: a zero norm, nothing to clip, nothing to skip."""
    device = trainable[0].device if trainable else None
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return zero, torch.ones((), dtype=torch.float32, device=device), zero


def optimizer_step(step_loss: torch.Tensor, *, args, optimizer, scaler, lr_scheduler, run,
                   clipper: GradClipper, event) -> None:
    """Unscale, clip and step, skipping on a device-side flag: overflow (fp16), a
    non-finite gradient norm or a non-finite loss. Nothing here reads the flag (but see
    the one `# sync:`). `event(name)` runs the callbacks around the update."""
    found_inf = grad_scale = None
    if scaler is not None:
        scaler.unscale_(optimizer)
        found_inf = scaler.found_inf_flag()
    if args.max_grad_norm:
        run.grad_norm, grad_scale, norm_bad = clipper.clip(args.max_grad_norm, optimizer, scaler)
        # NaN loss -> NaN norm; the clip op flags it, clip_grad_norm_'s norm is checked here
        found_inf = _either(found_inf, norm_bad if norm_bad is not None else nonfinite_flag(run.grad_norm))
    loss_bad = None
    if not args.max_grad_norm or args.nonfinite_loss_policy == "stop":
        loss_bad = nonfinite_flag(step_loss)
        found_inf = _either(found_inf, loss_bad)
    event("on_pre_optimizer_step")
    if scaler is not None:
        scaler.step(optimizer, found_inf=found_inf)
        scaler.update()
    else:
        if found_inf is not None and not flag_interface(optimizer):
            # foreach/for-loop AdamW, SGD: they cannot skip on a device flag, so read it
            # once here and hand the number to both the optimizer and the schedule
            found_inf = float(found_inf)  # sync: optimizers without a device skip flag
        step_skipping(optimizer, found_inf, grad_scale)
    event("on_optimizer_step")
    # a scheduler fasttrain did not build hands back the LRs this step used, for logging
    run.lr_captured = step_scheduler(lr_scheduler, optimizer, skipped=found_inf)
    run.record_optimizer_step(found_inf, loss_bad if args.nonfinite_loss_policy == "stop" else None)
