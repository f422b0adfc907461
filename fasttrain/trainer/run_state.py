"""The mutable state of one `train()` run, in one object the Trainer owns.

`RunState` is everything the loop changes as it goes that is not already a component's own
state (weights, optimizer, LR schedule, loss scaler: those save themselves) nor the
HF-visible `TrainerState` (global step, epoch as a float, log history, best metric):
  - the loop position: epoch and micro-batches consumed in it (the data position a resume
    starts the sampler from, so nothing is replayed or skipped);
  - the logging window: device-side loss and grad-norm accumulators since the last log;
  - device-side counters: skipped optimizer steps and the current run of non-finite losses;
  - the last gradient norm (a device tensor, read only on logging steps) and, for a
    scheduler fasttrain did not build, the LRs the last step used;
  - the stop signal a SIGTERM handler recorded;
  - the host sums of the logged losses (the final train_loss).
The Checkpointer saves it as `data_state.json` through `state_dict()`/`load_state_dict()`.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any, Optional

import torch

logger = logging.getLogger("fasttrain")


class LogWindow:
    """Step losses and the grad norm between logging steps, on the device; read once per
    logging step. A step adds a reference to its loss (no device op); the sum is formed when
    read. `nan_inf_filter` (HF's logging_nan_inf_filter): non-finite step losses are left out
    of the logged mean instead of turning it into NaN/inf."""

    def __init__(self, device, nan_inf_filter: bool = False):
        self.device = device
        self.nan_inf_filter = nan_inf_filter
        self.reset()

    def reset(self):
        self._carry = torch.zeros((), device=self.device)  # folded sum (checkpoint save/restore)
        self._pending = []  # this window's step losses, not yet summed
        self._dropped = 0  # steps the filter left out of _carry
        self.grad_norm = torch.zeros((), device=self.device)  # the last step's (as HF logs it)
        self.steps = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    @property
    def loss(self) -> torch.Tensor:
        """The window's summed step loss (a 0-d device tensor, filled in place on restore)."""
        if self._pending:
            steps = torch.stack(self._pending)
            self._pending = []
            if self.nan_inf_filter:
                finite = torch.isfinite(steps)
                self._dropped += int(finite.logical_not().sum())  # sync: checkpoint save only
                steps = torch.where(finite, steps, torch.zeros_like(steps))
            self._carry += steps.sum()
        return self._carry

    @torch.no_grad()
    def add(self, step_loss, grad_norm, tokens: int = 0):
        self._pending.append(step_loss.detach())
        if grad_norm is not None:
            self.grad_norm = grad_norm  # a reference: read on the logging step
        self.steps += 1
        self.tokens += tokens

    def flush(self, dist) -> dict:
        if self.steps == 0:
            return {}
        # the ranks' shares of each step add up to the step's loss: reduce, then filter
        pending = torch.stack(self._pending) if self._pending else self._carry.new_zeros(0)
        summed = dist.all_reduce_sum(torch.cat([self._carry.reshape(1), pending]))
        per_step = summed[1:]
        kept = torch.full((), float(self.steps - self._dropped), device=self.device)
        if self.nan_inf_filter:
            finite = torch.isfinite(per_step)
            kept = kept - finite.logical_not().sum()
            per_step = torch.where(finite, per_step, torch.zeros_like(per_step))
        total = summed[0] + per_step.sum()
        values = torch.stack([total, kept, self.grad_norm]).tolist()  # sync: logging step
        elapsed = time.perf_counter() - self.t0  # after the sync: the device work is done
        loss = values[0] / values[1] if values[1] > 0 else float("nan")
        out = {"loss": loss, "steps": self.steps, "grad_norm": values[2] or None,
               "tokens_per_second": self.tokens * dist.world_size / max(elapsed, 1e-9)}
        self.reset()
        return out


@dataclasses.dataclass(eq=False)
class RunState:
    """`world_size` and `per_device_train_batch_size` fix what `micro_batches_done` means:
    a resume must use the same values (checked by `load_state_dict`)."""
    device: torch.device
    world_size: int = 1
    per_device_train_batch_size: int = 1
    epoch: int = 0
    micro_batches_done: int = 0
    window: LogWindow = None
    skipped: torch.Tensor = None        # optimizer steps skipped (overflow, non-finite)
    # True when `skipped` is a view of a counter another component advances (the device LR
    # schedule's): the run's one count of skipped steps, so it is not added to twice
    skips_counted_elsewhere: bool = False
    nonfinite_run: torch.Tensor = None  # consecutive non-finite losses, 0 after a finite one
    grad_norm: Optional[torch.Tensor] = None
    lr_captured: Optional[list] = None  # LRs the last step used, from a scheduler not fasttrain's
    stop_signal: Optional[str] = None
    saved_step: Optional[int] = None    # the step of this run's last checkpoint (none twice per step)
    # host sums over the logged windows of this process's run, for the final train_loss
    # (not checkpointed: as HF, train_loss covers the steps this run trained)
    logged_loss_total: float = 0.0
    logged_loss_steps: int = 0
    _prev_sigterm: Any = dataclasses.field(default=None, repr=False)  # restored after train()
    # streaming datasets: the DataLoader's worker count and every rank's dataset state (if
    # the dataset has one), set by the Trainer before each save
    num_workers: int = 0
    stream_states: Optional[list] = None
    resumed_from: Optional[dict] = None  # the saved position as written, after load_state_dict

    def __post_init__(self):
        self.window = self.window or LogWindow(self.device)
        if self.skipped is None:
            self.skipped = torch.zeros((), device=self.device)
        if self.nonfinite_run is None:
            self.nonfinite_run = torch.zeros((), device=self.device)

    # ------------------------------------------------------------------ the step's updates
    def record_optimizer_step(self, found_inf, loss_bad: Optional[torch.Tensor]) -> None:
        """Device-side bookkeeping of one optimizer step; reads nothing on the host."""
        if not self.skips_counted_elsewhere:
            self.skipped += found_inf
        if loss_bad is not None:
            self.nonfinite_run.add_(1).mul_(loss_bad)  # in place: a CUDA graph may replay it

    def add_logged_window(self, window: dict) -> None:
        """Count a flushed window in the run's train_loss. With HF's logging_nan_inf_filter, a
        window whose every step loss was non-finite logs what HF substitutes for such steps:
        the mean of the losses logged before it (0.0 before any, HF's empty accumulator)."""
        if self.window.nan_inf_filter and window["loss"] != window["loss"]:  # NaN: none kept
            window["loss"] = self.mean_logged_loss() if self.logged_loss_steps else 0.0
        self.logged_loss_total += window["loss"] * window["steps"]
        self.logged_loss_steps += window["steps"]

    def mean_logged_loss(self) -> float:
        return self.logged_loss_total / self.logged_loss_steps if self.logged_loss_steps else float("nan")

    def advance(self, micro_batches: int) -> None:
        self.micro_batches_done += micro_batches

    def next_epoch(self) -> None:
        self.epoch, self.micro_batches_done = self.epoch + 1, 0

    # ------------------------------------------------------------------ stop on SIGTERM
    def install_sigterm_handler(self) -> None:
        """Record a SIGTERM in `stop_signal`; the loop saves and stops at the step's end."""
        try:
            self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:  # not the main thread: leave signals to the caller
            self._prev_sigterm = None

    def restore_sigterm_handler(self) -> None:
        if self._prev_sigterm is not None:
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        w = self.window
        values = torch.stack([w.loss, w.grad_norm, self.skipped, self.nonfinite_run]).tolist()  # sync: save
        return {"epoch": self.epoch, "micro_batches_done": self.micro_batches_done,
                "world_size": self.world_size,
                "per_device_train_batch_size": self.per_device_train_batch_size,
                "window": {"loss": values[0], "grad_norm": values[1], "steps": w.steps, "tokens": w.tokens},
                "skipped": values[2], "nonfinite_run": values[3], "num_workers": self.num_workers,
                "stream": self.stream_states}

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        """Restore the loop position; on another world size or per-device batch size the
        position is recomputed from the global number of samples consumed in the epoch
        (the sampler's global order does not depend on either). When the new global batch
        does not divide that number, the run resumes at the next batch boundary (no sample is
        seen twice; fewer than one global batch is skipped) and says so, as HF's Trainer
        resumes with a new batch size, but silently."""
        self.resumed_from = {k: state.get(k) for k in ("world_size", "per_device_train_batch_size",
                                                       "micro_batches_done", "num_workers", "stream")}
        self.epoch, self.micro_batches_done = state["epoch"], state["micro_batches_done"]
        old = (state["world_size"], state["per_device_train_batch_size"])
        if old != (self.world_size, self.per_device_train_batch_size):
            samples = state["micro_batches_done"] * old[0] * old[1]
            per_micro = self.world_size * self.per_device_train_batch_size
            self.micro_batches_done = -(-samples // per_micro)
            skipped = self.micro_batches_done * per_micro - samples
            if skipped:
                logger.warning(
                    "%s had consumed %d samples of epoch %d (%d processes x per_device_train_batch_size=%d "
                    "x %d micro-batches); this run reads %d x %d = %d per micro-batch, which does not "
                    "divide it: resuming at sample %d, so %d samples of this epoch are skipped (none is "
                    "repeated). For an exact resume choose per_device_train_batch_size so that "
                    "world_size x per_device_train_batch_size divides %d", where, samples, self.epoch,
                    old[0], old[1], state["micro_batches_done"], self.world_size,
                    self.per_device_train_batch_size, per_micro, samples + skipped, skipped, samples)
            logger.info("resuming %d processes x batch %d from %d x %d: %d global samples into epoch %d",
                        self.world_size, self.per_device_train_batch_size, old[0], old[1],
                        samples + skipped, self.epoch)
        w = self.window
        w.loss.fill_(state["window"]["loss"])
        w.grad_norm.fill_(state["window"]["grad_norm"])
        w.steps, w.tokens = state["window"]["steps"], state["window"]["tokens"]
        self.skipped.fill_(state["skipped"])
        self.nonfinite_run.fill_(state["nonfinite_run"])
