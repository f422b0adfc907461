"""FusedAdamW step vs torch.optim.AdamW (fused=True, foreach=True) on GPT-2-124M's shapes.

    python3 bench/bench_fused_adamw.py [--reps 10] [--scale 1.0]

CPU rows: FusedAdamW's CPU path (the compiled fasttrain op when built, else torch's fused
kernel plus master-weight handling; the row name says which) against torch fused and
foreach. GPU rows (when CUDA is present, else "skipped: no GPU"): the Triton kernel against
torch fused/foreach and NVIDIA apex FusedAdam when importable, with GB/s at 28 bytes per
parameter (fp32: read p, g, m, v; write p, m, v) and percent of the device's peak bandwidth.
Rows run interleaved, one step each per repetition; p20/p50/p80 and ratio of medians.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cross_entropy import environment, report, time_interleaved  # noqa: E402
from fasttrain.optim import FusedAdamW, _compiled_ops  # noqa: E402

BYTES_PER_PARAM = 28
HP = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


def gpt2_124m_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """GPT-2 small (C=768, 12 layers, V=50257, T=1024); scale shrinks V and T for quick runs."""
    C = 768
    V, T = max(1, int(50257 * scale)), max(1, int(1024 * scale))
    shapes = [(V, C), (T, C)]
    for _ in range(12):
        shapes += [(C,), (C,), (C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,),
                   (C, 4 * C), (4 * C,), (4 * C, C), (C,)]
    return shapes + [(C,), (C,)]


def _params(shapes, device, dtype=torch.float32):
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen).to(dtype))
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen).to(dtype) * 1e-3
    return params


def _rows(shapes, device):
    lr = torch.tensor(HP["lr"], device=device)
    opts = {"fasttrain": FusedAdamW(_params(shapes, device), **dict(HP, lr=lr)),
            "torch fused": torch.optim.AdamW(_params(shapes, device), fused=True, **HP),
            "torch foreach": torch.optim.AdamW(_params(shapes, device), foreach=True, **HP)}
    if device == "cuda":
        try:
            from apex.optimizers import FusedAdam
            opts["apex FusedAdam"] = FusedAdam(_params(shapes, device), adam_w_mode=True, **HP)
        except ImportError:
            pass
    rows = {name: opt.step for name, opt in opts.items()}
    if device == "cpu":
        path = "compiled op" if _compiled_ops() is not None else "torch fused fallback"
        rows[f"fasttrain ({path})"] = rows.pop("fasttrain")
        if _compiled_ops() is not None:  # also time the fallback used where it is not built
            fallback = FusedAdamW(_params(shapes, device), **dict(HP, lr=lr))
            rows["fasttrain (torch fused fallback)"] = _without_compiled_ops(fallback.step)
    return rows


def _without_compiled_ops(step):
    import fasttrain.optim as optim_mod

    def run():
        real = optim_mod._compiled_ops
        optim_mod._compiled_ops = lambda: None
        try:
            step()
        finally:
            optim_mod._compiled_ops = real
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    shapes = gpt2_124m_shapes(args.scale)
    n = sum(torch.Size(s).numel() for s in shapes)
    moved = n * BYTES_PER_PARAM
    results = {"env": environment(), "params": n, "rows": []}
    title = f"AdamW step, {len(shapes)} tensors, {n / 1e6:.1f}M fp32 params"
    results["rows"] += report(f"CPU {title}", time_interleaved(_rows(shapes, "cpu"), args.reps,
                                                               "cpu"),
                              "torch fused", bytes_moved=moved, extra={"device": "cpu"})
    if torch.cuda.is_available():
        results["rows"] += report(f"GPU {title}",
                                  time_interleaved(_rows(shapes, "cuda"), args.reps, "cuda"),
                                  "torch fused", bytes_moved=moved, extra={"device": "cuda"})
    else:
        print("\nGPU rows: skipped: no GPU")
    print(json.dumps(results["env"]))


if __name__ == "__main__":
    main()
