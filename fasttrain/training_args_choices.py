"""What each TrainingArguments field accepts: the tables of accepted values, the optimizers
(fasttrain's and HF's library-backed ones), HF's fields refused because they cannot apply
here (`CANNOT_APPLY`) or are not implemented yet (`NOT_YET`), and the error every check
raises. Data only; `training_args_checks.py` applies it. Imports only the standard library.
"""
from __future__ import annotations

import enum
import logging
from typing import Any

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


def bad_value(name: str, value: Any, accepted: str) -> ValueError:
    """The error for a bad field value: names the field, the value and what to set instead."""
    return ValueError(f"TrainingArguments.{name}={value!r} is invalid: {accepted}")


class ParallelMode(enum.Enum):
    """How this process trains alongside others; the values of HF's `ParallelMode`."""
    NOT_PARALLEL = "not_parallel"
    NOT_DISTRIBUTED = "not_distributed"
    DISTRIBUTED = "distributed"
