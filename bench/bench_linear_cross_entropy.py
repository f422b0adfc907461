"""linear_cross_entropy vs the unfused F.cross_entropy(hidden @ weight.T, target): peak memory
and time of forward+backward.

    python3 bench/bench_linear_cross_entropy.py [--tokens 4096] [--hidden 1024]
        [--vocab 65536] [--reps 3]

CPU (fp32, Linux): every measurement runs in a fresh process; "extra peak" = the peak RSS
during forward+backward (VmHWM, reset just before) minus the RSS with the inputs built. The floor
is the gradients themselves: grad_weight (V*H) + grad_hidden (N*H), printed as its own row.
Processes alternate fused/unfused, so machine noise hits both alike; memory and time are
p20/p50/p80 over those processes, and the time ratio is taken per fused/unfused pair.
Results also go to bench/results/linear_cross_entropy-<time>.json with machine and versions.
GPU (when present): bf16 at vocab 128256, torch.cuda.max_memory_allocated above the inputs,
otherwise "skipped: no GPU".
"""
from __future__ import annotations

import argparse
import json
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
    """Built in place (no temporaries), so building them leaves no freed peak behind."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.empty(N, H, device=device, dtype=dtype).normal_(generator=gen)
    weight = torch.empty(V, H, device=device, dtype=dtype).normal_(std=H ** -0.5, generator=gen)
    target = torch.randint(0, V, (N,), device=device, generator=gen)
    return hidden.requires_grad_(), weight.requires_grad_(), target


def _run(mode, hidden, weight, target):
    if mode == "fused":
        loss = linear_cross_entropy(hidden, weight, target)
    else:
        loss = F.cross_entropy((hidden @ weight.t()).float(), target)
    loss.backward()
    return loss


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def child(mode, N, H, V):
    """One measurement in this (fresh) process; prints a JSON line.

    Growth of peak RSS = the high-water mark during forward+backward minus the resident size
    just before. The mark is reset first (Linux: `5` into /proc/self/clear_refs), so a higher
    peak from earlier (imports, building the inputs) cannot hide part of the growth.
    """
    _run(mode, *_inputs(8, 16, 32, "cpu", torch.float32))  # first-call imports, tiny shape
    hidden, weight, target = _inputs(N, H, V, "cpu", torch.float32)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    _run(mode, hidden, weight, target)
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "extra_peak": _status_bytes("VmHWM") - before,
                      "seconds": seconds}))


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
    print(f"\nCPU fp32 fwd+bwd, tokens={N} hidden={H} vocab={V}, {args.reps} fresh processes per "
          f"row, interleaved; p50 [p20, p80]")
    print(f"  {'floor':8s} grad_weight + grad_hidden {floor / 2**20:8.0f} MiB (1.00x floor)")
    # time ratio per interleaved pair: both processes of a pair saw about the same machine load
    pair_ratio = percentiles([f["seconds"] / u["seconds"]
                              for f, u in zip(samples["fused"], samples["unfused"])])
    rows = []
    for mode, runs in samples.items():
        m20, m50, m80 = (m / 2**20 for m in percentiles([s["extra_peak"] for s in runs]))
        p20, p50, p80 = percentiles([s["seconds"] for s in runs])
        row = {"device": "cpu", "row": mode, "extra_peak_MiB": m50, "extra_peak_p20_MiB": m20,
               "extra_peak_p80_MiB": m80, "floor_MiB": floor / 2**20,
               "x_floor": m50 * 2**20 / floor, "p20_s": p20, "p50_s": p50, "p80_s": p80}
        line = (f"  {mode:8s} extra peak {m50:8.0f} MiB [{m20:.0f}, {m80:.0f}] "
                f"({row['x_floor']:5.2f}x floor)  time {p50:6.2f} s [{p20:.2f}, {p80:.2f}]")
        if mode == "fused":
            row["time_vs_unfused_p20_p50_p80"] = pair_ratio
            line += (f"  ({pair_ratio[1]:4.2f}x unfused [{pair_ratio[0]:.2f}, "
                     f"{pair_ratio[2]:.2f}] per pair)")
        rows.append(row)
        print(line)
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
    env = environment()
    results = {"env": env, "rows": cpu_rows(args) + gpu_rows(args)}
    print(f"{env['cpu']}, {env['threads']} threads, load {env['load_avg_1min']:.1f} | torch "
          f"{env['torch']} | commit {env['commit']}")
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"linear_cross_entropy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
