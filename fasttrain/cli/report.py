"""`fasttrain report RUN_DIR`: PNG plots and a one-page HTML summary of a finished run.

Reads `RUN_DIR/log_history.jsonl` (one JSON object per logged record, HF log_history keys:
step, loss, eval_loss, learning_rate, grad_norm, plus the profiler's tokens_per_second,
mfu, memory keys) and, when present, `RUN_DIR/profile.json` (Profiler.write). A run saved
by the HF Trainer works too: `trainer_state.json`'s log_history is used when there is no
JSONL. Writes `RUN_DIR/report/{loss,throughput,memory,optimizer}.png` and `index.html`
(images embedded, so the one file can be mailed or opened anywhere).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path

from fasttrain.extras import require

PLOTS = {
    "loss": ("Loss", "loss", [("loss", "train loss"), ("eval_loss", "eval loss")]),
    "throughput": ("Throughput", "tokens/s", [("tokens_per_second", "tokens/s (total)"),
                                              ("tokens_per_second_per_device", "tokens/s per device")]),
    "memory": ("Memory", "GiB", [("memory_allocated_peak_gib", "torch allocated (peak)"),
                                 ("memory_reserved_peak_gib", "torch reserved (peak)"),
                                 ("gpu_memory_used_gib", "GPU used (NVML)"),
                                 ("host_rss_gib", "host RSS"), ("host_rss_peak_gib", "host RSS (peak)")]),
    "optimizer": ("Learning rate and gradient norm", "value",
                  [("learning_rate", "learning rate"), ("grad_norm", "grad norm")]),
}


def load_log_history(run_dir: Path) -> list[dict]:
    """Records from log_history.jsonl (or trainer_state.json); errors name the bad line."""
    jsonl = run_dir / "log_history.jsonl"
    if jsonl.is_file():
        records = []
        for number, line in enumerate(jsonl.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{jsonl}:{number}: not valid JSON ({exc.msg}); each line must "
                                 "be one JSON object as the Trainer writes it") from None
            if not isinstance(record, dict):
                raise ValueError(f"{jsonl}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
        return records
    state = run_dir / "trainer_state.json"
    if state.is_file():
        return list(json.loads(state.read_text()).get("log_history", []))
    raise FileNotFoundError(f"{run_dir} has no log_history.jsonl (nor trainer_state.json): "
                            "point `fasttrain report` at the output_dir of a `fasttrain train` run")


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that have a numeric `key` and a step."""
    steps, values = [], []
    for r in records:
        value, step = r.get(key), r.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(step, (int, float)):
            steps.append(step)
            values.append(float(value))
    return steps, values


