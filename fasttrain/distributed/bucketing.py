"""The bucket plan: which gradients share one flat all-reduce buffer, as pure functions.

A plan is computed from parameter sizes and an order alone (no tensors, no process group),
so it can be tested exhaustively and recomputed identically on every rank.

Rules (the same as PyTorch's Reducer, `compute_bucket_assignment_by_size`):
- parameters are taken in the given order (reverse registration order before the first
  iteration, the observed gradient-ready order after it), so the gradients that become
  ready first fill the first bucket;
- a bucket only holds one dtype on one device (it is one flat buffer);
- the first bucket of each (dtype, device) group is closed at `first_bucket_cap_bytes`,
  later ones at `bucket_cap_bytes`: a small first bucket starts communication early;
- a bucket is closed as soon as it reaches its cap, so it may exceed the cap by its last
  parameter, and a parameter larger than the cap sits alone in its bucket;
- buckets are ordered by the position of their first parameter in the order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ParamSpec:
    """What the plan needs to know about one parameter."""

    numel: int
    dtype: torch.dtype
    device: str = "cpu"

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def mb_to_bytes(mb: float, name: str) -> int:
    """Convert a bucket cap given in MiB (PyTorch DDP's unit) to bytes, validating it."""
    if not isinstance(mb, (int, float)) or isinstance(mb, bool) or not mb > 0:
        raise ValueError(f"{name} must be a positive number of MiB, got {mb!r}")
    return max(1, int(mb * 1024 * 1024))


def reverse_registration_order(num_params: int) -> list[int]:
    """The initial order: backward produces the last-registered parameters' grads first."""
    return list(range(num_params - 1, -1, -1))


def order_from_ready(ready: Sequence[int], num_params: int) -> list[int]:
    """Turn the observed gradient-ready sequence into a full parameter order.

    Duplicates keep their first position; parameters that never became ready (unused in
    the observed iteration) go last, in reverse registration order.
    """
    seen: set[int] = set()
    order: list[int] = []
    for index in ready:
        if not 0 <= index < num_params:
            raise ValueError(f"ready index {index} out of range for {num_params} parameters")
        if index not in seen:
            seen.add(index)
            order.append(index)
    order.extend(i for i in reverse_registration_order(num_params) if i not in seen)
    return order


def plan_buckets(
    params: Sequence[ParamSpec],
    order: Sequence[int],
    bucket_cap_bytes: int,
    first_bucket_cap_bytes: int,
) -> list[tuple[int, ...]]:
    """Assign parameter indices to buckets; returns buckets in launch order."""
    if sorted(order) != list(range(len(params))):
        raise ValueError(
            f"order must be a permutation of range({len(params)}), got {list(order)!r}"
        )
    if bucket_cap_bytes <= 0 or first_bucket_cap_bytes <= 0:
        raise ValueError("bucket caps must be positive byte counts")
    position = {index: pos for pos, index in enumerate(order)}
    open_buckets: dict[tuple[torch.dtype, str], list[int]] = {}
    open_bytes: dict[tuple[torch.dtype, str], int] = {}
    closed_count: dict[tuple[torch.dtype, str], int] = {}
    buckets: list[list[int]] = []
    for index in order:
        spec = params[index]
        key = (spec.dtype, spec.device)
        bucket = open_buckets.setdefault(key, [])
        bucket.append(index)
        open_bytes[key] = open_bytes.get(key, 0) + spec.nbytes
        cap = first_bucket_cap_bytes if closed_count.get(key, 0) == 0 else bucket_cap_bytes
        if open_bytes[key] >= cap:
            buckets.append(bucket)
            closed_count[key] = closed_count.get(key, 0) + 1
            del open_buckets[key]
            open_bytes[key] = 0
    buckets.extend(b for b in open_buckets.values() if b)
    buckets.sort(key=lambda b: position[b[0]])
    return [tuple(b) for b in buckets]
