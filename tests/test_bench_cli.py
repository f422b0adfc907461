"""`fasttrain bench`: argument parsing, the matrix, the table and files, and one real run of
the worker (the real Trainer in a fresh process). No assertion on speed."""
import argparse
import csv
import json
import subprocess
import sys

import pytest

import fasttrain.cli.bench as bench
from fasttrain.cli.bench import add_speedups, build_matrix, format_table, register, write_results


def parse(*argv):
    parser = argparse.ArgumentParser(prog="fasttrain")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_defaults_and_matrix_order():
    args = parse()
    rows = build_matrix(args)
    assert [(r["compile"], r["fused"]) for r in rows] == [(False, False), (False, True),
                                                          (True, False), (True, True)]
    assert all(r["model"] == "tiny" and r["warmup"] == 3 and r["steps"] == 10 for r in rows)
    args = parse("--seq-len", "64,128", "--batch", "2", "--compile", "off", "--fused", "on",
                 "--precision", "fp32,bf16", "--ddp", "1,2")
    rows = build_matrix(args)
    assert len(rows) == 8 and rows[0]["seq_len"] == 64 and rows[-1] == {
        "model": "tiny", "seq_len": 128, "batch": 2, "precision": "bf16", "compile": False,
        "fused": True, "ddp": 2, "warmup": 3, "steps": 10}


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "0"], "every value must be >= 1"),
    (["--batch", "x"], "expected comma-separated integers"),
    (["--compile", "maybe"], "expected on/off values"),
    (["--precision", "fp64"], "not in"),
])
def test_bad_arguments_are_explained(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


def test_unknown_model_and_bad_steps_rejected():
    with pytest.raises(SystemExit, match="unknown; choose from"):
        bench._checked_main(parse("--model", "huge"))
    with pytest.raises(SystemExit, match="need warmup >= 0 and steps >= 1"):
        bench._checked_main(parse("--steps", "0"))
    with pytest.raises(SystemExit, match="--threads 0: must be >= 1"):
        bench._checked_main(parse("--threads", "0"))


def test_help_lists_every_axis(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    for flag in ("--model", "--seq-len", "--batch", "--precision", "--compile", "--fused",
                 "--ddp", "--warmup", "--steps", "--out"):
        assert flag in out


def test_table_speedup_and_files(tmp_path):
    rows = [{"model": "tiny", "compile": False, "tokens_per_second": 100.0, "mfu": None},
            {"model": "tiny", "compile": True, "tokens_per_second": 150.0, "mfu": 0.25},
            {"model": "tiny", "compile": True, "error": "exit 1: RuntimeError: boom"}]
    add_speedups(rows)
    assert [r["speedup"] for r in rows] == [1.0, 1.5, None]
    table = format_table(rows)
    assert "1.50x" in table and "25.0%" in table and "RuntimeError: boom" in table
    meta = {"torch": "x", "git_commit": "abc"}
    json_path, csv_path = write_results(rows, meta, tmp_path)
    assert json.loads(json_path.read_text())["machine"] == meta
    lines = csv_path.read_text().splitlines()
    assert lines[:2] == ["# torch: x", "# git_commit: abc"]
    parsed = list(csv.DictReader(lines[2:]))
    assert parsed[1]["speedup"] == "1.5" and parsed[2]["error"] == "exit 1: RuntimeError: boom"


def test_worker_failure_becomes_an_error_row(monkeypatch):
    failing = [sys.executable, "-c", "import sys; print('=' * 20, file=sys.stderr); "
               "raise ValueError('bad config')"]
    monkeypatch.setattr(bench, "worker_command", lambda cfg: failing)
    row = bench.run_config({"model": "tiny"}, timeout_s=60)
    assert row["error"] == "exit 1: ValueError: bad config"


@pytest.mark.slow
@pytest.mark.distributed
def test_real_bench_run_prints_table_and_writes_files(tmp_path):
    cmd = [sys.executable, "-m", "fasttrain.cli.bench", "bench", "--compile", "off", "--fused", "off",
           "--seq-len", "32", "--batch", "2", "--warmup", "1", "--steps", "3", "--threads", "1",
           "--ddp", "1,2", "--repeats", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens_per_second" in proc.stdout and "1.00x" in proc.stdout
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    row = result["rows"][0]
    assert "error" not in row and row["tokens_per_second"] > 0 and row["mfu"] is None
    assert row["step_time_p20"] <= row["step_time_p50"] <= row["step_time_p80"]
    assert row["flops_per_token"] > 0 and row["peak_memory_source"] == "host peak RSS"
    assert row["repeats"] == 2 and len(row["tokens_per_second_repeats"]) == 2
    assert row["tps_p20"] <= row["tokens_per_second"] <= row["tps_p80"]
    assert result["machine"]["torch"].startswith("2.") and "git_commit" in result["machine"]
    assert result["machine"]["omp_num_threads"] == 1
    assert next(tmp_path.glob("bench-*.csv")).read_text().startswith("# host: ")
    ddp = result["rows"][1]  # two gloo processes under torchrun: tokens of both ranks counted
    assert "error" not in ddp, ddp.get("error")
    assert ddp["world_size"] == 2 and ddp["tokens_per_second"] == pytest.approx(
        2 * ddp["tokens_per_second_per_device"])


def test_worker_commands_single_and_ddp():
    cfg = {"model": "tiny", "ddp": 1}
    assert bench.worker_command(cfg)[:3] == [sys.executable, "-m", "fasttrain.cli.bench_worker"]
    cmd = bench.worker_command({**cfg, "ddp": 4})
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd and json.loads(cmd[-1])["ddp"] == 4


def test_repeats_summarised_with_spread_and_paired_speedups(capsys):
    assert parse().repeats == 3
    base = bench.summarize_repeats([{"model": "tiny", "tokens_per_second": v, "mfu": None} for v in (90.0, 100.0, 110.0)])
    assert base["tokens_per_second"] == 100.0 and base["tps_p20"] == pytest.approx(94.0)
    assert base["tps_p80"] == pytest.approx(106.0) and base["tps_spread"] == pytest.approx(0.12)
    # repeat i against repeat i: the same drift cancels in the ratio (2x every time)
    fast = bench.summarize_repeats([{"model": "tiny", "tokens_per_second": v} for v in (180.0, 200.0, 220.0)])
    broken = bench.summarize_repeats([{"model": "tiny", "tokens_per_second": 1.0}, {"model": "tiny", "error": "boom"}])
    rows = [base, fast, broken]
    add_speedups(rows)
    assert fast["speedup"] == fast["speedup_p20"] == fast["speedup_p80"] == pytest.approx(2.0)
    assert broken["error"] == "boom" and broken["speedup"] is None
    warnings = bench.spread_warnings(rows)
    assert len(warnings) == 2 and "spread 12%" in warnings[0] and "unreliable" in warnings[0]
    tight = bench.summarize_repeats([{"model": "tiny", "tokens_per_second": v} for v in (100.0, 101.0, 102.0)])
    assert bench.spread_warnings([tight]) == []
