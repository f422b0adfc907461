"""Activation checkpointing applied to a model: recompute chosen blocks in backward.

A checkpointed block keeps only its input during forward; backward runs its forward again
(`torch.utils.checkpoint`, non-reentrant) to rebuild the activations it needs. Memory for
activations drops from every block's intermediates to one block's plus the block inputs;
the price is one more forward of each checkpointed block (about +1/3 of the step's FLOPs
when every block is checkpointed). `every=k` checkpoints every k-th block only: the
memory/speed trade-off in between (torchtitan's selective layer checkpointing).

Order when composing: activation checkpointing, then per-block compile, then FSDP (the
FSDP hooks then wrap the checkpointed block, and its parameters are re-gathered for the
recomputation by FSDP's pre-backward hook).

HF models with their own `gradient_checkpointing_enable()` use it (non-reentrant) when
every block is checkpointed; other models, and `every > 1`, get the generic wrapper below,
which replaces each chosen block's `forward` on the instance (state_dict keys unchanged).
"""
from __future__ import annotations

import functools
import logging
from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger("fasttrain")

_ATTR = "_fasttrain_activation_checkpoint"


def apply_activation_checkpointing(model: nn.Module, blocks: Iterable[nn.Module], every: int = 1,
                                   checkpoint_kwargs: Optional[dict] = None) -> int:
    """Checkpoint every `every`-th block of `blocks` (in place); returns how many blocks.

    An HF model (`gradient_checkpointing_enable`) with every=1 is switched through its own
    method, so it also turns off its KV cache in training as HF does."""
    blocks = list(blocks)
    kwargs = dict(checkpoint_kwargs or {})
    kwargs["use_reentrant"] = False
    if every == 1 and getattr(model, "supports_gradient_checkpointing", False) \
            and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        logger.info("activation checkpointing: %s.gradient_checkpointing_enable() on %d blocks",
                    type(model).__name__, len(blocks))
        return len(blocks)
    chosen = blocks[::every]
    for block in chosen:
        checkpoint_block(block, **kwargs)
    logger.info("activation checkpointing: %d of %d blocks (every %d)", len(chosen), len(blocks), every)
    return len(chosen)


def checkpoint_block(block: nn.Module, **kwargs) -> None:
    """Make `block`'s forward recompute in backward. Idempotent."""
    if getattr(block, _ATTR, False):
        return
    forward = block.forward
    kwargs.setdefault("use_reentrant", False)

    @functools.wraps(forward)
    def checkpointed_forward(*args, **fkwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **fkwargs)
        return checkpoint(forward, *args, **kwargs, **fkwargs)

    block.forward = checkpointed_forward
    setattr(block, _ATTR, True)


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(block, _ATTR, False))
