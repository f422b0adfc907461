"""The checks TrainingArguments.__post_init__ runs after conversion: every value in its
range, choices among the accepted ones (`training_args_choices.py`), combinations that
cannot work together, and HF's refused fields. Functions of the arguments object they are
handed; each error names the field, the bad value and what to set instead.
"""
from __future__ import annotations

import dataclasses
import math
import os

from fasttrain.training_args_choices import (ACCELERATOR_CONFIG_DEFAULTS, CANNOT_APPLY, DDP_BACKENDS,
                                             HF_ONLY_REPORT_TARGETS, HUB_STRATEGIES, LIBRARY_OPTIMIZERS,
                                             LIGER_EQUIVALENTS, LOG_LEVELS, METRIC_DRIVEN_SCHEDULES,
                                             METRIC_INPUTS, NONFINITE_POLICIES, NOT_YET, OPTIMIZERS,
                                             REPORT_TARGETS, SAMPLING_STRATEGIES, SAVE_STRATEGIES,
                                             SCHEDULER_TYPES, STRATEGIES, TOKENS_SEEN_MODES, bad_value)
from fasttrain.training_args_fields import field_defaults, parse_optim_args


def validate(args) -> None:
    """The long-standing fields, after conversion; raises ValueError naming the field."""
    _check_choice(args, "lr_scheduler_type", SCHEDULER_TYPES)
    _check_choice(args, "eval_strategy", STRATEGIES)
    _check_choice(args, "save_strategy", SAVE_STRATEGIES)
    _check_choice(args, "logging_strategy", STRATEGIES)
    _check_choice(args, "nonfinite_loss_policy", NONFINITE_POLICIES)
    _check_choice(args, "ddp_backend", DDP_BACKENDS)
    _check_optimizer(args)
    for target in args.report_to:
        if target not in REPORT_TARGETS:
            why = " (an HF integration fasttrain does not ship)" if target in HF_ONLY_REPORT_TARGETS else ""
            raise bad_value("report_to", args.report_to, f"each entry must be one of {REPORT_TARGETS}; "
                            f"{target!r} is not{why}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "max_consecutive_nonfinite"):
        value = getattr(args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad_value(name, value, "must be a positive integer (1 or more)")
    for name in ("learning_rate", "weight_decay", "adam_epsilon", "warmup_ratio",
                 "num_train_epochs", "ddp_bucket_cap_mb", "warmup_steps", "eval_delay"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise bad_value(name, value, "must be a finite number >= 0")
    if args.warmup_ratio > 1:
        raise bad_value("warmup_ratio", args.warmup_ratio, "must be in [0, 1]")
    if args.warmup_steps > 1 and args.warmup_steps != int(args.warmup_steps):
        raise bad_value("warmup_steps", args.warmup_steps, "a value >= 1 is a step count and must be "
                        "whole; a value < 1 is a ratio of the total steps")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            raise bad_value(name, value, "must be in [0, 1)")
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        raise bad_value("max_grad_norm", args.max_grad_norm, "must be >= 0 (0 or None disables clipping)")
    if not isinstance(args.max_steps, int) or args.max_steps == 0 or args.max_steps < -1:
        raise bad_value("max_steps", args.max_steps, "must be a positive integer, or -1 to use num_train_epochs")
    for name in ("logging_steps", "save_steps", "eval_steps"):
        value = getattr(args, name)
        if value is None or value <= 0:
            raise bad_value(name, value, "must be > 0 (an integer step count, or a float < 1 as a ratio of the total steps)")
        if value > 1 and value != int(value):
            raise bad_value(name, value, "must be a whole number of steps when above 1 (below 1 it is a ratio)")
    if not isinstance(args.ddp_heartbeat_timeout, (int, float)) or not args.ddp_heartbeat_timeout >= 0:
        raise bad_value("ddp_heartbeat_timeout", args.ddp_heartbeat_timeout,
                        "must be seconds >= 0 (0 turns the hung-peer check off)")
    if args.dataloader_num_workers < 0:
        raise bad_value("dataloader_num_workers", args.dataloader_num_workers, "must be >= 0")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise bad_value("save_total_limit", args.save_total_limit, "must be >= 1, or None to keep every checkpoint")
    if args.fp16 and args.bf16:
        raise ValueError("TrainingArguments: fp16=True and bf16=True are both set; choose one "
                         "(bf16 needs no loss scaling; fp16 uses fasttrain's dynamic loss scaler)")
    if args.master_weights and not (args.bf16 or args.fp16):
        raise bad_value("master_weights", True, "needs bf16=True or fp16=True (it keeps fp32 master "
                        "copies of low-precision weights)")
    if args.master_weights and args.optim != "fasttrain_adamw":
        raise bad_value("master_weights", True, f"needs optim='fasttrain_adamw' (got {args.optim!r})")
    if args.load_best_model_at_end:
        if args.save_strategy == "no":
            raise bad_value("save_strategy", "no", "load_best_model_at_end=True needs checkpoints: "
                            "set save_strategy to 'steps', 'epoch' or 'best'")
        if args.eval_strategy == "no":
            raise bad_value("eval_strategy", "no", "load_best_model_at_end=True needs evaluation: "
                            "set eval_strategy to 'steps' or 'epoch'")
        if (args.save_strategy in ("steps", "epoch") and args.save_strategy != args.eval_strategy):
            raise bad_value("save_strategy", args.save_strategy, "load_best_model_at_end=True needs "
                            f"save_strategy to match eval_strategy ({args.eval_strategy!r}) or be 'best'")
        if (args.save_strategy == "steps" and args.eval_strategy == "steps"
                and args.save_steps % args.eval_steps):
            raise bad_value("save_steps", args.save_steps, "load_best_model_at_end=True needs "
                            f"save_steps to be a multiple of eval_steps ({args.eval_steps}), so the "
                            "best evaluation always has a checkpoint")
    if args.save_strategy == "best" and args.eval_strategy == "no":
        raise bad_value("save_strategy", "best", "needs eval_strategy 'steps' or 'epoch' to find the best")
    if args.profiler_trace_steps is not None:
        try:
            start, end = (int(x) for x in str(args.profiler_trace_steps).split(":"))
            assert 0 <= start < end
        except (ValueError, AssertionError):
            raise bad_value("profiler_trace_steps", args.profiler_trace_steps,
                            "must be 'START:END' with 0 <= START < END, e.g. '10:12'") from None
    _validate_sharding(args)
    if os.path.isfile(args.output_dir):
        raise bad_value("output_dir", args.output_dir, "is an existing file; point output_dir at a "
                        "directory (it is created if missing)")


def _validate_sharding(args) -> None:
    from fasttrain.distributed.fsdp import FSDPConfig
    FSDPConfig.from_args(args.fsdp, args.fsdp_config, bf16=args.bf16, fp16=args.fp16)
    args.activation_checkpointing_options()


def validate_hf_fields(args) -> None:
    """The fields added for HF 5.24 parity, and the refused ones (CANNOT_APPLY, NOT_YET)."""
    if args.lr_scheduler_type in METRIC_DRIVEN_SCHEDULES and args.eval_strategy == "no":
        raise bad_value("lr_scheduler_type", args.lr_scheduler_type, "changes the LR on evaluation "
                        "metrics, so it needs eval_strategy 'steps' or 'epoch'")
    _check_choice(args, "log_level", tuple(LOG_LEVELS))
    _check_choice(args, "log_level_replica", tuple(LOG_LEVELS))
    _check_choice(args, "hub_strategy", HUB_STRATEGIES)
    _check_choice(args, "include_num_input_tokens_seen", TOKENS_SEEN_MODES)
    _check_choice(args, "train_sampling_strategy", SAMPLING_STRATEGIES)
    if args.auto_find_batch_size and args.fsdp:
        raise bad_value("auto_find_batch_size", args.auto_find_batch_size, "not supported with fsdp yet (a "
                        "retry would shard the model twice); set per_device_train_batch_size explicitly")
    if args.save_only_model and args.fsdp:
        raise bad_value("save_only_model", args.save_only_model, "not supported with fsdp yet (sharded "
                        "checkpoints always hold the optimizer state); set save_only_model=False, and "
                        "trainer.save_model() writes the full model")
    if args.train_sampling_strategy == "batch_rebalance":
        raise bad_value("train_sampling_strategy", args.train_sampling_strategy, "not supported by fasttrain "
                        "yet: 'random' (default), 'sequential' and 'group_by_length' are")
    for entry in args.include_for_metrics:
        if entry not in METRIC_INPUTS:
            raise bad_value("include_for_metrics", args.include_for_metrics,
                            f"each entry must be one of {METRIC_INPUTS}")
    if not 0.0 <= args.label_smoothing_factor < 1.0:
        raise bad_value("label_smoothing_factor", args.label_smoothing_factor, "must be in [0, 1) (0 disables it)")
    if args.neftune_noise_alpha is not None and not args.neftune_noise_alpha > 0:
        raise bad_value("neftune_noise_alpha", args.neftune_noise_alpha, "must be > 0, or None to disable NEFTune")
    for name in ("torch_empty_cache_steps", "eval_accumulation_steps", "dataloader_prefetch_factor"):
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise bad_value(name, value, "must be a positive integer, or None")
    if args.dataloader_prefetch_factor is not None and args.dataloader_num_workers == 0:
        raise bad_value("dataloader_prefetch_factor", args.dataloader_prefetch_factor,
                        "only applies to worker processes: set dataloader_num_workers > 0 or leave it None")
    if args.dataloader_persistent_workers and args.dataloader_num_workers == 0:
        raise bad_value("dataloader_persistent_workers", True,
                        "only applies to worker processes: set dataloader_num_workers > 0")
    if args.dataloader_multiprocessing_context not in (None, "fork", "spawn", "forkserver"):
        raise bad_value("dataloader_multiprocessing_context", args.dataloader_multiprocessing_context,
                        "accepted values are fork, spawn, forkserver (or None for torch's default)")
    if args.fp16_full_eval and args.bf16_full_eval:
        raise ValueError("TrainingArguments: fp16_full_eval=True and bf16_full_eval=True are both set; choose one")
    if not args.average_tokens_across_devices and args.world_size > 1:
        raise bad_value("average_tokens_across_devices", False, "fasttrain always divides the summed "
                        "loss by the token count of all ranks (the exact mean); leave it True")
    if args.save_on_each_node and args.world_size != int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size)):
        raise bad_value("save_on_each_node", True, "fasttrain writes checkpoints from global rank 0 "
                        "to a filesystem every node shares; leave it False")
    if args.ddp_broadcast_buffers and args.ddp_backend != "torch":
        raise bad_value("ddp_broadcast_buffers", True, "fasttrain's DDP broadcasts buffers once, at "
                        "wrapping; for a broadcast before every forward set ddp_backend='torch'")
    parse_optim_args(args.optim_args)  # the syntax; the keys are checked against the optimizer
    _validate_accelerator_config(args)
    _validate_liger_config(args)
    defaults = field_defaults(type(args))
    for name, instead in {**CANNOT_APPLY, **NOT_YET}.items():
        default = defaults[name]
        off = (None, "", False, [], {}) if default in (None, "", False) else (default,)
        if getattr(args, name) not in off:
            raise bad_value(name, getattr(args, name), f"not supported by fasttrain: {instead}")


def _validate_accelerator_config(args) -> None:
    config = args.accelerator_config
    if config is None:
        return
    if not isinstance(config, dict):  # accelerate's AcceleratorConfig object
        config = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        args.accelerator_config = config
    for key, value in config.items():
        if key not in ACCELERATOR_CONFIG_DEFAULTS:
            raise bad_value("accelerator_config", config, f"unknown key {key!r}; known keys are "
                            f"{sorted(ACCELERATOR_CONFIG_DEFAULTS)}")
        if key != "non_blocking" and value != ACCELERATOR_CONFIG_DEFAULTS[key]:
            raise bad_value("accelerator_config", config, f"{key}={value!r} is not supported: fasttrain "
                            f"shards data itself as {key}={ACCELERATOR_CONFIG_DEFAULTS[key]!r} does")


def _validate_liger_config(args) -> None:
    for key, enabled in (args.liger_kernel_config or {}).items():
        if key not in LIGER_EQUIVALENTS:
            raise bad_value("liger_kernel_config", args.liger_kernel_config, f"unknown key {key!r}; "
                            f"known keys are {sorted(LIGER_EQUIVALENTS)}")
        if enabled and LIGER_EQUIVALENTS[key] is None:
            raise bad_value("liger_kernel_config", args.liger_kernel_config, f"fasttrain has no "
                            f"kernel for {key!r}; set it to False (fasttrain fuses the loss: "
                            "fused_linear_cross_entropy)")


def _check_optimizer(args) -> None:
    if args.optim in OPTIMIZERS:
        return
    lib = LIBRARY_OPTIMIZERS.get(args.optim)
    if lib is None:
        raise bad_value("optim", args.optim, f"accepted values are {', '.join(OPTIMIZERS)} (HF's "
                        f"library-backed names: {', '.join(sorted(LIBRARY_OPTIMIZERS))})")
    import importlib.util
    state = "is not installed" if importlib.util.find_spec(lib) is None else \
        "is installed, but fasttrain does not build this optimizer"
    raise bad_value("optim", args.optim, f"this optimizer comes from the `{lib}` library, which "
                    f"{state}; use one of {', '.join(OPTIMIZERS)}, or build it yourself and pass "
                    "Trainer(optimizers=(optimizer, None))")


def _check_choice(args, name: str, accepted: tuple) -> None:
    value = getattr(args, name)
    if value not in accepted:
        raise bad_value(name, value, f"accepted values are {', '.join(map(str, accepted))}")
