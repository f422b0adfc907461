"""The `fasttrain` command line: train, sample, config files, --help everywhere."""
import json
import os

import pytest

from fasttrain.cli.main import build_parser, build_training_args
from tests._launch import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "sample"} <= set(sub.choices)
    for name, p in sub.choices.items():
        text = p.format_help()
        assert text.startswith("usage: fasttrain " + name), name


def test_flags_override_config_file_which_overrides_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.01\nmax_steps: 7\nwarmup_steps: 2\n")
    ns = build_parser().parse_args(["train", "--config", str(cfg), "--max_steps", "9", "--bf16"])
    args = build_training_args(ns, str(tmp_path / "out"))
    assert (args.learning_rate, args.max_steps, args.warmup_steps, args.bf16) == (0.01, 9, 2, True)
    assert args.per_device_train_batch_size == 16  # the default job's value survives
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rat": 1.0}))
    ns = build_parser().parse_args(["train", "--config", str(bad)])
    with pytest.raises(ValueError, match="unknown field.*learning_rat"):
        build_training_args(ns, str(tmp_path / "out"))


def test_train_then_sample_on_a_text_folder(tmp_path):
    text = tmp_path / "corpus"
    text.mkdir()
    for i in range(4):
        (text / f"f{i}.py").write_text("def add(a, b):\n    return a + b\n" * 200)
    r = run_cli(["train", "--data", str(text), "--name", "t", "--seq-len", "32", "--max_steps", "40",
              "--logging_steps", "10", "--disable_tqdm", "--per_device_train_batch_size", "8"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "== fasttrain train: summary ==" in r.stdout and "steps" in r.stdout
    run_dir = tmp_path / "runs" / "t"
    with open(run_dir / "log_history.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert losses[-1] < 0.5 * losses[0]  # a repetitive corpus is learnt quickly
    s = run_cli(["sample", "--checkpoint", str(run_dir), "--prompt", "def ", "--max-new-tokens", "40"], tmp_path)
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("def ") and len(s.stdout) > 20


def test_a_run_shorter_than_logging_steps_still_reports_its_train_loss(tmp_path):
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "a.py").write_text("def add(a, b):\n    return a + b\n" * 200)
    r = run_cli(["train", "--data", str(text), "--name", "short", "--seq-len", "32", "--max_steps", "3",
              "--logging_steps", "50", "--disable_tqdm", "--per_device_train_batch_size", "4"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = r.stdout.split("== fasttrain train: summary ==")[1]
    line = summary.split("final train loss")[1].splitlines()[0]
    final = float(line.split()[0])
    assert 0.0 < final < 10.0 and "no logging step was reached" in line  # was "nan"


def test_cli_reports_bad_values_without_a_traceback(tmp_path):
    r = run_cli(["train", "--optim", "nope", "--max_steps", "1"], tmp_path)
    assert r.returncode == 2 and "optim='nope' is invalid" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["sample", "--checkpoint", str(tmp_path)], tmp_path)
    assert r.returncode != 0 and "has no config.json" in r.stderr


@pytest.mark.slow
def test_default_job_finishes_and_learns(tmp_path):
    """`fasttrain train` with no arguments (the README's first command), shortened only in steps."""
    r = run_cli(["train", "--name", "d", "--max_steps", "60", "--eval_steps", "60", "--disable_tqdm"],
             tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = r.stdout.split("== fasttrain train: summary ==")[1]
    final = float(summary.split("final train loss")[1].split()[0])
    assert final < 3.5  # from ~5.5 (uniform over bytes) after 60 steps


@pytest.mark.slow
@pytest.mark.distributed
def test_train_nproc_per_node_starts_torchrun(tmp_path):
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "a.py").write_text("x = 1\n" * 2000)
    r = run_cli(["train", "--nproc-per-node", "2", "--data", str(text), "--name", "ddp", "--seq-len", "16",
              "--max_steps", "4", "--save_steps", "4", "--logging_steps", "2", "--disable_tqdm",
              "--per_device_train_batch_size", "2"], tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("== fasttrain train: summary ==") == 1  # rank 0 alone reports
    with open(tmp_path / "runs" / "ddp" / "log_history.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert os.path.isfile(tmp_path / "runs" / "ddp" / "checkpoint-4" / "rng_state_1.pt")


@pytest.mark.distributed
def test_train_four_ranks_fsdp_with_gradient_checkpointing(tmp_path):
    """The issue's command line on the default job's model and data, shortened to 6 steps."""
    r = run_cli(["train", "--nproc-per-node", "4", "--fsdp", "full_shard", "--gradient-checkpointing",
              "--name", "fsdp", "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3",
              "--logging_steps", "3", "--disable_tqdm", "--per_device_train_batch_size", "4"],
             tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "fsdp"
    assert r.stdout.count("== fasttrain train: summary ==") == 1
    assert sorted(os.listdir(run / "checkpoint-6" / "shards")) == \
        [".metadata"] + [f"__{rank}_0.distcp" for rank in range(4)]
    assert os.path.isfile(run / "model.safetensors")  # save_model gathered the shards
    s = run_cli(["sample", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "10"], tmp_path)
    assert s.returncode == 0, s.stderr
