"""The Checkpointer alone: plain components (model, FusedAdamW, LR schedule, loss scaler,
loop state, TrainerState, a stateful callback, RNG), no Trainer. A run saved mid-way and
resumed into freshly built components takes the same steps, bit for bit, as one that never
stopped; the model/optimizer I/O is a seam another format plugs into."""
import json
import os
import random

import numpy as np
import pytest
import torch

from fasttrain.callbacks import CallbackHandler, TrainerCallback, TrainerState
from fasttrain.checkpoint import storage
from fasttrain.checkpoint.checkpointer import Checkpointer, FullStateIO, RunComponents
from fasttrain.optim.adamw import FusedAdamW
from fasttrain.optim.schedules import LRScheduler, get_multiplier
from fasttrain.precision.mixed import DynamicLossScaler
from fasttrain.trainer.run_state import RunState
from tests._tiny import tiny_gpt, token_examples

STEPS, SAVE_AT = 6, 3


class CountingCallback(TrainerCallback):
    def __init__(self):
        self.seen = 0

    def state(self):
        return {"seen": self.seen}

    def restore(self, saved):
        self.seen = saved["seen"]


def build(seed: int, output_dir, state_io=None):
    """Fresh components; `seed` sets the initial weights (a resume must overwrite them)."""
    model = tiny_gpt(seed=seed, dropout=0.2)  # dropout: the torch RNG matters
    optimizer = FusedAdamW(model.parameters(), lr=torch.tensor(3e-3), weight_decay=0.1)
    scheduler = LRScheduler(optimizer, get_multiplier("cosine", 2, STEPS), STEPS)
    callback = CountingCallback()
    components = RunComponents(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, scaler=DynamicLossScaler(),
        run_state=RunState(torch.device("cpu"), world_size=1, per_device_train_batch_size=2),
        trainer_state=TrainerState(max_steps=STEPS), callbacks=CallbackHandler([callback], model, None, optimizer, scheduler),
        training_args={"note": "for the record"})
    return components, callback, Checkpointer(str(output_dir), components, state_io=state_io)


def one_step(c: RunComponents, callback) -> float:
    """A training step that draws from every RNG the checkpoint restores."""
    data = token_examples(8, seed=11)
    i = random.randrange(len(data)) if np.random.rand() >= 0 else 0  # python + numpy RNGs
    batch = torch.stack([data[i]["input_ids"], data[(i + 1) % len(data)]["input_ids"]])
    c.model.train()
    loss = c.model(batch, labels=batch).loss
    c.scaler.scale(loss).backward()
    c.scaler.unscale_(c.optimizer)
    found_inf = c.scaler.found_inf_flag()
    c.scaler.step(c.optimizer, found_inf=found_inf)
    c.scaler.update()
    c.lr_scheduler.step(skipped=found_inf)
    c.optimizer.zero_grad(set_to_none=True)
    c.run_state.record_optimizer_step(found_inf, None)
    c.run_state.advance(1)
    c.run_state.window.add(loss.detach(), None, batch.numel())
    c.trainer_state.global_step += 1
    callback.seen += 1
    return loss.item()


def test_save_then_resume_into_fresh_components_is_bit_exact(tmp_path):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ref, ref_cb, checkpointer = build(seed=3, output_dir=tmp_path / "run")
    ref_losses = []
    for step in range(1, STEPS + 1):
        ref_losses.append(one_step(ref, ref_cb))
        if step == SAVE_AT:
            path = checkpointer.save(step, best=True, blocking=True)
            saved_run_state, saved_lr = ref.run_state.state_dict(), ref.lr_scheduler.get_last_lr()
    assert os.path.basename(path) == f"checkpoint-{SAVE_AT}"
    storage.verify(path)

    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # the resume must undo these
    got, got_cb, resumer = build(seed=4, output_dir=tmp_path / "run")
    lr_tensors_before_load = [g["lr"] for g in got.optimizer.param_groups]  # what the schedule writes into
    assert resumer.load(True) == path
    assert got.trainer_state.global_step == SAVE_AT and got_cb.seen == SAVE_AT
    assert got.trainer_state.best_model_checkpoint == path
    assert got.trainer_state.max_steps == STEPS
    assert got.run_state.state_dict() == saved_run_state
    assert got.run_state.micro_batches_done == SAVE_AT and saved_run_state["window"]["steps"] == SAVE_AT
    assert got.lr_scheduler.get_last_lr() == saved_lr
    # the optimizer's LR is still the device tensor the schedule updates in place
    assert all(g["lr"] is lr for g, lr in zip(got.optimizer.param_groups, lr_tensors_before_load))
    got_losses = ref_losses[:SAVE_AT] + [one_step(got, got_cb) for _ in range(SAVE_AT, STEPS)]

    assert got_losses == ref_losses  # every loss, exactly
    ref_sd, got_sd = ref.model.state_dict(), got.model.state_dict()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k  # bit for bit
    for p_ref, p_got in zip(ref.model.parameters(), got.model.parameters()):
        s_ref, s_got = ref.optimizer.state[p_ref], got.optimizer.state[p_got]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s_ref[key], s_got[key]), key
    assert ref.lr_scheduler.get_last_lr() == got.lr_scheduler.get_last_lr()
    assert ref.scaler.state_dict().keys() == got.scaler.state_dict().keys()
    for k, v in ref.scaler.state_dict().items():
        assert (torch.equal(v, got.scaler.state_dict()[k]) if isinstance(v, torch.Tensor)
                else v == got.scaler.state_dict()[k]), k
    assert ref.run_state.state_dict() == got.run_state.state_dict()
    assert got_cb.seen == ref_cb.seen == STEPS


