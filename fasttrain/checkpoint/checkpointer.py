"""Save and resume a training run from the components it is handed; no Trainer needed.

A run is whatever `RunComponents` lists: model, optimizer, LR scheduler, loss scaler, the
loop state (data position, logging window, device-side counters: any object with
`state_dict()`/`load_state_dict()` whose state is plain JSON), the TrainerState, the
callbacks' state and every rank's RNG. Exact resume restores all of it, so a resumed run
takes the same steps, bit for bit, as one that never stopped.

Model and optimizer state go through a `StateIO` (the seam for sharded formats): the default
`FullStateIO` writes `model.safetensors` + `optimizer.pt` from rank 0, which holds the full
state (single process, DDP). A sharded backend (torch.distributed.checkpoint for FSDP) is
another `StateIO`; nothing else here changes. The file layout and crash safety (temp dir,
fsync, rename, CRC-32 manifest, background writes) are `storage.py`'s.

May import: torch, fasttrain.checkpoint, fasttrain.callbacks, fasttrain.distributed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Optional, Protocol

import torch

from fasttrain.callbacks import TrainerState
from fasttrain.checkpoint import hf_layout as hf
from fasttrain.checkpoint import storage
from fasttrain.checkpoint.rng import rng_state, set_rng_state
from fasttrain.distributed.context import DistContext

logger = logging.getLogger("fasttrain")

OPTIMIZER_FILE = "optimizer.pt"
DATA_STATE_FILE = "data_state.json"
# TrainerState fields that describe this process or this run's plan, not the saved run
_NOT_RESTORED = ("is_local_process_zero", "is_world_process_zero", "max_steps")


class StateIO(Protocol):
    """How model and optimizer state reach the checkpoint directory and come back.

    `snapshot` runs on every rank on the training thread (it may run collectives) and
    returns a host-memory copy, safe to write while training goes on; `write` runs on
    rank 0's background saver thread with the checkpoint's `storage.CheckpointWriter`
    (files it writes are listed in the manifest); `load` runs on every rank."""

    def snapshot(self, model: torch.nn.Module, optimizer, is_main: bool) -> Any: ...

    def write(self, writer: storage.CheckpointWriter, snap: Any) -> None: ...

    def load(self, path: str, model: torch.nn.Module, optimizer) -> None: ...


class FullStateIO:
    """Full (unsharded) state from rank 0: `model.safetensors` (tied weights stored once), or
    for a PEFT model only the adapter in PEFT's layout, and `optimizer.pt` in HF's layout
    (float LRs, HF's two param groups), so HF's Trainer can resume from it too."""

    def snapshot(self, model, optimizer, is_main: bool):
        """`optimizer` None: the model alone (save_only_model)."""
        if not is_main:
            return None
        if optimizer is None:
            optimizer_state = None
        else:
            optimizer_state = optimizer.state_dict()
        for group in optimizer_state["param_groups"] if optimizer_state else ():  # plain floats: HF's take no tensor LR
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"] = float(group["lr"])  # sync: once per save
        if hf.is_peft_model(model):
            return storage.snapshot({"optimizer": optimizer_state}), hf.adapter_files(model)
        weights, aliases = storage.dedupe_shared(model.state_dict())
        return storage.snapshot({"weights": weights, "optimizer": optimizer_state}), aliases

    def write(self, writer, snap) -> None:
        state, model_part = snap
        if "weights" in state:
            writer.write_model(state["weights"], model_part)
        else:  # a PEFT adapter: {file name: bytes}
            for name, data in model_part.items():
                writer.write_bytes(name, data)
        if state["optimizer"] is not None:
            writer.write_torch(OPTIMIZER_FILE, state["optimizer"])

    def load(self, path: str, model, optimizer) -> None:
        from fasttrain.checkpoint import sharded
        if sharded.has_shards(path):  # an FSDP run's checkpoint: DCP reads every slice
            sharded.load(path, model, optimizer)
            return
        hf.load_weights(model, path)
        lr_tensors = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(hf.fit_optimizer_state(storage.read_torch(path, OPTIMIZER_FILE), optimizer))
        for g, lr in zip(optimizer.param_groups, lr_tensors):
            if isinstance(lr, torch.Tensor):  # keep the device-resident LR the schedule updates
                lr.copy_(torch.as_tensor(g["lr"]))
                g["lr"] = lr


@dataclasses.dataclass
class RunComponents:
    """Everything a checkpoint holds. `run_state` and `scaler` are Stateful
    (`state_dict`/`load_state_dict`); `callbacks` has `stateful_state()`/`restore_state()`
    (fasttrain.callbacks.CallbackHandler); `training_args` is a plain dict, saved for the
    record and never loaded."""
    model: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    run_state: Any
    trainer_state: TrainerState
    scaler: Any = None
    callbacks: Any = None
    training_args: Optional[dict] = None
    restore_callbacks: bool = True  # False: saved, not restored (HF's restore_callback_states_from_checkpoint)
    control: Any = None  # the TrainerControl, saved among the callbacks' state as HF does
    args_object: Any = None  # the arguments object, pickled into HF's training_args.bin (never read back)
    model_only: bool = False  # HF's save_only_model: no optimizer, scheduler, scaler or RNG state


class Checkpointer:
    def __init__(self, output_dir: str, components: RunComponents, dist: Optional[DistContext] = None,
                 save_total_limit: Optional[int] = None, keep_best: bool = False,
                 state_io: Optional[StateIO] = None, saver: Optional[storage.AsyncSaver] = None):
        """`keep_best`: rotation never deletes `trainer_state.best_model_checkpoint`."""
        self.output_dir = output_dir
        self.c = components
        self.dist = dist or DistContext()
        self.save_total_limit, self.keep_best = save_total_limit, keep_best
        self.state_io = state_io or FullStateIO()
        self.saver = saver or storage.AsyncSaver()

    # ------------------------------------------------------------------ saving
    def save(self, step: int, best: bool = False, blocking: bool = False) -> str:
        """Snapshot every component into host memory (the only part the caller waits for),
        then write `checkpoint-<step>` on the background saver. A collective: call on every
        rank. `best`: this checkpoint becomes `trainer_state.best_model_checkpoint`."""
        c = self.c
        check_weights_finite(c.model, self.dist)
        path = os.path.join(self.output_dir, f"{storage.PREFIX}{step}")
        if best:
            c.trainer_state.best_model_checkpoint = path
        if c.callbacks is not None:
            c.trainer_state.stateful_callbacks = c.callbacks.stateful_state(c.control)
        rng_states = [] if c.model_only else self.dist.all_gather_object(rng_state())
        model_snap = self.state_io.snapshot(c.model, None if c.model_only else c.optimizer, self.dist.is_main)
        if self.dist.is_main:
            snap = {"scheduler": None, "scaler": None}
            if not c.model_only:
                scheduler = c.lr_scheduler.state_dict()
                if "step_count" in scheduler:  # fasttrain's schedule: LambdaLR's keys beside its own
                    scheduler = hf.hf_scheduler_state(scheduler, c.lr_scheduler.get_last_lr(),
                                                      len(c.optimizer.param_groups))
                snap = storage.snapshot({
                    "scheduler": scheduler,
                    "scaler": c.scaler.state_dict() if c.scaler is not None else None})
            files = {"trainer_state.json": hf.hf_trainer_state_json(c.trainer_state.to_json_string()).encode(),
                     DATA_STATE_FILE: c.run_state.state_dict(), "training_args.json": c.training_args,
                     "config.json": None if hf.is_peft_model(c.model) else model_config(c.model)}
            if c.args_object is not None:
                files[hf.TRAINING_ARGS_FILE] = hf.training_args_bytes(c.args_object)
            if self.dist.world_size == 1 and not c.model_only:  # HF's RNG file (HF names per-rank files alike)
                files[hf.HF_RNG_FILE] = hf.hf_rng_state()
            keep = c.trainer_state.best_model_checkpoint if self.keep_best else None
            self.saver.submit(lambda: self._write(step, model_snap, snap, rng_states, files, keep))
            if blocking:
                self.saver.wait()
        self.dist.barrier()
        return path

    def _write(self, step, model_snap, snap, rng_states, files, keep) -> None:
        writer = storage.CheckpointWriter(self.output_dir, step)
        self.state_io.write(writer, model_snap)
        if snap["scheduler"] is not None:
            writer.write_torch("scheduler.pt", snap["scheduler"])
        if snap["scaler"] is not None:
            writer.write_torch("scaler.pt", snap["scaler"])
        for rank, state in enumerate(rng_states):
            writer.write_torch(f"rng_state_{rank}.pt", state)
        for name, value in files.items():
            if isinstance(value, bytes):
                writer.write_bytes(name, value)
            elif name == hf.HF_RNG_FILE:
                writer.write_torch(name, value)
            elif value is not None:
                writer.write_json(name, value)
        writer.commit(step)
        storage.rotate(self.output_dir, self.save_total_limit, keep=keep)

    def poll(self) -> None:
        """Re-raise a failed background save (call once per step)."""
        self.saver.poll()

    def wait(self) -> None:
        self.saver.wait()

    def drain(self) -> None:
        self.saver.drain()

    # ------------------------------------------------------------------ resuming
    def resolve(self, resume) -> str:
        """The checkpoint `resume` names: True/"latest" = the newest valid one in output_dir."""
        if resume is True or resume == "latest":
            newest = storage.list_checkpoints(self.output_dir)[-1:]
            if newest and hf.looks_like_hf_checkpoint(newest[0]):
                return newest[0]  # a run HF's Trainer started (no manifest to verify)
            path = storage.find_resumable(self.output_dir)
            if path is None:
                raise ValueError(f"No valid checkpoint found in output directory {self.output_dir!r} "
                                 "(resume_from_checkpoint=True): train without resuming, or pass "
                                 "a checkpoint path")
            return path
        if hf.looks_like_hf_checkpoint(str(resume)):
            return str(resume)  # written by HF's Trainer: no manifest to verify
        storage.verify(str(resume))
        return str(resume)

    def load(self, resume) -> str:
        """Restore every component from the checkpoint `resume` names; returns its path.
        A checkpoint HF's Trainer wrote restores all but the data position (it has no
        data_state.json): the caller derives that from trainer_state.global_step."""
        c = self.c
        path = self.resolve(resume)
        refuse_model_only(path)
        logger.info("resuming from %s", path)
        from_hf = hf.looks_like_hf_checkpoint(path)
        if not from_hf:
            # first: a run that cannot resume exactly (other world size, batch size) fails here
            c.run_state.load_state_dict(storage.read_json(path, DATA_STATE_FILE), where=f"checkpoint {path!r}")
        self.state_io.load(path, c.model, c.optimizer)
        scheduler = storage.read_torch(path, "scheduler.pt")
        if hasattr(type(c.lr_scheduler), "step_count"):  # fasttrain's schedule reads LambdaLR's state too
            scheduler = hf.scheduler_state_from_hf(scheduler, c.lr_scheduler.base_lrs)
        c.lr_scheduler.load_state_dict(scheduler)
        if c.scaler is not None:
            c.scaler.load_state_dict(storage.read_torch(path, "scaler.pt"))
        saved = TrainerState.from_dict(storage.read_json(path, "trainer_state.json"))
        for f in dataclasses.fields(TrainerState):
            if f.name not in _NOT_RESTORED:
                setattr(c.trainer_state, f.name, getattr(saved, f.name))
        if c.callbacks is not None and c.restore_callbacks:
            c.callbacks.restore_state(c.trainer_state.stateful_callbacks, c.control)
        if from_hf:
            if not hf.restore_hf_rng_state(path, self.dist.rank, self.dist.world_size):
                logger.warning("%s has no RNG state for this process: dropout and shuffling restart "
                               "from the seed", path)
        elif storage.read_json(path, DATA_STATE_FILE).get("world_size", self.dist.world_size) == self.dist.world_size:
            set_rng_state(storage.read_torch(path, f"rng_state_{self.dist.rank}.pt"))
        else:  # which rank draws which random numbers changed: no saved stream fits
            logger.warning("resuming on %d processes from a checkpoint of %d: RNG states are not restored "
                           "(dropout masks differ from the uninterrupted run; data order, weights and "
                           "optimizer state are exact)", self.dist.world_size,
                           storage.read_json(path, DATA_STATE_FILE)["world_size"])
        return path


def refuse_model_only(path: str) -> None:
    """A checkpoint without optimizer and scheduler state (HF's save_only_model=True, by
    either trainer) cannot continue a run: say so instead of resuming with a fresh
    optimizer and a restarted schedule (HF 5.24 resumes silently that way)."""
    present = set(os.listdir(path))
    if "scheduler.pt" in present or OPTIMIZER_FILE in present:  # every full checkpoint, sharded ones too
        return
    raise ValueError(
        f"cannot resume from {path!r}: it holds the model weights and trainer state only (saved with "
        "save_only_model=True), without the optimizer, LR scheduler, loss scaler and RNG state that "
        "continuing the run needs. Resume from a checkpoint saved with save_only_model=False, or "
        "start a new run from these weights (load them as the model) without resume_from_checkpoint.")


def check_weights_finite(model: torch.nn.Module, dist: Optional[DistContext] = None) -> None:
    """Raise on every rank if any weight is NaN/inf; sharded (DTensor) weights are checked
    on their local shards and the verdict agreed over ranks."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    checks = [torch.isfinite(t).all() for t in local if t.numel()]
    bad = bool(checks) and not bool(torch.stack(checks).all())  # sync: once per save
    if dist is not None and dist.enabled and any(hasattr(p, "to_local") for p in model.parameters()):
        bad = dist.any_flag(bad)
    if bad:
        raise FloatingPointError("refusing to save a checkpoint: the model weights contain NaN/inf. "
                                 "Earlier checkpoints are intact; resume from one with a lower "
                                 "learning rate.")


