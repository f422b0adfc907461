"""The logging step: the one place the training loop reads its device accumulators.

`training_record` turns a flushed logging window into HF's record (loss, learning rate,
grad norm, skipped steps, loss scale) plus fasttrain's measurements (tokens/s, profiler
metrics), reading the device once per logging step (each read marked `# sync:`) and
warning when the window is nonsense. The measurements reach the callbacks and the writers
(JSONL, TensorBoard, progress bar) but not `state.log_history` (`history_record`): there a
resumed run's records equal the uninterrupted run's, key for key, as with HF's Trainer.
`stamp` and `write_outside_train` are the body of `Trainer.log`, which stays on the
Trainer (HF's contract: a subclass may override it, and every record passes through it).
Everything here is handed what it reads; nothing imports the Trainer.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from fasttrain.optim.schedules import learning_rate_used
from fasttrain.trainer.metrics_log import MetricsLogger

logger = logging.getLogger("fasttrain")


def training_record(window: dict, *, args, state, run, lr_scheduler, optimizer, scaler,
                    instruments, losses) -> tuple[dict, frozenset]:
    """(HF's training record of `window` (run.window.flush()'s dict) with the measurements
    added, the measurements' keys); updates `state.skipped_steps` and `run`'s logged
    windows. Raises FloatingPointError when the loss stayed non-finite for
    `args.max_consecutive_nonfinite` steps."""
    run.add_logged_window(window)
    lr = learning_rate_used(lr_scheduler, optimizer, run.lr_captured)
    record = {"loss": window["loss"], "learning_rate": lr,
              "epoch": round(state.epoch, 4)}
    if window.get("grad_norm") is not None:
        record["grad_norm"] = window["grad_norm"]
    valid = losses.valid_tokens_of_last_step()
    if valid is None:
        record["skipped_steps"] = int(run.skipped.item())  # sync: logging step
    else:  # one read for both
        skipped, valid = torch.stack([run.skipped.float(), valid.float()]).tolist()  # sync: logging step
        record["skipped_steps"], valid = int(skipped), int(valid)
    warn_if_window_is_nonsense(window, state.global_step, record["skipped_steps"] - state.skipped_steps, valid)
    state.skipped_steps = record["skipped_steps"]
    if scaler is not None:
        record["loss_scale"] = float(scaler.get_scale())  # sync: logging step
        scaler.check_divergence()
    measured = {"tokens_per_second": window["tokens_per_second"], **instruments.log_metrics()}
    record.update(measured)
    if args.nonfinite_loss_policy == "stop":
        nonfinite = int(run.nonfinite_run.item())  # sync: logging step
        if nonfinite >= args.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"the loss was non-finite for {nonfinite} consecutive steps (limit "
                f"max_consecutive_nonfinite={args.max_consecutive_nonfinite}); those steps were "
                "skipped and no NaN weights were saved. Lower the learning rate, enable "
                "gradient clipping, or use bf16 instead of fp16.")
    return record, frozenset(measured)


def history_record(record: dict, measured: frozenset) -> dict:
    """The entry of `state.log_history` for a logged `record`: without the measurement keys
    `measured` (timings differ between an uninterrupted and a resumed run; HF's history has
    none)."""
    if not measured:
        return record
    return {k: v for k, v in record.items() if k not in measured}


def warn_if_window_is_nonsense(window: dict, step: int, skipped: int, valid_last: Optional[int]) -> None:
    """Loud, on the logging step: a window whose steps were mostly skipped (non-finite
    loss or gradients, fp16 overflow), or a logging step whose batches had no label to
    learn from (checked on the last step of the window: constant memory, no per-step op)."""
    steps = window["steps"]
    span = f"steps {step - steps + 1}-{step}" if steps > 1 else f"step {step}"
    if skipped * 2 > steps:
        logger.warning(
            "%s: %d of %d optimizer steps were skipped (non-finite loss or gradients, or fp16 "
            "overflow); the weights barely changed. Lower learning_rate, keep max_grad_norm on, "
            "or use bf16 instead of fp16", span, skipped, steps)
    if valid_last == 0:
        logger.warning(
            "step %d: no valid label tokens in this step's batches (every label is -100, or one "
            "token per sequence after the causal shift): nothing is learned from them. Check "
            "that the collator and label_names produce labels", step)


def train_end_record(runtime: float, steps_run: int, train_loss: float, total_flos: float, *,
                     samples_per_step: int) -> dict:
    """HF's end-of-training record (logged, so it reaches log_history and the console)."""
    return {"train_runtime": round(runtime, 4),
            "train_samples_per_second": round(steps_run * samples_per_step / max(runtime, 1e-9), 3),
            "train_steps_per_second": round(steps_run / max(runtime, 1e-9), 3),
            "total_flos": total_flos, "train_loss": train_loss}


def stamp(logs: dict, state, args) -> dict:
    """HF's fields added to `logs` in place (epoch, input tokens seen); returns the record
    kept in log_history: `logs` plus the step."""
    if state.epoch is not None:
        logs.setdefault("epoch", round(state.epoch, 4))
    if args.include_num_input_tokens_seen != "no":
        logs["num_input_tokens_seen"] = state.num_input_tokens_seen
    return {**logs, "step": state.global_step}


def write_outside_train(record: dict, args, is_main: bool, step: int) -> None:
    """evaluate()/predict() outside train(): append to the run's log, keep nothing open."""
    outside = MetricsLogger(args, is_main, 0, resume=True)
    try:
        outside.log(record, step)
    finally:
        outside.close()
