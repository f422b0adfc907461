"""Sharded data parallelism with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

`apply_fsdp` shards a model in place: `fully_shard` on every block the caller names (the
repeated block stack the per-block compile uses, found by the Trainer) and then on the root,
so parameters are all-gathered block by block in forward/backward and gradients are
reduce-scattered block by block while backward continues (torchtitan's `apply_fsdp`). The
parameters become `DTensor`s sharded on dim 0; an optimizer built afterwards keeps its state
on the local shards only.

Modes (HF's `TrainingArguments.fsdp` names; several may be combined in one string):
  full_shard      shard parameters, gradients and optimizer state; re-gather in backward
  shard_grad_op   the same, but parameters stay gathered after forward (no second gather)
  hybrid_shard    2-D mesh (nodes, local ranks): shard within a node, replicate across nodes
  offload         parameters, gradients and optimizer state live in CPU memory
  auto_wrap       accepted for HF compatibility: blocks are always wrapped one by one
Under bf16 (fp16) the policy is MixedPrecisionPolicy(param_dtype=bf16 (fp16),
reduce_dtype=fp32): the all-gathered weights are bf16 (fp16), gradients are reduced in fp32
into fp32 shards. With fp16 the loss scaler unscales the local shards and agrees on an
overflow over the shard group (`shard_groups`), so every rank skips the same steps.

This module knows nothing of the Trainer; it imports only torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "offload",
                "auto_wrap", "no_shard")
FSDP_CONFIG_KEYS = ("reshard_after_forward", "activation_checkpointing", "num_replicas")
# HF/accelerate keys that FSDP2 per-block wrapping makes moot: accepted, logged, not used
FSDP_CONFIG_MOOT = ("min_num_params", "transformer_layer_cls_to_wrap", "version", "backward_prefetch",
                    "forward_prefetch", "limit_all_gathers", "use_orig_params", "sync_module_states",
                    "cpu_ram_efficient_loading", "state_dict_type", "auto_wrap_policy", "xla",
                    "xla_fsdp_settings", "xla_fsdp_grad_ckpt", "xla_fsdp_v2", "offload_params",
                    "sharding_strategy", "cpu_offload", "activation_cpu_offload")


@dataclass
class FSDPConfig:
    """What `apply_fsdp` does; built from `TrainingArguments.fsdp` / `fsdp_config` by
    `FSDPConfig.from_args` (validated there, naming the field)."""

    reshard_after_forward: bool = True
    hybrid: bool = False
    num_replicas: Optional[int] = None  # hybrid: the replicate dimension (default: nodes)
    offload: bool = False
    bf16: bool = False
    fp16: bool = False
    activation_checkpointing: bool = False
    options: tuple = field(default_factory=tuple)

    @classmethod
    def from_args(cls, fsdp: Union[str, list, None], fsdp_config: Optional[dict] = None,
                  bf16: bool = False, fp16: bool = False) -> Optional["FSDPConfig"]:
        options = parse_fsdp_option(fsdp)
        if not options:
            return None
        config = dict(fsdp_config or {})
        config = {k[5:] if k.startswith("fsdp_") else k: v for k, v in config.items()}
        unknown = sorted(k for k in config if k not in FSDP_CONFIG_KEYS + FSDP_CONFIG_MOOT)
        if unknown:
            raise ValueError(f"TrainingArguments.fsdp_config has unknown key(s) {unknown}; used: "
                             f"{', '.join(FSDP_CONFIG_KEYS)}; accepted from HF/accelerate and not needed "
                             f"with FSDP2's per-block wrapping: {', '.join(FSDP_CONFIG_MOOT)}")
        if "no_shard" in options:
            raise ValueError("TrainingArguments.fsdp='no_shard' is plain data parallelism: leave "
                             "fsdp empty to get fasttrain's DDP, or use 'full_shard'")
        sharding = [o for o in options if o in ("full_shard", "shard_grad_op", "hybrid_shard",
                                                "hybrid_shard_zero2")]
        if len(sharding) > 1:
            raise ValueError(f"TrainingArguments.fsdp={fsdp!r} names several sharding strategies "
                             f"{sharding}; choose one")
        strategy = sharding[0] if sharding else "full_shard"
        reshard = strategy in ("full_shard", "hybrid_shard")
        reshard = bool(config.get("reshard_after_forward", reshard))
        replicas = config.get("num_replicas")
        if replicas is not None and (not isinstance(replicas, int) or replicas < 1):
            raise ValueError(f"TrainingArguments.fsdp_config['num_replicas']={replicas!r} must be a "
                             "positive integer (the number of model replicas in hybrid_shard)")
        return cls(reshard_after_forward=reshard, hybrid=strategy.startswith("hybrid"),
                   num_replicas=replicas, offload="offload" in options, bf16=bf16, fp16=fp16,
                   activation_checkpointing=bool(config.get("activation_checkpointing", False)),
                   options=tuple(options))


def parse_fsdp_option(fsdp: Union[str, list, tuple, None]) -> list[str]:
    """HF's `fsdp` value ('full_shard auto_wrap', ['full_shard', 'offload'], '' or None) as a
    list of options; an unknown option is an error naming it."""
    if fsdp is None or fsdp is False:
        return []
    if fsdp is True:
        return ["full_shard"]
    words = fsdp.split() if isinstance(fsdp, str) else [str(w) for w in fsdp]
    bad = [w for w in words if w not in FSDP_OPTIONS]
    if bad:
        raise ValueError(f"TrainingArguments.fsdp={fsdp!r}: unknown option(s) {bad}; accepted: "
                         f"{', '.join(FSDP_OPTIONS)} (space-separated, e.g. 'full_shard offload')")
    return words


def build_mesh(config: FSDPConfig, device_type: str, world_size: int):
    """A 1-D mesh over every rank, or for hybrid sharding a 2-D (replicate, shard) mesh whose
    shard dimension is one node (LOCAL_WORLD_SIZE ranks) unless num_replicas says otherwise."""
    from torch.distributed.device_mesh import init_device_mesh
    if not config.hybrid:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    replicas = config.num_replicas
    if replicas is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        replicas = max(1, world_size // local)
    if world_size % replicas:
        raise ValueError(f"TrainingArguments.fsdp_config['num_replicas']={replicas} does not divide "
                         f"the world size {world_size}; hybrid_shard needs replicas x shard = world")
    return init_device_mesh(device_type, (replicas, world_size // replicas),
                            mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: nn.Module, blocks: Iterable[nn.Module], config: FSDPConfig, mesh) -> nn.Module:
    """Shard `model` in place: `fully_shard` on each of `blocks`, then on the root. Apply
    activation checkpointing and per-block compile first, and build the optimizer after."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kwargs = {"mesh": mesh}
    if config.bf16 or config.fp16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if config.bf16 else torch.float16,
                                                   reduce_dtype=torch.float32)
    if config.offload:
        # pinned host memory makes the host<->accelerator copies asynchronous; a CPU mesh has
        # no accelerator to pin for (the policy then only exercises FSDP's offload path)
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        reshard = config.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=config.reshard_after_forward, **kwargs)
    return model


def shard_groups(tensors: Iterable[torch.Tensor]) -> list:
    """The process groups over which any of `tensors` (FSDP's DTensors) is sharded: one per
    mesh dimension with a `Shard` placement (for hybrid sharding, the shard dimension only:
    the replicas already agree after the all-reduce). Empty for plain tensors."""
    groups, seen = [], set()
    for t in tensors:
        mesh = getattr(t, "device_mesh", None)
        if mesh is None:
            continue
        for dim, placement in enumerate(t.placements):
            if placement.is_shard() and (id(mesh), dim) not in seen:
                seen.add((id(mesh), dim))
                group = mesh.get_group(dim)
                if all(group is not g for g in groups):
                    groups.append(group)
    return groups


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage: in-place updates reach the DTensor), or
    `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def local_state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Bytes this rank holds for parameters, gradients and optimizer state, counted on the
    local shards (a DTensor's `to_local()`), for memory accounting and tests."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def nbytes(t) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    seen, params, grads = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += nbytes(p)
        if p.grad is not None:
            grads += nbytes(p.grad)
    optim = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            optim += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}
