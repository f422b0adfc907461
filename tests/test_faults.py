"""The fault campaign: each test injects a real fault (a read-only remount, a killed
process's leftovers, a deleted checkpoint file, a stopped or killed peer, a real YAML file)
and checks what the user sees. docs/faults.md lists them in a table."""
import re
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from fasttrain import Trainer, TrainerCallback, TrainingArguments
from fasttrain.checkpoint import storage as ckpt
from tests._launch import run_cli
from tests._tiny import PoisonSteps, poisonable_gpt, tiny_gpt, token_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, logging_steps=1,
                save_strategy="no", disable_tqdm=True, report_to="none", learning_rate=1e-3)
    return TrainingArguments(**{**base, **kw})


def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _open_files():
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def _threads():
    return {t.ident: t.name for t in threading.enumerate() if t.is_alive()}


# ------------------------------------------------------------------ 1: the real error surfaces
class RemountReadOnlyAt(TrainerCallback):
    def __init__(self, step, mount_point):
        self.step, self.mount_point = step, mount_point

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            subprocess.run(["mount", "-o", "remount,ro", str(self.mount_point)], check=True)


def test_read_only_output_dir_mid_run_surfaces_the_first_error(tmp_path):
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, "size=4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        args = _args(mnt / "run", profile=True, report_to="jsonl")  # profile.json: written in cleanup
        trainer = Trainer(tiny_gpt(), args, train_dataset=token_examples(16),
                          callbacks=[RemountReadOnlyAt(2, mnt)])
        with pytest.raises(OSError) as e:
            trainer.train()
        msg = str(e.value)
        # the logging step of step 3 failed first; profile.json's failure is only logged
        assert "log_history.jsonl" in msg and "profile.json" not in msg, msg
        assert str(mnt / "run") in msg and "resume_from_checkpoint=True" in msg, msg
        assert "Read-only file system" in msg, msg
    finally:
        subprocess.run(["umount", str(mnt)])


# ------------------------------------------------------------------ 2: nothing leaks
class RaiseAt(TrainerCallback):
    def __init__(self, event):
        self.event = event

    def on_train_begin(self, args, state, control, **kw):
        if self.event == "begin":
            raise RuntimeError("injected failure at train begin")

    def on_step_end(self, args, state, control, **kw):
        if self.event == "step" and state.global_step == 2:
            raise RuntimeError("injected failure at step 2")


@pytest.mark.parametrize("where", ["begin", "step", "resume"])
def test_failed_train_calls_leave_no_thread_or_file(tmp_path, where):
    Trainer(tiny_gpt(), _args(tmp_path / "warm"), train_dataset=token_examples(8)).train()  # imports, pools
    threads, files = _threads(), _open_files()
    for i in range(5):
        args = _args(tmp_path / f"run{i}", report_to="tensorboard", disable_tqdm=False)
        trainer = Trainer(tiny_gpt(), args, train_dataset=token_examples(16),
                          callbacks=[RaiseAt(where)])
        resume = str(tmp_path / "no-such-checkpoint") if where == "resume" else None
        with pytest.raises((RuntimeError, ckpt.CheckpointError)):
            trainer.train(resume_from_checkpoint=resume)
    leaked = {k: v for k, v in _threads().items() if k not in threads}
    assert not leaked, f"threads left after 5 failed train() calls: {sorted(leaked.values())}"
    assert _open_files() - files == set()


def test_train_then_evaluate_with_tensorboard_leaves_nothing_open(tmp_path):
    Trainer(tiny_gpt(), _args(tmp_path / "warm"), train_dataset=token_examples(8)).train()
    threads, files = _threads(), _open_files()
    data = token_examples(16)
    args = _args(tmp_path / "run", report_to="tensorboard", disable_tqdm=False)
    trainer = Trainer(tiny_gpt(), args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    trainer.evaluate()
    trainer.evaluate()
    leaked = {k: v for k, v in _threads().items() if k not in threads}
    assert not leaked, f"threads left after train() + evaluate(): {sorted(leaked.values())}"
    assert _open_files() - files == set()
    events = [f for f in os.listdir(args.logging_dir) if f.startswith("events.out.tfevents")]
    assert events, "TensorBoard wrote nothing"


# ------------------------------------------------------------------ 4: resumed state owns its memory
def _mapped_under(directory):
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if str(directory) in line]


