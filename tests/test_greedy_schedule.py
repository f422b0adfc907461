"""lr_scheduler_type='greedy' (HF 5.24's GreedyLR): the same LRs as transformers' own class
over the same metric sequence, and in the Trainer the same logged LRs as HF's Trainer."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402
from fasttrain.optim.greedy import GreedyLR  # noqa: E402
from fasttrain.optim.schedules import SCHEDULES_ACCEPTED  # noqa: E402
from tests._tiny import Classifier, sign_examples  # noqa: E402


def _opt(lr, tensor, groups=2):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": torch.tensor(lr) if tensor else lr} for p in params])


# improvements, plateaus and noise: every branch (raise, lower, cooldown, warmup, reset) runs
METRICS = [5, 4, 3, 2, 1.5, 1.5, 1.5, 1.5, 1.6, 1.6, 1.4, 1.3, 1.2, 1.1, 1.0, 1.0, 1.0, 1.0, 1.0,
           1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1] * 2


@pytest.mark.parametrize("kwargs", [
    {"patience": 1, "factor": 0.5, "min_lr": 0.02, "max_lr": 0.5, "reset_start": 3},
    {"patience": 0, "factor": 0.8, "cooldown": 2, "warmup": 1, "min_lr": [0.01, 0.05], "max_lr": 0.3},
    {"patience": 2, "mode": "max", "threshold_mode": "rel", "threshold": 0.01, "smooth": True, "window_size": 3},
    {},  # HF's defaults: min_lr 1e-3 above nothing here, patience 10
])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_greedy_follows_transformers_greedylr(kwargs, tensor_lr):
    from transformers.optimization import GreedyLR as HFGreedyLR
    ours_opt, ref_opt = _opt(0.1, tensor_lr), _opt(0.1, False)
    ours, ref = GreedyLR(ours_opt, **kwargs), HFGreedyLR(ref_opt, **kwargs)
    changes = 0
    rel = 1e-6 if tensor_lr else 1e-12  # a tensor LR is float32
    for i, metric in enumerate(METRICS):
        before = [float(g["lr"]) for g in ref_opt.param_groups]
        ours.step(metric)
        ref.step(metric)
        theirs = [g["lr"] for g in ref_opt.param_groups]
        changes += theirs != before
        assert [float(g["lr"]) for g in ours_opt.param_groups] == pytest.approx(theirs, rel=rel), i
        assert ours.get_last_lr() == pytest.approx(ref.get_last_lr(), rel=rel)
        if tensor_lr:  # written in place: a fused optimizer keeps reading the same tensor
            assert all(isinstance(g["lr"], torch.Tensor) for g in ours_opt.param_groups)
    if kwargs:
        assert changes >= 3  # the sequence really moves the LR
    for key, value in ref.state_dict().items():
        if key in ("_last_lr", "_init_lrs"):
            assert ours.state_dict()[key] == pytest.approx(value, rel=rel), key
        else:
            assert ours.state_dict()[key] == value, key


def test_greedy_state_round_trips_with_transformers():
    """A checkpoint of either trainer resumes in the other: HF's state_dict keys, LR restored."""
    from transformers.optimization import GreedyLR as HFGreedyLR
    ref_opt = _opt(0.1, False)
    ref = HFGreedyLR(ref_opt, patience=0, factor=0.5, smooth=True, window_size=2, min_lr=0.0)
    for m in (3, 3, 3):  # raised once, lowered twice
        ref.step(m)
    ours_opt = _opt(0.1, True)
    ours = GreedyLR(ours_opt, patience=0, factor=0.5, smooth=True, window_size=2, min_lr=0.0)
    ours.load_state_dict(ref.state_dict())
    assert [float(g["lr"]) for g in ours_opt.param_groups] == pytest.approx([0.05, 0.05]) == \
        [g["lr"] for g in ref_opt.param_groups]
    ref.step(1.0)
    ours.step(1.0)
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert mine.pop("_last_lr") == pytest.approx(theirs.pop("_last_lr"), rel=1e-6)  # float32 tensor LR
    assert mine == theirs


def test_greedy_refuses_a_factor_of_one_or_more():
    with pytest.raises(ValueError, match="factor=1.0 is invalid.*< 1"):
        GreedyLR(_opt(0.1, False), factor=1.0)


def test_every_transformers_scheduler_type_is_accepted():
    from fasttrain.training_args import SCHEDULER_TYPES
    assert {s.value for s in transformers.SchedulerType} <= set(SCHEDULES_ACCEPTED) == set(SCHEDULER_TYPES)


def test_greedy_in_the_trainer_logs_the_lrs_hf_logs(tmp_path):
    logged = {}
    for lib in (transformers, fasttrain):
        metric = iter([1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7])  # two improvements, then a plateau
        args = lib.TrainingArguments(
            output_dir=str(tmp_path / lib.__name__), report_to="none", disable_tqdm=True, save_strategy="no",
            per_device_train_batch_size=4, max_steps=16, logging_steps=1, eval_strategy="steps", eval_steps=2,
            learning_rate=0.1, lr_scheduler_type="greedy", metric_for_best_model="score",
            greater_is_better=False, lr_scheduler_kwargs={"patience": 1, "factor": 0.5, "min_lr": 0.01})
        trainer = lib.Trainer(Classifier(), args, train_dataset=sign_examples(), eval_dataset=sign_examples(4),
                              compute_metrics=lambda pred: {"score": next(metric)})
        trainer.train()
        logged[lib.__name__] = [r["learning_rate"] for r in trainer.state.log_history if "loss" in r]
    assert logged["fasttrain"] == pytest.approx(logged["transformers"], rel=1e-6)
    assert len(set(logged["fasttrain"])) >= 3  # raised, then lowered


def test_greedy_needs_evaluation_as_in_hf():
    with pytest.raises(ValueError, match="lr_scheduler_type='greedy' is invalid: .*eval_strategy"):
        fasttrain.TrainingArguments(lr_scheduler_type="greedy")
    assert fasttrain.TrainingArguments(lr_scheduler_type="greedy", eval_strategy="epoch").metric_for_best_model \
        == transformers.TrainingArguments(lr_scheduler_type="greedy", eval_strategy="epoch").metric_for_best_model \
        == "loss"