def prepare_output_dir(output_dir: str, resuming: bool, overwrite: bool, is_main: bool) -> None:
    """Make output_dir ready for a run. A new run in a folder that holds an earlier run's
    checkpoints starts over, as HF's Trainer does (training twice into one folder, or a new
    Trainer with the same arguments, are common in scripts and HF's own tests): each new
    checkpoint replaces the old one of its step; the others stay until rotated or replaced.
    That is said once, with the ways to continue or to clear the folder instead."""
    if os.path.isfile(output_dir):
        raise ValueError(f"output_dir {output_dir!r} is a file; choose a directory")
    if is_main and not resuming and not overwrite and storage.list_checkpoints(output_dir):
        logger.warning(
            "output_dir %r already holds checkpoints of an earlier run; this run starts over and "
            "replaces them step by step as HF's Trainer does. Pass resume_from_checkpoint=True to "
            "continue that run instead, or overwrite_output_dir=True to remove them first.", output_dir)
    if is_main:
        if not resuming and overwrite:
            for path in storage.list_checkpoints(output_dir):  # as promised: start over there
                shutil.rmtree(path)
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create output_dir {output_dir!r}: {e}") from None
        storage.remove_stale_temporaries(output_dir)  # saves a killed process left half-written


def save_model_files(model: torch.nn.Module, output_dir: str, state_dict: Optional[dict] = None) -> None:
    """Weights (safetensors) and config of the model, for inference or fine-tuning.
    `state_dict`: the full weights when the model's own are sharded (FSDP)."""
    os.makedirs(output_dir, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(output_dir, safe_serialization=True, state_dict=state_dict)
        return
    with open(os.path.join(output_dir, storage.MODEL_FILE), "wb") as f:
        f.write(storage.model_bytes(state_dict if state_dict is not None else model.state_dict()))
    config = model_config(model)
    if config is not None:
        with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)


def model_config(model):
    config = getattr(model, "config", None)
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return {"model_type": "fasttrain-gpt", **dataclasses.asdict(config)}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return None
