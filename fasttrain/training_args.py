"""TrainingArguments: the HuggingFace field names with the HuggingFace meaning.

Every field of transformers 5.24's TrainingArguments is accepted, plus fasttrain's own
(grouped last). Each value is validated in `__post_init__`, before any work starts; an
invalid value raises `ValueError` naming the field, the bad value and what to set instead.
A field that cannot apply here (uploading to the Hub, DeepSpeed) is rejected the same way
when set to anything but its default; none is silently ignored.

Value conversion lives here, in one place: JSON strings of dict fields, `warmup_steps` as a
ratio below 1, `report_to="none"`, the `gradient_checkpointing*` aliases. Annotations use
`Optional[list[str]]`-style types so `transformers.HfArgumentParser` can build flags.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Optional, Union

SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
)
METRIC_DRIVEN_SCHEDULES = ("reduce_lr_on_plateau", "greedy")  # stepped on evaluation metrics
STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
REPORT_TARGETS = ("none", "tensorboard", "jsonl", "all")
HF_ONLY_REPORT_TARGETS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive",
                          "flyte", "kubeflow", "mlflow", "neptune", "swanlab", "trackio", "wandb")
NONFINITE_POLICIES = ("skip", "stop")
DDP_BACKENDS = ("fasttrain", "torch", "nccl", "gloo")  # nccl/gloo: fasttrain's DDP on that group
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL, "passive": -1}
HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
TOKENS_SEEN_MODES = ("no", "all", "non_padding")
SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length", "batch_rebalance")
_FLAG = {"nargs": "?", "const": True}  # HfArgumentParser: `--name` alone means True
METRIC_INPUTS = ("inputs", "loss")
ACCELERATOR_CONFIG_DEFAULTS = {  # accelerate's AcceleratorConfig, as fasttrain already behaves
    "split_batches": False, "dispatch_batches": None, "even_batches": True,
    "use_seedable_sampler": True, "non_blocking": False, "gradient_accumulation_kwargs": None,
    "use_configured_state": False,
}
DICT_FIELDS = ("lr_scheduler_kwargs", "gradient_checkpointing_kwargs",
               "activation_checkpointing_kwargs", "fsdp_config", "accelerator_config",
               "liger_kernel_config")

# optim names: built from torch (or fasttrain), and HF's that need a third-party library
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "fasttrain_adamw", "adafactor", "sgd",
              "adagrad", "rmsprop")
_LIBRARY_OPTIMIZERS = {
    "bitsandbytes": ("adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit",
                     "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
                     "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb",
                     "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"),
    "torchao": ("adamw_torch_4bit", "adamw_torch_8bit"),
    "torch_xla": ("adamw_torch_xla",),
    "torch_npu": ("adamw_torch_npu_fused",),
    "torchdistx": ("adamw_anyprecision",),
    "galore_torch": ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
                     "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise"),
    "lomo_optim": ("lomo", "adalomo"),
    "grokadamw": ("grokadamw",),
    "schedulefree": ("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"),
    "apollo_torch": ("apollo_adamw", "apollo_adamw_layerwise"),
    "optimi": ("stable_adamw",),
}
LIBRARY_OPTIMIZERS = {name: lib for lib, names in _LIBRARY_OPTIMIZERS.items() for name in names}

# HF's liger_kernel_config keys -> fasttrain's equivalent (None: fasttrain has none)
LIGER_EQUIVALENTS = {"fused_linear_cross_entropy": "fused_loss", "cross_entropy": "fused_loss",
                     "rope": None, "rms_norm": None, "swiglu": None, "geglu": None,
                     "layer_norm": None}

# Set to anything but the default, these fields are refused: they cannot apply here.
CANNOT_APPLY = {
    "push_to_hub": "fasttrain has no Hub upload; save with trainer.save_model(dir) and run "
                   "`huggingface_hub.upload_folder(repo_id=..., folder_path=dir)` yourself",
    "hub_always_push": "only meaningful with push_to_hub, which fasttrain does not provide",
    "deepspeed": "fasttrain does not run DeepSpeed; shard the model with fsdp='full_shard' "
                 "(ZeRO-3 equivalent) or use data parallelism under torchrun",
    "parallelism_config": "fasttrain does not take accelerate's ParallelismConfig; use fsdp=... "
                          "for sharding and torchrun (--nproc-per-node) for data parallelism",
    "optim_target_modules": "it selects layers for GaLore/APOLLO, optimizers fasttrain does not "
                            "provide; remove it",
    "debug": "HF's debug options (underflow_overflow, tpu_metrics_debug) are not available; for "
             "non-finite values use nonfinite_loss_policy='stop'",
}

# Accepted and validated, but the behaviour is not in this build yet: refused when set, so
# nothing is silently ignored. Remove a line when its behaviour lands.
NOT_YET = {
}


def _bad(name: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"TrainingArguments.{name}={value!r} is invalid: {accepted}")


class ParallelMode(enum.Enum):
    """How this process trains alongside others; the values of HF's `ParallelMode`."""
    NOT_PARALLEL = "not_parallel"
    NOT_DISTRIBUTED = "not_distributed"
    DISTRIBUTED = "distributed"


