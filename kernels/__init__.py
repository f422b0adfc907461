"""Triton kernels, installed as `fasttrain.kernels`. Imports only torch and triton.

Every kernel module defines COMPILE_SPECS (see docs/kernels.md and
tests/test_kernel_compile.py); the plain PyTorch references live in `_reference.py`.

This package is importable only as `fasttrain.kernels`. From the repository root the folder
is also reachable as a top-level `kernels`, a name transformers probes for the unrelated
hub-kernels package. Importing the ops a second time would define the torch.library ops twice
(a use-after-free in the dispatcher), so under any other name this module stays inert: it
defines nothing, exposes no submodules (`import kernels.adamw` raises ImportError), and looks
like an empty namespace package (no `__file__`, no `__version__`), which is what transformers'
probe reads as "not installed". (transformers 5.24 does not tolerate an ImportError here: its
`_is_package_available` imports the package and lets the error propagate.)
"""
if __name__ != "fasttrain.kernels":
    __path__ = []  # no submodules reachable under this name
    del __file__
else:
    from .adamw import fused_adamw_
    from .cross_entropy import cross_entropy
    from .linear_cross_entropy import linear_cross_entropy

    __all__ = ["cross_entropy", "fused_adamw_", "linear_cross_entropy"]
