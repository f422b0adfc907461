"""cross_entropy forward+backward: fasttrain vs torch (eager and torch.compile) vs Liger.

    python3 bench/bench_cross_entropy.py [--tokens 4096] [--vocab 32768] [--reps 10]

CPU rows always run (fasttrain's CPU path against F.cross_entropy). GPU rows run when CUDA
is present (the Triton kernel, bf16 logits; GB/s counts the kernel's own traffic: read the
logits twice, write the gradient once) and print "skipped: no GPU" otherwise. Rows are
timed interleaved, one call each per repetition; reported p20/p50/p80 and the ratio of
medians against torch eager. Also defines the helpers the other kernel benchmarks import.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fasttrain.kernels import cross_entropy  # noqa: E402

# Peak HBM bandwidth, bytes/s, by device-name substring (vendor datasheets).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12,
                  "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "A100-SXM4-80GB": 2.04e12,
                  "A100-SXM4-40GB": 1.56e12, "A100 80GB PCIe": 1.94e12}


def environment() -> dict:
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=root).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "fasttrain"],
                           capture_output=True, text=True, cwd=root).stdout.strip()
    import triton
    env = {"commit": commit + ("+dirty" if dirty else ""), "machine": platform.machine(),
           "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return env


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def peak_bandwidth() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def spread(samples: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 of the samples."""
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]  # noqa: E731
    return pick(0.2), pick(0.5), pick(0.8)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()  # sync: timing boundary


def time_interleaved(rows: dict, reps: int, device: str, warmup: int = 2) -> dict:
    """{name: [seconds per call]}: every row runs once per repetition, in turn."""
    for fn in rows.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in rows}
    for _ in range(reps):
        for name, fn in rows.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def report(title: str, times: dict, baseline: str, bytes_moved: int | None = None,
           extra: dict | None = None) -> list[dict]:
    base = spread(times[baseline])[1]
    bw = peak_bandwidth()
    print(f"\n{title}")
    out = []
    for name, ts in times.items():
        p20, p50, p80 = spread(ts)
        row = {"row": name, "p20_ms": p20 * 1e3, "p50_ms": p50 * 1e3, "p80_ms": p80 * 1e3,
               f"speedup_vs_{baseline}": base / p50}
        line = (f"  {name:28s} p20 {p20*1e3:9.2f}  p50 {p50*1e3:9.2f}  p80 {p80*1e3:9.2f} ms"
                f"  x{base / p50:5.2f} vs {baseline}")
        if bytes_moved:
            row["GB/s"] = bytes_moved / p50 / 1e9
            line += f"  {row['GB/s']:8.1f} GB/s"
            if bw:
                row["pct_peak_bw"] = 100 * bytes_moved / p50 / bw
                line += f" ({row['pct_peak_bw']:.0f}% of peak)"
        print(line)
        out.append(dict(row, **(extra or {})))
    return out


def _ce_rows(logits, target):
    def fasttrain_ce():
        logits.grad = None
        cross_entropy(logits, target).backward()

    def torch_ce():
        logits.grad = None
        F.cross_entropy(logits.float(), target).backward()

    compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t))

    def torch_compile_ce():
        logits.grad = None
        compiled(logits, target).backward()

    rows = {"torch": torch_ce, "fasttrain": fasttrain_ce, "torch.compile": torch_compile_ce}
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
        if logits.is_cuda:
            def liger_ce():
                logits.grad = None
                liger_cross_entropy(logits, target).backward()
            rows["liger"] = liger_ce
    except ImportError:
        pass
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    results = {"env": environment(), "rows": []}
    N, V = args.tokens, args.vocab
    x = torch.randn(N, V, requires_grad=True)
    t = torch.randint(0, V, (N,))
    results["rows"] += report(f"CPU fp32 cross_entropy fwd+bwd, N={N} V={V}",
                              time_interleaved(_ce_rows(x, t), args.reps, "cpu"), "torch",
                              extra={"device": "cpu"})
    if torch.cuda.is_available():
        x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, V, (N,), device="cuda")
        results["rows"] += report(
            f"GPU bf16 cross_entropy fwd+bwd, N={N} V={V}",
            time_interleaved(_ce_rows(x, t), args.reps, "cuda"), "torch",
            bytes_moved=3 * N * V * 2, extra={"device": "cuda"})
    else:
        print("\nGPU rows: skipped: no GPU")
    print(json.dumps(results["env"]))


if __name__ == "__main__":
    main()
