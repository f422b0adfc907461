"""Where the kernel test cases run, chosen by the environment before pytest starts.

FASTTRAIN_TEST_DEVICE=cpu (the default): CPU tensors; the Triton kernels run under the
interpreter (conftest.py sets TRITON_INTERPRET=1). FASTTRAIN_TEST_DEVICE=cuda: the same cases,
selected with `-m kernel_cases`, on the GPU with compiled Triton and the CUDA C++ ops
(`python -m fasttrain.cli.gpu_check`, part 2). Test helpers put every tensor they build on
DEVICE, so a case is written once for both.
"""
import os

import torch

DEVICE_ENV = "FASTTRAIN_TEST_DEVICE"
DEVICE_NAME = os.environ.get(DEVICE_ENV, "cpu") or "cpu"
if DEVICE_NAME not in ("cpu", "cuda"):
    raise ValueError(f"{DEVICE_ENV}={DEVICE_NAME!r}: set it to 'cpu' (default) or 'cuda'")
DEVICE = torch.device(DEVICE_NAME)
# The interpreter truncates fp32 -> bf16 where compiled Triton rounds to nearest (NOTES.md).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
