"""LR schedules: the same curves as transformers' schedulers, on a device-side counter that
a skipped step does not advance."""
import math

import pytest
import torch

from fasttrain.optim.schedules import LRScheduler, get_multiplier

transformers = pytest.importorskip("transformers")


def _opt(lr=1.0, tensor=True):
    p = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([p], lr=torch.tensor(lr) if tensor else lr)


@pytest.mark.parametrize("name,kwargs", [
    ("linear", {}), ("cosine", {}), ("constant", {}), ("constant_with_warmup", {}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 20, "min_lr_rate": 0.05}),
])
@pytest.mark.parametrize("tensor_lr", [True, False])
def test_matches_transformers_schedulers(name, kwargs, tensor_lr):
    from transformers import get_scheduler
    total, warmup = 100, 10
    opt = _opt(tensor=tensor_lr)
    ours = LRScheduler(opt, get_multiplier(name, warmup, total, **kwargs), total)
    ref_opt = _opt(tensor=False)
    hf_kwargs = dict(kwargs)
    if name == "warmup_stable_decay":
        hf_kwargs = {"num_decay_steps": kwargs["num_decay_steps"], "min_lr_ratio": kwargs["min_lr_rate"]}
    ref = get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=total,
                        scheduler_specific_kwargs=hf_kwargs or None)
    for step in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-6), (name, step)
        ours.step()
        ref.step()


def test_skipped_step_does_not_advance_the_schedule():
    opt = _opt()
    sched = LRScheduler(opt, get_multiplier("linear", 0, 10), 10)
    lr_tensor = opt.param_groups[0]["lr"]
    sched.step(skipped=torch.zeros(()))
    after_one = sched.get_last_lr()[0]
    sched.step(skipped=torch.ones(()))  # an overflow: the schedule stays put
    assert sched.get_last_lr()[0] == after_one == pytest.approx(0.9)
    sched.step(skipped=torch.zeros(()))
    assert sched.get_last_lr()[0] == pytest.approx(0.8)
    assert opt.param_groups[0]["lr"] is lr_tensor  # updated in place: compiled code never sees a new object


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown lr_scheduler_type 'zigzag'"):
        get_multiplier("zigzag", 0, 10)


def test_state_dict_round_trip():
    opt = _opt()
    a = LRScheduler(opt, get_multiplier("cosine", 3, 20), 20)
    for _ in range(7):
        a.step()
    opt2 = _opt()
    b = LRScheduler(opt2, get_multiplier("cosine", 3, 20), 20)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == a.get_last_lr()
    assert math.isclose(b.get_last_lr()[0], 0.5 * (1 + math.cos(math.pi * 4 / 17)), rel_tol=1e-6)
