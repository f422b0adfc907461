"""Checkpoints: exact resume after a real SIGKILL, clean stop on SIGTERM, corruption,
unsafe pickles, full and read-only disks, rotation, non-finite losses."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fasttrain.checkpoint import storage as ckpt
from fasttrain import Trainer, TrainerCallback, TrainingArguments
from tests._ckpt_worker import build_trainer
from tests._tiny import PoisonSteps, poisonable_gpt, tiny_gpt, token_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STEPS = 10


def _spawn(out_dir, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "tests._ckpt_worker", str(out_dir), str(MAX_STEPS), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("worker never reached the pause point")
        time.sleep(0.05)


def _losses(out_dir):
    with open(os.path.join(out_dir, "log_history.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _spawn(out)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    return out


def test_sigkill_mid_run_then_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = _spawn(out, "--pause-at", "7")  # saves at 3 and 6; killed inside step 7's end
    _wait_for(tmp_path / "paused-7", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # checkpoint-6 may still have been in flight on the saver thread: then it must not exist
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(out)]
    assert names in (["checkpoint-3"], ["checkpoint-3", "checkpoint-6"])
    for p in ckpt.list_checkpoints(out):
        ckpt.verify(p)
    resumed = _spawn(out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()

    ref_losses, got_losses = _losses(uninterrupted), _losses(out)
    assert [s for s, _ in got_losses] == list(range(1, MAX_STEPS + 1))  # no replayed records
    assert got_losses == ref_losses  # every per-step loss, exactly
    ref = torch.load(uninterrupted / "final_weights.pt")
    got = torch.load(out / "final_weights.pt")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bit for bit
    # the run really moved: a model that skipped or replayed batches would differ
    assert not torch.equal(ref["transformer.h.0.mlp.fc.weight"], tiny_gpt(seed=3).state_dict()["transformer.h.0.mlp.fc.weight"])


def test_sigterm_finishes_step_saves_and_exits_cleanly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = _spawn(out, "--pause-at", "4")
    _wait_for(tmp_path / "paused-4", proc)
    proc.send_signal(signal.SIGTERM)
    open(tmp_path / "sigterm-sent", "w").close()
    assert proc.wait(timeout=120) == 0
    log = proc.stdout.read()
    assert "finished at step 4" in log and "received SIGTERM" in log
    ckpt.verify(str(out / "checkpoint-4"))  # saved outside the save_steps schedule
    resumed = _spawn(out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert _losses(out) == _losses(uninterrupted)


# ------------------------------------------------------------------ corruption
@pytest.fixture
def two_checkpoints(tmp_path):
    trainer = build_trainer(str(tmp_path / "run"), 6)
    trainer.train()
    return tmp_path / "run"


def _corrupt(kind, path):
    if kind == "truncate":
        f = path / "model.safetensors"
        os.truncate(f, os.path.getsize(f) // 2)
        return "model.safetensors"
    if kind == "flip":
        f = path / "optimizer.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        return "optimizer.pt"
    if kind == "delete":
        os.remove(path / "optimizer.pt")
        return "optimizer.pt"
    if kind == "no-manifest":
        os.remove(path / "manifest.json")
        return "manifest.json"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncate", "flip", "delete", "no-manifest"])
def test_corrupt_checkpoint_named_explicitly_and_skipped_on_auto_resume(two_checkpoints, kind, caplog):
    newest = two_checkpoints / "checkpoint-6"
    name = _corrupt(kind, newest)
    with pytest.raises(ckpt.CheckpointError, match=name.replace(".", r"\.")):
        build_trainer(str(two_checkpoints), 9).train(resume_from_checkpoint=str(newest))
    trainer = build_trainer(str(two_checkpoints), 9)
    with caplog.at_level("WARNING", logger="fasttrain"):
        trainer.train(resume_from_checkpoint=True)
    assert "skipping invalid checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    history_steps = [r["step"] for r in trainer.state.log_history if "loss" in r]
    assert history_steps == list(range(1, 10))  # resumed from 3, re-ran 4..9


def test_half_written_checkpoint_directory_is_never_picked(two_checkpoints):
    # what a crash mid-save leaves behind: a temporary directory, never a checkpoint-N name
    tmp = two_checkpoints / ".tmp-checkpoint-9-12345"
    shutil.copytree(two_checkpoints / "checkpoint-6", tmp)
    os.remove(tmp / "manifest.json")
    assert ckpt.find_resumable(str(two_checkpoints)).endswith("checkpoint-6")


def test_crafted_pickle_is_refused_without_running_code(two_checkpoints, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = two_checkpoints / "checkpoint-6"
    torch.save({"state": Evil()}, target / "optimizer.pt")
    manifest = json.loads((target / "manifest.json").read_text())  # make it look legitimate
    data = (target / "optimizer.pt").read_bytes()
    import zlib
    manifest["files"]["optimizer.pt"] = {"size": len(data), "crc32": zlib.crc32(data)}
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="refusing to load.*could run code"):
        build_trainer(str(two_checkpoints), 9).train(resume_from_checkpoint=str(target))
    assert not marker.exists()


# ------------------------------------------------------------------ disks
def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


class SaveAfter(TrainerCallback):
    """Request a save at chosen steps (save_strategy='no' otherwise)."""

    def __init__(self, steps):
        self.steps = steps

    def on_step_end(self, args, state, control, **kw):
        control.should_save = state.global_step in self.steps


def test_full_disk_during_save_raises_clearly_and_keeps_previous(tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "size=600k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE test covers ENOSPC-like failures")
    try:
        args = TrainingArguments(output_dir=str(mnt / "run"), max_steps=2, per_device_train_batch_size=2,
                                 save_strategy="steps", save_steps=1, disable_tqdm=True, report_to="none")
        trainer = Trainer(tiny_gpt(), args, train_dataset=token_examples(8))
        with pytest.raises(ckpt.CheckpointError, match="disk is full.*Previous checkpoints are intact"):
            trainer.train()
        ckpt.verify(str(mnt / "run" / "checkpoint-1"))
        assert [p for p in os.listdir(mnt / "run") if p.startswith(".tmp")] == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_file_size_limit_during_save_raises_clearly(tmp_path):
    code = f"""
