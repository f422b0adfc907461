"""linear_cross_entropy vs the unfused F.cross_entropy(hidden @ weight.T, target): peak memory
and time of forward+backward.

    python3 bench/bench_linear_cross_entropy.py [--tokens 4096] [--hidden 1024]
        [--vocab 65536] [--reps 3]

CPU (fp32): every measurement runs in a fresh process (so peak RSS is that call's own);
"extra peak" = peak RSS during forward+backward minus RSS with the inputs built. The floor
is the gradients themselves: grad_weight (V*H) + grad_hidden (N*H). Processes alternate
fused/unfused, so machine noise hits both alike; time is p20/p50/p80 over those processes.
GPU (when present): bf16 at vocab 128256, torch.cuda.max_memory_allocated above the inputs,
otherwise "skipped: no GPU".
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, percentiles  # noqa: E402
from fasttrain.kernels import linear_cross_entropy  # noqa: E402


def _inputs(N, H, V, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=gen) / H ** 0.5)
    weight.requires_grad_()
    target = torch.randint(0, V, (N,), device=device, generator=gen)
    return hidden, weight, target


def _run(mode, hidden, weight, target):
    if mode == "fused":
        loss = linear_cross_entropy(hidden, weight, target)
    else:
        loss = F.cross_entropy((hidden @ weight.t()).float(), target)
    loss.backward()
    return loss


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(mode, N, H, V):
    """One measurement in this (fresh) process; prints a JSON line."""
    _run(mode, *_inputs(8, 16, 32, "cpu", torch.float32))  # first-call imports, tiny shape
    hidden, weight, target = _inputs(N, H, V, "cpu", torch.float32)
    before = _rss_bytes()
    t0 = time.perf_counter()
    _run(mode, hidden, weight, target)
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "extra_peak": _rss_bytes() - before, "seconds": seconds}))


def cpu_rows(args):
    N, H, V = args.tokens, args.hidden, args.vocab
    floor = (V * H + N * H) * 4
    samples = {"unfused": [], "fused": []}
    for _ in range(args.reps):
        for mode in samples:
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--tokens", str(N),
                                   "--hidden", str(H), "--vocab", str(V)],
                                  capture_output=True, text=True, check=True)
            samples[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\nCPU fp32 fwd+bwd, tokens={N} hidden={H} vocab={V}; gradient floor "
          f"{floor / 2**20:.0f} MiB")
    rows = []
    base_t = percentiles([s["seconds"] for s in samples["unfused"]])[1]
    for mode, runs in samples.items():
        mem = percentiles([s["extra_peak"] for s in runs])[1]
        p20, p50, p80 = percentiles([s["seconds"] for s in runs])
        rows.append({"device": "cpu", "row": mode, "extra_peak_MiB": mem / 2**20,
                     "x_floor": mem / floor, "p20_s": p20, "p50_s": p50, "p80_s": p80,
                     "time_vs_unfused": p50 / base_t})
        print(f"  {mode:8s} extra peak {mem / 2**20:8.0f} MiB ({mem / floor:5.2f}x floor)  "
              f"time p20 {p20:6.2f} p50 {p50:6.2f} p80 {p80:6.2f} s  "
              f"({p50 / base_t:4.2f}x unfused)")
    return rows


def gpu_rows(args):
    if not torch.cuda.is_available():
        print("\nGPU rows: skipped: no GPU")
        return []
    N, H, V = args.tokens, args.hidden, 128256
    rows = []
    print(f"\nGPU bf16 fwd+bwd, tokens={N} hidden={H} vocab={V}")
    for mode in ("unfused", "fused"):
        hidden, weight, target = _inputs(N, H, V, "cuda", torch.bfloat16)
        _run(mode, hidden, weight, target)  # warm-up (compiles the Triton kernel)
        times = []
        for _ in range(args.reps + 2):
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()  # sync: timing boundary
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            _run(mode, hidden, weight, target)
            torch.cuda.synchronize()  # sync: timing boundary
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - base
        p20, p50, p80 = percentiles(times)
        rows.append({"device": "cuda", "row": mode, "extra_peak_MiB": peak / 2**20,
                     "p20_s": p20, "p50_s": p50, "p80_s": p80})
        print(f"  {mode:8s} extra peak {peak / 2**20:8.0f} MiB  time p20 {p20*1e3:7.2f} "
              f"p50 {p50*1e3:7.2f} p80 {p80*1e3:7.2f} ms")
        del hidden, weight, target
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", choices=["fused", "unfused"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tokens, args.hidden, args.vocab)
        return
    results = {"env": environment(), "rows": cpu_rows(args) + gpu_rows(args)}
    print(json.dumps(results["env"]))


if __name__ == "__main__":
    main()