def plot(records: list[dict], name: str, path: Path) -> bool:
    """Draw one PNG; returns False (and writes nothing) when no record has its keys."""
    matplotlib = require("matplotlib", "report", "fasttrain report's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, ylabel, keys = PLOTS[name]
    lines = [(label, *series(records, key)) for key, label in keys]
    lines = [line for line in lines if line[1]]
    if name == "throughput" and len(lines) == 2 and lines[0][2] == lines[1][2]:
        lines = lines[:1]  # one device: per-device equals total, draw it once
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for index, (label, steps, values) in enumerate(lines):
        axis = ax.twinx() if name == "optimizer" and index == 1 else ax
        style = dict(marker="o", markersize=3) if len(steps) < 30 else {}
        axis.plot(steps, values, label=label, color=f"C{index}", **style)
        if axis is not ax:
            axis.set_ylabel(label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(lines[0][0] if name == "optimizer" else ylabel)
    if name in ("throughput", "memory"):
        top = max(max(values) for _, _, values in lines)  # absolute scale: small wiggles
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)    # must not look like big swings
    ax.grid(alpha=0.3)
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def headline(records: list[dict], profile: dict | None) -> list[tuple[str, str]]:
    """The numbers a person looks for first."""
    rows = []
    _, losses = series(records, "loss")
    _, evals = series(records, "eval_loss")
    steps = [r["step"] for r in records if isinstance(r.get("step"), (int, float))]
    if steps:
        rows.append(("steps", f"{max(steps):g}"))
    if losses:
        rows.append(("train loss (first -> last)", f"{losses[0]:.4f} -> {losses[-1]:.4f}"))
    if evals:
        rows.append(("eval loss (last / best)", f"{evals[-1]:.4f} / {min(evals):.4f}"))
    if profile:
        thr, mfu = profile.get("throughput", {}), profile.get("mfu", {})
        if thr.get("tokens_per_second") is not None:
            rows.append(("tokens/s (total)", f"{thr['tokens_per_second']:.4g}"))
        rows.append(("MFU", "null (" + mfu.get("note", "unknown") + ")" if mfu.get("value") is None
                     else f"{mfu['value']:.1%}"))
        if mfu.get("formula"):
            rows.append(("FLOPs per token", mfu["formula"]))
        step = profile.get("step_time_s", {})
        if step.get("p50") is not None:
            rows.append(("step time p50 / p90", f"{step['p50']:.4g} s / {step['p90']:.4g} s"))
        if profile.get("data_wait_fraction") is not None:
            rows.append(("data wait", f"{profile['data_wait_fraction']:.1%}"))
        for key, value in profile.get("memory", {}).items():
            rows.append((key, f"{value:.4g}"))
        rows.append(("NVML", str(profile.get("hardware", {}).get("nvml_status", "n/a"))))
    return rows


def _table(rows) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def write_html(path: Path, run_dir: Path, rows, images: list[Path], profile: dict | None) -> None:
    figures = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{p.name}</figcaption></figure>'
        for p in images)
    raw = ("" if profile is None else "<details><summary>profile.json</summary><pre>"
           + html.escape(json.dumps(profile, indent=2)) + "</pre></details>")
    path.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fasttrain report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}th,td{{text-align:left;padding:3px 12px;border-bottom:1px solid #ddd}}
figure{{display:inline-block;margin:8px}}img{{max-width:520px}}</style></head>
<body><h1>fasttrain report</h1><p>{html.escape(str(run_dir))}</p>
<h2>Summary</h2>{_table(rows)}<h2>Plots</h2>{figures or "<p>no plottable records</p>"}{raw}
</body></html>
""")


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write the plots and index.html; returns {'html': path, 'plots': [paths]}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN_DIR {run_dir} is not a directory: pass the output_dir "
                                "of a training run (e.g. runs/<name>)")
    records = load_log_history(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/log_history.jsonl is empty: the run logged nothing "
                         "(set logging_steps so at least one step is logged)")
    profile_path = run_dir / "profile.json"
    profile = json.loads(profile_path.read_text()) if profile_path.is_file() else None
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = [out / f"{name}.png" for name in PLOTS if plot(records, name, out / f"{name}.png")]
    rows = headline(records, profile)
    if profile is None:
        rows.append(("profile.json", "absent (run without the profiler)"))
    write_html(out / "index.html", run_dir, rows, images, profile)
    return {"html": str(out / "index.html"), "plots": [str(p) for p in images]}


def main(args: argparse.Namespace) -> int:
    try:
        result = build_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"fasttrain report: error: {exc}") from None
    for p in result["plots"]:
        print(f"wrote {p}")
    print(f"wrote {result['html']}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `report` to the fasttrain CLI's subparsers; sets `func`."""
    parser = subparsers.add_parser(
        "report", help="plots and a one-page HTML summary of a training run",
        description="Draw PNG plots (loss and eval loss, tokens/s, memory, learning rate and "
                    "grad norm over steps) from RUN_DIR/log_history.jsonl and write a one-page "
                    "HTML summary that includes RUN_DIR/profile.json when present.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output_dir of a training run")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where to write the report (default: RUN_DIR/report)")
    parser.set_defaults(func=main)
    return parser


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="fasttrain")
    register(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args()
    raise SystemExit(_args.func(_args))
