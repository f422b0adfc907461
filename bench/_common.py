"""What every benchmark shares: the environment record, p20/p50/p80 summaries, interleaved
timing and the side-by-side report. The one home of these helpers: scripts import them with

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import environment, percentiles, ...
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
# Paths whose uncommitted edits change what a benchmark measures ("+dirty" on the commit).
SOURCE_PATHS = ("fasttrain", "kernels", "csrc", "bench")

# Peak HBM bandwidth, bytes/s, by device-name substring (vendor datasheets).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12,
                  "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "A100-SXM4-80GB": 2.04e12,
                  "A100-SXM4-40GB": 1.56e12, "A100 80GB PCIe": 1.94e12}


# ----------------------------------------------------------------------------- environment
def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit() -> str:
    """Short commit of the checkout, "+dirty" when fasttrain/kernels/csrc/bench have edits."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if _git("status", "--porcelain", "--", *SOURCE_PATHS) else "")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(**extra) -> dict:
    """Machine, versions and commit to record beside every result; `extra` is merged in."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    env = {"commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "os": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(),
           "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "python": platform.python_version(), "torch": torch.__version__,
           "triton": _version("triton"), "cuda": torch.version.cuda, "gpu": gpu}
    env.update(extra)
    return env


def peak_bandwidth() -> float | None:
    """The current GPU's peak memory bandwidth in bytes/s, None when unknown or no GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


# ----------------------------------------------------------------------------- summaries
def percentiles(values) -> tuple[float, float, float]:
    """p20, p50, p80 of the values (linear interpolation between samples)."""
    p20, p50, p80 = np.percentile(np.asarray(values, dtype=float), [20, 50, 80])
    return float(p20), float(p50), float(p80)


def spread(values) -> dict:
    """percentiles() as {"p20", "p50", "p80"}."""
    return dict(zip(("p20", "p50", "p80"), percentiles(values)))


def fmt(s: dict, unit: str = "", scale: float = 1.0) -> str:
    return f"{s['p50'] * scale:.3g}{unit} [p20 {s['p20'] * scale:.3g}, p80 {s['p80'] * scale:.3g}]"


# ----------------------------------------------------------------------------- timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # sync: timing boundary


def time_interleaved(rows: dict, reps: int, device, warmup: int = 2,
                     reps_of: dict | None = None) -> dict:
    """{name: [seconds per call]}: after `warmup` calls each, every row runs once per
    repetition, in turn, so machine noise hits all rows alike. `reps_of` caps the timed
    repetitions of slow rows ({name: reps})."""
    reps_of = reps_of or {}
    for fn in rows.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in rows}
    for rep in range(reps):
        for name, fn in rows.items():
            if rep >= reps_of.get(name, reps):
                continue
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def report(title: str, times: dict, baseline: str, bytes_moved: int | None = None,
           extra: dict | None = None) -> list[dict]:
    """Print one row per entry of `times` (p20/p50/p80 ms, ratio of medians against
    `baseline`, GB/s and percent of peak bandwidth when `bytes_moved` is given); return them."""
    base = percentiles(times[baseline])[1]
    bw = peak_bandwidth()
    width = max(28, *(len(name) for name in times))
    print(f"\n{title}")
    out = []
    for name, ts in times.items():
        p20, p50, p80 = percentiles(ts)
        row = {"row": name, "p20_ms": p20 * 1e3, "p50_ms": p50 * 1e3, "p80_ms": p80 * 1e3,
               f"speedup_vs_{baseline}": base / p50, "samples": len(ts)}
        line = (f"  {name:{width}s} p20 {p20*1e3:9.2f}  p50 {p50*1e3:9.2f}  p80 {p80*1e3:9.2f} ms"
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


# ----------------------------------------------------------------------------- op counting
class OpCount(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it (`n`): deterministic under load, and each one
    is a kernel launch on a GPU."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))
