"""The Trainer's side of checkpointing: building the Checkpointer from the run's components,
resuming a run (the checkpoint's optimizer checked against this run's, HF's checkpoints
positioned from their step count, a stream's position restored) and writing a model folder.

Save/resume itself is `fasttrain.checkpoint.Checkpointer`; these functions are handed what
they use and read no Trainer attribute.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from fasttrain.callbacks import TrainerState
from fasttrain.checkpoint import hf_layout
from fasttrain.checkpoint.checkpointer import Checkpointer, RunComponents, save_model_files
from fasttrain.data.streaming import resume_plan

logger = logging.getLogger("fasttrain")


def build_checkpointer(args, components: RunComponents, dist, sharded: bool) -> Checkpointer:
    """`sharded` (FSDP): every rank writes its own shards through DCP."""
    state_io = None
    if sharded:
        from fasttrain.checkpoint.sharded import ShardedStateIO
        state_io = ShardedStateIO(args.output_dir, dist.world_size, timeout_s=args.ddp_timeout)
    return Checkpointer(args.output_dir, components, dist, save_total_limit=args.save_total_limit,
                        keep_best=args.load_best_model_at_end, state_io=state_io)


def resume_run(checkpointer: Checkpointer, resume_from_checkpoint, *, args, run, state, steps_per_epoch,
           stream, dist, built_optimizer: bool) -> str:
    """Load `resume_from_checkpoint` into the components and set the data position in `run`
    (or `stream`'s resume plan); returns the checkpoint's path. `steps_per_epoch()`: the
    optimizer steps of one epoch (asked only for HF's checkpoints)."""
    try:
        path = checkpointer.load(resume_from_checkpoint)
    except Exception as e:  # noqa: BLE001 - re-raised unless the optimizer is the cause
        try:
            resolved = checkpointer.resolve(resume_from_checkpoint)
        except Exception:  # noqa: BLE001 - the original error says more
            raise e from None
        if built_optimizer:
            raise_if_other_optimizer(resolved, args.optim, e)
        raise
    if built_optimizer:
        raise_if_other_optimizer(path, args.optim, None)
    warn_if_arguments_differ(args, state, path)
    if hf_layout.looks_like_hf_checkpoint(path):  # HF's run: the position from its step count
        run.epoch, run.micro_batches_done = hf_layout.hf_resume_position(
            state.global_step, steps_per_epoch(), args.gradient_accumulation_steps)
    if args.ignore_data_skip:  # HF: resume at the start of the saved epoch's data
        run.micro_batches_done = 0
    elif stream is not None:
        stream.resume = _stream_resume_plan(run.resumed_from, dist, args)
    return path


def warn_if_arguments_differ(args, state, path: str) -> None:
    """As HF: a resumed run keeps the checkpoint's logging/eval/save steps and batch size
    (trainer_state.json); when this run's arguments say otherwise, say which win."""
    given = TrainerState()
    given.compute_steps(args, state.max_steps)
    given.train_batch_size = args.per_device_train_batch_size
    differ = [f"{name}: {getattr(given, name)} (from args) != {getattr(state, name)} (from trainer_state.json)"
              for name in ("logging_steps", "eval_steps", "save_steps", "train_batch_size")
              if getattr(state, name) is not None and getattr(given, name) != getattr(state, name)]
    if differ:
        logger.warning("resuming from %s: these arguments differ from the checkpoint's, and the run "
                       "continues with the checkpoint's values:\n\t%s", path, "\n\t".join(differ))


def raise_if_other_optimizer(path: str, optim: str, error: Optional[BaseException]) -> None:
    """A checkpoint holding another optimizer's state cannot resume this run (optim=`optim`):
    say so (loading it fails deep in torch, blaming a parameter group, or worse, succeeds)."""
    try:
        with open(os.path.join(path, "training_args.json"), encoding="utf-8") as f:
            saved = json.load(f).get("optim")
    except (OSError, ValueError, AttributeError):  # HF's checkpoints keep a .bin: nothing to compare
        return
    if saved and saved != optim:
        raise ValueError(
            f"checkpoint {path!r} holds the state of optim={saved!r}, this run uses "
            f"optim={optim!r}; resume with optim={saved!r}, or load only the "
            "weights into the model and start a new run") from error


def _stream_resume_plan(saved: dict, dist, args) -> dict:
    states = saved.get("stream") or []
    mine = states[dist.rank] if saved["world_size"] == dist.world_size and states else None
    return resume_plan(saved, dist.world_size, args.per_device_train_batch_size,
                       args.dataloader_num_workers, stateful_state=mine)


def record_stream_position(run, stream, dist, num_workers: int) -> None:
    """Every rank's stream position into `run` before a save (a collective)."""
    run.num_workers = num_workers
    state = stream.state_dict() if num_workers == 0 else {}
    states = dist.all_gather_object(state)
    run.stream_states = states if any(states) else None


def save_step(checkpointer: Checkpointer, step: int, *, run, scaler, stream, dist, num_workers: int,
              best: bool, blocking: bool) -> str:
    """Save `checkpoint-<step>`; `best`: it holds the new best model."""
    if scaler is not None:
        scaler.check_divergence()  # a diverged fp16 run stops before it saves
    if stream is not None:  # every rank's stream position (a collective)
        record_stream_position(run, stream, dist, num_workers)
    run.saved_step = step
    return checkpointer.save(step, best=best, blocking=blocking)


def save_model_folder(model, output_dir: str, args, processing_class, *, dist, sharded: bool) -> None:
    """The model folder on the main process; `sharded` (FSDP): the weights are gathered shard
    by shard onto rank 0 first (a collective)."""
    state_dict = None
    if sharded:
        from fasttrain.checkpoint.sharded import full_model_state
        state_dict = full_model_state(model)
    if dist.is_main:
        write_model_folder(model, output_dir, args, processing_class, state_dict=state_dict)


def write_model_folder(model, output_dir: str, args, processing_class, state_dict=None) -> None:
    """Weights (safetensors), config, the tokenizer/processor (so AutoTokenizer reloads the
    folder, as HF) and HF's training_args.bin."""
    save_model_files(model, output_dir, state_dict=state_dict)
    if callable(getattr(processing_class, "save_pretrained", None)):
        processing_class.save_pretrained(output_dir)
    with open(os.path.join(output_dir, hf_layout.TRAINING_ARGS_FILE), "wb") as f:
        f.write(hf_layout.training_args_bytes(args))
