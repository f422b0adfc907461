"""HF's checkpoint files beside fasttrain's, so a run either trainer started resumes in the
other, and PEFT checkpoints that hold only the adapter.

What is written for HF (transformers 5.x reads each on resume): `rng_state.pth` (python /
numpy / cpu / cuda RNG states), `scheduler.pt` with LambdaLR's keys next to fasttrain's own,
`training_args.bin` (written, never read: it is a pickle). What is read from an HF
checkpoint: `model.safetensors` (tied weights stored once), `adapter_model.safetensors`,
`optimizer.pt`, `scheduler.pt`, `trainer_state.json`, `rng_state.pth` -- every file with
`torch.load(weights_only=True)`; numpy's RNG state is allowed by name, nothing else.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file

from fasttrain.checkpoint.storage import (MANIFEST, MODEL_FILE, CheckpointError, check_shapes,
                                         read_model_state)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HF_RNG_FILE = "rng_state.pth"
TRAINING_ARGS_FILE = "training_args.bin"


def is_peft_model(model) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def written_by_fasttrain(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def looks_like_hf_checkpoint(path: str) -> bool:
    """Written by HF's Trainer: its trainer_state.json without fasttrain's data_state.json
    (which every fasttrain checkpoint has, so a damaged one is never taken for HF's)."""
    return (os.path.isfile(os.path.join(path, "trainer_state.json"))
            and not os.path.exists(os.path.join(path, "data_state.json")) and not written_by_fasttrain(path))


# ------------------------------------------------------------------ PEFT adapters
def adapter_files(model) -> dict:
    """{file name: bytes} of the adapter as PEFT itself writes it (weights + config), taken
    now, on the training thread; small (kilobytes to megabytes for LoRA)."""
    tmp = tempfile.mkdtemp(prefix="fasttrain-adapter-")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        out = {}
        for name in os.listdir(tmp):
            full = os.path.join(tmp, name)
            if os.path.isfile(full) and name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                with open(full, "rb") as f:
                    out[name] = f.read()
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_weights(model, path: str) -> None:
    """The weights of checkpoint `path` into `model`: a PEFT adapter, fasttrain's
    model.safetensors, or HF's (which stores tied weights once)."""
    if is_peft_model(model):
        file = os.path.join(path, ADAPTER_WEIGHTS)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path!r} has no {ADAPTER_WEIGHTS}; a PEFT model resumes "
                                  "only from checkpoints of a PEFT run")
        from peft import set_peft_model_state_dict
        result = set_peft_model_state_dict(model, load_file(file))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise CheckpointError(f"{file!r} does not match the adapter: unexpected {sorted(unexpected)[:8]}")
        return
    state = read_model_state(path)
    check_shapes(model, state, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not _is_tied(model, name, state)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not match the model: missing "
                              f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")


def _is_tied(model, name: str, loaded: dict) -> bool:
    """A weight HF left out because it shares storage with one the file holds."""
    tensors = dict(model.state_dict(keep_vars=True))
    target = tensors.get(name)
    if target is None:
        return False
    return any(key != name and key in loaded and other.data_ptr() == target.data_ptr()
               for key, other in tensors.items())


# ------------------------------------------------------------------ RNG, schedule, arguments
def hf_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_hf_rng_state(path: str, rank: int, world_size: int) -> bool:
    """Restore the RNG states an HF checkpoint saved; False when it has none for this rank."""
    name = HF_RNG_FILE if world_size == 1 else f"rng_state_{rank}.pth"
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return False
    # numpy's state is an ndarray inside a tuple; allow exactly the functions that rebuild it
    allowed = [_numpy_reconstruct(), np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(file, map_location="cpu", weights_only=True)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core (a deprecated alias now)
    return core.multiarray._reconstruct


def hf_scheduler_state(state: dict, last_lrs: list, n_groups: int) -> dict:
    """fasttrain's schedule state with LambdaLR's keys added, so HF's scheduler loads it;
    one entry per param group written to optimizer.pt (`n_groups`)."""
    step = int(state["step_count"])

    def per_group(values):
        values = [float(v) for v in values]
        return values if len(values) == n_groups else values[:1] * n_groups
    return {**state, "base_lrs": per_group(state["base_lrs"]), "last_epoch": step, "_step_count": step + 1,
            "_last_lr": per_group(last_lrs), "lr_lambdas": [None] * n_groups,
            "_get_lr_called_within_step": False, "_is_initial": False}


def scheduler_state_from_hf(state: dict, base_lrs: list) -> dict:
    """The step counter of HF's LambdaLR state as fasttrain's schedule state. HF's base LRs
    are Python floats, this run's are float32 device values: equal to float32 precision
    counts as the same learning rate."""
    if "step_count" not in state and "last_epoch" not in state:
        raise CheckpointError(f"scheduler.pt has neither fasttrain's step_count nor LambdaLR's last_epoch "
                              f"(keys {sorted(state)}); resume with the scheduler that wrote it")
    saved = list(state["base_lrs"])
    values = saved + list(base_lrs)  # group counts may differ (HF: 2, fasttrain: 1 without decay)
    same = bool(values) and max(values) - min(values) <= 1e-6 * max(abs(max(values)), 1e-12)
    out = dict(state) if "step_count" in state else {"step_count": torch.tensor(float(state["last_epoch"]))}
    out["base_lrs"] = list(base_lrs) if same else saved
    return out


def fit_optimizer_state(saved: dict, optimizer) -> dict:
    """A saved optimizer state whose param groups are cut differently from `optimizer`'s
    (HF's two groups vs one, as fasttrain wrote with weight_decay=0 before it kept HF's
    two, or a user's optimizer) mapped onto this optimizer's groups, parameters
    matched in order; the learning rate is the saved one."""
    ours = optimizer.state_dict()
    flat_saved = [i for g in saved["param_groups"] for i in g["params"]]
    flat_ours = [i for g in ours["param_groups"] for i in g["params"]]
    if len(flat_saved) != len(flat_ours):
        raise CheckpointError(f"optimizer.pt holds {len(flat_saved)} parameters, this model trains "
                              f"{len(flat_ours)}; resume with the same model and trainable parameters")
    mapping = dict(zip(flat_saved, flat_ours))
    _check_state_shapes(saved["state"], mapping, [p for g in optimizer.param_groups for p in g["params"]], flat_ours)
    if [len(g["params"]) for g in saved["param_groups"]] == [len(g["params"]) for g in ours["param_groups"]]:
        return saved
    lr = saved["param_groups"][0].get("lr")
    groups = [dict(g, lr=lr) if lr is not None else g for g in ours["param_groups"]]
    return {"state": {mapping[k]: v for k, v in saved["state"].items()}, "param_groups": groups}


def _check_state_shapes(state: dict, mapping: dict, params: list, ids: list) -> None:
    """Every per-parameter tensor of the saved state (exp_avg, momentum, ...) has its
    parameter's shape: a state saved in another parameter order would otherwise be read by a
    fused optimizer kernel with the wrong sizes (out of bounds, not an error)."""
    position = {i: n for n, i in enumerate(ids)}
    for saved_id, values in state.items():
        if saved_id not in mapping:
            raise CheckpointError(f"optimizer.pt has state for parameter {saved_id!r}, which none of its "
                                  "param groups lists; the file is damaged or not an optimizer state")
        n = position[mapping[saved_id]]
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[n].shape:
                raise CheckpointError(
                    f"optimizer.pt's {name!r} for parameter #{n} has shape {tuple(value.shape)}, but that "
                    f"parameter is {tuple(params[n].shape)}: the checkpoint lists the parameters in another "
                    "order or for another model; resume with the model (and weight_decay split) it was saved with")


def training_args_bytes(args) -> bytes:
    """HF's training_args.bin (a pickle of the arguments), for tools that expect it. fasttrain
    never loads it: unpickling can run code."""
    buffer = io.BytesIO()
    torch.save(args, buffer)
    return buffer.getvalue()


def hf_trainer_state_json(state_json: str, drop=("skipped_steps",)) -> str:
    """trainer_state.json without fasttrain-only keys: HF's TrainerState(**json) rejects
    unknown names."""
    values = json.loads(state_json)
    for key in drop:
        values.pop(key, None)
    return json.dumps(values, indent=2, sort_keys=True) + "\n"


def hf_resume_position(global_step: int, steps_per_epoch: int, accumulation: int) -> tuple[int, int]:
    """(epoch, micro-batches consumed in it) after `global_step` optimizer steps, as HF
    counts them (whole steps per epoch)."""
    epoch = global_step // steps_per_epoch
    return epoch, (global_step % steps_per_epoch) * accumulation


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "HF_RNG_FILE", "MODEL_FILE", "TRAINING_ARGS_FILE",
           "adapter_files", "fit_optimizer_state", "hf_resume_position", "hf_rng_state", "hf_scheduler_state",
           "hf_trainer_state_json", "is_peft_model", "load_weights", "looks_like_hf_checkpoint",
           "restore_hf_rng_state", "scheduler_state_from_hf", "training_args_bytes", "written_by_fasttrain"]
