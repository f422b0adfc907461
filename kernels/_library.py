"""`custom_op`: torch.library.custom_op for fasttrain's ops, refusing a second definition.

Defining a `torch.library` op name twice makes torch free the first definition while modules
that imported it still call it: a use-after-free in the dispatcher (seen under AddressSanitizer
when `kernels/` was imported a second time as a top-level package). Refuse loudly instead.
"""
from __future__ import annotations

import torch


def op_defined(qualname: str) -> bool:
    """Whether an operator `namespace::name` (default overload) is registered already."""
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def custom_op(qualname: str, *, mutates_args=()):
    """torch.library.custom_op that raises if `qualname` is already defined in this process."""
    if op_defined(qualname):
        raise RuntimeError(
            f"the torch.library op {qualname} is already defined in this process; fasttrain's "
            "kernels were imported a second time under another module name. Import them only "
            "as `fasttrain.kernels` (never a top-level `kernels`).")
    return torch.library.custom_op(qualname, mutates_args=mutates_args)
