"""Shared bits of the benchmarks: environment record and percentile summaries."""
import os
import platform
import subprocess

import numpy as np
import torch


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "commit": commit}


def spread(values) -> dict:
    p20, p50, p80 = np.percentile(np.asarray(values, dtype=float), [20, 50, 80])
    return {"p20": float(p20), "p50": float(p50), "p80": float(p80)}


def fmt(s: dict, unit: str = "", scale: float = 1.0) -> str:
    return f"{s['p50'] * scale:.3g}{unit} [p20 {s['p20'] * scale:.3g}, p80 {s['p80'] * scale:.3g}]"
