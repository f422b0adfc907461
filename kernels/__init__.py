"""Triton kernels, installed as `fasttrain.kernels`. Imports only torch and triton.

Every kernel module defines COMPILE_SPECS (see docs/kernels.md and
tests/test_kernel_compile.py); each op has a plain PyTorch reference in `_reference.py`.
"""
from .adamw import fused_adamw_
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["cross_entropy", "fused_adamw_", "linear_cross_entropy"]
