"""Training step of the built-in GPT: eager vs per-block compile vs whole-model compile.

    python3 bench/bench_compile.py [--rounds 15] [--batch 8] [--seq-len 256] [--n-layer 4]
                                   [--n-embd 128] [--n-head 4] [--threads N] [--no-cache-runs]

Part 1, side by side in one process: three copies of one GPT (same weights), each with its
own fused AdamW, run one full training step (forward, backward, optimizer, zero_grad) each
per round, interleaved, so machine noise hits every row alike. Reported per row: step time
p20/p50/p80, tokens/s at p50, and the speed-up against eager as p20/p50/p80 of the per-round
ratios eager_time / row_time. Compile time per row is `CompileMonitor.compile_time_s`
(wall time inside torch.compile's compile callbacks, lazy backward compile included); the
first-step time minus the steady p50 is printed beside it as a cross-check.

Part 2, the compile cache: for each compiled mode, two fresh processes share a new, empty
Inductor cache directory: the first compiles cold, the second finds the cache warm.

Results go to stdout and bench/results/compile-<time>.json with machine, versions, commit.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # measure compiled kernels, never the interpreter
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, percentiles  # noqa: E402
from fasttrain.compile.apply import CompileMonitor, apply_compile  # noqa: E402
from fasttrain.models.gpt import GPT, GPTConfig  # noqa: E402

MODES = {"eager": None, "per-block": True, "whole-model": False}  # name -> per_block


class Row:
    """One model copy with its optimizer; `step()` is one full training step."""

    def __init__(self, model: GPT, batch: torch.Tensor):
        self.model, self.batch = model, batch
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(self) -> float:
        start = time.perf_counter()
        loss = self.model(self.batch, labels=self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.batch.is_cuda:
            torch.cuda.synchronize()  # sync: time the step, not its launch
        return time.perf_counter() - start


def build_row(mode: str, base: GPT, batch: torch.Tensor) -> tuple[Row, dict]:
    model = copy.deepcopy(base)
    monitor = CompileMonitor().start()
    if MODES[mode] is not None:
        apply_compile(model, per_block=MODES[mode])
    row = Row(model, batch)
    first = row.step()  # compiles forward and backward
    second = row.step()
    monitor.stop()
    return row, {"first_step_s": first, "second_step_s": second, **monitor.stats()}


def side_by_side(args, config: GPTConfig, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    base = GPT(config).to(device)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    rows, warm = {}, {}
    for mode in MODES:
        rows[mode], warm[mode] = build_row(mode, base, batch)
    times = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, row in rows.items():
            times[mode].append(row.step())
    tokens = args.batch * args.seq_len
    results = []
    for mode in MODES:
        p20, p50, p80 = percentiles(times[mode])
        ratios = [e / t for e, t in zip(times["eager"], times[mode])]
        results.append({"mode": mode, "step_p20_s": p20, "step_p50_s": p50, "step_p80_s": p80,
                        "tokens_per_s": tokens / p50,
                        "speedup_vs_eager_p20_p50_p80": percentiles(ratios),
                        "first_step_minus_p50_s": warm[mode]["first_step_s"] - p50,
                        **warm[mode]})
    return results


def cache_runs(args) -> list[dict]:
    results = []
    for mode in ("per-block", "whole-model"):
        with tempfile.TemporaryDirectory(prefix="fasttrain-compile-cache-") as cache_dir:
            for label in ("cold", "warm"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, "--cache-dir", cache_dir,
                     *child_args(args)], capture_output=True, text=True, check=True)
                stats = json.loads(out.stdout.strip().splitlines()[-1])
                results.append({"mode": mode, "cache": label, **stats})
    return results


def child_args(args) -> list[str]:
    return ["--batch", str(args.batch), "--seq-len", str(args.seq_len),
            "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd),
            "--n-head", str(args.n_head), "--threads", str(args.threads)]


def child(args, config: GPTConfig) -> None:
    """A fresh process: compile with the given cache directory, one training step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPT(config).to(device)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    monitor = CompileMonitor().start()
    apply_compile(model, per_block=MODES[args.child], cache_dir=args.cache_dir)
    first = Row(model, batch).step()
    print(json.dumps({"first_step_s": first, **monitor.stats()}))


def report(env: dict, config: GPTConfig, args, rows: list[dict], caches: list[dict]) -> None:
    print(f"GPT training step: L={config.n_layer} C={config.n_embd} H={config.n_head} "
          f"V={config.vocab_size}, batch {args.batch} x {args.seq_len} tokens | {env['cpu']}, "
          f"{env['threads']} threads, load {env['load_avg_1min']} | torch {env['torch']} | "
          f"commit {env['commit']}")
    print(f"{'mode':12s} {'p20 ms':>8s} {'p50 ms':>8s} {'p80 ms':>8s} {'tok/s':>8s} "
          f"{'vs eager p20/p50/p80':>21s} {'compile s':>9s} {'1st-p50 s':>9s} {'graphs':>6s}")
    for r in rows:
        s20, s50, s80 = r["speedup_vs_eager_p20_p50_p80"]
        print(f"{r['mode']:12s} {r['step_p20_s'] * 1e3:8.1f} {r['step_p50_s'] * 1e3:8.1f} "
              f"{r['step_p80_s'] * 1e3:8.1f} {r['tokens_per_s']:8.0f} "
              f"{s20:6.2f}/{s50:.2f}/{s80:.2f}x {r['compile_time_s']:9.1f} "
              f"{r['first_step_minus_p50_s']:9.1f} {r['graphs']:6d}")
    for r in caches:
        print(f"compile cache {r['mode']:12s} {r['cache']}: compile {r['compile_time_s']:.1f} s "
              f"(first step {r['first_step_s']:.1f} s), cache hits {r['cache_hits']}, "
              f"misses {r['cache_misses']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="timed steps per row")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--no-cache-runs", action="store_true", help="skip cold/warm processes")
    ap.add_argument("--child", choices=["per-block", "whole-model"], help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPTConfig(block_size=args.seq_len, n_layer=args.n_layer, n_embd=args.n_embd,
                       n_head=args.n_head)
    if args.child:
        return child(args, config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device=device.type)
    rows = side_by_side(args, config, device)
    caches = [] if args.no_cache_runs else cache_runs(args)
    report(env, config, args, rows, caches)
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"compile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"env": env, "config": vars(config), "args": vars(args),
                               "rows": rows, "cache_runs": caches}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
