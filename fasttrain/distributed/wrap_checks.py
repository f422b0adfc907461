"""One-time work when a model is wrapped for data parallelism, and the unused-parameter scan.

- `check_same_params`: every rank must hold the same parameters (names, shapes, dtypes);
  a mismatch is an error on every rank that names the first differing parameters, instead
  of a collective that silently reads the wrong number of bytes or hangs.
- `broadcast_from_rank0`: rank 0's parameters and buffers overwrite everyone else's, so all
  replicas start identical whatever each rank's random initialisation did.
- `unreachable_params`: which parameters the autograd graph of a forward's outputs cannot
  reach (they will get no gradient), for `find_unused_parameters=True`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


def _describe(names: Sequence[str], params: Sequence[torch.Tensor]) -> list[tuple[str, tuple, str]]:
    return [(name, tuple(p.shape), str(p.dtype)) for name, p in zip(names, params)]


def _differences(mine: list, reference: list, rank: int, limit: int = 5) -> list[str]:
    found = []
    if len(mine) != len(reference):
        found.append(f"rank 0 has {len(reference)} trainable parameters, rank {rank} has {len(mine)}")
    for (name, shape, dtype), (ref_name, ref_shape, ref_dtype) in zip(mine, reference):
        if (name, shape, dtype) != (ref_name, ref_shape, ref_dtype):
            found.append(
                f"parameter '{ref_name}' {ref_shape} {ref_dtype} on rank 0 but '{name}' {shape} {dtype} on rank {rank}"
            )
        if len(found) >= limit:
            break
    return found


def check_same_params(names: Sequence[str], params: Sequence[torch.Tensor], group=None) -> None:
    """Raise on every rank if any rank's trainable parameters differ from rank 0's."""
    world = dist.get_world_size(group)
    described = _describe(names, params)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, described, group=group)
    problems = []
    for rank in range(1, world):
        problems.extend(_differences(everyone[rank], everyone[0], rank))
    if problems:
        raise RuntimeError(
            "BucketedDDP: the model differs across ranks, so gradients cannot be averaged:\n  "
            + "\n  ".join(problems)
            + "\nBuild the same model (same config) on every rank before wrapping it"
        )


_BROADCAST_CHUNK_BYTES = 256 * 2**20  # bounds the temporary copy for large models


@torch.no_grad()
def broadcast_from_rank0(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Overwrite every rank's tensors with rank 0's: flat broadcasts per dtype and device,
    each at most ~256 MiB (plus one tensor) so wrapping a large model needs little memory."""
    src = 0 if group is None else dist.get_global_rank(group, 0)
    groups: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    filled: dict[tuple[torch.dtype, torch.device], int] = {}
    for tensor in tensors:
        key = (tensor.dtype, tensor.device)
        chunks = groups.setdefault(key, [[]])
        if filled.get(key, 0) >= _BROADCAST_CHUNK_BYTES:
            chunks.append([])
            filled[key] = 0
        chunks[-1].append(tensor)
        filled[key] = filled.get(key, 0) + tensor.numel() * tensor.element_size()
    for members in (chunk for chunks in groups.values() for chunk in chunks):
        flat = torch.cat([t.detach().reshape(-1) for t in members])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for tensor in members:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def _output_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _output_tensors(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _output_tensors(v)]
    return []


def unreachable_params(output: Any, params: Sequence[torch.Tensor]) -> list[int]:
    """Indices of `params` that no gradient path from `output`'s tensors reaches."""
    index_of = {id(p): i for i, p in enumerate(params)}
    reached: set[int] = set()
    stack = [t.grad_fn for t in _output_tensors(output) if t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes carry their leaf
        if variable is not None and id(variable) in index_of:
            reached.add(index_of[id(variable)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    for tensor in _output_tensors(output):  # a parameter returned as is
        if id(tensor) in index_of:
            reached.add(index_of[id(tensor)])
    return [i for i in range(len(params)) if i not in reached]
