"""The fault campaign: each test injects a real fault (a read-only remount, a killed
process's leftovers, a deleted checkpoint file, a stopped or killed peer, a real YAML file)
and checks what the user sees. docs/faults.md lists them in a table."""
import functools
import json
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
from tests._tiny import tiny_gpt, token_examples

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


class PoisonSteps(TrainerCallback):
    """A real NaN in the forward pass of the chosen steps (the loss becomes non-finite)."""

    def __init__(self, steps):
        self.steps = steps

    def on_step_begin(self, args, state, control, model=None, **kw):
        model._poison = (state.global_step + 1) in self.steps


def _poisonable_gpt():
    model = tiny_gpt()
    forward = model.forward

    @functools.wraps(forward)  # the Trainer reads forward's parameter names to pick batch keys
    def poisoned(*a, **kw):
        out = forward(*a, **kw)
        if getattr(model, "_poison", False):
            out.loss = out.loss * float("nan")
        return out
    model.forward = poisoned
    return model


def test_mostly_skipped_window_warns_on_the_logging_step(tmp_path, caplog):
    args = _args(tmp_path / "run", max_steps=16, logging_steps=8, fused_loss=False)
    trainer = Trainer(_poisonable_gpt(), args, train_dataset=token_examples(32),
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
