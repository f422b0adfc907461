"""cross_entropy forward+backward: fasttrain vs torch (eager and torch.compile) vs Liger.

    python3 bench/bench_cross_entropy.py [--tokens 4096] [--vocab 32768] [--reps 10]

CPU rows always run, fp32 and bf16: fasttrain's CPU path (the C++ rows kernel
fasttrain::ce_rows_ where the ops library is built) and its torch-op fallback ("fasttrain
(torch rows)") against F.cross_entropy. GPU rows run when CUDA
is present (the Triton kernel, bf16 logits; GB/s counts the kernel's own traffic: read the
logits twice, write the gradient once) and print "skipped: no GPU" otherwise. Rows are
timed interleaved, one call each per repetition; reported p20/p50/p80 and the ratio of
medians against torch eager. Environment, timing and report helpers: bench/_common.py.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, report, time_interleaved  # noqa: E402
from fasttrain.kernels import cross_entropy  # noqa: E402  (imports fasttrain: loads the ops)
_ce_module = importlib.import_module("fasttrain.kernels.cross_entropy")  # the module, not the function

def _ce_rows(logits, target):
    def fasttrain_ce():
        logits.grad = None
        cross_entropy(logits, target).backward()

    def torch_ce():
        logits.grad = None
        F.cross_entropy(logits.float(), target).backward()

    compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t))

    def torch_compile_ce():
        logits.grad = None
        compiled(logits, target).backward()

    rows = {"torch": torch_ce, "fasttrain": fasttrain_ce, "torch.compile": torch_compile_ce}
    if not logits.is_cuda and _ce_module.cpu_rows_kernel():
        def fasttrain_torch_rows():
            saved = _ce_module.cpu_rows_kernel
            _ce_module.cpu_rows_kernel = lambda: False
            try:
                fasttrain_ce()
            finally:
                _ce_module.cpu_rows_kernel = saved
        rows["fasttrain (torch rows)"] = fasttrain_torch_rows
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
        if logits.is_cuda:
            def liger_ce():
                logits.grad = None
                liger_cross_entropy(logits, target).backward()
            rows["liger"] = liger_ce
    except ImportError:
        pass
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    results = {"env": environment(), "rows": []}
    N, V = args.tokens, args.vocab
    print(f"CPU rows kernel (fasttrain::ce_rows_): {'loaded' if _ce_module.cpu_rows_kernel() else 'not built'}")
    t = torch.randint(0, V, (N,))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(N, V).to(dtype).requires_grad_()
        name = str(dtype).removeprefix("torch.")
        results["rows"] += report(f"CPU {name} cross_entropy fwd+bwd, N={N} V={V}",
                                  time_interleaved(_ce_rows(x, t), args.reps, "cpu"), "torch",
                                  extra={"device": "cpu", "dtype": name})
    if torch.cuda.is_available():
        x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, V, (N,), device="cuda")
        results["rows"] += report(
            f"GPU bf16 cross_entropy fwd+bwd, N={N} V={V}",
            time_interleaved(_ce_rows(x, t), args.reps, "cuda"), "torch",
            bytes_moved=3 * N * V * 2, extra={"device": "cuda"})
    else:
        print("\nGPU rows: skipped: no GPU")
    print(json.dumps(results["env"]))


if __name__ == "__main__":
    main()