def _parse_json_dict(name: str, value):
    """A dict field given as a JSON string (`'{"min_lr_rate": 0.1}'`) or a .json file path."""
    if not isinstance(value, str):
        return value
    text = value
    if not value.lstrip().startswith("{"):
        if not os.path.isfile(value):
            raise _bad(name, value, "a dict field takes a dict, a JSON object string such as "
                       "'{\"key\": 1}', or the path of a .json file (no such file)")
        with open(value, encoding="utf-8") as f:
            text = f.read()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(name, value, f"is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(parsed, dict):
        raise _bad(name, value, "must be a JSON object ({...})")
    return _typed_strings(parsed)


def parse_optim_args(text: Optional[str]) -> dict:
    """HF's `optim_args` ("momentum=0.9,nesterov=True") as typed keyword arguments."""
    pairs = {}
    for item in filter(None, (text or "").replace(" ", "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _bad("optim_args", text, "write 'key=value,key=value', e.g. 'momentum=0.9,nesterov=True'")
        pairs[key] = value
    return _typed_strings(pairs, signed=True)


def _typed_strings(values: dict, signed: bool = False) -> dict:
    """As HF: string values from a command line that spell a bool or a number become one
    (`signed`: also negative numbers and exponents, as optim_args needs)."""
    out = {}
    for key, v in values.items():
        if isinstance(v, dict):
            v = _typed_strings(v, signed)
        elif isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        elif isinstance(v, str) and v.isdigit():
            v = int(v)
        elif isinstance(v, str) and v.replace(".", "", 1).isdigit():
            v = float(v)
        elif signed and isinstance(v, str):
            with contextlib.suppress(ValueError):
                v = int(v) if v.lstrip("-").isdigit() else float(v)
        out[key] = v
    return out


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
        self._validate()
        self._validate_hf_fields()
        if (self.load_best_model_at_end or self.lr_scheduler_type in METRIC_DRIVEN_SCHEDULES) \
                and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.save_strategy == "best" and self.metric_for_best_model is None:  # HF's Trainer refuses it too
            raise _bad("metric_for_best_model", None, "`args.metric_for_best_model` must be provided with "
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
            setattr(self, name, _parse_json_dict(name, getattr(self, name)))
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

    # ---- validation of the long-standing fields -----------------------------------------
    def _validate(self):
        self._check_choice("lr_scheduler_type", SCHEDULER_TYPES)
        self._check_choice("eval_strategy", STRATEGIES)
        self._check_choice("save_strategy", SAVE_STRATEGIES)
        self._check_choice("logging_strategy", STRATEGIES)
        self._check_choice("nonfinite_loss_policy", NONFINITE_POLICIES)
        self._check_choice("ddp_backend", DDP_BACKENDS)
        self._check_optimizer()
        for target in self.report_to:
            if target not in REPORT_TARGETS:
                why = " (an HF integration fasttrain does not ship)" if target in HF_ONLY_REPORT_TARGETS else ""
                raise _bad("report_to", self.report_to, f"each entry must be one of {REPORT_TARGETS}; "
                           f"{target!r} is not{why}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "max_consecutive_nonfinite"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(name, value, "must be a positive integer (1 or more)")
        for name in ("learning_rate", "weight_decay", "adam_epsilon", "warmup_ratio",
                     "num_train_epochs", "ddp_bucket_cap_mb", "warmup_steps", "eval_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise _bad(name, value, "must be a finite number >= 0")
        if self.warmup_ratio > 1:
            raise _bad("warmup_ratio", self.warmup_ratio, "must be in [0, 1]")
        if self.warmup_steps > 1 and self.warmup_steps != int(self.warmup_steps):
            raise _bad("warmup_steps", self.warmup_steps, "a value >= 1 is a step count and must be "
                       "whole; a value < 1 is a ratio of the total steps")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise _bad(name, value, "must be in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise _bad("max_grad_norm", self.max_grad_norm, "must be >= 0 (0 or None disables clipping)")
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise _bad("max_steps", self.max_steps, "must be a positive integer, or -1 to use num_train_epochs")
        for name in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, name)
            if value is None or value <= 0:
                raise _bad(name, value, "must be > 0 (an integer step count, or a float < 1 as a ratio of the total steps)")
            if value > 1 and value != int(value):
                raise _bad(name, value, "must be a whole number of steps when above 1 (below 1 it is a ratio)")
        if not isinstance(self.ddp_heartbeat_timeout, (int, float)) or not self.ddp_heartbeat_timeout >= 0:
            raise _bad("ddp_heartbeat_timeout", self.ddp_heartbeat_timeout,
                       "must be seconds >= 0 (0 turns the hung-peer check off)")
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

    # ---- validation of the fields added for HF 5.24 parity ---------------------------------
    def _validate_hf_fields(self):
        if self.lr_scheduler_type in METRIC_DRIVEN_SCHEDULES and self.eval_strategy == "no":
            raise _bad("lr_scheduler_type", self.lr_scheduler_type, "changes the LR on evaluation "
                       "metrics, so it needs eval_strategy 'steps' or 'epoch'")
        self._check_choice("log_level", tuple(LOG_LEVELS))
        self._check_choice("log_level_replica", tuple(LOG_LEVELS))
        self._check_choice("hub_strategy", HUB_STRATEGIES)
        self._check_choice("include_num_input_tokens_seen", TOKENS_SEEN_MODES)
        self._check_choice("train_sampling_strategy", SAMPLING_STRATEGIES)
        if self.auto_find_batch_size and self.fsdp:
            raise _bad("auto_find_batch_size", self.auto_find_batch_size, "not supported with fsdp yet (a "
                       "retry would shard the model twice); set per_device_train_batch_size explicitly")
        if self.save_only_model and self.fsdp:
            raise _bad("save_only_model", self.save_only_model, "not supported with fsdp yet (sharded "
                       "checkpoints always hold the optimizer state); set save_only_model=False, and "
                       "trainer.save_model() writes the full model")
        if self.train_sampling_strategy == "batch_rebalance":
            raise _bad("train_sampling_strategy", self.train_sampling_strategy, "not supported by fasttrain "
                       "yet: 'random' (default), 'sequential' and 'group_by_length' are")
        for entry in self.include_for_metrics:
            if entry not in METRIC_INPUTS:
                raise _bad("include_for_metrics", self.include_for_metrics,
                           f"each entry must be one of {METRIC_INPUTS}")
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise _bad("label_smoothing_factor", self.label_smoothing_factor, "must be in [0, 1) (0 disables it)")
        if self.neftune_noise_alpha is not None and not self.neftune_noise_alpha > 0:
            raise _bad("neftune_noise_alpha", self.neftune_noise_alpha, "must be > 0, or None to disable NEFTune")
        for name in ("torch_empty_cache_steps", "eval_accumulation_steps", "dataloader_prefetch_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise _bad(name, value, "must be a positive integer, or None")
        if self.dataloader_prefetch_factor is not None and self.dataloader_num_workers == 0:
            raise _bad("dataloader_prefetch_factor", self.dataloader_prefetch_factor,
                       "only applies to worker processes: set dataloader_num_workers > 0 or leave it None")
        if self.dataloader_persistent_workers and self.dataloader_num_workers == 0:
            raise _bad("dataloader_persistent_workers", True,
                       "only applies to worker processes: set dataloader_num_workers > 0")
        if self.dataloader_multiprocessing_context not in (None, "fork", "spawn", "forkserver"):
            raise _bad("dataloader_multiprocessing_context", self.dataloader_multiprocessing_context,
                       "accepted values are fork, spawn, forkserver (or None for torch's default)")
        if self.fp16_full_eval and self.bf16_full_eval:
            raise ValueError("TrainingArguments: fp16_full_eval=True and bf16_full_eval=True are both set; choose one")
        if not self.average_tokens_across_devices and self.world_size > 1:
            raise _bad("average_tokens_across_devices", False, "fasttrain always divides the summed "
                       "loss by the token count of all ranks (the exact mean); leave it True")
        if self.save_on_each_node and self.world_size != int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)):
            raise _bad("save_on_each_node", True, "fasttrain writes checkpoints from global rank 0 "
                       "to a filesystem every node shares; leave it False")
        if self.ddp_broadcast_buffers and self.ddp_backend != "torch":
            raise _bad("ddp_broadcast_buffers", True, "fasttrain's DDP broadcasts buffers once, at "
                       "wrapping; for a broadcast before every forward set ddp_backend='torch'")
        parse_optim_args(self.optim_args)  # the syntax; the keys are checked against the optimizer
        self._validate_accelerator_config()
        self._validate_liger_config()
        defaults = _field_defaults()
        for name, instead in {**CANNOT_APPLY, **NOT_YET}.items():
            default = defaults[name]
            off = (None, "", False, [], {}) if default in (None, "", False) else (default,)
            if getattr(self, name) not in off:
                raise _bad(name, getattr(self, name), f"not supported by fasttrain: {instead}")

    def _validate_accelerator_config(self):
        config = self.accelerator_config
        if config is None:
            return
        if not isinstance(config, dict):  # accelerate's AcceleratorConfig object
            config = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
            self.accelerator_config = config
        for key, value in config.items():
            if key not in ACCELERATOR_CONFIG_DEFAULTS:
                raise _bad("accelerator_config", config, f"unknown key {key!r}; known keys are "
                           f"{sorted(ACCELERATOR_CONFIG_DEFAULTS)}")
            if key != "non_blocking" and value != ACCELERATOR_CONFIG_DEFAULTS[key]:
                raise _bad("accelerator_config", config, f"{key}={value!r} is not supported: fasttrain "
                           f"shards data itself as {key}={ACCELERATOR_CONFIG_DEFAULTS[key]!r} does")

    def _validate_liger_config(self):
        for key, enabled in (self.liger_kernel_config or {}).items():
            if key not in LIGER_EQUIVALENTS:
                raise _bad("liger_kernel_config", self.liger_kernel_config, f"unknown key {key!r}; "
                           f"known keys are {sorted(LIGER_EQUIVALENTS)}")
            if enabled and LIGER_EQUIVALENTS[key] is None:
                raise _bad("liger_kernel_config", self.liger_kernel_config, f"fasttrain has no "
                           f"kernel for {key!r}; set it to False (fasttrain fuses the loss: "
                           "fused_linear_cross_entropy)")

    def _check_optimizer(self):
        if self.optim in OPTIMIZERS:
            return
        lib = LIBRARY_OPTIMIZERS.get(self.optim)
        if lib is None:
            raise _bad("optim", self.optim, f"accepted values are {', '.join(OPTIMIZERS)} (HF's "
                       f"library-backed names: {', '.join(sorted(LIBRARY_OPTIMIZERS))})")
        import importlib.util
        state = "is not installed" if importlib.util.find_spec(lib) is None else \
            "is installed, but fasttrain does not build this optimizer"
        raise _bad("optim", self.optim, f"this optimizer comes from the `{lib}` library, which "
                   f"{state}; use one of {', '.join(OPTIMIZERS)}, or build it yourself and pass "
                   "Trainer(optimizers=(optimizer, None))")

    def _check_choice(self, name: str, accepted: tuple):
        value = getattr(self, name)
        if value not in accepted:
            raise _bad(name, value, f"accepted values are {', '.join(map(str, accepted))}")

    def _apply_tf32(self):
        import torch
        if self.tf32 and not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8):
            raise _bad("tf32", True, "TF32 needs an Ampere or newer NVIDIA GPU; leave tf32=None here")
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


def _field_defaults() -> dict:
    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# ---- field types, help and text conversion (the CLI flags and config files use these) -----
def _allowed_types(annotation) -> tuple:
    """The concrete types a field annotation admits: Optional[float] -> (float,),
    Union[None, str, list[str]] -> (str, list), Literal['a', False] -> (str, bool)."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        return tuple(t for a in typing.get_args(annotation) if a is not type(None)
                     for t in _allowed_types(a))
    if origin is Literal:
        return tuple(dict.fromkeys(type(a) for a in typing.get_args(annotation)))
    if origin is not None:  # list[str], dict[str, Any]
        return (origin,)
    return (annotation,) if isinstance(annotation, type) else (object,)


def field_types() -> dict:
    """{field name: the types its annotation admits}, from the resolved annotations."""
    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: _allowed_types(hints[f.name]) for f in dataclasses.fields(TrainingArguments)}


def _field_docs() -> dict:
    """Each field's documentation: its `metadata["help"]`, else the string literal written
    right under it in the class body (its docstring), else the comment on its line, else its
    line in training_args_help.FIELD_HELP."""
    import ast
    import inspect
    import io
    import tokenize
    source = inspect.getsource(TrainingArguments)
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    docs = {}
    body = ast.parse(source).body[0].body
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[name] = " ".join(after.value.value.split())
            elif node.lineno in comments:
                docs[name] = comments[node.lineno]
    for f in dataclasses.fields(TrainingArguments):
        if f.metadata.get("help"):
            docs[f.name] = f.metadata["help"]
    from fasttrain.training_args_help import FIELD_HELP
    return {**FIELD_HELP, **docs}  # a field's own documentation wins over the table


def field_help(name: str) -> str:
    return _field_docs().get(name, "")


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def convert_field_value(name: str, value):
    """A text value for field `name` (a command-line flag, or a YAML/JSON config value: YAML
    reads `1e-3` and `1e2` as strings) converted to the field's type. Non-strings pass
    through for __post_init__ to validate. Raises ValueError naming the field, the value and
    the fix."""
    if not isinstance(value, str):
        return value
    kinds = field_types()[name]
    text = value.strip()
    if bool in kinds and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    if int in kinds or float in kinds:
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None:
            if float in kinds:
                return int(number) if int in kinds and number.is_integer() else number
            if not number.is_integer():
                raise _bad(name, value, "must be a whole number")
            return int(number)
        if str not in kinds:
            raise _bad(name, value, "must be a number (e.g. 1e-3 or 0.001)")
    if list in kinds and (str not in kinds or "," in text):
        return [item.strip() for item in text.split(",") if item.strip()]
    if kinds and all(k in (int, float, bool) for k in kinds):
        raise _bad(name, value, f"must be {' or '.join(k.__name__ for k in kinds)}")
    return value


def check_field_types(args: "TrainingArguments") -> None:
    """A string where a number or bool belongs fails here, by name, instead of as a raw
    TypeError deep inside the optimizer or the schedule."""
    for name, kinds in field_types().items():
        value = getattr(args, name)
        if not isinstance(value, str) or str in kinds or object in kinds:
            continue
        try:
            fixed = convert_field_value(name, value)
        except ValueError:
            fixed = None
        hint = f"pass {name}={fixed!r} (a {type(fixed).__name__}, not a string)" if fixed is not None \
            else f"pass a {' or '.join(k.__name__ for k in kinds)}"
        raise _bad(name, value, f"is a string; {hint}")
