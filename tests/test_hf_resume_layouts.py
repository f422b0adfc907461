"""Resuming from weights laid out as HF lays them out: sharded by a model.safetensors.index.json
(HF's Trainer writes large models so; a user may re-shard a checkpoint), and models whose own
load_state_dict decides what fits (HF's Trainer calls it and leaves that to the model)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402
from tests._tiny import UnseededRegressor as Regressor  # noqa: E402


def data(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "labels": x[i] @ torch.tensor([1.0, -2.0, 0.5, 3.0])} for i in range(n)]


def _args(lib, out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=0.05, save_steps=2,
                num_train_epochs=2, report_to="none", disable_tqdm=True, seed=0)
    base.update(kw)
    return lib.TrainingArguments(**base)


def shard_by_index(checkpoint):
    """Replace model.safetensors by one shard per tensor and HF's index naming them."""
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    os.remove(os.path.join(checkpoint, "model.safetensors"))
    names = sorted(weights)
    weight_map = {}
    for i, name in enumerate(names):
        shard = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file({name: weights[name].contiguous()}, os.path.join(checkpoint, shard))
        weight_map[name] = shard
    with open(os.path.join(checkpoint, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _resume(out, checkpoint):
    torch.manual_seed(1)  # other initial weights: only the checkpoint can make them equal
    trainer = fasttrain.Trainer(Regressor(), _args(fasttrain, out), train_dataset=data())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def test_a_fasttrain_checkpoint_resharded_by_index_resumes(tmp_path, caplog):
    torch.manual_seed(0)
    whole = fasttrain.Trainer(Regressor(), _args(fasttrain, tmp_path / "run"), train_dataset=data())
    whole.train()
    shard_by_index(tmp_path / "run" / "checkpoint-2")
    resumed = _resume(tmp_path / "resumed", tmp_path / "run" / "checkpoint-2")
    assert resumed.state.global_step == whole.state.global_step == 8
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "re-sharded after the save" in caplog.text  # the manifest does not cover the shards: said


def test_an_hf_checkpoint_with_sharded_weights_resumes_like_the_whole_one(tmp_path):
    torch.manual_seed(0)
    transformers.Trainer(Regressor(), _args(transformers, tmp_path / "hf"), train_dataset=data()).train()
    whole, sharded = tmp_path / "whole-ckpt", tmp_path / "sharded-ckpt"
    shutil.copytree(tmp_path / "hf" / "checkpoint-2", whole)
    shutil.copytree(tmp_path / "hf" / "checkpoint-2", sharded)
    shard_by_index(sharded)
    a, b = _resume(tmp_path / "a", whole), _resume(tmp_path / "b", sharded)
    assert a.state.global_step == b.state.global_step == 8
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_missing_shards_are_named(tmp_path):
    torch.manual_seed(0)
    fasttrain.Trainer(Regressor(), _args(fasttrain, tmp_path / "run", max_steps=2), train_dataset=data()).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    shard_by_index(checkpoint)
    os.remove(checkpoint / "model-00001-of-00002.safetensors")
    with pytest.raises(Exception, match="model-00001-of-00002.safetensors"):
        _resume(tmp_path / "resumed", checkpoint)


class GrowingBuffer(Regressor):
    """Logs what it saw in a buffer that grows every forward; its load_state_dict takes the
    saved size, as the model in HF's resume-order test does."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.empty(0))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if "seen" in state_dict:
            self.seen = state_dict["seen"].clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x, labels=None):
        self.seen = torch.cat([self.seen, x[:, 0].detach()])
        return super().forward(x, labels)


def test_a_model_s_own_load_state_dict_decides_what_fits(tmp_path):
    torch.manual_seed(0)
    whole = fasttrain.Trainer(GrowingBuffer(), _args(fasttrain, tmp_path / "run"), train_dataset=data())
    whole.train()
    torch.manual_seed(0)
    resumed = fasttrain.Trainer(GrowingBuffer(), _args(fasttrain, tmp_path / "resumed"), train_dataset=data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert torch.equal(resumed.model.seen, whole.model.seen)  # the data seen, in order, across the resume
    assert resumed.model.seen.numel() == 32


def test_a_plain_model_of_another_shape_is_still_named(tmp_path):
    torch.manual_seed(0)
    fasttrain.Trainer(Regressor(), _args(fasttrain, tmp_path / "run", max_steps=2), train_dataset=data()).train()
    wider = Regressor()
    wider.linear = torch.nn.Linear(4, 2)
    with pytest.raises(Exception, match="another shape"):
        fasttrain.Trainer(wider, _args(fasttrain, tmp_path / "resumed"), train_dataset=data()).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_an_optimizer_state_in_another_parameter_order_is_refused_by_shape():
    """A fused optimizer reads its state with the parameters' sizes: a state saved for the
    parameters in another order must be an error naming the shapes, not an out-of-bounds read."""
    from fasttrain.checkpoint.hf_layout import CheckpointError, fit_optimizer_state
    weight, bias = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([weight, bias], lr=0.1)
    for p in (weight, bias):
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = optimizer.state_dict()
    assert fit_optimizer_state(state, optimizer) is state  # the matching state loads as it is
    swapped = {"state": {0: state["state"][1], 1: state["state"][0]},
               "param_groups": [dict(g, params=[0]) for g in state["param_groups"]] +
                               [dict(state["param_groups"][0], params=[1])]}
    with pytest.raises(CheckpointError, match=r"'exp_avg' for parameter #0 has shape \(4,\), but that parameter is \(4, 3\)"):
        fit_optimizer_state(swapped, optimizer)
