"""Training step of the built-in GPT in fp32, bf16, fp16 + DynamicLossScaler, and bf16
weights with fp32 masters; fp16 + torch.amp.GradScaler as the peer for the scaler.

    python3 bench/bench_precision.py [--reps 15] [--warmup 3] [--threads N] [--device cpu]
        [--n-layer 2 --n-embd 256 --n-head 4 --vocab 4096 --seq-len 64 --batch 4]

The default model is small because CPUs without native bf16/fp16 matmul (AVX2-only, as
on this project's machines) run half-precision GEMMs ~10x slower than fp32; pass a
GPT-2-sized config on a GPU or an AMX/AVX512-BF16 CPU.

A step is the Trainer's precision path written out: forward under autocast_context, fp32
loss (the model's fused linear cross-entropy returns fp32), scaled backward, unscale_, clip
to 1.0, FusedAdamW step skipped on the device flag, scaler update. Rows run interleaved,
one step each per repetition, so machine noise hits every row alike. Reported per row:
tokens/s (p20/p50/p80), speed relative to fp32, and peak memory of a fresh process that
builds the row and runs warmup + 2 steps (peak sampled RSS above the pre-model baseline
on CPU, max_memory_allocated on CUDA). A second table times the scaler alone (unscale_ + update)
on the same gradients: DynamicLossScaler vs GradScaler. Results go to stdout and to
bench/results/precision-<time>.json with machine, versions and commit.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _common import environment, percentiles, sync, time_interleaved  # noqa: E402
from fasttrain.models import GPT, GPTConfig  # noqa: E402
from fasttrain.optim.adamw import FusedAdamW  # noqa: E402
from fasttrain.precision.mixed import (DynamicLossScaler, autocast_context,  # noqa: E402
                                 cast_floating_params_)

ROWS = ("fp32", "bf16", "fp16+scaler", "bf16-params+master", "fp16+GradScaler")


class Row:
    """One precision configuration: its own model, optimizer and scaler."""

    def __init__(self, name: str, cfg: GPTConfig, device: torch.device):
        self.name, self.device = name, device
        torch.manual_seed(0)
        self.model = GPT(cfg).to(device)
        master = name == "bf16-params+master"
        if master:
            cast_floating_params_(self.model, torch.bfloat16)
        self.opt = FusedAdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1,
                              master_weights=master)
        self.bf16, self.fp16 = name.startswith("bf16"), name.startswith("fp16")
        self.scaler = None
        if name == "fp16+scaler":
            self.scaler = DynamicLossScaler()
        elif name == "fp16+GradScaler":
            self.scaler = torch.amp.GradScaler(device.type)

    def step(self, batch: dict) -> None:
        with autocast_context(self.device, bf16=self.bf16, fp16=self.fp16):
            loss = self.model(**batch).loss
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.scaler.step(self.opt)
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


def make_batch(cfg: GPTConfig, batch: int, seq_len: int, device) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def time_rows(rows: list[Row], batch: dict, reps: int, warmup: int) -> dict[str, list[float]]:
    steps = {row.name: functools.partial(row.step, batch) for row in rows}
    return time_interleaved(steps, reps, rows[0].device, warmup=warmup)


def time_scalers(cfg: GPTConfig, batch: dict, device, reps: int) -> dict[str, list[float]]:
    """unscale_ + update alone, on one set of fp16-autocast gradients (restored each rep)."""
    row = Row("fp16+scaler", cfg, device)
    with autocast_context(device, bf16=False, fp16=True):
        loss = row.model(**batch).loss
    (loss * 2.0**16).backward()
    grads = [p.grad.clone() for p in row.model.parameters()]
    scalers = {"DynamicLossScaler": DynamicLossScaler(),
               "GradScaler": torch.amp.GradScaler(device.type)}
    for s in scalers.values():
        s.scale(loss)  # creates the state on the device
    times = {name: [] for name in scalers}
    for _ in range(reps + 2):
        for name, scaler in scalers.items():
            for p, g in zip(row.model.parameters(), grads):
                p.grad.copy_(g)
            sync(device)
            start = time.perf_counter()
            scaler.unscale_(row.opt)
            scaler.update()  # consumes the found_inf that unscale_ recorded
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: t[2:] for name, t in times.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_child(name: str, cfg: GPTConfig, args, device) -> int:
    """In a fresh process: peak bytes above the pre-model baseline while building `name`
    and training it (CPU: current RSS sampled every millisecond; CUDA: the allocator)."""
    # Load every library and lazy kernel on a throwaway model first: the baseline then
    # excludes them and the peak above it is this row's model, optimizer and activations.
    tiny = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8)
    Row(name, tiny, device).step(make_batch(tiny, 1, 8, device))
    baseline, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    batch = make_batch(cfg, args.batch, args.seq_len, device)
    row = Row(name, cfg, device)
    for _ in range(args.warmup + 2):
        row.step(batch)
    sync(device)
    done.set()
    sampler.join()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return max(peak[0], rss_bytes()) - baseline


def peak_memory(name: str, argv: list[str]) -> int:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", name],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq_len, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd)
    if args.child:
        print(peak_memory_child(args.child, cfg, args, device))
        return
    names = [n for n in args.rows.split(",") if n]
    unknown = set(names) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown --rows {sorted(unknown)}; choose from {ROWS}")
    batch = make_batch(cfg, args.batch, args.seq_len, device)
    times = time_rows([Row(n, cfg, device) for n in names], batch, args.reps, args.warmup)
    memory = {n: peak_memory(n, argv) for n in names}
    scaler_times = time_scalers(cfg, batch, device, args.reps)
    tokens = args.batch * args.seq_len
    base = percentiles(times[names[0]])[1]
    results = {"env": environment(device=device.type), "config": vars(args), "rows": {},
               "scaler": {}}
    print(f"{'row':22s} {'tok/s p20':>10s} {'p50':>10s} {'p80':>10s} {'vs ' + names[0]:>9s} "
          f"{'peak MiB':>9s} {'mem vs':>7s}")
    for name in names:
        p20, p50, p80 = percentiles(times[name])
        rec = {"tokens_per_s": [tokens / p80, tokens / p50, tokens / p20],
               "speed_vs_first": base / p50, "peak_bytes": memory[name],
               "memory_vs_first": memory[name] / memory[names[0]]}
        results["rows"][name] = rec
        print(f"{name:22s} {tokens / p80:10.0f} {tokens / p50:10.0f} {tokens / p20:10.0f} "
              f"{rec['speed_vs_first']:9.2f} {memory[name] / 2**20:9.1f} "
              f"{rec['memory_vs_first']:7.2f}")
    print(f"\nscaler alone (unscale_ + update), {sum(p.numel() for p in GPT(cfg).parameters())}"
          " parameters:")
    ref = percentiles(scaler_times["GradScaler"])[1]
    for name, samples in scaler_times.items():
        p20, p50, p80 = (t * 1e3 for t in percentiles(samples))
        results["scaler"][name] = {"ms": [p20, p50, p80], "vs_gradscaler": p50 / (ref * 1e3)}
        print(f"  {name:18s} {p20:8.3f} {p50:8.3f} {p80:8.3f} ms (p20/p50/p80), "
              f"{p50 / (ref * 1e3):.2f}x GradScaler")
    print(json.dumps(results["env"]))
    out = ROOT / "bench" / "results" / f"precision-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
