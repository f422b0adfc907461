"""TrainingArguments: the HuggingFace field names with the HuggingFace meaning.

Every field of transformers 5.24's TrainingArguments is accepted, plus fasttrain's own
(grouped last). Each value is validated in `__post_init__`, before any work starts; an
invalid value raises `ValueError` naming the field, the bad value and what to set instead.
A field that cannot apply here (uploading to the Hub, DeepSpeed) is rejected the same way
when set to anything but its default; none is silently ignored.

Value conversion lives here, in one place (`_normalise`): JSON strings of dict fields,
`warmup_steps` as a ratio below 1, `report_to="none"`, the `gradient_checkpointing*` aliases.
Annotations use `Optional[list[str]]`-style types so `transformers.HfArgumentParser` can
build flags. Beside this file, by concern: the accepted values and refused fields
(`training_args_choices.py`), the checks `__post_init__` runs (`training_args_checks.py`),
field types, help and text conversion (`training_args_fields.py`), one line of help per
field (`training_args_help.py`). Every public name stays importable from here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Optional, Union

from fasttrain import training_args_fields as _fields
# the tables are public here too (the import surface of this module is unchanged)
from fasttrain.training_args_choices import (  # noqa: F401 - re-exported
    ACCELERATOR_CONFIG_DEFAULTS, CANNOT_APPLY, DDP_BACKENDS, DICT_FIELDS, HF_ONLY_REPORT_TARGETS,
    HUB_STRATEGIES, LIBRARY_OPTIMIZERS, LIGER_EQUIVALENTS, LOG_LEVELS, METRIC_DRIVEN_SCHEDULES,
    METRIC_INPUTS, NONFINITE_POLICIES, NOT_YET, OPTIMIZERS, REPORT_TARGETS, SAMPLING_STRATEGIES,
    SAVE_STRATEGIES, SCHEDULER_TYPES, STRATEGIES, TOKENS_SEEN_MODES, ParallelMode, bad_value)
from fasttrain.training_args_checks import validate, validate_hf_fields
from fasttrain.training_args_fields import parse_json_dict, parse_optim_args  # noqa: F401 - re-exported

_FLAG = {"nargs": "?", "const": True}  # HfArgumentParser: `--name` alone means True


@dataclass
class TrainingArguments:
    # ---- output, run control (HF) -----------------------------------------------------
    output_dir: Optional[str] = None  # None -> "trainer_output", as HF
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    resume_from_checkpoint: Optional[str] = None
    local_rank: int = -1  # torch.distributed.launch passes it; read local_process_index instead

    # ---- optimisation (HF) -----------------------------------------------------------
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: Union[dict, str, None] = None
    warmup_steps: float = 0  # >= 1: steps; < 1: a ratio of the total steps (HF 5)
    optim: str = "adamw_torch_fused"
    optim_args: Optional[str] = None  # "key=value,key=value", passed to the optimizer
    optim_target_modules: Union[None, str, list[str]] = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    average_tokens_across_devices: bool = True
    label_smoothing_factor: float = 0.0
    auto_find_batch_size: bool = False

    # ---- precision, compile, kernels (HF) ----------------------------------------------
    bf16: bool = False
    fp16: bool = False
    bf16_full_eval: bool = False
    fp16_full_eval: bool = False
    tf32: Optional[bool] = None
    activation_checkpointing: Optional[bool] = field(default=None, metadata=_FLAG)
    activation_checkpointing_kwargs: Union[dict, str, None] = None
    gradient_checkpointing: Optional[bool] = field(default=None, metadata=_FLAG)  # the older name
    gradient_checkpointing_kwargs: Union[dict, str, None] = None  # + fasttrain's "every": k-th block
    torch_compile: bool = False
    torch_compile_backend: Optional[str] = None  # default inductor
    torch_compile_mode: Optional[str] = None
    use_liger_kernel: bool = False  # -> fasttrain's fused linear cross-entropy loss
    liger_kernel_config: Union[dict, str, None] = None
    use_cache: bool = False
    neftune_noise_alpha: Optional[float] = None
    torch_empty_cache_steps: Optional[int] = None
    use_cpu: bool = False

    # ---- logging (HF) -----------------------------------------------------------------
    logging_strategy: str = "steps"
    logging_steps: float = 500
    logging_first_step: bool = False
    log_on_each_node: bool = True
    logging_nan_inf_filter: bool = True
    include_num_input_tokens_seen: Union[str, bool] = "no"
    log_level: str = "passive"
    log_level_replica: str = "warning"
    disable_tqdm: Optional[bool] = None
    report_to: Union[None, str, list[str]] = "jsonl"  # HF's default is "none"
    run_name: Optional[str] = None
    project: str = "huggingface"
    trackio_space_id: Optional[str] = None
    trackio_bucket_id: Optional[str] = None
    trackio_static_space_id: Union[str, None, Literal[False]] = None
    skip_memory_metrics: bool = True

    # ---- evaluation (HF) ----------------------------------------------------------------
    eval_strategy: str = "no"
    eval_steps: Optional[float] = None  # None -> logging_steps
    eval_delay: float = 0
    prediction_loss_only: bool = False
    eval_on_start: bool = False
    eval_do_concat_batches: bool = True
    eval_use_gather_object: bool = False
    eval_accumulation_steps: Optional[int] = None  # fasttrain moves predictions off the device every batch
    include_for_metrics: list[str] = field(default_factory=list)
    batch_eval_metrics: bool = False

    # ---- saving, best model, hub (HF) -------------------------------------------------------
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: Optional[int] = None
    save_only_model: bool = False
    save_on_each_node: bool = False
    enable_jit_checkpoint: bool = False  # fasttrain always checkpoints on SIGTERM
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    ignore_data_skip: bool = False
    restore_callback_states_from_checkpoint: bool = False
    push_to_hub: bool = False
    hub_token: Optional[str] = None
    hub_private_repo: Optional[bool] = None
    hub_model_id: Optional[str] = None
    hub_strategy: str = "every_save"
    hub_always_push: bool = False
    hub_revision: Optional[str] = None

    # ---- reproducibility, data (HF) -----------------------------------------------------------
    seed: int = 42
    data_seed: Optional[int] = None
    full_determinism: bool = False
    dataloader_drop_last: bool = False
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: Optional[int] = None
    dataloader_multiprocessing_context: Optional[str] = None
    dataloader_in_order: bool = True
    remove_unused_columns: bool = True
    label_names: Optional[list[str]] = None
    train_sampling_strategy: str = "random"
    length_column_name: str = "length"
    accelerator_config: Union[dict, str, None] = None
    parallelism_config: Optional[Any] = None

    # ---- distributed (HF) ---------------------------------------------------------------
    ddp_backend: Optional[str] = "fasttrain"
    ddp_timeout: int = 1800
    ddp_bucket_cap_mb: Optional[float] = 25.0
    ddp_find_unused_parameters: Optional[bool] = None
    ddp_broadcast_buffers: Optional[bool] = None
    ddp_static_graph: Optional[bool] = None
    fsdp: Optional[str] = field(default=None, metadata=_FLAG)  # or a list, or True (full_shard)
    fsdp_config: Union[dict, str, None] = None
    deepspeed: Union[dict, str, None] = None
    debug: Union[str, list[str]] = ""

    # ---- fasttrain's own ---------------------------------------------------------------------
    overwrite_output_dir: bool = False
    warmup_ratio: float = 0.0  # removed from HF 5 (warmup_steps < 1 is the ratio); kept here
    evaluation_strategy: Optional[str] = None  # the older spelling; copied into eval_strategy
    logging_dir: Optional[str] = None
    master_weights: bool = False
    torch_compile_per_block: bool = True
    torch_compile_cache_dir: Optional[str] = None  # default ~/.cache/fasttrain/inductor
    fused_loss: bool = True
    nonfinite_loss_policy: str = "skip"
    cuda_graph_optimizer: bool = False
    max_consecutive_nonfinite: int = 10
    profile: bool = True
    profile_warmup_steps: int = 3
    profiler_trace_steps: Optional[str] = None  # "START:END", e.g. "10:12"
    flops_per_token: Optional[float] = None
    peak_tflops: Optional[float] = None
    ddp_heartbeat_timeout: float = 60.0
    """Seconds without a heartbeat from a peer rank (stopped, frozen) before every rank stops
    with an error naming it, instead of waiting ddp_timeout; 0 turns the check off."""

    def __post_init__(self):
        check_field_types(self)
        self._normalise()
        validate(self)
        validate_hf_fields(self)
        if (self.load_best_model_at_end or self.lr_scheduler_type in METRIC_DRIVEN_SCHEDULES) \
                and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.save_strategy == "best" and self.metric_for_best_model is None:  # HF's Trainer refuses it too
            raise bad_value("metric_for_best_model", None, "`args.metric_for_best_model` must be provided with "
                            "save_strategy='best': name the metric that decides it ('loss', or a key "
                            "compute_metrics returns)")
        if self.tf32 is not None:
            self._apply_tf32()

    # ---- conversion --------------------------------------------------------------------
    def _normalise(self):
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        self.output_dir = os.path.expanduser(self.output_dir)
        for name in DICT_FIELDS:
            setattr(self, name, parse_json_dict(name, getattr(self, name)))
        # gradient_checkpointing* are HF's older names: used only when the new one is unset,
        # then mirrored, so code reading either name sees the same value
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
            setattr(self, old, getattr(self, new))
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing = False
        if isinstance(self.include_num_input_tokens_seen, bool):
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        self.evaluation_strategy = self.eval_strategy
        if self.eval_strategy != "no":
            self.do_eval = True
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        self.report_to = [t for t in (self.report_to or []) if t != "none"]
        if "all" in self.report_to:
            self.report_to = ["jsonl", "tensorboard"]
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "logs")
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if self.disable_tqdm is None:
            self.disable_tqdm = False
        if self.ddp_bucket_cap_mb is None:
            self.ddp_bucket_cap_mb = 25.0
        if self.ddp_backend is None:
            self.ddp_backend = "fasttrain"
        self.debug = (self.debug or "").split() if isinstance(self.debug, (str, type(None))) else self.debug
        if isinstance(self.fsdp, list):
            self.fsdp = " ".join(self.fsdp)
        if self.fsdp is True:
            self.fsdp = "full_shard"
        if not self.fsdp:  # HF scripts pass fsdp=False or "" for "off"
            self.fsdp = None
        if self.fsdp_config is not None:  # HF also accepts accelerate's `fsdp_`-prefixed keys
            self.fsdp_config = {k[5:] if k.startswith("fsdp_") else k: v
                                for k, v in self.fsdp_config.items()}
        if self.use_liger_kernel:
            self.fused_loss = True

    def activation_checkpointing_options(self) -> tuple[int, dict]:
        """`gradient_checkpointing_kwargs` split into (every, torch.utils.checkpoint kwargs);
        `every` is fasttrain's selective mode (checkpoint every k-th block)."""
        kwargs = self.gradient_checkpointing_kwargs
        if kwargs is not None and not isinstance(kwargs, dict):
            raise bad_value("gradient_checkpointing_kwargs", kwargs, "must be a dict (e.g. {'every': 2}) or None")
        kwargs = dict(kwargs or {})
        every = kwargs.pop("every", 1)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise bad_value("gradient_checkpointing_kwargs", self.gradient_checkpointing_kwargs,
                            "'every' must be a positive integer (1 = every block, k = every k-th block)")
        if kwargs.get("use_reentrant", False):
            raise bad_value("gradient_checkpointing_kwargs", self.gradient_checkpointing_kwargs,
                            "use_reentrant=True is not supported (reentrant checkpointing breaks with FSDP "
                            "and torch.compile); drop the key, non-reentrant is used")
        kwargs["use_reentrant"] = False
        return every, kwargs

    def _apply_tf32(self):
        import torch
        if self.tf32 and not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8):
            raise bad_value("tf32", True, "TF32 needs an Ampere or newer NVIDIA GPU; leave tf32=None here")
        torch.backends.cuda.matmul.allow_tf32 = bool(self.tf32)
        torch.backends.cudnn.allow_tf32 = bool(self.tf32)

    # ---- the process's place in the job (HF's properties) --------------------------------
    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", "0"))

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def device(self):
        import torch
        if torch.cuda.is_available() and not self.use_cpu:
            return torch.device("cuda", self.local_process_index if self.world_size > 1 else torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def n_gpu(self) -> int:
        """GPUs this process drives: fasttrain runs one device per process (no DataParallel)."""
        return 1 if self.device.type == "cuda" else 0

    @property
    def parallel_mode(self) -> ParallelMode:
        return ParallelMode.DISTRIBUTED if self.world_size > 1 else ParallelMode.NOT_PARALLEL

    @property
    def should_log(self) -> bool:
        return (self.local_process_index if self.log_on_each_node else self.process_index) == 0

    @property
    def should_save(self) -> bool:
        return self.process_index == 0  # fasttrain writes from global rank 0 (shared filesystem)

    @property
    def place_model_on_device(self) -> Optional[bool]:
        return None  # as HF: no integration overrides where the model goes

    @property
    def ddp_timeout_delta(self) -> timedelta:
        return timedelta(seconds=self.ddp_timeout)

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    def get_process_log_level(self) -> int:
        """The logging level of this process: log_level on the processes that log (should_log),
        log_level_replica on the others; 'passive' keeps the current level."""
        name = self.log_level if self.should_log else self.log_level_replica
        level = LOG_LEVELS[name]
        return logging.getLogger("fasttrain").getEffectiveLevel() if level == -1 else level

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work"):
        """Run the block on the main process (of each node with local=True) first, then on the
        others, e.g. `datasets.map` so replicas reuse its cache. Starts the process group
        when the job runs under torchrun and no group exists yet (the Trainer reuses it)."""
        if self.world_size <= 1:
            yield
            return
        from fasttrain.distributed import barrier
        from fasttrain.distributed.context import DistContext
        DistContext.from_args(self)  # joins the torchrun group (or reuses an existing one)
        is_main = (self.local_process_index if local else self.process_index) == 0
        if not is_main:
            barrier()  # wait for the main process to finish `desc`
        try:
            yield
        finally:
            if is_main:
                barrier()  # release the replicas

    def get_warmup_steps(self, num_training_steps: int) -> int:
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        ratio = self.warmup_steps if self.warmup_steps > 0 else self.warmup_ratio
        return math.ceil(num_training_steps * ratio)

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = f"<{f.name.upper()}>" if f.name.endswith("_token") and value else value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    def to_sanitized_dict(self) -> dict:
        """Scalars only (TensorBoard's hparams): anything else as its string."""
        d = {**self.to_dict(), "train_batch_size": self.train_batch_size,
             "eval_batch_size": self.eval_batch_size}
        return {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingArguments":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainingArguments got unknown field(s) {unknown}; "
                             f"see `fasttrain train --help` for the accepted names")
        return cls(**values)


# ---- field types, help and text conversion (the CLI flags and config files use these) -----
def field_types() -> dict:
    """{field name: the types its annotation admits}, from the resolved annotations."""
    return _fields.field_types(TrainingArguments)


def field_help(name: str) -> str:
    return _fields.field_docs(TrainingArguments).get(name, "")


def convert_field_value(name: str, value):
    """A text value for field `name` (a command-line flag, or a YAML/JSON config value)
    converted to the field's type; see training_args_fields.convert_value."""
    return _fields.convert_value(TrainingArguments, name, value)


def check_field_types(args: "TrainingArguments") -> None:
    """A string where a number or bool belongs fails here, by name."""
    _fields.check_types(args)
