"""Collectives the Trainer needs besides gradient all-reduce.

- `all_reduce_`: an in-place all-reduce of a device tensor (the global count of valid
  tokens, a loss for logging). It is enqueued on the device like any kernel: no host sync.
- `gather_eval_predictions`: every rank's evaluation outputs gathered into one tensor per
  output in dataset order, each sample exactly once, so `compute_metrics` sees the whole
  evaluation set without the duplicates a padded sharded sampler adds.

Both are identities in a single process.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _world_size(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def all_reduce_(tensor: torch.Tensor, op: str = "sum", process_group=None) -> torch.Tensor:
    """All-reduce `tensor` in place across ranks and return it.

    op: "sum", "max", "min" or "mean" (a sum then a division on the device).
    """
    if op not in (*_OPS, "mean"):
        raise ValueError(f"op must be one of sum, max, min, mean; got {op!r}")
    world = _world_size(process_group)
    if world == 1:
        return tensor
    dist.all_reduce(tensor, op=_OPS["sum" if op == "mean" else op], group=process_group)
    if op == "mean":
        tensor.div_(world)
    return tensor


def _map_leaves(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_leaves(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_leaves(fn, v) for v in tree)
    raise TypeError(f"eval predictions must be tensors or lists/tuples/dicts of them, got {type(tree)}")


def _leaves(tree: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map_leaves(out.append, tree)
    return out


def _pad_to(tensor: torch.Tensor, shape: list[int], pad_value: float) -> torch.Tensor:
    if list(tensor.shape) == shape:
        return tensor.contiguous()
    out = tensor.new_full(shape, pad_value)
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


def _gather_padded(tensor: torch.Tensor, shape: list[int], pad_value: float, group) -> torch.Tensor:
    """All-gather `tensor` padded to `shape`; returns (world, *shape)."""
    padded = _pad_to(tensor, shape, pad_value)
    parts = [torch.empty_like(padded) for _ in range(_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return torch.stack(parts)


def _max_shapes(leaves: list[torch.Tensor], group) -> list[list[int]]:
    dims = [t.dim() for t in leaves]
    if any(d == 0 for d in dims):
        raise ValueError("eval predictions need a leading sample dimension; got a 0-d tensor")
    device = leaves[0].device
    local = torch.tensor([s for t in leaves for s in t.shape], dtype=torch.int64, device=device)
    counts = torch.tensor([len(local)], dtype=torch.int64, device=device)
    all_counts = [torch.empty_like(counts) for _ in range(_world_size(group))]
    dist.all_gather(all_counts, counts, group=group)
    if len({int(c) for c in all_counts}) != 1:  # sync: eval only, shapes are host metadata
        raise RuntimeError(
            "ranks produced eval predictions of different structure (number of outputs or "
            "tensor ranks differ); every rank must return the same outputs"
        )
    gathered = [torch.empty_like(local) for _ in all_counts]
    dist.all_gather(gathered, local, group=group)
    maxima = torch.stack(gathered).amax(dim=0).tolist()  # sync: eval only
    shapes, start = [], 0
    for d in dims:
        shapes.append(maxima[start:start + d])
        start += d
    return shapes


def _interleave(gathered: torch.Tensor, num_samples: int) -> torch.Tensor:
    # Rank r's local row j is global sample j * world + r (ShardedSampler(shuffle=False)).
    world, rows = gathered.shape[:2]
    ordered = gathered.transpose(0, 1).reshape(world * rows, *gathered.shape[2:])
    return ordered[:num_samples]


def _scatter_by_index(gathered: torch.Tensor, indices: torch.Tensor, num_samples: int) -> torch.Tensor:
    flat = gathered.reshape(-1, *gathered.shape[2:])
    flat_indices = indices.reshape(-1)
    valid = flat_indices >= 0
    out = flat.new_empty((num_samples, *flat.shape[1:]))
    out[flat_indices[valid]] = flat[valid]
    seen = torch.zeros(num_samples, dtype=torch.bool, device=flat.device)
    seen[flat_indices[valid]] = True
    if not bool(seen.all()):  # sync: eval only, a coverage check
        missing = (~seen).nonzero().flatten()[:8].tolist()
        raise RuntimeError(f"no rank produced predictions for samples {missing} (first 8 shown)")
    return out


def gather_eval_predictions(
    local: Any,
    num_samples: int,
    sample_indices: torch.Tensor | None = None,
    pad_value: float = -100,
    process_group=None,
) -> Any:
    """Gather per-rank eval outputs into dataset order, each sample exactly once.

    local: a tensor or a (nested) list/tuple/dict of tensors whose dim 0 is this rank's
        samples in the order it evaluated them. Other dims may differ between ranks
        (different sequence lengths): they are padded with `pad_value`.
    num_samples: the size of the evaluation set; padding rows and duplicated samples
        beyond it are dropped.
    sample_indices: optional global index of each local row (1-D, int). Without it the
        layout of `ShardedSampler(shuffle=False)` is assumed: rank r's row j is sample
        j * world_size + r.
    """
    world = _world_size(process_group)
    if world == 1:
        return _map_leaves(lambda t: t[:num_samples], local)
    leaves = _leaves(local)
    if not leaves:
        raise ValueError("no tensors to gather")
    if sample_indices is not None:
        if sample_indices.dim() != 1 or sample_indices.shape[0] != leaves[0].shape[0]:
            raise ValueError("sample_indices must be 1-D with one index per local row")
        leaves.append(sample_indices.to(device=leaves[0].device, dtype=torch.int64))
    shapes = _max_shapes(leaves, process_group)
    index_rows = None
    if sample_indices is not None:
        index_rows = _gather_padded(leaves[-1], shapes.pop(), -1, process_group)
    leaf_shapes = iter(shapes)

    def gather_leaf(tensor: torch.Tensor) -> torch.Tensor:
        gathered = _gather_padded(tensor, next(leaf_shapes), pad_value, process_group)
        if index_rows is None:
            return _interleave(gathered, num_samples)
        return _scatter_by_index(gathered, index_rows, num_samples)

    return _map_leaves(gather_leaf, local)