import resource, signal, sys
sys.path.insert(0, {ROOT!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from fasttrain import Trainer, TrainingArguments
from fasttrain.checkpoint import storage as ckpt
from tests._tiny import tiny_gpt, token_examples
args = TrainingArguments(output_dir={str(tmp_path / 'run')!r}, max_steps=1, save_strategy="steps",
                         save_steps=1, disable_tqdm=True, report_to="none")
t = Trainer(tiny_gpt(), args, train_dataset=token_examples(8))
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
try:
    t.train()
except ckpt.CheckpointError as e:
    print("ERR", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR could not save a checkpoint" in r.stdout and "file-size limit" in r.stdout, r.stdout + r.stderr
    assert not ckpt.list_checkpoints(str(tmp_path / "run"))


def test_read_only_output_dir(tmp_path):
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        args = TrainingArguments(output_dir=str(mnt / "run"), max_steps=1, disable_tqdm=True, report_to="none")
        with pytest.raises(ValueError, match="cannot create output_dir"):
            Trainer(tiny_gpt(), args, train_dataset=token_examples(4)).train()
        with pytest.raises(ckpt.CheckpointError, match="not writable"):
            ckpt.CheckpointWriter(str(mnt), 1)
    finally:
        subprocess.run(["umount", str(mnt)])


# ------------------------------------------------------------------ layout and policies
def test_layout_tied_weights_and_rotation_keeps_best(tmp_path):
    data = token_examples(16, seed=2)
    scores = iter([0.9, 0.1, 0.5, 0.4, 0.3])  # the best (lowest) is at step 2
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=4,
                             eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                             save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="score",
                             greater_is_better=False, disable_tqdm=True, report_to="none")
    trainer = Trainer(tiny_gpt(), args, train_dataset=data, eval_dataset=data[:2],
                      compute_metrics=lambda p: {"score": next(scores)})
    trainer.train()
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(args.output_dir)]
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = ckpt.read_model_state(trainer.state.best_model_checkpoint)
    for k, v in trainer.model.state_dict().items():  # the best weights were loaded at the end
        assert torch.equal(v, best[k]), k
    # the tied LM head is stored once and restored as the same tensor
    model = tiny_gpt(seed=99)
    ckpt.load_model_weights(model, str(tmp_path / "run" / "checkpoint-5"))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    files = set(os.listdir(tmp_path / "run" / "checkpoint-5"))
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json",
            "data_state.json", "training_args.json", "manifest.json"} <= files


def test_nonfinite_steps_are_skipped_and_never_saved(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2,
                             save_strategy="steps", save_steps=3, logging_steps=1, disable_tqdm=True,
                             report_to="none", fused_loss=False)
    model = poisonable_gpt()
    trainer = Trainer(model, args, train_dataset=token_examples(16), callbacks=[PoisonSteps({2, 3})])
    trainer.train()
    assert trainer.state.skipped_steps == 2
    for path in ckpt.list_checkpoints(args.output_dir):
        for name, t in ckpt.read_model_state(path).items():
            assert torch.isfinite(t).all(), (path, name)


def test_consecutive_nonfinite_steps_stop_with_clear_error(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=2,
                             save_strategy="no", logging_steps=1, disable_tqdm=True, report_to="none",
                             nonfinite_loss_policy="stop", max_consecutive_nonfinite=3, fused_loss=False)
    trainer = Trainer(poisonable_gpt(), args, train_dataset=token_examples(16), callbacks=[PoisonSteps(set(range(2, 11)))])
    with pytest.raises(FloatingPointError, match="non-finite for 3 consecutive steps"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class _TermSelfAt(TrainerCallback):
    """Deliver a real SIGTERM to this process at the end of one step; count the saves."""
    def __init__(self, step):
        self.step, self.saves = step, []

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_save(self, args, state, control, **kw):
        self.saves.append(state.global_step)


@pytest.mark.parametrize("strategy", ["steps", "best"])
def test_sigterm_saves_the_step_once_whatever_the_save_strategy(tmp_path, strategy, caplog):
    # save_steps=4 and a constant metric (step 1 stays the best): neither strategy would save
    # step 3 on its own; the preemption must, once (the epoch-end pass after the stop must not
    # write it again: a second save doubles the stall inside the scheduler's grace period)
    term = _TermSelfAt(3)
    trainer = build_trainer(str(tmp_path / "run"), 6, dict(
        eval_strategy="steps", eval_steps=1, save_strategy=strategy, save_steps=4,
        metric_for_best_model="const", greater_is_better=True), eval_dataset=token_examples(4, seed=9))
    trainer.compute_metrics = lambda prediction: {"const": 1.0}
    trainer.add_callback(term)
    with caplog.at_level("WARNING", logger="fasttrain"):
        trainer.train()
    assert trainer.state.global_step == 3
    assert trainer.state.best_global_step == 1
    assert term.saves == ([1, 3] if strategy == "best" else [3])
    assert sum("received SIGTERM" in r.getMessage() for r in caplog.records) == 1
    ckpt.verify(str(tmp_path / "run" / "checkpoint-3"))
