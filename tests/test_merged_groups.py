"""HF's two param groups, stepped as one when their hyperparameters are equal
(fasttrain.optim.merged_groups): HF's layout for everyone who reads the groups, one
optimizer launch set per step, the same numbers as stepping the groups one by one."""
import tempfile

import pytest
import torch

import fasttrain
from fasttrain.optim.merged_groups import merged_param_groups, step_merged
from fasttrain.profiler.hand_loop import Regressor, regression_examples
from tests._dispatch_count import LOCAL_SCALAR_DENSE, OpCounter, per_step
from tests._tiny import Classifier


def _params(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 2, generator=g)) for _ in range(n)]


def _adamw(params, wd=(0.0, 0.0), lr=None, **kw):
    lr = torch.tensor(0.01) if lr is None else lr
    return torch.optim.AdamW([{"params": params[:2], "weight_decay": wd[0]},
                              {"params": params[2:], "weight_decay": wd[1]}], lr=lr, fused=True, **kw)


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_equal_groups_merge_and_different_ones_do_not():
    params = _params()
    merged = merged_param_groups(_adamw(params))
    assert merged is not None and len(merged) == 1 and [id(p) for p in merged[0]["params"]] == [id(p) for p in params]
    assert merged_param_groups(_adamw(params, wd=(0.1, 0.0))) is None
    # two LR tensors are never compared (that would read them on the host): not merged
    opt = torch.optim.AdamW([{"params": params[:2], "lr": torch.tensor(0.01)},
                             {"params": params[2:], "lr": torch.tensor(0.01)}], fused=True)
    with OpCounter() as counter:
        assert merged_param_groups(opt) is None
    assert counter.ops[LOCAL_SCALAR_DENSE] == 0


def _ids(params):
    return [id(p) for p in params]


def test_the_cache_follows_every_change_to_the_groups():
    params = _params(6)
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:4]}], lr=0.1)
    first = merged_param_groups(opt)
    assert len(first) == 1 and merged_param_groups(opt) is first  # cached while nothing changes
    opt.param_groups[1]["lr"] = 0.2  # a host-side schedule writing one group
    assert merged_param_groups(opt) is None
    opt.param_groups[1]["lr"] = 0.1  # an equal value, another float object
    assert _ids(merged_param_groups(opt)[0]["params"]) == _ids(params[:4])
    opt.param_groups[0]["params"].append(params[4])  # a parameter added in place
    assert _ids(merged_param_groups(opt)[0]["params"]) == _ids(params[:2] + params[4:5] + params[2:4])
    opt.add_param_group({"params": [params[5]]})
    assert _ids(merged_param_groups(opt)[0]["params"]) == _ids(params[:2] + params[4:5] + params[2:4] + params[5:])


@pytest.mark.parametrize("make", [  # fused with a tensor LR, foreach, SGD with momentum
    lambda p: _adamw(p),
    lambda p: torch.optim.AdamW([{"params": p[:2]}, {"params": p[2:]}], lr=0.01, foreach=True),
    lambda p: torch.optim.SGD([{"params": p[:2]}, {"params": p[2:]}], lr=0.1, momentum=0.9),
])
def test_merged_steps_are_bit_identical_to_stepping_each_group(make):
    a, b = _params(), _params()
    opt_a, opt_b = make(a), make(b)
    for step in range(3):
        _grads(a, step)
        _grads(b, step)
        groups = opt_a.param_groups
        step_merged(opt_a)
        assert opt_a.param_groups is groups  # the optimizer's own groups are back
        opt_b.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert len(opt_a.state_dict()["param_groups"]) == 2
    for x, y in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
        assert all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)


def test_the_groups_come_back_when_the_step_raises():
    params = _params()
    opt = _adamw(params)
    groups = opt.param_groups
    _grads(params, 0)

    def closure():
        raise RuntimeError("the closure failed")
    with pytest.raises(RuntimeError, match="the closure failed"):
        step_merged(opt, closure)
    assert opt.param_groups is groups and len(groups) == 2


def test_the_trainer_has_hfs_two_groups_as_hf_builds_them():
    """HF's own test (test_no_wd_param_group): decay on the weights, none on the rest."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    for wd in (0.0, 0.1):
        args = fasttrain.TrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", weight_decay=wd)
        trainer = fasttrain.Trainer(model, args)
        trainer.create_optimizer_and_scheduler(10)
        groups = trainer.optimizer.param_groups
        assert groups[0]["params"] == [model[0].weight, model[2].weight]
        assert groups[1]["params"] == [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
        assert [g["weight_decay"] for g in groups] == [wd, 0.0]


def _default_trainer_ops(steps, weight_decay):
    torch.manual_seed(0)
    args = fasttrain.TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=4,
                                       save_strategy="no", disable_tqdm=True, report_to="none", logging_steps=1000,
                                       weight_decay=weight_decay)
    trainer = fasttrain.Trainer(Regressor(), args, train_dataset=regression_examples(200))
    with OpCounter() as counter:
        trainer.train()
    assert len(trainer.optimizer.param_groups) == 2
    return counter.ops


def test_the_default_step_launches_the_optimizer_once_for_hfs_two_groups():
    merged = per_step(lambda n: _default_trainer_ops(n, 0.0), 10, 20)
    split = per_step(lambda n: _default_trainer_ops(n, 0.1), 10, 20)
    assert merged["aten._fused_adamw_.tensor_lr"] == 1
    assert split["aten._fused_adamw_.tensor_lr"] == 2  # unequal groups: one launch set each
    assert sum(split.values()) - sum(merged.values()) == 3  # step counters, update, skip rollback


def test_training_with_merged_groups_matches_hfs_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.test_hf_trainer_api import _args, class_data
    final = {}
    for lib in (transformers, fasttrain):
        torch.manual_seed(0)
        model = Classifier()
        trainer = lib.Trainer(model, _args(lib, tmp_path / lib.__name__, max_steps=5, max_grad_norm=0.0,
                                           lr_scheduler_type="constant"), train_dataset=class_data(40))
        trainer.train()
        final[lib.__name__] = [p.detach().clone() for p in model.parameters()]
        assert len(trainer.optimizer.param_groups) == 2
    for ft, hf in zip(final["fasttrain"], final["transformers"]):
        torch.testing.assert_close(ft, hf, rtol=1e-6, atol=1e-7)


def test_a_scheduler_that_scales_each_group_in_place_scales_each_lr_once(tmp_path):
    """The groups share one LR tensor only under fasttrain's schedule: a subclass's own
    ReduceLROnPlateau (which multiplies each group's LR where it lies) halves it once."""
    class PlateauTrainer(fasttrain.Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            self.lr_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer or self.optimizer, patience=0, factor=0.5)
            return self.lr_scheduler

    args = fasttrain.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", disable_tqdm=True,
                                       save_strategy="no", learning_rate=0.01, per_device_train_batch_size=4)
    trainer = PlateauTrainer(Regressor(), args, train_dataset=regression_examples(8))
    trainer.train()
    trainer.lr_scheduler.step(1.0)
    trainer.lr_scheduler.step(1.0)  # no improvement: halved once
    assert [float(g["lr"]) for g in trainer.optimizer.param_groups] == pytest.approx([0.005, 0.005], rel=1e-6)
