"""`fasttrain bench`: training throughput over a matrix of configurations.

Every configuration (model size x sequence length x batch x precision x compile x fused
kernels x DDP processes) runs in a fresh process (`fasttrain.cli.bench_worker`, under
`torch.distributed.run` when DDP > 1) for W warm-up steps (never timed) and M timed steps of
the real Trainer, R times, interleaved (every configuration once per repeat, in turn), so
drift on a loaded machine hits all alike. The table shows tokens/s as p50 [p20, p80] over
the repeats, MFU, peak memory, compile time and the speed-up against the first row (the
median of per-repeat ratios, with its p20/p80); a wide spread is warned about. CSV and JSON
files carry the same rows, every repeat, the machine, load, versions and git commit.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from fasttrain.cli.bench_worker import RESULT_PREFIX

AXES = ("model", "seq_len", "batch", "precision", "compile", "fused", "ddp")
PRECISIONS = ("fp32", "bf16", "fp16")
COLUMNS = ("model", "seq_len", "batch", "precision", "compile", "fused", "ddp", "tokens_per_second",
           "tps_p20", "tps_p80", "step_time_p50", "mfu", "peak_memory_gib", "compile_time_s", "speedup",
           "speedup_p20", "speedup_p80", "note", "error")
# (p80 - p20) / p50 of tokens/s above which the figures are flagged as unreliable
WIDE_SPREAD = 0.10


def _ints(name: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} {text!r}: expected comma-separated integers") from None
        if any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"--{name} {text!r}: every value must be >= 1")
        return values
    return parse


def _switches(name: str):
    def parse(text: str) -> list[bool]:
        table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
        try:
            return [table[v.strip().lower()] for v in text.split(",")]
        except KeyError:
            raise argparse.ArgumentTypeError(f"--{name} {text!r}: expected on/off values, e.g. off,on") from None
    return parse


def _choices(name: str, allowed):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",")]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"--{name}: {bad} not in {sorted(allowed)}")
        return values
    return parse


def build_matrix(args: argparse.Namespace) -> list[dict]:
    """Cartesian product of the axes, in the order given (the first row is the baseline)."""
    rows = []
    for values in itertools.product(*(getattr(args, axis) for axis in AXES)):
        cfg = dict(zip(AXES, values))
        cfg.update(warmup=args.warmup, steps=args.steps)
        rows.append(cfg)
    return rows


def worker_command(cfg: dict) -> list[str]:
    payload = json.dumps(cfg)
    if cfg["ddp"] == 1:
        return [sys.executable, "-m", "fasttrain.cli.bench_worker", payload]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={cfg['ddp']}", "-m", "fasttrain.cli.bench_worker", payload]


def run_config(cfg: dict, timeout_s: float, threads: int | None = None) -> dict:
    """Run one configuration in a fresh process; a failure becomes a row with `error`."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a benchmark measures compiled kernels, never the interpreter
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    try:
        proc = subprocess.run(worker_command(cfg), capture_output=True, text=True,
                              timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout_s:.0f} s (raise --timeout)"}
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return {**cfg, **json.loads(line[len(RESULT_PREFIX):]), "wall_s": wall}
    return {**cfg, "error": f"exit {proc.returncode}: {_error_line(proc.stderr + proc.stdout)}",
            "wall_s": wall}


