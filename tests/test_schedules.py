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


# ------------------------------------------------------------------ every HF lr_scheduler_type
HF_CASES = [
    ("linear", {}), ("cosine", {}), ("cosine", {"num_cycles": 1.5}), ("constant", {}),
    ("constant_with_warmup", {}), ("cosine_with_restarts", {}), ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}), ("polynomial", {"lr_end": 0.1, "power": 2.0}), ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 25}), ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 0.05}), ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr": 0.02, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"num_decay_steps": 30}),
    ("warmup_stable_decay", {"num_decay_steps": 30, "num_stable_steps": 40, "warmup_type": "cosine",
                             "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 20, "warmup_type": "1-sqrt", "decay_type": "linear"}),
]


@pytest.mark.parametrize("name,kwargs", HF_CASES)
@pytest.mark.parametrize("tensor_lr", [True, False])
def test_every_hf_schedule_matches_transformers(name, kwargs, tensor_lr):
    from transformers import get_scheduler
    total, warmup, base = 100, 10, 0.5
    opt = _opt(lr=base, tensor=tensor_lr)
    ours = LRScheduler(opt, get_multiplier(name, warmup, total, lr_init=base, **kwargs), total)
    ref = get_scheduler(name, _opt(lr=base, tensor=False), num_warmup_steps=warmup, num_training_steps=total,
                        scheduler_specific_kwargs=dict(kwargs))
    for step in range(total + 1):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-6, abs=1e-9), (name, step)
        if step < total:
            ours.step()
            ref.step()


@pytest.mark.parametrize("name,kwargs,needle", [
    ("cosine", {"min_lr_rate": 0.1}, "['min_lr_rate'] do not apply to lr_scheduler_type='cosine'"),
    ("cosine_with_min_lr", {}, "needs lr_scheduler_kwargs={'min_lr_rate'"),
    ("polynomial", {"lr_end": 2.0}, "lr_end=2.0 must be below the initial learning rate 0.5"),
    ("warmup_stable_decay", {"decay_type": "cubic"}, "decay_type='cubic' is invalid"),
])
def test_bad_schedule_kwargs_are_named(name, kwargs, needle):
    with pytest.raises(ValueError) as e:
        get_multiplier(name, 10, 100, lr_init=0.5, **kwargs)
    assert needle in str(e.value)


def test_lr_used_is_the_lr_of_the_last_step_even_after_a_skip():
    opt = _opt()
    sched = LRScheduler(opt, get_multiplier("linear", 0, 10), 10)
    assert sched.lr_used() == [pytest.approx(1.0)]  # before any step: the LR the first step will use
    sched.step(skipped=torch.zeros(()))
    assert sched.lr_used() == [pytest.approx(1.0)] and sched.get_last_lr() == [pytest.approx(0.9)]
    sched.step(skipped=torch.ones(()))  # skipped: the schedule stayed at 0.9, which that step had
    assert sched.lr_used() == [pytest.approx(0.9)]
    sched.step()
    assert sched.lr_used() == [pytest.approx(0.9)] and sched.get_last_lr() == [pytest.approx(0.8)]


def _trainer(tmp_path, **kw):
    from fasttrain import Trainer, TrainingArguments
    from tests._tiny import tiny_gpt, token_examples
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", disable_tqdm=True, save_strategy="no",
                             logging_steps=1, per_device_train_batch_size=2, seed=3, **kw)
    data = token_examples(16, seed=4)
    return Trainer(tiny_gpt(), args, train_dataset=data, eval_dataset=data[:4])


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "sgd"])
def test_logged_learning_rate_is_the_one_the_step_used(tmp_path, optim):
    """HF logs the LR captured before the scheduler steps: step k used m(k - 1)."""
    from transformers import get_scheduler
    trainer = _trainer(tmp_path, max_steps=6, learning_rate=0.01, lr_scheduler_type="linear",
                       warmup_steps=2, optim=optim)
    trainer.train()
    logged = [r["learning_rate"] for r in trainer.state.log_history if "loss" in r]
    ref = get_scheduler("linear", _opt(lr=0.01, tensor=False), num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(ref.get_last_lr()[0])
        ref.step()
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert logged[0] == 0.0  # HF's warm-up starts at 0: the first step does not move the weights


def test_reduce_lr_on_plateau_reacts_to_eval_metrics(tmp_path):
    """A metric that never improves: torch's ReduceLROnPlateau (patience 0) halves the LR after
    every evaluation but the first, and training steps do not move it."""
    trainer = _trainer(tmp_path, max_steps=8, learning_rate=0.01, lr_scheduler_type="reduce_lr_on_plateau",
                       lr_scheduler_kwargs={"patience": 0, "factor": 0.5}, eval_strategy="steps", eval_steps=2,
                       metric_for_best_model="flat")
    trainer.compute_metrics = lambda pred: {"flat": 1.0}
    trainer.train()
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    logged = [r["learning_rate"] for r in trainer.state.log_history if "loss" in r]
    assert logged == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025], rel=1e-6)


def test_reduce_lr_on_plateau_needs_evaluation():
    from fasttrain import TrainingArguments
    with pytest.raises(ValueError, match="lr_scheduler_type='reduce_lr_on_plateau' is invalid: .*eval_strategy"):
        TrainingArguments(lr_scheduler_type="reduce_lr_on_plateau")


def test_a_schedule_state_with_float32_base_lrs_loads_and_another_lr_is_refused():
    """Earlier versions saved the base LR read from a float32 tensor (0.20000000298...); the
    schedule now keeps the given 0.2: the two are the same run, another LR is not."""
    from fasttrain.optim.schedules import LRScheduler, get_multiplier
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=torch.tensor(0.2), fused=True)
    sched = LRScheduler(opt, get_multiplier("linear", 0, 10, lr_init=0.2), 10, learning_rate=0.2)
    assert sched.base_lrs == [0.2] and sched.get_last_lr() == [0.2]
    state = sched.state_dict()
    sched.load_state_dict(dict(state, base_lrs=[float(torch.tensor(0.2, dtype=torch.float32))]))
    with pytest.raises(ValueError, match="base learning rates"):
        sched.load_state_dict(dict(state, base_lrs=[0.3]))
