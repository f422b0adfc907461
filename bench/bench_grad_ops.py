"""Unscale + overflow check and gradient-norm clipping: fasttrain's ops vs torch's, side by side.

    python3 bench/bench_grad_ops.py [--reps 15] [--scale 0.25] [--threads N]

Two parameter sets: GPT-2-124M's shapes (148 tensors; --scale shrinks vocabulary and
positions) and a tiny model (Linear(16, 1): 2 tensors), where per-call overhead decides.
Rows per set, interleaved one call each per repetition so machine noise hits all alike:
  unscale   fasttrain.ops.dispatch.unscale_and_check_ (the implementation it picks, named in
            the row) vs torch._amp_foreach_non_finite_check_and_unscale_ (its fallback and
            what torch.amp.GradScaler runs)
  clip      fasttrain.ops.dispatch.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_
            (foreach), the Trainer's clipping before and after
Reported: p20/p50/p80 per call, the ratio of medians against torch's row, GB/s (unscale reads
and writes every fp32 gradient: 8 B/element; the norm reads it, the clip multiply reads and
writes it: 12 B/element) and ATen ops dispatched per call (counted with a TorchDispatchMode:
each is a kernel launch on a GPU). On a GPU (when present) the same rows run on CUDA tensors.
Results go to stdout and bench/results/grad_ops-<time>.json with machine, versions, commit.
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
from _common import OpCount, environment, report, time_interleaved  # noqa: E402
from bench_adamw import gpt2_124m_shapes  # noqa: E402
from fasttrain.ops import dispatch, native  # noqa: E402


def ops_per_call(fn) -> int:
    fn()  # first-call set-up (e.g. a cached scratch flag) is not per call
    with OpCount() as counter:
        fn()
    return counter.n


def make_grads(shapes, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, device=device, generator=gen) * 1e-3 for s in shapes]


def rows_for(shapes, device) -> tuple[dict, dict]:
    """({row name: callable}, {op: torch's row name}) on fresh gradients per row."""
    ours_unscale = dispatch.implementation("unscale_and_check_", device)
    ours_norm = dispatch.implementation("grad_norm", device)
    grads = {name: make_grads(shapes, device) for name in ("ours_u", "torch_u")}
    params = {}
    for name in ("ours_c", "torch_c"):
        params[name] = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for p, g in zip(params[name], make_grads(shapes, device)):
            p.grad = g
    inv = torch.full((), 1.0, device=device)  # keeps the gradients' values across repetitions
    found = torch.zeros((), device=device)
    rows = {
        f"unscale fasttrain ({ours_unscale})":
            lambda: dispatch.unscale_and_check_(grads["ours_u"], inv, found),
        "unscale torch foreach":
            lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads["torch_u"], found, inv),
        f"clip fasttrain (norm {ours_norm})":
            lambda: dispatch.clip_grad_norm_(params["ours_c"], 1e9),
        "clip torch.nn.utils.clip_grad_norm_":
            lambda: torch.nn.utils.clip_grad_norm_(params["torch_c"], 1e9),
    }
    return rows, {"unscale": "unscale torch foreach", "clip": "clip torch.nn.utils.clip_grad_norm_"}


def run_set(label, shapes, device, reps) -> list[dict]:
    n = sum(torch.Size(s).numel() for s in shapes)
    rows, baselines = rows_for(shapes, device)
    counts = {name: ops_per_call(fn) for name, fn in rows.items()}
    times = time_interleaved(rows, reps, device, warmup=2)
    results = []
    for op, per_element in (("unscale", 8), ("clip", 12)):
        subset = {name: t for name, t in times.items() if name.startswith(op)}
        title = f"{label} ({n / 1e6:.2f}M fp32 elements in {len(shapes)} tensors, {device}): {op}"
        out = report(title, subset, baselines[op], bytes_moved=n * per_element,
                     extra={"set": label, "device": device, "op": op})
        for row in out:
            row["aten_ops_per_call"] = counts[row["row"]]
            print(f"    {row['row']}: {row['aten_ops_per_call']} ATen ops per call")
        results += out
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--scale", type=float, default=0.25, help="shrink GPT-2's vocab/positions")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(ops_library=native.library_path(), ops_build=native.build_info())
    print(f"{env['cpu']}, {env['threads']} threads, load {env['load_avg_1min']:.1f} | torch "
          f"{env['torch']} | commit {env['commit']}")
    sets = [("gpt2-124m shapes", gpt2_124m_shapes(args.scale)), ("tiny Linear(16,1)", [(1, 16), (1,)])]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = [row for device in devices for label, shapes in sets
               for row in run_set(label, shapes, device, args.reps)]
    if "cuda" not in devices:
        print("\nGPU rows: skipped: no GPU")
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"grad_ops-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"env": env, "rows": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