def _error_line(text: str) -> str:
    """The exception line of a worker's output (torchrun wraps it in banners), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and set(ln.strip()) != {"="}]
    for line in lines:
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_repeats(runs: list[dict]) -> dict:
    """One row from the repeats of a configuration: tokens/s p20/p50/p80 over the repeats,
    the other figures from the median run; an error in any repeat makes an error row."""
    failed = [r for r in runs if r.get("error")]
    if failed:
        return {**failed[0], "repeats": len(runs)}
    tps = [r["tokens_per_second"] for r in runs]
    median_run = sorted(runs, key=lambda r: r["tokens_per_second"])[(len(runs) - 1) // 2]
    p20, p50, p80 = (_percentile(tps, q) for q in (0.2, 0.5, 0.8))
    if "tokens_per_second_per_device" in median_run:  # consistent with the p50 below
        median_run = {**median_run, "tokens_per_second_per_device": p50 / median_run.get("world_size", 1)}
    return {**median_run, "tokens_per_second": p50, "tps_p20": p20, "tps_p80": p80,
            "tps_spread": (p80 - p20) / p50 if p50 else None, "tokens_per_second_repeats": tps,
            "repeats": len(runs)}


def add_speedups(rows: list[dict]) -> None:
    """Speed-up against the first row: with repeats, the median (p20, p80) of the per-repeat
    ratios (repeat i of a row against repeat i of the baseline, run side by side)."""
    base = rows[0] if rows else {}
    base_reps = base.get("tokens_per_second_repeats")
    for row in rows:
        tps, reps = row.get("tokens_per_second"), row.get("tokens_per_second_repeats")
        if base_reps and reps and len(reps) == len(base_reps) and not row.get("error"):
            ratios = [a / b for a, b in zip(reps, base_reps)]
            row["speedup"], row["speedup_p20"], row["speedup_p80"] = (
                _percentile(ratios, q) for q in (0.5, 0.2, 0.8))
        else:
            row["speedup"] = tps / base.get("tokens_per_second") if base.get("tokens_per_second") and tps else None


def spread_warnings(rows: list[dict]) -> list[str]:
    return [f"warning: {_label(r)}: tokens/s spread {r['tps_spread']:.0%} over {r['repeats']} repeats "
            f"(p20 {r['tps_p20']:.4g}, p80 {r['tps_p80']:.4g}); the machine is busy or the run too "
            "short: treat these figures as unreliable (raise --steps/--repeats, run on an idle machine)"
            for r in rows if (r.get("tps_spread") or 0) > WIDE_SPREAD]


def _label(cfg: dict) -> str:
    return ", ".join(f"{k}={_cell(cfg, k)}" for k in AXES)


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def machine_info() -> dict:
    import torch

    info = {"host": socket.gethostname(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "git_commit": _git_commit(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    for name in ("triton", "transformers", "fasttrain"):
        try:
            from importlib.metadata import version
            info[name] = version(name)
        except Exception:
            info[name] = None
    return info


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if column == "mfu":
        return f"{value:.1%}"
    if column.startswith("speedup"):
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    columns = [c for c in COLUMNS if c not in ("note", "error") or any(r.get(c) for r in rows)]
    cells = [[_cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, "-" * len(line), *body])


def write_results(rows: list[dict], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, csv_path = out_dir / f"bench-{stamp}.json", out_dir / f"bench-{stamp}.csv"
    json_path.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        f.write("".join(f"# {k}: {v}\n" for k, v in meta.items()))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def main(args: argparse.Namespace) -> int:
    matrix = build_matrix(args)
    meta = machine_info()
    meta["omp_num_threads"] = args.threads or os.environ.get("OMP_NUM_THREADS")
    meta["repeats"] = args.repeats
    print(f"fasttrain bench: {len(matrix)} configuration(s) x {args.repeats} interleaved repeat(s), "
          f"{args.warmup} warm-up (not timed) + {args.steps} timed steps each, one fresh process per run",
          flush=True)
    runs: list[list[dict]] = [[] for _ in matrix]
    for rep in range(args.repeats):
        for i, cfg in enumerate(matrix):
            if runs[i] and runs[i][-1].get("error"):
                continue  # a failing configuration fails again: do not wait for it twice
            print(f"[repeat {rep + 1}/{args.repeats}, {i + 1}/{len(matrix)}] {_label(cfg)}", flush=True)
            runs[i].append(run_config(cfg, args.timeout, args.threads))
            if runs[i][-1].get("error"):
                print(f"    failed: {runs[i][-1]['error']}", flush=True)
    rows = [summarize_repeats(r) for r in runs]
    add_speedups(rows)
    print()
    print(format_table(rows))
    for line in spread_warnings(rows):
        print(line)
    print(f"machine: {meta['platform']}, {meta['cpu_count']} CPUs, load {meta['load_avg_1min']}, GPUs "
          f"{meta['gpus'] or 'none'}; torch {meta['torch']}, commit {meta['git_commit']}")
    json_path, csv_path = write_results(rows, meta, Path(args.out))
    print(f"wrote {json_path}\nwrote {csv_path}")
    return 1 if all(r.get("error") for r in rows) else 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `bench` to the fasttrain CLI's subparsers; sets `func`."""
    p = subparsers.add_parser(
        "bench", help="training throughput over a matrix of configurations",
        description="Run every combination of the comma-separated values below in a fresh process "
                    "(W warm-up + M timed steps of the built-in GPT with the fasttrain Trainer) and "
                    "print tokens/s, MFU, peak memory, compile time and speed-up against the first "
                    "row. Results go to OUT/bench-<time>.{csv,json} with machine, versions and commit. "
                    "The defaults finish in a few minutes on a 2-core CPU.")
    p.add_argument("--model", type=_choices("model", None), default=["tiny"],
                   help="built-in GPT sizes from fasttrain.models.MODEL_SIZES (default: tiny)")
    p.add_argument("--seq-len", dest="seq_len", type=_ints("seq-len"), default=[128],
                   help="sequence lengths (default: 128)")
    p.add_argument("--batch", type=_ints("batch"), default=[8], help="per-device batch sizes (default: 8)")
    p.add_argument("--precision", type=_choices("precision", PRECISIONS), default=["fp32"],
                   help="fp32, bf16, fp16 (autocast; default: fp32)")
    p.add_argument("--compile", type=_switches("compile"), default=[False, True],
                   help="torch.compile off/on (default: off,on)")
    p.add_argument("--fused", type=_switches("fused"), default=[False, True],
                   help="fused kernels off/on: off = adamw_torch + plain loss, on = fasttrain_adamw "
                        "+ fused loss (default: off,on)")
    p.add_argument("--ddp", type=_ints("ddp"), default=[1], help="data-parallel processes (default: 1)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps, not timed (default: 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of every configuration, interleaved; tokens/s is reported as "
                        "p50 [p20, p80] over them (default: 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for each worker (default: inherit; per process under DDP)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration (default: 900)")
    p.add_argument("--out", default="bench_results", help="output folder (default: bench_results)")
    p.set_defaults(func=_checked_main)
    return p


def _checked_main(args: argparse.Namespace) -> int:
    from fasttrain.models import MODEL_SIZES

    unknown = [m for m in args.model if m not in MODEL_SIZES]
    if unknown:
        raise SystemExit(f"fasttrain bench: --model {unknown} unknown; choose from {sorted(MODEL_SIZES)}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"fasttrain bench: --threads {args.threads}: must be >= 1")
    if args.repeats < 1:
        raise SystemExit(f"fasttrain bench: --repeats {args.repeats}: must be >= 1")
    if args.warmup < 0 or args.steps < 1:
        raise SystemExit(f"fasttrain bench: --warmup {args.warmup} / --steps {args.steps}: "
                         "need warmup >= 0 and steps >= 1")
    return main(args)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="fasttrain")
    register(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args()
    raise SystemExit(_args.func(_args))
