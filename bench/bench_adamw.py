"""AdamW step on GPT-2-124M's shapes: fasttrain (C++ op, FusedAdamW) vs torch.optim.AdamW.

    python3 bench/bench_adamw.py [--reps 15] [--loop-reps 3] [--scale 1.0] [--threads N]

The parameter set has GPT-2-124M's shapes (tied embedding, 148 tensors); --scale shrinks the
vocabulary and positions for quick runs. Rows run interleaved, one step each per repetition,
so machine noise hits every row alike; each row owns its optimizer state, parameters and
gradients are shared. Reported: p20/p50/p80 step time, GB/s at 28 bytes per parameter (fp32:
read p, g, m, v, write p, m, v; bf16 with fp32 master: read g(2) w m v, write w m v p(2) = 28
as well), and speed relative to torch fused.

CPU rows: fasttrain.ops.dispatch.adamw_, what FusedAdamW runs (the C++ op when built, else
torch's fused kernel; the row name says which), fp32 and bf16 params with fp32 masters; the
torch fallback with masters (torch._fused_adamw_ on the masters + a rounding copy); torch
fused, foreach and for-loop (--loop-reps steps only: it is slow). GPU rows (when CUDA is present, else "skipped:
no GPU"): FusedAdamW's Triton kernel (fp32, bf16 + fp32 master) against torch fused/foreach
and NVIDIA apex FusedAdam when importable, with percent of the device's peak bandwidth.
Results go to stdout and bench/results/adamw-<time>.json with machine, versions and commit.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, percentiles, report, time_interleaved  # noqa: E402
from fasttrain.ops import dispatch, native as _ops  # noqa: E402
from fasttrain.optim.adamw import FusedAdamW  # noqa: E402

BYTES_PER_PARAM = 28
LR, BETAS, WD, EPS = 1e-3, (0.9, 0.95), 0.1, 1e-8
HP = dict(lr=LR, betas=BETAS, weight_decay=WD, eps=EPS)
BASELINE = "torch fused=True fp32"


def gpt2_124m_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (C=768, L=12, V=50257, T=1024); scale shrinks V and T."""
    C, L = 768, 12
    V, T = max(1, int(50257 * scale)), max(1, int(1024 * scale))
    shapes = [(V, C), (T, C)]
    for _ in range(L):
        shapes += [(C,), (C,), (C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,),
                   (C, 4 * C), (4 * C,), (4 * C, C), (C,)]
    return shapes + [(C,), (C,)]


class OpStep:
    """One AdamW implementation on lists of tensors, with its own state; master=True keeps
    fp32 masters. `impl` is fasttrain.ops.dispatch.adamw_ (what FusedAdamW runs) or its torch
    fallback (`dispatch._torch_adamw_`, what runs where the C++ library is not built)."""

    def __init__(self, impl, params, grads, master: bool):
        self.impl, self.params, self.grads = impl, params, grads
        device = params[0].device
        self.master = [p.float() for p in params] if master else []
        self.exp_avgs = [torch.zeros(p.shape, device=device) for p in params]
        self.exp_avg_sqs = [torch.zeros(p.shape, device=device) for p in params]
        self.steps = [torch.zeros((), device=device) for _ in params]
        self.lr = torch.tensor(LR, device=device)

    def __call__(self):
        self.impl(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.master,
                  self.steps, self.lr, BETAS[0], BETAS[1], WD, EPS)


def leaves(params, grads) -> list[torch.nn.Parameter]:
    """Parameters sharing the storage of `params`, with `grads` attached."""
    out = [torch.nn.Parameter(p, requires_grad=True) for p in params]
    for leaf, grad in zip(out, grads):
        leaf.grad = grad
    return out


def fused_adamw_step(params, grads, master: bool = False):
    lr = torch.tensor(LR, device=params[0].device)
    return FusedAdamW(leaves(params, grads), master_weights=master, **dict(HP, lr=lr)).step


def torch_step(params, grads, **impl):
    return torch.optim.AdamW(leaves(params, grads), **HP, **impl).step


def tensors(shapes, device):
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) * 1e-3 for s in shapes]
    return params, grads, [p.bfloat16() for p in params], [g.bfloat16() for g in grads]


def cpu_rows(shapes) -> dict:
    params, grads, params_bf16, grads_bf16 = tensors(shapes, "cpu")
    ours = dispatch.implementation("adamw_", "cpu")
    rows = {f"fasttrain ({ours}) fp32": OpStep(dispatch.adamw_, params, grads, master=False),
            BASELINE: torch_step(params, grads, fused=True),
            "torch foreach=True fp32": torch_step(params, grads, foreach=True),
            f"fasttrain ({ours}) bf16+fp32 master": OpStep(dispatch.adamw_, params_bf16,
                                                          grads_bf16, master=True),
            "torch fused fallback bf16+fp32 master": OpStep(dispatch._torch_adamw_, params_bf16,
                                                            grads_bf16, master=True),
            "torch for-loop fp32": torch_step(params, grads, foreach=False, fused=False)}
    return rows


def gpu_rows(shapes) -> dict:
    params, grads, params_bf16, grads_bf16 = tensors(shapes, "cuda")
    rows = {"FusedAdamW (Triton) fp32": fused_adamw_step(params, grads),
            BASELINE: torch_step(params, grads, fused=True),
            "torch foreach=True fp32": torch_step(params, grads, foreach=True),
            "FusedAdamW (Triton) bf16+fp32 master": fused_adamw_step(params_bf16, grads_bf16,
                                                                     master=True)}
    try:
        from apex.optimizers import FusedAdam
        rows["apex FusedAdam fp32"] = FusedAdam(leaves(params, grads), adam_w_mode=True,
                                                **HP).step
    except ImportError:
        pass
    return rows


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
    shapes = gpt2_124m_shapes(args.scale)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    moved = n_params * BYTES_PER_PARAM
    env = environment(ops_library=_ops.library_path(), ops_build=_ops.build_info())
    print(f"AdamW step, {n_params / 1e6:.1f}M params in {len(shapes)} tensors | "
          f"{env['cpu']}, {env['threads']} threads | torch {env['torch']} | commit {env['commit']}")
    times = time_interleaved(cpu_rows(shapes), args.reps, "cpu", warmup=1,
                             reps_of={"torch for-loop fp32": args.loop_reps})
    results = report("CPU", times, BASELINE, bytes_moved=moved, extra={"device": "cpu"})
    ours = percentiles(next(t for k, t in times.items() if k.endswith(") fp32")))[1]
    foreach, fused = (percentiles(times[k])[1] for k in ("torch foreach=True fp32", BASELINE))
    print(f"fasttrain fp32 vs foreach: {foreach / ours:.2f}x faster; vs fused: {fused / ours:.2f}x")
    if torch.cuda.is_available():
        results += report(f"GPU {env['gpu']}", time_interleaved(gpu_rows(shapes), args.reps,
                                                               "cuda"),
                          BASELINE, bytes_moved=moved, extra={"device": "cuda"})
    else:
        print("\nGPU rows: skipped: no GPU")
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"adamw-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"env": env, "n_params": n_params, "rows": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
