"""`fasttrain report`: plots and HTML from a run directory (log_history.jsonl + profile.json)."""
import argparse
import json

import matplotlib.image
import pytest
import torch

from fasttrain.profiler.profiler import Profiler, ProfilerConfig
from fasttrain.cli.report import build_report, load_log_history, register


def make_run(run_dir, with_profile=True):
    """A run directory as the Trainer writes it; metrics come from a real CPU profiler."""
    run_dir.mkdir(parents=True, exist_ok=True)
    prof = Profiler(ProfilerConfig(warmup_steps=1, sample_interval_s=10.0), "cpu",
                    flops_per_token=1e5, output_dir=run_dir)
    a = torch.randn(64, 64)
    lines = []
    for step in range(1, 13):
        prof.step_begin()
        with prof.phase("forward"):
            torch.mm(a, a)
        prof.step_end(tokens=256, samples=8)
        if step % 3 == 0:
            lines.append({"step": step, "epoch": step / 12, "loss": 4.0 / step,
                          "learning_rate": 1e-3, "grad_norm": 0.5, **prof.log_metrics()})
        if step % 6 == 0:
            lines.append({"step": step, "epoch": step / 12, "eval_loss": 5.0 / step})
    (run_dir / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if with_profile:
        prof.write()
    prof.close()
    return lines


def test_report_writes_plots_and_html(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    result = build_report(run)
    names = sorted(p.split("/")[-1] for p in result["plots"])
    assert names == ["loss.png", "memory.png", "optimizer.png", "throughput.png"]
    for path in result["plots"]:
        image = matplotlib.image.imread(path)
        assert image.shape[0] >= 300 and image.shape[1] >= 600  # a real raster, not empty
        assert image[..., :3].std() > 0.05  # something is drawn on it
    page = (run / "report" / "index.html").read_text()
    assert "train loss (first -&gt; last)</th><td>1.3333 -&gt; 0.3333" in page
    assert "eval loss (last / best)</th><td>0.4167 / 0.4167" in page
    assert "FLOPs per token" in page and "user-supplied: 1e+05 FLOPs/token" in page
    assert page.count("data:image/png;base64,") == 4
    assert "NVML not used" in page


def test_report_without_profile_or_memory_keys(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 6)]
    (run / "log_history.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    result = build_report(run, out_dir=tmp_path / "elsewhere")
    assert [p.split("/")[-1] for p in result["plots"]] == ["loss.png"]
    page = (tmp_path / "elsewhere" / "index.html").read_text()
    assert "absent (run without the profiler)" in page


def test_hf_trainer_state_fallback(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps(
        {"log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}]}))
    assert load_log_history(tmp_path)[1]["eval_loss"] == 2.5


def test_bad_run_dirs_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no log_history.jsonl"):
        build_report(tmp_path)
    (tmp_path / "log_history.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, loss\n')
    with pytest.raises(ValueError, match=r"log_history.jsonl:2: not valid JSON"):
        build_report(tmp_path)
    (tmp_path / "log_history.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=":1: expected a JSON object, got list"):
        build_report(tmp_path)
    (tmp_path / "log_history.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        build_report(tmp_path)


def test_cli_register_and_run(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fasttrain")
    register(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--help"])
    assert "RUN_DIR" in capsys.readouterr().out
    make_run(tmp_path / "r", with_profile=False)
    args = parser.parse_args(["report", str(tmp_path / "r")])
    assert args.func(args) == 0
    assert "index.html" in capsys.readouterr().out
