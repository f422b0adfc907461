"""What part 2 must cover, discovered rather than listed: a new kernel or op without a
`kernel_cases` test fails tests/test_gpu_check.py.

Names: a Triton kernel is '<module>.<kernel>' inside fasttrain.kernels (an entry kernel: one
no other kernel of its module calls; helpers are exercised through their callers); a torch
op is 'fasttrain::<name>' (every op of the namespace that takes a tensor: the custom ops of
kernels/ and the compiled ops of csrc/, the latter also read from the C++ source, so they
count even where the library is not built).
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
_DEF_RE = re.compile(r'm\.def\(\s*"(\w+)\(([^"]*)\)')
_IMPL_RE = re.compile(r'm\.impl\(\s*"(\w+)"')


def triton_kernels() -> list[str]:
    from fasttrain.kernels import _compile_check as cc

    found = []
    for module in cc.kernel_modules():
        short = module.__name__.rsplit(".", 1)[1]
        fns = {name: cc._base_fn(obj) for name, obj in cc.kernels_in(module).items()}
        sources = {name: inspect.getsource(fn) for name, fn in fns.items()}
        for name in fns:
            called = any(re.search(rf"\b{name}\s*\(", src) for other, src in sources.items()
                         if other != name)
            if not called:
                found.append(f"{short}.{name}")
    return sorted(found)


def csrc_ops(root: Path = REPO_ROOT) -> list[str]:
    """fasttrain:: ops defined in csrc/ (TORCH_LIBRARY m.def) that take a tensor."""
    names = set()
    for path in (root / "csrc").rglob("*.cpp"):
        for name, args in _DEF_RE.findall(path.read_text()):
            if "Tensor" in args:
                names.add(f"fasttrain::{name}")
    return sorted(names)


def cuda_csrc_ops(root: Path = REPO_ROOT) -> list[str]:
    """The csrc/ ops with a CUDA kernel (m.impl in csrc/cuda/); the rest are CPU-only and on a
    GPU their cases skip (fasttrain.ops.dispatch runs another implementation there)."""
    names = set()
    for path in (root / "csrc" / "cuda").rglob("*.cpp"):
        names.update(f"fasttrain::{n}" for n in _IMPL_RE.findall(path.read_text()))
    return sorted(names)


def registered_ops() -> list[str]:
    """fasttrain:: ops registered in this process that take a tensor (after importing the
    kernels and loading the compiled library where it exists)."""
    import fasttrain.kernels  # noqa: F401  (defines the custom ops)
    from fasttrain.ops import native

    native.available()
    names = []
    for qualname in torch._C._dispatch_get_all_op_names():
        if not qualname.startswith("fasttrain::"):
            continue
        op = getattr(torch.ops.fasttrain, qualname.split("::", 1)[1])
        schema = op.default._schema
        if any("Tensor" in str(arg.type) for arg in schema.arguments):
            names.append(qualname)
    return sorted(set(names))


def everything() -> dict[str, list[str]]:
    return {"triton": triton_kernels(), "ops": sorted(set(csrc_ops()) | set(registered_ops()))}


def on_cuda(found: dict[str, list[str]]) -> dict[str, list[str]]:
    """What must pass on a GPU: every Triton kernel, the custom ops of kernels/, and the csrc
    ops with a CUDA kernel; plus the CPU-only csrc ops, listed apart."""
    cpu_only = sorted(set(csrc_ops()) - set(cuda_csrc_ops()))
    return {"triton": found["triton"], "ops": sorted(set(found["ops"]) - set(cpu_only)),
            "cpu_only": cpu_only}
