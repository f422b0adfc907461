"""Runs the parts in order, each in a subprocess under its own time limit and under one total
limit, and writes OUTDIR/gpu_check.json (schema below) and OUTDIR/summary.txt.

gpu_check.json:
    {"schema": "fasttrain.gpu_check/1", "started": ISO time, "total_s", "total_limit_s",
     "device": "cuda" | "cpu", "commit", "argv",
     "parts": {name: {"status": "pass"|"fail"|"skipped"|"timeout"|"error", "seconds",
                      "limit_s", "reason" (unless pass), "summary" (one line), ...details}},
     "results_bytes": size of OUTDIR at the end}
Per-part logs (stdout+stderr, last 256 KiB) go to OUTDIR/logs/<part>.log.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fasttrain.cli.gpu_check.inventory import REPO_ROOT

SCHEMA = "fasttrain.gpu_check/1"
STATUSES = ("pass", "fail", "skipped", "timeout", "error")
# (name, worker target, time limit in seconds, GPU only): the cheap and telling parts first,
# so a slow end-to-end run can only cost itself. The limits add up to more than the total on
# purpose. A GPU-only part is reported skipped without a GPU, without starting a process
# (tests/test_gpu_check.py runs the speed code on CPU at toy sizes instead).
PARTS = [
    ("environment", "environment", 30, False),
    ("build_ops", "correctness:build", 180, True),
    ("correctness", "correctness", 150, False),
    ("gpu_tests", "correctness:gpu_tests", 90, True),
    ("host_sync", "host_sync", 90, False),
    ("distributed", "dist_smoke", 60, False),
    ("speed_adamw", "speed:adamw", 45, True),
    ("speed_linear_cross_entropy", "speed:linear_cross_entropy", 45, True),
    ("speed_step_overhead", "speed:step_overhead", 60, True),
    ("speed_end_to_end", "speed:end_to_end", 180, True),
]
PART_NAMES = [name for name, *_ in PARTS]
TOTAL_LIMIT_S = 465  # under eight minutes, with room for writing the results
MIN_PART_S = 10  # a part that would get less is reported as skipped: out of time
LOG_TAIL_BYTES = 256 * 1024
RESULTS_LIMIT_BYTES = 16 * 1024 * 1024


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("TRITON_INTERPRET", None)  # compiled Triton on a GPU; nothing launches it on CPU
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _tail(path: Path) -> None:
    if path.stat().st_size > LOG_TAIL_BYTES:
        with open(path, "rb") as f:
            f.seek(-LOG_TAIL_BYTES, os.SEEK_END)
            data = f.read()
        path.write_bytes(b"[... earlier output cut ...]\n" + data)


def worker_command(target: str, result_path: Path, outdir: Path, limit_s: float) -> list[str]:
    return [sys.executable, "-m", "fasttrain.cli.gpu_check.worker", target, str(result_path),
            str(outdir), str(limit_s)]


def run_part(name: str, target: str, limit_s: float, outdir: Path) -> dict:
    result_path = outdir / f".{name}.json"
    log_path = outdir / "logs" / f"{name}.log"
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(worker_command(target, result_path, outdir, limit_s), stdout=log,
                                stderr=subprocess.STDOUT, env=_worker_env(), cwd=REPO_ROOT,
                                start_new_session=True)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group only
            proc.wait()
    seconds = time.monotonic() - start
    _tail(log_path)
    partial_path = outdir / f"{name}.partial.json"  # what a part measured before it was cut
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        result_path.unlink()
    elif seconds >= limit_s:
        result = {"status": "timeout", "reason": f"timeout: still running after {limit_s:.0f} s "
                  f"(see logs/{name}.log)"}
        if partial_path.is_file():
            result["partial"] = json.loads(partial_path.read_text())
    else:
        result = {"status": "error", "reason": f"the worker exited with code {proc.returncode} "
                  f"and no result (see logs/{name}.log)"}
    partial_path.unlink(missing_ok=True)
    if result.get("status") not in STATUSES:
        result = {"status": "error", "reason": f"part returned status {result.get('status')!r}",
                  "returned": result}
    result["seconds"] = round(seconds, 1)
    result["limit_s"] = round(limit_s, 1)
    return result


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summary_text(report: dict) -> str:
    env = report["parts"].get("environment", {})
    lines = [f"fasttrain gpu_check  {report['started']}  commit {report['commit']}  "
             f"device {report['device']}",
             f"  {env.get('summary', '')}",
             f"total {report['total_s']:.0f} s (limit {report['total_limit_s']} s), "
             f"results {report['results_bytes'] / 1024:.0f} KiB", ""]
    for name, part in report["parts"].items():
        text = part.get("summary") or part.get("reason", "")
        lines.append(f"[{part['status']:>7}] {name:<28} {part['seconds']:>6.1f} s  {text}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasttrain.cli.gpu_check",
                                     description="Prove the GPU paths in one command "
                                     "(docs/gpu_check.md).")
    parser.add_argument("outdir", help="folder for gpu_check.json, summary.txt and logs/")
    parser.add_argument("--parts", default="", help="comma-separated subset of: "
                        + ", ".join(PART_NAMES))
    parser.add_argument("--total-limit", type=float, default=TOTAL_LIMIT_S,
                        help=f"seconds for all parts together (default {TOTAL_LIMIT_S})")
    args = parser.parse_args(argv)
    wanted = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(wanted) - set(PART_NAMES))
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}; choose from {PART_NAMES}")
    outdir = Path(args.outdir)
    (outdir / "logs").mkdir(parents=True, exist_ok=True)
    import torch

    gpu = torch.cuda.is_available()
    report = {"schema": SCHEMA,
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "device": "cuda" if gpu else "cpu", "commit": _commit(),
              "argv": sys.argv[1:], "total_limit_s": args.total_limit, "parts": {}}
    t0 = time.monotonic()
    for name, target, limit, gpu_only in PARTS:
        if wanted and name not in wanted:
            continue
        left = args.total_limit - (time.monotonic() - t0)
        if gpu_only and not gpu:
            report["parts"][name] = {"status": "skipped", "seconds": 0.0, "limit_s": 0.0,
                                     "reason": "skipped: no GPU (torch.cuda.is_available() is False)"}
        elif left < MIN_PART_S:
            report["parts"][name] = {"status": "skipped", "seconds": 0.0, "limit_s": 0.0,
                                     "reason": f"skipped: out of time ({left:.0f} s left of "
                                     f"{args.total_limit:.0f} s)"}
        else:
            report["parts"][name] = run_part(name, target, min(limit, left), outdir)
        print(f"[{report['parts'][name]['status']:>7}] {name} "
              f"({report['parts'][name]['seconds']:.0f} s)", flush=True)
    report["total_s"] = round(time.monotonic() - t0, 1)
    report["results_bytes"] = 0
    size = report["parts"]["results_size"] = {"status": "pass", "seconds": 0.0, "limit_s": 0.0}
    for _ in range(3):  # the size includes the files that report it
        (outdir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (outdir / "summary.txt").write_text(summary_text(report))
        report["results_bytes"] = _dir_bytes(outdir)
        small = report["results_bytes"] <= RESULTS_LIMIT_BYTES
        size.update(status="pass" if small else "fail", bytes=report["results_bytes"],
                    summary=f"{report['results_bytes'] / 1024:.0f} KiB in {outdir} "
                    f"(limit {RESULTS_LIMIT_BYTES >> 20} MiB)")
        if not small:
            size["reason"] = "the results folder is over the limit: see which logs grew"
    print(summary_text(report), end="")
    return 0
