"""BucketedDDP vs torch DistributedDataParallel: two gloo processes on CPU, side by side.

    python bench/bench_ddp.py [--width 512 --depth 8 --batch 16 --steps 15 --rounds 3]

For each bucket size of the sweep, the same model (an MLP-block stack, residual, LayerNorm)
is trained with SGD by BucketedDDP, torch DDP (same bucket_cap_mb, 1 MiB first bucket), and
BucketedDDP with bf16 communication; the variants alternate step by step (rotating which
goes first) so machine noise hits all of them alike. Reported per variant: step time p20/p50/p80 (ms), the ratio of medians
against torch DDP, and for BucketedDDP the fraction of all-reduce bytes launched while
gradients were still being computed (before the last gradient of the backward was ready)
and the share launched at least 1 ms before backward ended.
A local step without communication is timed too, as the floor. Results (with machine,
versions and git commit) are printed and written to bench/results/bench_ddp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as TorchDDP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from _common import environment, spread  # noqa: E402

from fasttrain.distributed import BucketedDDP  # noqa: E402
from tests._ddp_workers import Block  # noqa: E402  (the distributed tests' residual MLP block)


def build_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(width) for _ in range(depth)], nn.Linear(width, width))


def make_variant(kind: str, args, cap_mb: float):
    model = build_model(args.width, args.depth)
    if kind == "local":
        wrapped = model
    elif kind == "torch":
        wrapped = TorchDDP(model, bucket_cap_mb=cap_mb)
    else:
        comm = torch.bfloat16 if kind == "fasttrain_bf16" else None
        wrapped = BucketedDDP(model, bucket_cap_mb=cap_mb, first_bucket_cap_mb=1, comm_dtype=comm)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    return wrapped, opt


def run_steps(wrapped, opt, x, steps, times, fractions):
    for _ in range(steps):
        start = time.perf_counter()
        if isinstance(wrapped, BucketedDDP):
            wrapped.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)
        wrapped(x).square().mean().backward()
        opt.step()
        times.append((time.perf_counter() - start) * 1e3)
        if isinstance(wrapped, BucketedDDP):
            stats = wrapped.stats
            fractions.append((stats.fraction_bytes_launched_early, stats.fraction_bytes_launched_before_end(1e-3)))


def bench_cap(args, cap_mb: float) -> dict:
    kinds = ["local", "torch", "fasttrain", "fasttrain_bf16"]
    variants = {k: make_variant(k, args, cap_mb) for k in kinds}
    x = torch.randn(args.batch, args.seq, args.width)
    times = {k: [] for k in kinds}
    fractions = {k: [] for k in kinds}
    for k in kinds:  # warm-up (and BucketedDDP's bucket rebuild after iteration 1)
        run_steps(*variants[k], x, 2, [], [])
    for i in range(args.rounds * args.steps):  # interleaved step by step, rotating who goes first
        for k in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            run_steps(*variants[k], x, 1, times[k], fractions[k])
    out = {k: spread(times[k]) for k in kinds}
    for k in ("fasttrain", "fasttrain_bf16"):
        out[k]["fraction_bytes_launched_early"] = statistics.mean(f[0] for f in fractions[k])
        out[k]["fraction_bytes_launched_1ms_before_end"] = statistics.mean(f[1] for f in fractions[k])
        out[k]["buckets"] = len(variants[k][0].bucket_indices)
        out[k]["vs_torch_p50"] = out[k]["p50"] / out["torch"]["p50"]
    return out


def worker(rank: int, args, init_file: str, result_path: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {str(cap): bench_cap(args, cap) for cap in args.caps}
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def bench_environment(args) -> dict:
    params = sum(p.numel() for p in build_model(args.width, args.depth).parameters())
    model = f"{args.depth} x MLP block (d={args.width}), batch {args.batch}x{args.seq}"
    return environment(backend="gloo", world_size=2, threads_per_rank=args.threads,
                       params=params, grad_mib=params * 4 / 2**20, model=model)


def print_table(env: dict, results: dict) -> None:
    print(f"# {env['model']}, {env['params'] / 1e6:.1f}M params ({env['grad_mib']:.0f} MiB grads); "
          f"torch {env['torch']}, {env['cores']} CPUs, commit {env['commit']}")
    print(f"{'cap MiB':>8} {'variant':>15} {'p20 ms':>8} {'p50 ms':>8} {'p80 ms':>8} "
          f"{'/torch':>7} {'early bytes':>11} {'>=1ms early':>11} {'buckets':>7}")
    for cap, row in results.items():
        for kind, m in row.items():
            ratio = f"{m['vs_torch_p50']:.3f}" if "vs_torch_p50" in m else ""
            early = f"{m['fraction_bytes_launched_early']:.2%}" if "buckets" in m else ""
            early_ms = f"{m['fraction_bytes_launched_1ms_before_end']:.2%}" if "buckets" in m else ""
            print(f"{cap:>8} {kind:>15} {m['p20']:8.1f} {m['p50']:8.1f} {m['p80']:8.1f} "
                  f"{ratio:>7} {early:>11} {early_ms:>11} {m.get('buckets', ''):>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--caps", type=float, nargs="+", default=[1.0, 5.0, 25.0, 100.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "results.json")
        mp.spawn(worker, args=(args, os.path.join(tmp, "rdv"), result_path), nprocs=2, join=True)
        with open(result_path) as f:
            results = json.load(f)
    env = bench_environment(args)
    print_table(env, results)
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "bench_ddp.json"), "w") as f:
        json.dump({"environment": env, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
