"""Saving and resuming the Trainer's whole state (the layout lives in checkpoint.py).

Exact resume: everything a step reads is restored (weights, optimizer, LR schedule, loss
scaler, every rank's RNG, the data position, the partial logging window), and the data
position is an (epoch, micro-batches consumed) pair from which the sampler starts directly,
so nothing is replayed or skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import torch

from fasttrain.checkpoint import storage as ckpt
from fasttrain.callbacks import TrainerState
from fasttrain.trainer.utils import rng_state, set_rng_state

logger = logging.getLogger("fasttrain")


class CheckpointMixin:
    # ------------------------------------------------------------------ saving
    def _prepare_output_dir(self, resuming) -> None:
        out = self.args.output_dir
        if os.path.isfile(out):
            raise ValueError(f"output_dir {out!r} is a file; choose a directory")
        if not resuming and not self.args.overwrite_output_dir and ckpt.list_checkpoints(out):
            raise ValueError(
                f"output_dir {out!r} already holds checkpoints of an earlier run. Pass "
                "resume_from_checkpoint=True to continue it, overwrite_output_dir=True to start "
                "over there (its checkpoints will be replaced), or choose another output_dir.")
        if self.dist.is_main:
            if not resuming and self.args.overwrite_output_dir:
                for path in ckpt.list_checkpoints(out):  # as promised: start over there
                    shutil.rmtree(path)
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create output_dir {out!r}: {e}") from None

    def _save_checkpoint(self, metrics=None, blocking: bool = False) -> str:
        """Snapshot the whole state into host memory (the only part the step waits for),
        then write it on the background saver thread."""
        st, args = self.state, self.args
        if self.scaler is not None:
            self.scaler.check_divergence()  # a diverged fp16 run stops before it saves
        self._check_weights_finite()
        path = os.path.join(args.output_dir, f"{ckpt.PREFIX}{st.global_step}")
        if self._pending_best:
            st.best_model_checkpoint = path
            self._pending_best = False
        st.stateful_callbacks = self.callback_handler.stateful_state()
        rng_states = self.dist.all_gather_object(rng_state())
        if self.dist.is_main:
            weights, aliases = ckpt.dedupe_shared(self.model.state_dict())
            snap = ckpt.snapshot({
                "weights": weights, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None})
            files = {"trainer_state.json": st.to_json_string().encode(),
                     "data_state.json": self._data_state(), "training_args.json": args.to_dict(),
                     "config.json": _model_config(self.model)}
            step, keep = st.global_step, st.best_model_checkpoint if args.load_best_model_at_end else None

            def write():
                writer = ckpt.CheckpointWriter(args.output_dir, step)
                writer.write_model(snap["weights"], aliases)
                writer.write_torch("optimizer.pt", snap["optimizer"])
                writer.write_torch("scheduler.pt", snap["scheduler"])
                if snap["scaler"] is not None:
                    writer.write_torch("scaler.pt", snap["scaler"])
                for rank, state in enumerate(rng_states):
                    writer.write_torch(f"rng_state_{rank}.pt", state)
                for name, value in files.items():
                    if isinstance(value, bytes):
                        writer.write_bytes(name, value)
                    elif value is not None:
                        writer.write_json(name, value)
                writer.commit(step)
                ckpt.rotate(args.output_dir, args.save_total_limit, keep=keep)

            self._saver.submit(write)
            if blocking:
                self._saver.wait()
        self.dist.barrier()
        return path

    def _check_weights_finite(self) -> None:
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):  # sync: once per save
            raise FloatingPointError("refusing to save a checkpoint: the model weights contain NaN/inf. "
                                     "Earlier checkpoints are intact; resume from one with a lower "
                                     "learning rate.")

    def _data_state(self) -> dict:
        w = self._window
        values = torch.stack([w.loss, w.grad_norm, self._skipped, self._nonfinite_run]).tolist()  # sync: save
        return {"epoch": self._epoch, "micro_batches_done": self._micro_done,
                "world_size": self.dist.world_size,
                "per_device_train_batch_size": self.args.per_device_train_batch_size,
                "window": {"loss": values[0], "grad_norm": values[1], "steps": w.steps, "tokens": w.tokens},
                "skipped": values[2], "nonfinite_run": values[3]}

    def save_model(self, output_dir=None) -> None:
        """Weights (safetensors) and config of the model, for inference or fine-tuning."""
        output_dir = output_dir or self.args.output_dir
        if not self.dist.is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(output_dir, safe_serialization=True)
            return
        with open(os.path.join(output_dir, ckpt.MODEL_FILE), "wb") as f:
            f.write(ckpt.model_bytes(self.model.state_dict()))
        config = _model_config(self.model)
        if config is not None:
            with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)

    # ------------------------------------------------------------------ resuming
    def _resolve_checkpoint(self, resume) -> str:
        if resume is True or resume == "latest":
            path = ckpt.find_resumable(self.args.output_dir)
            if path is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir!r} holds no "
                                 "valid checkpoint; train without resuming, or pass a checkpoint path")
            return path
        ckpt.verify(str(resume))
        return str(resume)

    def _resume(self, resume) -> tuple[int, int]:
        path = self._resolve_checkpoint(resume)
        logger.info("resuming from %s", path)
        data = ckpt.read_json(path, "data_state.json")
        if data["world_size"] != self.dist.world_size:
            raise ValueError(f"checkpoint {path!r} was written by {data['world_size']} processes, this "
                             f"run has {self.dist.world_size}; exact resume needs the same world size")
        if data["per_device_train_batch_size"] != self.args.per_device_train_batch_size:
            raise ValueError(f"checkpoint {path!r} used per_device_train_batch_size="
                             f"{data['per_device_train_batch_size']}; resume with the same value")
        ckpt.load_model_weights(self.model, path)
        lr_tensors = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt.read_torch(path, "optimizer.pt"))
        for g, lr in zip(self.optimizer.param_groups, lr_tensors):
            if isinstance(lr, torch.Tensor):  # keep the device-resident LR the schedule updates
                lr.copy_(torch.as_tensor(g["lr"]))
                g["lr"] = lr
        self.lr_scheduler.load_state_dict(ckpt.read_torch(path, "scheduler.pt"))
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt.read_torch(path, "scaler.pt"))
        saved = TrainerState.from_dict(ckpt.read_json(path, "trainer_state.json"))
        for f in dataclasses.fields(TrainerState):
            if f.name not in ("is_local_process_zero", "is_world_process_zero", "max_steps"):
                setattr(self.state, f.name, getattr(saved, f.name))
        self.callback_handler.restore_state(self.state.stateful_callbacks)
        w = self._window
        w.loss.fill_(data["window"]["loss"])
        w.grad_norm.fill_(data["window"]["grad_norm"])
        w.steps, w.tokens = data["window"]["steps"], data["window"]["tokens"]
        self._skipped.fill_(data["skipped"])
        self._nonfinite_run.fill_(data["nonfinite_run"])
        set_rng_state(ckpt.read_torch(path, f"rng_state_{self.dist.rank}.pt"))
        return data["epoch"], data["micro_batches_done"]


def _model_config(model):
    config = getattr(model, "config", None)
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return {"model_type": "fasttrain-gpt", **dataclasses.asdict(config)}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return None
