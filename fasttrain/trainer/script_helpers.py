"""The small Trainer methods HF's example scripts call around train()/evaluate():
run_clm.py's epilogue (log_metrics, save_metrics, save_state, create_model_card), process
identity, example and parameter counts. Reads only self.args, self.state, self.dist,
self.model and self.optimizer; writes only under args.output_dir on the main process.
"""
from __future__ import annotations

import datetime
import json
import os

from fasttrain.checkpoint.hf_layout import hf_trainer_state_json


class ScriptHelpersMixin:
    # ------------------------------------------------------------------ processes
    def is_world_process_zero(self) -> bool:
        return self.dist.is_main

    def is_local_process_zero(self) -> bool:
        return self.dist.local_rank == 0

    # ------------------------------------------------------------------ metrics files
    def metrics_format(self, metrics: dict) -> dict:
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

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print `metrics` as an aligned table under a `***** {split} metrics *****` header."""
        if not self.is_world_process_zero():
            return
        print(f"***** {split} metrics *****")
        shown = self.metrics_format(metrics)
        key_width = max((len(str(k)) for k in shown), default=0)
        value_width = max((len(str(v)) for v in shown.values()), default=0)
        for key in sorted(shown):
            print(f"  {key: <{key_width}} = {str(shown[key]):>{value_width}}")

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """`{split}_results.json` in output_dir; with `combined`, merged into all_results.json."""
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        _write_json(os.path.join(self.args.output_dir, f"{split}_results.json"), metrics)
        if combined:
            path = os.path.join(self.args.output_dir, "all_results.json")
            merged = {}
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    merged = json.load(f)
            merged.update(metrics)
            _write_json(path, merged)

    def _load_callback_state(self) -> None:
        """HF's (private) name, which HF's callback tests call: put back the callbacks' and the
        control's states from `self.state.stateful_callbacks`, as a resume does, when
        restore_callback_states_from_checkpoint is set."""
        if self.args.restore_callback_states_from_checkpoint:
            self.callback_handler.restore_state(self.state.stateful_callbacks, self.control)

    def save_state(self) -> None:
        """trainer_state.json in output_dir (HF's layout)."""
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.state.stateful_callbacks = self.callback_handler.stateful_state(self.control)
        with open(os.path.join(self.args.output_dir, "trainer_state.json"), "w", encoding="utf-8") as f:
            f.write(hf_trainer_state_json(self.state.to_json_string()))  # HF's TrainerState loads it

    def create_model_card(self, model_name=None, finetuned_from=None, tasks=None, dataset=None,
                          language=None, license=None, tags=None, **kwargs) -> None:
        """A README.md in output_dir: what was trained from what, the arguments that matter
        and the last evaluation (HF's card, without the hub metadata it cannot fetch offline)."""
        if not self.is_world_process_zero():
            return
        args = self.args
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
        evals = [r for r in self.state.log_history if any(k.startswith("eval_") for k in r)]
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
    def num_examples(self, dataloader) -> int:
        """Examples behind a DataLoader: its dataset's length, else batches x batch size."""
        try:
            dataset = dataloader.dataset
            return len(dataset)
        except (NameError, AttributeError, TypeError):
            return len(dataloader) * (getattr(dataloader, "batch_size", None) or 1)

    def num_tokens(self, train_dl, max_steps=None) -> int:
        """Input tokens of one pass over `train_dl` (or of `max_steps` batches)."""
        total = 0
        for step, batch in enumerate(train_dl):
            if max_steps is not None and step >= max_steps:
                break
            ids = batch.get("input_ids") if isinstance(batch, dict) else None
            total += int(ids.numel()) if ids is not None else 0
        return total

    def floating_point_ops(self, inputs: dict) -> int:
        """FLOPs of one forward+backward on `inputs`: the model's own `floating_point_ops` if it
        has one, else HF's estimate 6 x non-embedding parameters x input tokens (0 when the
        model cannot count its parameters or the batch has no main input)."""
        own = getattr(self.model, "floating_point_ops", None)
        if callable(own):
            return own(inputs)
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if getattr(self, "_flop_params", None) is None:  # counted once: the loop asks every step
            self._flop_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._flop_params

    def get_num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def get_learning_rates(self) -> list:
        if self.optimizer is None:
            raise ValueError("the optimizer does not exist yet: call train() or create_optimizer() first")
        return [float(g["lr"]) for g in self.optimizer.param_groups]  # sync: a device LR is read

    def get_optimizer_group(self, param=None):
        """The optimizer's param group holding `param`, or every group without it."""
        if self.optimizer is None:
            raise ValueError("the optimizer does not exist yet: call train() or create_optimizer() first")
        if param is None:
            return [g["params"] for g in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return group
        return None


def _hms(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:05.2f}"


def _write_json(path: str, values: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=4, sort_keys=True)
