"""CPU AdamW step: fasttrain's C++ op vs torch.optim.AdamW (fused, foreach, for-loop).

    python3 bench/bench_adamw.py [--reps 15] [--loop-reps 3] [--scale 1.0] [--threads N]

The parameter set has GPT-2-124M's shapes (tied embedding, 148 tensors). Rows run
interleaved, one step each per repetition, so machine noise hits every row alike; each row
owns its optimizer state, parameters and gradients are shared. Reported: p20/p50/p80 step
time, GB/s at 28 bytes per parameter (fp32: read p, g, m, v, write p, m, v; bf16 with fp32
master: read g(2) w m v, write w m v p(2) = 28 as well), and speed relative to torch fused.
Results go to stdout and bench/results/adamw-<time>.json with machine, versions and commit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fasttrain import _ops  # noqa: E402

BYTES_PER_PARAM = 28
LR, BETAS, WD, EPS = 1e-3, (0.9, 0.95), 0.1, 1e-8


def gpt2_124m_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (C=768, L=12, V=50257, T=1024); scale shrinks V and T."""
    C, L = 768, 12
    V, T = max(1, int(50257 * scale)), max(1, int(1024 * scale))
    shapes = [(V, C), (T, C)]
    for _ in range(L):
        shapes += [(C,), (C,), (C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,),
                   (C, 4 * C), (4 * C,), (4 * C, C), (C,)]
    return shapes + [(C,), (C,)]


class FasttrainStep:
    """fasttrain._ops.fused_adamw_ with its own state; master=True keeps fp32 masters."""

    def __init__(self, params, grads, master: bool):
        self.params, self.grads = params, grads
        self.master = [p.float() for p in params] if master else []
        self.exp_avgs = [torch.zeros(p.shape) for p in params]
        self.exp_avg_sqs = [torch.zeros(p.shape) for p in params]
        self.steps = [torch.zeros(()) for _ in params]
        self.lr = torch.tensor(LR)

    def __call__(self):
        _ops.fused_adamw_(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.master,
                          self.steps, self.lr, BETAS[0], BETAS[1], WD, EPS)


class TorchStep:
    def __init__(self, params, grads, **impl):
        self.leaves = [torch.nn.Parameter(p, requires_grad=True) for p in params]
        for leaf, grad in zip(self.leaves, grads):
            leaf.grad = grad
        self.opt = torch.optim.AdamW(self.leaves, lr=LR, betas=BETAS, weight_decay=WD,
                                     eps=EPS, **impl)

    def __call__(self):
        self.opt.step()


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
    return pick(0.2), pick(0.5), pick(0.8)


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit,
            "ops_library": _ops.library_path(), "ops_build": _ops.build_info()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed steps per fast row")
    ap.add_argument("--loop-reps", type=int, default=3, help="timed steps for the for-loop row")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink vocab/positions (smoke runs)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _ops.available():
        print("note: ops library not built (bash scripts/build_ops.sh); fasttrain rows use the "
              "PyTorch fallback")
    torch.manual_seed(0)
    shapes = gpt2_124m_shapes(args.scale)
    params = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    params_bf16 = [p.bfloat16() for p in params]
    grads_bf16 = [g.bfloat16() for g in grads]
    n_params = sum(p.numel() for p in params)
    rows = {
        "fasttrain C++ fp32": FasttrainStep(params, grads, master=False),
        "torch fused=True fp32": TorchStep(params, grads, fused=True),
        "torch foreach=True fp32": TorchStep(params, grads, foreach=True),
        "fasttrain C++ bf16+fp32 master": FasttrainStep(params_bf16, grads_bf16, master=True),
        "torch for-loop fp32": TorchStep(params, grads, foreach=False, fused=False),
    }
    times = {name: [] for name in rows}
    for name, step in rows.items():  # warm-up: allocates torch's lazy state
        step()
    for rep in range(args.reps):
        for name, step in rows.items():
            if "for-loop" in name and rep >= args.loop_reps:
                continue
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    fused_p50 = percentiles(times["torch fused=True fp32"])[1]
    env = environment()
    print(f"AdamW step, {n_params / 1e6:.1f}M params in {len(shapes)} tensors | "
          f"{env['cpu']}, {env['threads']} threads | torch {env['torch']} | commit {env['commit']}")
    print(f"{'row':34s} {'p20 ms':>9s} {'p50 ms':>9s} {'p80 ms':>9s} {'GB/s':>7s} {'vs fused':>9s}")
    results = []
    for name, samples in times.items():
        p20, p50, p80 = percentiles(samples)
        gbps = n_params * BYTES_PER_PARAM / p50 / 1e9
        print(f"{name:34s} {p20 * 1e3:9.1f} {p50 * 1e3:9.1f} {p80 * 1e3:9.1f} {gbps:7.2f} "
              f"{fused_p50 / p50:8.2f}x")
        results.append({"row": name, "p20_s": p20, "p50_s": p50, "p80_s": p80, "gb_per_s": gbps,
                        "speed_vs_torch_fused": fused_p50 / p50, "samples": len(samples)})
    ours = percentiles(times["fasttrain C++ fp32"])[1]
    foreach = percentiles(times["torch foreach=True fp32"])[1]
    print(f"fasttrain fp32 vs foreach: {foreach / ours:.2f}x faster; vs fused: {fused_p50 / ours:.2f}x")
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"adamw-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"env": env, "n_params": n_params, "rows": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