def test_resume_restores_every_rng(tmp_path):
    c, _, checkpointer = build(seed=3, output_dir=tmp_path / "run")
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    checkpointer.save(1, blocking=True)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(6), random.seed(6), np.random.seed(6)
    build(seed=3, output_dir=tmp_path / "run")[2].load(True)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_files_are_todays_layout(tmp_path):
    c, _, checkpointer = build(seed=3, output_dir=tmp_path / "run")
    path = checkpointer.save(2, blocking=True)
    assert sorted(os.listdir(path)) == sorted([
        "model.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state_0.pt",
        "trainer_state.json", "data_state.json", "training_args.json", "config.json", "manifest.json",
        "rng_state.pth"])  # HF's RNG file beside fasttrain's, so HF's Trainer can resume the run
    with open(os.path.join(path, "data_state.json")) as f:
        data = json.load(f)
    assert set(data) == {"epoch", "micro_batches_done", "world_size", "per_device_train_batch_size",
                         "window", "skipped", "nonfinite_run", "num_workers", "stream"}


@pytest.mark.parametrize("world, batch, micro, resumed_micro", [
    (2, 2, 3, 6),    # 2 ranks x 2 x 3 = 12 samples: this run (1 x 2) continues at micro-batch 6
    (1, 4, 3, 6),    # another per-device batch size: the same global position
    (1, 3, 3, 5),    # 9 samples cannot be reached in batches of 2: the next boundary, sample 10
])
def test_resume_on_another_layout_continues_from_the_global_sample_count(tmp_path, world, batch, micro,
                                                                        resumed_micro, caplog):
    c, _, checkpointer = build(seed=3, output_dir=tmp_path / "run")
    c.run_state.world_size, c.run_state.per_device_train_batch_size = world, batch  # as if saved so
    c.run_state.micro_batches_done = micro
    path = checkpointer.save(1, blocking=True)
    resumed, _, loader = build(seed=3, output_dir=tmp_path / "run")
    with caplog.at_level("WARNING", logger="fasttrain"):
        loader.load(path)
    assert resumed.run_state.micro_batches_done == resumed_micro
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    if world * batch * micro % 2:  # said once, with the numbers and the sizes that land exactly
        assert len(skipped) == 1 and repr(path) in skipped[0]
        assert "consumed 9 samples" in skipped[0] and "1 x 2 = 2 per micro-batch" in skipped[0]
        assert "resuming at sample 10, so 1 samples of this epoch are skipped" in skipped[0]
    else:
        assert not skipped


class ShardFilesIO:
    """A stand-in for a sharded backend: its own file names, calls recorded."""

    def __init__(self):
        self.calls = []
        self.full = FullStateIO()

    def snapshot(self, model, optimizer, is_main):
        self.calls.append("snapshot")
        return storage.snapshot({"model": model.state_dict(), "optim": optimizer.state_dict()})

    def write(self, writer, snap):
        self.calls.append("write")
        writer.write_torch("shard_0.pt", snap)

    def load(self, path, model, optimizer):
        self.calls.append("load")
        state = storage.read_torch(path, "shard_0.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])


def test_model_and_optimizer_io_is_a_seam(tmp_path):
    io = ShardFilesIO()
    c, cb, checkpointer = build(seed=3, output_dir=tmp_path / "run", state_io=io)
    one_step(c, cb)
    path = checkpointer.save(1, blocking=True)
    files = os.listdir(path)
    assert "shard_0.pt" in files and "model.safetensors" not in files and "optimizer.pt" not in files
    storage.verify(path)  # the backend's file is in the manifest
    got, _, resumer = build(seed=4, output_dir=tmp_path / "run", state_io=io)
    resumer.load(path)
    assert io.calls == ["snapshot", "write", "load"]
    for k, v in c.model.state_dict().items():
        assert torch.equal(v, got.model.state_dict()[k]), k


def test_refuses_to_save_non_finite_weights(tmp_path):
    c, _, checkpointer = build(seed=3, output_dir=tmp_path / "run")
    with torch.no_grad():
        next(c.model.parameters())[0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        checkpointer.save(1, blocking=True)
    assert storage.list_checkpoints(str(tmp_path / "run")) == []


def test_rotation_keeps_the_best_checkpoint(tmp_path):
    c, _, _ = build(seed=3, output_dir=tmp_path / "run")
    checkpointer = Checkpointer(str(tmp_path / "run"), c, save_total_limit=1, keep_best=True)
    best = checkpointer.save(1, best=True, blocking=True)
    checkpointer.save(2, blocking=True)
    last = checkpointer.save(3, blocking=True)
    assert storage.list_checkpoints(str(tmp_path / "run")) == [best, last]
