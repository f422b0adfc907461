"""Optional dependencies: import one, or fail with a message that names the extra to install.

The core (training, checkpoints, the CLI's train/sample/bench) needs only torch, numpy,
safetensors, pyyaml and tqdm. TensorBoard logging, the report's plots and the Triton kernels
on a CPU-only machine live behind extras declared in pyproject.toml.
"""
from __future__ import annotations

import importlib


def require(module: str, extra: str, feature: str):
    """Import `module`, or raise ImportError naming the feature and the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{feature} needs the `{module.split('.')[0]}` package, which is not installed: "
            f"pip install 'fasttrain[{extra}]'") from e
