"""Allocations: a TorchDispatchMode that records the sizes of the tensors ops create."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Allocations(TorchDispatchMode):
    """`sizes`: elements of every new tensor an op returned (views and in-place results, which
    allocate nothing, are left out), in dispatch order."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        fresh = [r.alias_info is None for r in func._schema.returns]
        self.sizes += [t.numel() for t, new in zip(flat, fresh)
                       if new and isinstance(t, torch.Tensor)]
        return out
