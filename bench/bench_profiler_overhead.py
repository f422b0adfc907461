"""Profiler overhead: step time of a training loop with profiling on vs off, side by side.

Both variants train the same built-in GPT with the same optimizer in one process; they
alternate in blocks of steps (off, on, off, on, ...) so machine load drifts hit both alike.
"on" is what the Trainer does: step_begin, data/forward/backward/optimizer phases,
step_end, and log_metrics() every --log-every steps, with the hardware sampler thread
running. Also reports the bare cost of the profiler calls on an empty step (microseconds).
Goal: on/off median ratio below 1.02.

    python bench/bench_profiler_overhead.py [--steps 200] [--block 10] [--model tiny]
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
from _common import environment, spread  # noqa: E402
from fasttrain.models import GPT, MODEL_SIZES, GPTConfig  # noqa: E402
from fasttrain.profiler.profiler import Profiler, ProfilerConfig, flops_per_token_for  # noqa: E402


def train_block(model, opt, batches, prof: Profiler | None, log_every: int, steps_done: int):
    """Run len(batches) steps; returns the wall time of each step (seconds)."""
    times = []
    for i, x in enumerate(batches):
        start = time.perf_counter()
        if prof is None:
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            prof.step_begin()
            with prof.phase("data"):
                batch = x
            with prof.phase("forward"):
                loss = model(batch, labels=batch).loss
            with prof.phase("backward"):
                loss.backward()
            with prof.phase("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            prof.step_end(tokens=x.numel(), samples=x.shape[0])
            if (steps_done + i + 1) % log_every == 0:
                prof.log_metrics()
        times.append(time.perf_counter() - start)
    return times


def empty_step_cost_us(n: int = 20000) -> float:
    prof = Profiler(ProfilerConfig(warmup_steps=0), "cpu")
    start = time.perf_counter()
    for _ in range(n):
        prof.step_begin()
        for name in ("data", "forward", "backward", "optimizer"):
            with prof.phase(name):
                pass
        prof.step_end(tokens=1, samples=1)
    cost = (time.perf_counter() - start) / n * 1e6
    prof.close()
    return cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=sorted(MODEL_SIZES))
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    ap.add_argument("--block", type=int, default=10, help="steps per alternation block")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared, oversubscribed machine "
                         "OpenMP spin-waiting makes multi-threaded step times swing by 10x)")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    result = measure(args)
    report(args, result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    size = dict(MODEL_SIZES[args.model])
    size["block_size"] = max(size.get("block_size", 0), args.seq_len)
    model = GPT(GPTConfig(**size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = model.config.vocab_size
    prof = Profiler(ProfilerConfig(warmup_steps=0, sample_interval_s=1.0), "cpu",
                    flops_per_token=flops_per_token_for(model, args.seq_len))
    make = lambda: [torch.randint(0, vocab, (args.batch, args.seq_len)) for _ in range(args.block)]  # noqa: E731
    train_block(model, opt, make(), None, args.log_every, 0)  # warm-up, both paths
    train_block(model, opt, make(), prof, args.log_every, 0)
    off, on, paired = [], [], []
    while len(off) < args.steps:
        block_off = train_block(model, opt, make(), None, args.log_every, 0)
        block_on = train_block(model, opt, make(), prof, args.log_every, len(on))
        paired.append(spread(block_on)["p50"] / spread(block_off)["p50"])
        off, on = off + block_off, on + block_on
    prof.close()
    result = {
        "off": spread(off), "on": spread(on),
        "ratio_p50": spread(on)["p50"] / spread(off)["p50"],
        "paired_block_ratio": spread(paired),
        "empty_step_profiler_cost_us": empty_step_cost_us(),
        "config": vars(args), "machine": environment(),
    }
    return result


def report(args: argparse.Namespace, result: dict) -> None:
    print(f"model {args.model}, B={args.batch}, T={args.seq_len}, {args.steps} steps per variant, "
          f"alternating blocks of {args.block}")
    print(f"{'variant':10s} {'p20 ms':>10s} {'p50 ms':>10s} {'p80 ms':>10s}")
    for name in ("off", "on"):
        p = result[name]
        print(f"{name:10s} {p['p20'] * 1e3:10.3f} {p['p50'] * 1e3:10.3f} {p['p80'] * 1e3:10.3f}")
    pr = result["paired_block_ratio"]
    print(f"on/off (p50 of all steps): {result['ratio_p50']:.4f}   goal < 1.02")
    print(f"on/off per adjacent block pair: p20 {pr['p20']:.4f}  p50 {pr['p50']:.4f}  p80 {pr['p80']:.4f}")
    print(f"profiler calls on an empty step: {result['empty_step_profiler_cost_us']:.1f} us")
    print(f"machine: {result['machine']}")


if __name__ == "__main__":
    main()
