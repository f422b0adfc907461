"""Loader of the compiled ops in `csrc/` (`torch.ops.fasttrain.*`).

The shared library is built by `bash scripts/build_ops.sh` into `build/` at the repository
root. `available()` loads it once, from `$FASTTRAIN_OPS_LIB` when set, else from `build/`;
`FASTTRAIN_DISABLE_OPS=1` forces the pure-PyTorch path. Which path is taken, and why, is
logged at debug level (`logging.getLogger("fasttrain.ops")`).

Callers do not use the ops directly: `fasttrain.ops.dispatch` picks, per op and device, the
one implementation that runs (and torch's own op where the library is not built).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger("fasttrain.ops")

LIBRARY_NAME = "libfasttrain_ops.so"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIBRARY_PATH = REPO_ROOT / "build" / LIBRARY_NAME

_loaded: Optional[bool] = None
_loaded_path: Optional[str] = None

Tensors = Sequence[torch.Tensor]


# ----------------------------------------------------------------------------- loading
def _load() -> bool:
    global _loaded_path
    if os.environ.get("FASTTRAIN_DISABLE_OPS", "0") not in ("", "0"):
        log.debug("fasttrain ops: FASTTRAIN_DISABLE_OPS is set; using the PyTorch fallback")
        return False
    override = os.environ.get("FASTTRAIN_OPS_LIB")
    path = Path(override) if override else DEFAULT_LIBRARY_PATH
    if not path.is_file():
        log.debug("fasttrain ops: %s not found (build it with `bash scripts/build_ops.sh`); "
                  "using the PyTorch fallback", path)
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:
        log.debug("fasttrain ops: loading %s failed (%s); using the PyTorch fallback", path, err)
        return False
    _loaded_path = str(path)
    log.debug("fasttrain ops: loaded %s", path)
    return True


def available() -> bool:
    """True when the compiled library is loaded (loads it on the first call)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel_on(op_name: str, device_type: str) -> bool:
    """True when the library is loaded and `fasttrain::<op_name>` has a kernel for
    `device_type` ("cpu", "cuda"); a CPU-only build has no CUDA kernels."""
    return available() and _registered(op_name, device_type)


@functools.lru_cache(maxsize=None)
def _registered(op_name: str, device_type: str) -> bool:
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fasttrain::{op_name}", key)


def has_kernel(op_name: str, tensors: Tensors) -> bool:
    """True when the library is loaded and `op_name` has a kernel for the tensors' device
    (a CPU-only build has no CUDA kernels: its CUDA callers take the fallback)."""
    return len(tensors) > 0 and has_kernel_on(op_name, tensors[0].device.type)


def library_path() -> Optional[str]:
    """The path the library was loaded from, or None on the fallback path."""
    return _loaded_path if available() else None


def build_info() -> dict:
    """What the loaded library was built from (source dir, torch version, CUDA); {} if absent."""
    if not available():
        return {}
    pairs = (item.split("=", 1) for item in torch.ops.fasttrain.build_info().split(";"))
    return {key: value for key, value in pairs}
