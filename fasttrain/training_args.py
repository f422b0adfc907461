"""TrainingArguments: the HuggingFace field names with the HuggingFace meaning.

Every value is validated in `__post_init__`, before any work starts; an invalid value
raises `ValueError` naming the field, the bad value and what is accepted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup",
    "warmup_stable_decay",
)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "fasttrain_adamw", "sgd")
STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
REPORT_TARGETS = ("none", "tensorboard", "jsonl", "all")
NONFINITE_POLICIES = ("skip", "stop")
DDP_BACKENDS = ("fasttrain", "torch")


def _bad(name: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"TrainingArguments.{name}={value!r} is invalid: {accepted}")


@dataclass
class TrainingArguments:
    output_dir: str = "runs/default"
    overwrite_output_dir: bool = False
    do_train: bool = True
    do_eval: bool = False
    do_predict: bool = False

    # optimisation
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict = field(default_factory=dict)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0

    # evaluation, saving, logging
    eval_strategy: str = "no"
    evaluation_strategy: Optional[str] = None  # the older spelling; copied into eval_strategy
    eval_steps: Optional[float] = None
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: Optional[int] = None
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    logging_dir: Optional[str] = None
    logging_strategy: str = "steps"
    logging_steps: float = 500
    logging_first_step: bool = False
    report_to: Union[str, list, None] = "jsonl"
    disable_tqdm: bool = False
    run_name: Optional[str] = None

    # reproducibility and data
    seed: int = 42
    data_seed: Optional[int] = None
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_drop_last: bool = False
    remove_unused_columns: bool = True
    label_names: Optional[list] = None

    # precision and speed
    fp16: bool = False
    bf16: bool = False
    master_weights: bool = False
    torch_compile: bool = False
    torch_compile_mode: Optional[str] = None
    torch_compile_per_block: bool = True
    torch_compile_backend: Optional[str] = None  # default inductor
    torch_compile_cache_dir: Optional[str] = None  # default ~/.cache/fasttrain/inductor
    fused_loss: bool = True
    use_cpu: bool = False

    # checkpoints and robustness
    resume_from_checkpoint: Optional[str] = None
    nonfinite_loss_policy: str = "skip"
    max_consecutive_nonfinite: int = 10

    # distributed
    ddp_backend: str = "fasttrain"
    ddp_timeout: int = 1800
    ddp_bucket_cap_mb: float = 25.0
    ddp_find_unused_parameters: bool = False
    # sharded data parallelism and activation memory (fasttrain/distributed/fsdp.py,
    # fasttrain/models/activation_checkpointing.py)
    fsdp: Union[str, list, None] = ""  # "full_shard", "shard_grad_op", "hybrid_shard", "offload"
    fsdp_config: Optional[dict] = None
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: Optional[dict] = None  # + fasttrain's "every": k-th block only

    # profiling
    profile: bool = True
    profile_warmup_steps: int = 3
    profiler_trace_steps: Optional[str] = None  # "START:END", e.g. "10:12"
    flops_per_token: Optional[float] = None
    peak_tflops: Optional[float] = None

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        self.evaluation_strategy = self.eval_strategy
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        self.report_to = list(self.report_to or ["none"])
        if "all" in self.report_to:
            self.report_to = ["jsonl", "tensorboard"]
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "logs")
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        self._validate()
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    def _validate(self):
        self._check_choice("lr_scheduler_type", SCHEDULER_TYPES)
        self._check_choice("optim", OPTIMIZERS)
        self._check_choice("eval_strategy", STRATEGIES)
        self._check_choice("save_strategy", SAVE_STRATEGIES)
        self._check_choice("logging_strategy", STRATEGIES)
        self._check_choice("nonfinite_loss_policy", NONFINITE_POLICIES)
        self._check_choice("ddp_backend", DDP_BACKENDS)
        for target in self.report_to:
            if target not in REPORT_TARGETS:
                raise _bad("report_to", self.report_to, f"each entry must be one of {REPORT_TARGETS}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "max_consecutive_nonfinite"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(name, value, "must be a positive integer (1 or more)")
        for name in ("learning_rate", "weight_decay", "adam_epsilon", "warmup_ratio",
                     "num_train_epochs", "ddp_bucket_cap_mb"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise _bad(name, value, "must be a finite number >= 0")
        if self.warmup_ratio > 1:
            raise _bad("warmup_ratio", self.warmup_ratio, "must be in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise _bad(name, value, "must be in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise _bad("max_grad_norm", self.max_grad_norm, "must be >= 0 (0 or None disables clipping)")
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise _bad("max_steps", self.max_steps, "must be a positive integer, or -1 to use num_train_epochs")
        if self.warmup_steps < 0:
            raise _bad("warmup_steps", self.warmup_steps, "must be >= 0")
        for name in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, name)
            if value is None or value <= 0:
                raise _bad(name, value, "must be > 0 (an integer step count, or a float < 1 as a ratio of the total steps)")
        if self.dataloader_num_workers < 0:
            raise _bad("dataloader_num_workers", self.dataloader_num_workers, "must be >= 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise _bad("save_total_limit", self.save_total_limit, "must be >= 1, or None to keep every checkpoint")
        if self.fp16 and self.bf16:
            raise ValueError("TrainingArguments: fp16=True and bf16=True are both set; choose one "
                             "(bf16 needs no loss scaling; fp16 uses fasttrain's dynamic loss scaler)")
        if self.master_weights and not (self.bf16 or self.fp16):
            raise _bad("master_weights", True, "needs bf16=True or fp16=True (it keeps fp32 master "
                       "copies of low-precision weights)")
        if self.master_weights and self.optim != "fasttrain_adamw":
            raise _bad("master_weights", True, f"needs optim='fasttrain_adamw' (got {self.optim!r})")
        if self.load_best_model_at_end:
            if self.save_strategy == "no":
                raise _bad("save_strategy", "no", "load_best_model_at_end=True needs checkpoints: "
                           "set save_strategy to 'steps', 'epoch' or 'best'")
            if self.eval_strategy == "no":
                raise _bad("eval_strategy", "no", "load_best_model_at_end=True needs evaluation: "
                           "set eval_strategy to 'steps' or 'epoch'")
            if (self.save_strategy in ("steps", "epoch") and self.save_strategy != self.eval_strategy):
                raise _bad("save_strategy", self.save_strategy, "load_best_model_at_end=True needs "
                           f"save_strategy to match eval_strategy ({self.eval_strategy!r}) or be 'best'")
            if (self.save_strategy == "steps" and self.eval_strategy == "steps"
                    and self.save_steps % self.eval_steps):
                raise _bad("save_steps", self.save_steps, "load_best_model_at_end=True needs "
                           f"save_steps to be a multiple of eval_steps ({self.eval_steps}), so the "
                           "best evaluation always has a checkpoint")
        if self.save_strategy == "best" and self.eval_strategy == "no":
            raise _bad("save_strategy", "best", "needs eval_strategy 'steps' or 'epoch' to find the best")
        if self.profiler_trace_steps is not None:
            try:
                start, end = (int(x) for x in str(self.profiler_trace_steps).split(":"))
                assert 0 <= start < end
            except (ValueError, AssertionError):
                raise _bad("profiler_trace_steps", self.profiler_trace_steps,
                           "must be 'START:END' with 0 <= START < END, e.g. '10:12'") from None
        self._validate_sharding()
        if os.path.isfile(self.output_dir):
            raise _bad("output_dir", self.output_dir, "is an existing file; point output_dir at a "
                       "directory (it is created if missing)")

    def _validate_sharding(self):
        from fasttrain.distributed.fsdp import FSDPConfig
        FSDPConfig.from_args(self.fsdp, self.fsdp_config, bf16=self.bf16, fp16=self.fp16)
        self.activation_checkpointing_options()

    def activation_checkpointing_options(self) -> tuple[int, dict]:
        """`gradient_checkpointing_kwargs` split into (every, torch.utils.checkpoint kwargs);
        `every` is fasttrain's selective mode (checkpoint every k-th block)."""
        kwargs = self.gradient_checkpointing_kwargs
        if kwargs is not None and not isinstance(kwargs, dict):
            raise _bad("gradient_checkpointing_kwargs", kwargs, "must be a dict (e.g. {'every': 2}) or None")
        kwargs = dict(kwargs or {})
        every = kwargs.pop("every", 1)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise _bad("gradient_checkpointing_kwargs", self.gradient_checkpointing_kwargs,
                       "'every' must be a positive integer (1 = every block, k = every k-th block)")
        if kwargs.get("use_reentrant", False):
            raise _bad("gradient_checkpointing_kwargs", self.gradient_checkpointing_kwargs,
                       "use_reentrant=True is not supported (reentrant checkpointing breaks with FSDP "
                       "and torch.compile); drop the key, non-reentrant is used")
        kwargs["use_reentrant"] = False
        return every, kwargs

    def _check_choice(self, name: str, accepted: tuple):
        value = getattr(self, name)
        if value not in accepted:
            raise _bad(name, value, f"accepted values are {', '.join(accepted)}")

    # ---- derived quantities ---------------------------------------------------------
    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", "0"))

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    def get_warmup_steps(self, num_training_steps: int) -> int:
        if self.warmup_steps > 0:
            return self.warmup_steps
        return math.ceil(num_training_steps * self.warmup_ratio)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingArguments":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainingArguments got unknown field(s) {unknown}; "
                             f"see `fasttrain train --help` for the accepted names")
        return cls(**values)