def test_resumed_optimizer_state_is_not_mapped_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    data = token_examples(16)
    args = _args(out, max_steps=2, save_strategy="steps", save_steps=2, save_total_limit=1,
                 optim="adamw_torch")
    Trainer(tiny_gpt(), args, train_dataset=data).train()
    args = _args(out, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=1,
                 optim="adamw_torch")
    trainer = Trainer(tiny_gpt(), args, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert not (out / "checkpoint-2").exists(), "rotation should have deleted the resumed checkpoint"
    assert _mapped_under(out) == [], "checkpoint files are still memory-mapped after resume"
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(v.untyped_storage().nbytes() == v.numel() * v.element_size() or v.dim() == 0
                         for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------ 5: stale temporaries
def test_stale_temporary_saves_of_dead_processes_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # a pid that certainly exited (and was reaped)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = out / f".tmp-checkpoint-3-{dead_pid}"
        stale_old = out / f"checkpoint-3.old-{dead_pid}"
        in_flight = out / f".tmp-checkpoint-3-{live.pid}"
        mine = out / f".tmp-checkpoint-9-{os.getpid()}"
        for d in (stale, stale_old, in_flight, mine):
            d.mkdir()
            (d / "optimizer.pt").write_bytes(b"half")
        Trainer(tiny_gpt(), _args(out, max_steps=1), train_dataset=token_examples(4)).train()
        assert not stale.exists() and not stale_old.exists()
        assert in_flight.exists(), "a live process's save in flight was deleted"
        assert mine.exists()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------ 6: no silent nonsense
def test_eval_strategy_without_eval_set_fails_at_construction(tmp_path):
    for strategy in ("steps", "epoch"):
        with pytest.raises(ValueError) as e:
            Trainer(tiny_gpt(), _args(tmp_path / "run", eval_strategy=strategy), train_dataset=token_examples(4))
        msg = str(e.value)
        assert f"eval_strategy={strategy!r}" in msg and "eval_dataset" in msg and "'no'" in msg, msg


def test_mostly_skipped_window_warns_on_the_logging_step(tmp_path, caplog):
    args = _args(tmp_path / "run", max_steps=16, logging_steps=8, fused_loss=False)
    trainer = Trainer(poisonable_gpt(), args, train_dataset=token_examples(32),
                      callbacks=[PoisonSteps(set(range(1, 8)))])  # steps 1-7 of the first window
    with caplog.at_level("WARNING", logger="fasttrain"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("steps 1-8: 7 of 8 optimizer steps were skipped" in m for m in warnings), warnings
    assert not any("steps 9-16" in m for m in warnings), warnings  # a clean window stays quiet


def test_window_without_valid_labels_warns(tmp_path, caplog):
    data = [{"input_ids": e["input_ids"], "labels": torch.full_like(e["labels"], -100)}
            for e in token_examples(8)]
    args = _args(tmp_path / "run", max_steps=2, logging_steps=2)
    with caplog.at_level("WARNING", logger="fasttrain"):
        Trainer(tiny_gpt(), args, train_dataset=data).train()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("step 2: no valid label tokens" in m for m in warnings), warnings


# ------------------------------------------------------------------ 9: progress and throughput
class FakeClock:
    def __init__(self):
        self.now = time.time()

    def time(self):
        return self.now


def test_progress_bar_redraws_by_time_not_step_count(tmp_path):
    from fasttrain.callbacks import ProgressCallback, TrainerControl, TrainerState
    clock = FakeClock()
    state = TrainerState(is_world_process_zero=True)
    state.max_steps, state.global_step = 400, 0
    callback = ProgressCallback()
    args = _args(tmp_path / "run", disable_tqdm=False)
    callback.on_train_begin(args, state, TrainerControl())
    bar = callback.training_bar
    bar._time, bar.start_t, bar.last_print_t = clock.time, clock.now, clock.now
    drawn = []
    refresh = bar.refresh
    bar.refresh = lambda *a, **k: (drawn.append(bar.n), refresh(*a, **k))
    clock.now += 5.0  # a slow first step: the user sees 1/400 at once, not 0/400 for minutes
    state.global_step = 1
    callback.on_step_end(args, state, TrainerControl())
    for step in range(2, 12):  # fast steps: at most one redraw per second
        clock.now += 0.25
        state.global_step = step
        callback.on_step_end(args, state, TrainerControl())
    callback.close_bars()
    assert drawn[:3] == [1, 5, 9], drawn  # step 1 at once, then every fourth 0.25 s step


def test_end_summary_has_one_defined_throughput_figure(tmp_path, capsys):
    import re

    from fasttrain.cli.main import _print_summary
    args = _args(tmp_path / "run", max_steps=6, disable_tqdm=False, profile_warmup_steps=2)
    model = tiny_gpt()
    trainer = Trainer(model, args, train_dataset=token_examples(16))
    out = trainer.train()
    _print_summary(trainer, out, None, 1.0, model.config, model)
    text = capsys.readouterr().out
    figures = {float(m) for m in re.findall(r"tokens/s[a-z ]*\s+([0-9.e+]+)", text)}
    assert len(figures) == 1, text  # the profile's table and the run summary agree
    line = next(l for l in text.splitlines() if l.startswith("tokens/s ") and "(" in l)
    assert "input tokens of all ranks / time in training steps" in line and "warm-up" in line, line


# ------------------------------------------------------------------ 3: hung and dead peers
def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(out, heartbeat_s):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-m", "tests._fault_worker", str(out), str(heartbeat_s)],
                              cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    deadline = time.monotonic() + 180
    while not all((out / f"ready-{r}").exists() for r in range(2)):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError("ranks never reached step 3:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
        time.sleep(0.1)
    return procs


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how,victim", [("stop", 1), ("stop", 0), ("kill", 1)])
def test_hung_or_dead_peer_stops_every_survivor_with_a_clear_error(tmp_path, how, victim):
    import signal
    heartbeat_s = 6.0
    procs = _two_ranks(tmp_path, heartbeat_s)
    survivor = procs[1 - victim]
    try:
        sent = time.monotonic()
        procs[victim].send_signal(signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        try:
            output, _ = survivor.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            survivor.kill()
            raise AssertionError(f"rank {1 - victim} still waits 90 s after rank {victim} was {how}ped "
                                 f"(ddp_timeout is 1800 s):\n{survivor.communicate()[0][-3000:]}")
        took = time.monotonic() - sent
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert survivor.returncode != 0, output[-3000:]
    # the stopped/killed peer is named in fasttrain's error
    assert re.search(rf"rank {1 - victim}\S* .*rank {victim} (made no progress|exited or stopped responding)",
                     output), output[-3000:]
    assert "Connection reset by peer" not in output and "Connection closed by peer" not in output, output[-3000:]
    assert took < heartbeat_s + 30, took


# ------------------------------------------------------------------ 7: bad input, by name
def test_input_ids_outside_the_vocabulary_named_on_the_first_batch(tmp_path):
    data = token_examples(8)
    data[3] = {"input_ids": data[3]["input_ids"].clone().fill_(64), "labels": data[3]["labels"]}
    trainer = Trainer(tiny_gpt(), _args(tmp_path / "run", per_device_train_batch_size=8), train_dataset=data)
    with pytest.raises(ValueError) as e:
        trainer.train()
    msg = str(e.value)
    assert "'input_ids'" in msg and "token id 64" in msg and "[0, 64)" in msg and "vocab_size" in msg, msg


def test_float_input_ids_named(tmp_path):
    data = [{"input_ids": e["input_ids"].float(), "labels": e["labels"]} for e in token_examples(4)]
    trainer = Trainer(tiny_gpt(), _args(tmp_path / "run"), train_dataset=data)
    with pytest.raises(TypeError) as e:
        trainer.train()
    msg = str(e.value)
    assert "'input_ids'" in msg and "torch.float32" in msg and "dtype=torch.long" in msg, msg


def test_none_dataset_item_named(tmp_path):
    data = token_examples(4)
    data[1] = None
    trainer = Trainer(tiny_gpt(), _args(tmp_path / "run", per_device_train_batch_size=4), train_dataset=data)
    with pytest.raises(TypeError) as e:
        trainer.train()
    msg = str(e.value)
    assert "returned None for an example" in msg and "filter" in msg, msg


def test_checkpoint_of_another_width_named(tmp_path):
    from fasttrain.models import GPT, GPTConfig
    out = tmp_path / "run"
    Trainer(tiny_gpt(), _args(out, max_steps=1, save_strategy="steps", save_steps=1),
            train_dataset=token_examples(4)).train()
    wide = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=48))
    trainer = Trainer(wide, _args(out, max_steps=2), train_dataset=token_examples(4))
    with pytest.raises(ckpt.CheckpointError) as e:
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    msg = str(e.value)
    assert "checkpoint-1" in msg and "config.json" in msg, msg
    assert re.search(r"is \(\d+, 32\) there and \(\d+, 48\) here", msg), msg


def test_resuming_another_optimizers_checkpoint_names_optim(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_gpt(), _args(out, max_steps=1, save_strategy="steps", save_steps=1, optim="sgd"),
            train_dataset=token_examples(4)).train()
    trainer = Trainer(tiny_gpt(), _args(out, max_steps=2, optim="adamw_torch"), train_dataset=token_examples(4))
    with pytest.raises(ValueError) as e:
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    msg = str(e.value)
    assert "optim='sgd'" in msg and "optim='adamw_torch'" in msg and "learning" not in msg, msg


@pytest.mark.parametrize("field,value,fixed", [
    ("adam_beta1", "0.9", "adam_beta1=0.9"), ("warmup_steps", "10", "warmup_steps=10"),
    ("max_grad_norm", "1.0", "max_grad_norm=1.0"), ("learning_rate", "fast", "pass a float"),
])
def test_string_for_a_number_named(tmp_path, field, value, fixed):
    with pytest.raises(ValueError) as e:
        _args(tmp_path / "run", **{field: value})
    msg = str(e.value)
    assert f"{field}={value!r}" in msg and "is a string" in msg and fixed in msg, msg


def test_yaml_config_numbers_go_through_the_flag_converters(tmp_path):
    from fasttrain.cli.main import build_parser, build_training_args
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 1e-3\nwarmup_steps: 1e2\nmax_grad_norm: 0.5\nbf16: false\n")
    ns = build_parser().parse_args(["train", "--config", str(cfg)])
    args = build_training_args(ns, str(tmp_path / "out"))
    assert (args.learning_rate, args.warmup_steps, args.max_grad_norm, args.bf16) == (1e-3, 100, 0.5, False)
    assert isinstance(args.learning_rate, float) and args.warmup_steps == 100
    cfg.write_text("warmup_steps: 1.5e1x\n")
    ns = build_parser().parse_args(["train", "--config", str(cfg)])
    with pytest.raises(ValueError, match=r"run.yaml.*warmup_steps='1.5e1x' is invalid: must be a number"):
        build_training_args(ns, str(tmp_path / "out"))


def test_linear_cross_entropy_with_zero_rows_named():
    from fasttrain.kernels.linear_cross_entropy import linear_cross_entropy
    hidden, weight = torch.randn(0, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"no rows to score \(hidden \(0, 8\), target \(0,\)\)"):
        linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------ 8: the command line
def _train_parser():
    import argparse

    from fasttrain.cli.main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices["train"]


def test_every_train_flag_has_help_and_default():
    import argparse
    _, train = _train_parser()
    for action in train._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        # a description, not only the default: every field is documented (its docstring,
        # metadata or training_args_help.FIELD_HELP)
        assert not action.help.lstrip().startswith("(default"), (action.option_strings, action.help)
    text = train.format_help()
    assert "--learning_rate VALUE, --learning-rate VALUE" in text, text
    assert "--model-size MODEL_SIZE, --model_size MODEL_SIZE" in text, text
    lr = next(a for a in train._actions if a.dest == "learning_rate")
    assert "(default: 0.002)" in lr.help  # the default job's value, which the run uses
    assert lr.help.startswith("peak learning rate"), lr.help
    hb = next(a for a in train._actions if a.dest == "ddp_heartbeat_timeout")
    assert "heartbeat" in hb.help and "(default: 60.0)" in hb.help, hb.help  # from the field's doc


def test_flag_spellings_negative_numbers_and_types():
    parser, _ = _train_parser()
    a = parser.parse_args(["train", "--learning-rate", "1e-3", "--save-total-limit", "3"])
    b = parser.parse_args(["train", "--learning_rate", "1e-3", "--save_total_limit", "3"])
    assert a.learning_rate == b.learning_rate == 1e-3 and a.save_total_limit == b.save_total_limit == 3
    c = parser.parse_args(["train", "--learning_rate", "-1e-3", "--seq-len", "64", "--report_to", "jsonl,tensorboard",
                           "--no-bf16", "--eval_steps", "0.5"])
    assert c.learning_rate == -1e-3 and c.seq_len == 64 and c.report_to == ["jsonl", "tensorboard"]
    assert c.bf16 is False and c.eval_steps == 0.5


def test_misspelt_flag_suggests_the_right_one(capsys):
    parser, _ = _train_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--learnin_rate", "1e-3"])
    err = capsys.readouterr().err
    assert "did you mean --learning_rate?" in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--data", "no/such/file.bin"], "--data 'no/such/file.bin': no such file or directory"),
    (["--resume_from_checkpoint", "runs/x/checkpoint-9"], "no such checkpoint directory"),
])
def test_missing_input_file_is_one_line(tmp_path, argv, needle):
    r = run_cli(["train", "--max_steps", "1", *argv], tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
