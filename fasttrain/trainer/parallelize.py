"""How the Trainer applies activation checkpointing and FSDP to the model it was given.

Order (torchtitan's): activation checkpointing -> per-block compile (the Instruments) ->
`fully_shard` per block and at the root -> the optimizer is built on the sharded
parameters. The blocks are the repeated block stacks per-block compile uses
(`find_repeated_blocks`: `transformer.h` of fasttrain's GPT and HF GPT-2, `model.layers` of
HF Llama).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from fasttrain.compile.apply import find_repeated_blocks
from fasttrain.distributed.fsdp import FSDPConfig, apply_fsdp, build_mesh
from fasttrain.models.activation_checkpointing import apply_activation_checkpointing

logger = logging.getLogger("fasttrain")


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block for name in find_repeated_blocks(model) for block in model.get_submodule(name)]


def fsdp_config_from_args(args) -> Optional[FSDPConfig]:
    return FSDPConfig.from_args(getattr(args, "fsdp", None), getattr(args, "fsdp_config", None),
                                bf16=args.bf16, fp16=args.fp16)


def checkpoint_activations_from_args(model: torch.nn.Module, args) -> int:
    """Apply activation checkpointing when `gradient_checkpointing` (or fsdp_config's
    `activation_checkpointing`) asks; returns the number of checkpointed blocks."""
    fsdp = fsdp_config_from_args(args)
    wanted = getattr(args, "gradient_checkpointing", False) or (fsdp is not None and fsdp.activation_checkpointing)
    if not wanted:
        return 0
    every, kwargs = args.activation_checkpointing_options()
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"TrainingArguments.gradient_checkpointing=True: {type(model).__name__} has no "
                         "repeated block stack (an nn.ModuleList of one block class) to checkpoint")
    return apply_activation_checkpointing(model, blocks, every=every, checkpoint_kwargs=kwargs)


def shard_from_args(model: torch.nn.Module, args, dist, optimizer_given: bool) -> Optional[FSDPConfig]:
    """`fully_shard` the model when `args.fsdp` asks (before the optimizer is built)."""
    config = fsdp_config_from_args(args)
    if config is None:
        return None
    if optimizer_given:
        raise ValueError("TrainingArguments.fsdp is set but Trainer(optimizers=...) was given an "
                         "optimizer built on the unsharded parameters; let the Trainer build it "
                         "(pass optimizers=(None, None)) or override create_optimizer()")
    if getattr(args, "master_weights", False):
        raise ValueError("TrainingArguments.master_weights=True with fsdp: FSDP keeps fp32 shards and "
                         "gathers bf16 copies itself (MixedPrecisionPolicy); drop master_weights")
    if config.offload and dist.device.type == "cpu":
        logger.warning("TrainingArguments.fsdp=%r: 'offload' keeps parameters and optimizer state in host "
                       "memory between their uses on an accelerator; this run is on the CPU, where they "
                       "already live, so it saves nothing here (FSDP's offload path still runs)", args.fsdp)
    blocks = repeated_blocks(model)
    if not blocks:
        logger.warning("fsdp: %s has no repeated block stack; sharding the root module only "
                       "(every parameter is gathered at once)", type(model).__name__)
    mesh = build_mesh(config, dist.device.type, dist.world_size)
    apply_fsdp(model, blocks, config, mesh)
    logger.info("fsdp: fully_shard on %d blocks + root over mesh %s (reshard_after_forward=%s, "
                "offload=%s, bf16 params=%s)", len(blocks), tuple(mesh.shape),
                config.reshard_after_forward, config.offload, config.bf16)
    return config
