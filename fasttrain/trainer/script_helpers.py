"""The bodies of the small Trainer methods HF's example scripts call around
train()/evaluate(): run_clm.py's epilogue (log_metrics, save_metrics, save_state,
create_model_card), example, token, FLOP and parameter counts, the optimizer's groups.

Functions of what they use (the Trainer keeps HF's method names and passes its state in);
the writers run on the main process only, which the Trainer decides. They write only
under the output directory they are given.
"""
from __future__ import annotations

import datetime
import inspect
import json
import os
import time

import torch

from fasttrain.checkpoint.hf_layout import hf_trainer_state_json
from fasttrain.optim.schedules import LRScheduler, float32_value


def call_model_init(model_init, trial=None):
    """A fresh model from `model_init` (called with `trial` if it takes an argument)."""
    n_args = len(inspect.signature(model_init).parameters)
    model = model_init(trial) if n_args == 1 else model_init()
    if model is None:
        raise RuntimeError("model_init returned None; it must return a torch.nn.Module")
    return model


def session_speed(start_time: float, tokens: int) -> dict:
    """train_runtime since `start_time` (time.time()) and the tokens per second over it:
    what HF's log(logs, start_time) adds when tokens are counted."""
    runtime = time.time() - start_time
    return {"train_runtime": round(runtime, 4),
            "train_tokens_per_second": round(tokens / runtime, 3) if runtime > 0 else 0.0}


