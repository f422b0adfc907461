"""The optimizer tail replayed from one CUDA graph (opt-in: `cuda_graph_optimizer=True`).

The tail of a step (clip: norm, divisor and skip flag in one op; the optimizer update
skipped on the device flag; the LR schedule; the skip counters; zeroing the gradients) is
tens of kernel launches whose work is tiny for small and medium models: launch-bound on a
GPU. Nothing in it reads the device on the host (the Trainer's contract), so after two
eager warm-up steps (the optimizer creates its state lazily, the kernels compile) it is
captured once into a CUDA graph and every later step replays it: one launch.

A graph replays fixed addresses and no Python, so the tail must only read tensors that stay
where they are and hold no host number that changes between steps:
- gradients are zeroed in place inside the tail (never set to None), so backward
  accumulates into the same tensors every step; the step's loss (read only for the
  non-finite check without clipping, or with nonfinite_loss_policy="stop") is copied into a
  static buffer first;
- the LR schedule keeps its step count on the device (`LRScheduler.count_steps_on_device`);
  its host count and the `run`'s per-step host state are updated outside the graph;
- the optimizer's state (moments, step counters, the LR tensor) exists before capture.
Capture waits until the step's gradients are the last eager step's tensors and each has its
optimizer state. Before each replay the gradients are checked to be the captured tensors (a
callback that replaced or dropped one would otherwise be silently ignored): if not, the tail
runs eagerly and is captured again, at most MAX_CAPTURES times. A capture that fails warns
and leaves the tail eager. Hyperparameters other than the LR (betas, eps, weight decay,
max_grad_norm) are fixed at capture: changing them mid-run needs the ordinary tail.

Where it cannot apply (no CUDA device, fp16 loss scaling, an optimizer or schedule that
needs the host each step, FSDP, a callback that hooks the optimizer step), `why_not` says
why and the Trainer warns once and runs the ordinary tail.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from fasttrain.ops.dispatch import nonfinite_flag
from fasttrain.optim.schedules import LRScheduler
from fasttrain.optim.skip import flag_interface, step_skipping

logger = logging.getLogger("fasttrain")

WARMUP_STEPS = 2
MAX_CAPTURES = 3  # then a run whose gradients keep changing stays eager
_HOOKS = ("on_pre_optimizer_step", "on_optimizer_step")


def why_not(*, device: torch.device, optimizer, scaler, lr_scheduler, clipper, callbacks) -> Optional[str]:
    """Why the optimizer tail cannot be replayed from a CUDA graph here, or None."""
    if device.type != "cuda":
        return f"it needs a CUDA device (this run is on {device.type})"
    if scaler is not None:
        return "fp16 loss scaling updates its scale with host logic each step; use bf16"
    if not flag_interface(optimizer):
        return (f"{type(optimizer).__name__} cannot skip a step on a device flag; use "
                "optim='adamw_torch_fused' or 'fasttrain_adamw'")
    if not isinstance(lr_scheduler, LRScheduler) or not lr_scheduler.device_mode:
        return "the LR schedule is not fasttrain's device-side one (a custom or metric-driven scheduler)"
    if clipper.sharded:
        return "FSDP shards the gradients (the clip runs a collective)"
    if not clipper.one_device:
        return "the parameters are on more than one device"
    for cb in callbacks:  # fasttrain's or transformers' TrainerCallback: both define no-op hooks
        hooked = [h for h in _HOOKS if getattr(getattr(type(cb), h, None), "__qualname__", "")
                  not in ("", f"TrainerCallback.{h}")]
        if hooked:
            return f"callback {type(cb).__name__} overrides {hooked[0]}, which a replayed graph would skip"
    if lr_scheduler.table.device.type != device.type:
        return f"the learning rates are tensors on {lr_scheduler.table.device}, not on the CUDA device"
    return None


def graph_tail_for(args, *, device, optimizer, scaler, lr_scheduler, run, clipper, callbacks) -> Optional["GraphedTail"]:
    """The run's GraphedTail when `args.cuda_graph_optimizer` asks for one and it applies;
    otherwise None, with a warning saying why when it was asked for."""
    if not args.cuda_graph_optimizer:
        return None
    reason = why_not(device=device, optimizer=optimizer, scaler=scaler, lr_scheduler=lr_scheduler,
                     clipper=clipper, callbacks=callbacks)
    if reason is not None:
        logger.warning("cuda_graph_optimizer=True but the optimizer tail runs eagerly: %s", reason)
        return None
    return GraphedTail(args=args, optimizer=optimizer, lr_scheduler=lr_scheduler, run=run, clipper=clipper)


class GraphedTail:
    """The device work of one optimizer step, run eagerly for WARMUP_STEPS steps, then
    captured into a CUDA graph and replayed. `capture=False` runs it eagerly every step (the
    same code, for a device without graphs)."""

    def __init__(self, *, args, optimizer, lr_scheduler, run, clipper, capture: bool = True):
        self.args, self.optimizer, self.lr_scheduler = args, optimizer, lr_scheduler
        self.run, self.clipper, self.capture = run, clipper, capture
        self.needs_loss = not args.max_grad_norm or args.nonfinite_loss_policy == "stop"
        lr_scheduler.count_steps_on_device()
        self._eager_steps = 0
        self._graph = None
        self._static_loss: Optional[torch.Tensor] = None
        self._grads: list = []  # (param, its gradient tensor) the graph reads
        self._outputs = None
        self.captures = 0

    def step(self, step_loss: torch.Tensor, event: Callable[[str], None]) -> None:
        """One optimizer step: the device work (replayed when captured), then the host
        bookkeeping; `event` runs the optimizer-step callbacks around it."""
        event("on_pre_optimizer_step")
        if self._graph is not None and not self._same_grads():
            self._drop_graph("a gradient was replaced or dropped since the optimizer tail was "
                             "captured (a callback or hook?)")
        if self._graph is not None:
            if self.needs_loss:
                self._static_loss.copy_(step_loss)
            self._graph.replay()
            outputs = self._outputs
        elif self.capture and self._ready_to_capture():
            outputs = self._capture(step_loss)
        else:
            outputs = self._eager(step_loss)
        grad_norm, found_inf = outputs
        if grad_norm is not None:
            self.run.grad_norm = grad_norm
        self.lr_scheduler.count_step(found_inf)
        self.run.lr_captured = None
        event("on_optimizer_step")

    def close(self) -> None:
        """After train(): free the graph and its memory, and drop the gradients as the
        ordinary tail leaves them."""
        self._graph = self._outputs = self._static_loss = None
        self._grads = []
        for p in self.clipper.trainable:
            p.grad = None

    def _eager(self, loss: Optional[torch.Tensor]):
        outputs = self._device_tail(loss)
        self._eager_steps += 1
        self._grads = [(p, p.grad) for p in self.clipper.trainable if p.grad is not None]
        return outputs

    def _same_grads(self) -> bool:
        """This step's gradients are the recorded tensors (backward filled them in place)."""
        # `is` per parameter: a few microseconds, against a replayed graph's reads of stale memory
        return all(p.grad is g for p, g in self._grads) and \
            sum(p.grad is not None for p in self.clipper.trainable) == len(self._grads)

    def _ready_to_capture(self) -> bool:
        """WARMUP_STEPS eager steps done, this step's gradients are the last eager step's
        tensors, and each has its optimizer state: a parameter that gets its first gradient
        now (a rarely used expert) must get its state eagerly, or the capture would record
        its zero-initialisation and every replay would reset it."""
        return self._eager_steps >= WARMUP_STEPS and bool(self._grads) and self._same_grads() and \
            all(self.optimizer.state.get(p) for p, _ in self._grads)

    def _drop_graph(self, why: str) -> None:
        self._graph = self._outputs = None
        self._eager_steps = WARMUP_STEPS - 1  # one eager step records the new gradients
        if self.captures >= MAX_CAPTURES:
            self.capture = False
            logger.warning("%s: captured %d times already, the optimizer tail stays eager for the "
                           "rest of the run", why, self.captures)
        else:
            logger.warning("%s: running the optimizer tail eagerly and capturing it again", why)

    def _device_tail(self, loss: Optional[torch.Tensor]):
        """Everything of the step that runs on the device; reads no host value that changes
        between steps. Returns (gradient norm or None, skip flag)."""
        args, run = self.args, self.run
        found_inf = grad_scale = grad_norm = loss_bad = None
        if args.max_grad_norm:
            grad_norm, grad_scale, found_inf = self.clipper.clip(args.max_grad_norm, self.optimizer, None)
            if found_inf is None:
                found_inf = nonfinite_flag(grad_norm)
        if self.needs_loss:
            loss_bad = nonfinite_flag(loss)
            found_inf = loss_bad if found_inf is None else torch.maximum(found_inf, loss_bad)
        step_skipping(self.optimizer, found_inf, grad_scale)
        self.lr_scheduler.advance_on_device(found_inf)
        run.record_optimizer_step(found_inf, loss_bad if args.nonfinite_loss_policy == "stop" else None)
        grads = [p.grad for p in self.clipper.trainable if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)
        return grad_norm, found_inf

    def _capture(self, step_loss: torch.Tensor):
        """Capture the device tail into a graph, then replay it for this step (capturing runs
        nothing). When the capture fails, warn, undo what it set and stay eager."""
        groups = self.optimizer.param_groups
        capturable = [g.get("capturable", False) for g in groups]
        try:
            torch.cuda.synchronize()  # sync: once, before the capture (the eager steps' work is done)
            static_loss = step_loss.detach().clone() if self.needs_loss else None
            for group in groups:
                group["capturable"] = True  # torch's fused AdamW refuses a capture without it
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # the saver thread may copy meanwhile
                outputs = self._device_tail(static_loss)
        except Exception as e:  # noqa: BLE001 - any failure: the eager tail is always correct
            for group, flag in zip(groups, capturable):
                group["capturable"] = flag
            self.capture = False
            logger.warning("cuda_graph_optimizer: capturing the optimizer tail failed (%s: %s); it "
                           "runs eagerly for the rest of the run", type(e).__name__, e)
            return self._eager(step_loss)
        self._graph, self._outputs, self._static_loss = graph, outputs, static_loss
        self.captures += 1
        graph.replay()
        return outputs