def total_train_batch_size(args, world_size: int) -> int:
    """Samples per optimizer step over all ranks (every rank is data-parallel here)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size


def metrics_format(metrics: dict) -> dict:
    """Metrics for reading: runtimes as h:mm:ss.ss, total_flos in GF, floats to 4 places."""
    out = {}
    for key, value in metrics.items():
        if key.endswith("_runtime") and isinstance(value, (int, float)):
            out[key] = _hms(value)
        elif key == "total_flos":
            out[key] = f"{int(value) >> 30}GF"
        elif isinstance(value, float):
            out[key] = round(value, 4)
        else:
            out[key] = value
    return out


def print_metrics(split: str, shown: dict) -> None:
    """`shown` (formatted metrics) as an aligned table under a `***** {split} metrics *****` header."""
    print(f"***** {split} metrics *****")
    key_width = max((len(str(k)) for k in shown), default=0)
    value_width = max((len(str(v)) for v in shown.values()), default=0)
    for key in sorted(shown):
        print(f"  {key: <{key_width}} = {str(shown[key]):>{value_width}}")


def save_metrics(output_dir: str, split: str, metrics: dict, combined: bool = True) -> None:
    """`{split}_results.json` in output_dir; with `combined`, merged into all_results.json."""
    os.makedirs(output_dir, exist_ok=True)
    _write_json(os.path.join(output_dir, f"{split}_results.json"), metrics)
    if combined:
        path = os.path.join(output_dir, "all_results.json")
        merged = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                merged = json.load(f)
        merged.update(metrics)
        _write_json(path, merged)


def save_state(output_dir: str, state, callback_handler, control) -> None:
    """trainer_state.json in output_dir (HF's layout), with the callbacks' state in `state`."""
    os.makedirs(output_dir, exist_ok=True)
    state.stateful_callbacks = callback_handler.stateful_state(control)
    with open(os.path.join(output_dir, "trainer_state.json"), "w", encoding="utf-8") as f:
        f.write(hf_trainer_state_json(state.to_json_string()))  # HF's TrainerState loads it


def create_model_card(args, log_history: list, model_name=None, finetuned_from=None, tasks=None,
                      dataset=None, language=None, license=None, tags=None) -> None:
    """A README.md in args.output_dir: what was trained from what, the arguments that matter
    and the last evaluation in `log_history` (HF's card, without the hub metadata it cannot
    fetch offline)."""
    name = model_name or os.path.basename(os.path.abspath(args.output_dir))
    lines = ["---", "library_name: fasttrain"]
    for key, value in (("license", license), ("base_model", finetuned_from), ("language", language)):
        if value:
            lines.append(f"{key}: {value}")
    for key, value in (("tags", tags), ("tasks", tasks), ("datasets", dataset)):
        if value:
            values = value if isinstance(value, (list, tuple)) else [value]
            lines += [f"{key}:"] + [f"- {v}" for v in values]
    lines += ["---", "", f"# {name}", ""]
    if finetuned_from:
        lines.append(f"This model is a fine-tuned version of {finetuned_from}.")
    evals = [r for r in log_history if any(k.startswith("eval_") for k in r)]
    if evals:
        lines += ["", "## Evaluation", ""]
        lines += [f"- {k}: {v}" for k, v in evals[-1].items() if k.startswith("eval_")]
    lines += ["", "## Training hyperparameters", ""]
    for key in ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "seed", "optim", "lr_scheduler_type",
                "num_train_epochs", "max_steps", "warmup_steps"):
        if hasattr(args, key):
            lines.append(f"- {key}: {getattr(args, key)}")
    lines += ["", f"Trained with fasttrain on {datetime.date.today().isoformat()}.", ""]
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# ------------------------------------------------------------------ counts
def num_examples(dataloader) -> int:
    """Examples behind a DataLoader: its dataset's length, else batches x batch size."""
    try:
        dataset = dataloader.dataset
        return len(dataset)
    except (NameError, AttributeError, TypeError):
        return len(dataloader) * (getattr(dataloader, "batch_size", None) or 1)


def num_tokens(train_dl, max_steps=None) -> int:
    """Input tokens of one pass over `train_dl` (or of `max_steps` batches)."""
    total = 0
    for step, batch in enumerate(train_dl):
        if max_steps is not None and step >= max_steps:
            break
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        total += int(ids.numel()) if ids is not None else 0
    return total


class FlopCounter:
    """HF's `floating_point_ops` for one model: the model's own count if it has one, else
    6 x non-embedding parameters x input tokens (0 when the model cannot count its
    parameters or the batch has no main input). The loop asks every step, so what the
    model offers is looked up once per model (three failed attribute lookups on an
    nn.Module cost ~5 us a step) and the parameters are counted once."""

    def __init__(self):
        self._model = None
        self._own = self._main = self._params = None

    def __call__(self, model, inputs: dict) -> int:
        if self._model is not model:
            own = getattr(model, "floating_point_ops", None)
            self._own = own if callable(own) else None
            self._main = getattr(model, "main_input_name", "input_ids")
            self._params = None
            if self._own is None and hasattr(model, "num_parameters"):
                self._params = model.num_parameters(exclude_embeddings=True)
            self._model = model
        if self._own is not None:
            return self._own(inputs)
        if self._params is None or self._main not in inputs:
            return 0
        return 6 * inputs[self._main].numel() * self._params


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def learning_rates(optimizer, scheduler=None) -> list:
    """Each param group's current LR: fasttrain's schedule reports its float64 values (HF's
    numbers exactly), anything else is read from the groups."""
    _need_optimizer(optimizer)
    if isinstance(scheduler, LRScheduler) and scheduler.optimizer is optimizer:
        return scheduler.get_last_lr()
    return [_group_lr(g) for g in optimizer.param_groups]


def _group_lr(group: dict) -> float:
    """A group's LR as a float: a device LR still holding the float32 of its group's float
    initial_lr (no schedule has moved it) is reported as that float, HF's number."""
    lr = group["lr"]
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    value = float(lr)  # sync: a device LR is read
    initial = group.get("initial_lr")
    if isinstance(initial, float) and lr.dtype == torch.float32 and float32_value(initial) == value:
        return initial
    return value


def optimizer_group(optimizer, param=None):
    """The optimizer's param group holding `param`, or every group's params without it."""
    _need_optimizer(optimizer)
    if param is None:
        return [g["params"] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def _need_optimizer(optimizer) -> None:
    if optimizer is None:
        raise ValueError("the optimizer does not exist yet: call train() or create_optimizer() first")


def _hms(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:05.2f}"


def _write_json(path: str, values: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=4, sort_keys=True)
