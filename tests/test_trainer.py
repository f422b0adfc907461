"""The Trainer against plain PyTorch: API parity, exact accumulation, loss parity, logging."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasttrain import (EarlyStoppingCallback, EvalPrediction, Trainer, TrainerCallback,
                       TrainerControl, TrainerState, TrainingArguments)
from fasttrain.data.datasets import default_data_collator
from tests._tiny import tiny_gpt, token_examples


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), disable_tqdm=True, report_to="none",
                save_strategy="no", logging_steps=1, learning_rate=1e-2, max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------ exact accumulation
def test_accumulation_1x8_equals_8x1_with_ragged_lengths(tmp_path):
    data = token_examples(8, ragged=True)
    results = {}
    for bs, ga in ((8, 1), (1, 8), (2, 4)):
        model = tiny_gpt()
        args = _args(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs,
                     gradient_accumulation_steps=ga, max_steps=1, optim="sgd",
                     lr_scheduler_type="constant", learning_rate=1.0)
        Trainer(model, args, train_dataset=data).train()
        results[(bs, ga)] = _flat_params(model)
    # Reference: the exact mean over every valid target token of the 8 sequences.
    ref = tiny_gpt()
    total, count = 0.0, 0
    for ex in data:
        ids = ex["input_ids"][None]
        logits = ref(ids).logits[0, :-1]
        total = total + F.cross_entropy(logits, ids[0, 1:], reduction="sum")
        count += ids.shape[1] - 1
    (total / count).backward()
    with torch.no_grad():
        expected = _flat_params(ref) - torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    # fp32 summation order differs between layouts: a few ulps of the update, no more
    for key, got in results.items():
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6, msg=f"layout {key}")
    unchanged = _flat_params(tiny_gpt())
    assert (results[(8, 1)] - unchanged).abs().max() > 1e-3  # the step did move the weights


def test_mean_loss_model_weighted_by_valid_tokens(tmp_path):
    """A model that only returns a mean loss (no fused path) is weighted by its count."""
    data = token_examples(4, ragged=True, seed=3)
    finals = []
    for bs, ga in ((4, 1), (1, 4)):
        model = tiny_gpt(seed=5)
        args = _args(tmp_path / f"m{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     max_steps=1, optim="sgd", lr_scheduler_type="constant", learning_rate=1.0,
                     fused_loss=False)
        Trainer(model, args, train_dataset=data).train()
        finals.append(_flat_params(model))
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=2e-6)


# ------------------------------------------------------------------ loss parity with a plain loop
def test_per_step_losses_match_plain_pytorch_loop(tmp_path):
    data = token_examples(48, seed=7)
    steps, bs, lr = 12, 4, 3e-3
    model = tiny_gpt(seed=11)
    args = _args(tmp_path, per_device_train_batch_size=bs, max_steps=steps, learning_rate=lr,
                 lr_scheduler_type="linear", warmup_steps=3, max_grad_norm=1.0, weight_decay=0.1,
                 optim="adamw_torch_fused", seed=123)
    trainer = Trainer(model, args, train_dataset=data)
    trainer.train()
    got = [r["loss"] for r in trainer.state.log_history if "loss" in r]

    # the plain loop: same init, same order (the sampler's permutation), same AdamW and clipping
    ref = tiny_gpt(seed=11)
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / 3 if s < 3 else max(0.0, (steps - s) / (steps - 3)))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(123)).tolist()
    expected = []
    for step in range(steps):
        batch = default_data_collator([data[i] for i in order[step * bs:(step + 1) * bs]])
        loss = ref(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        expected.append(loss.item())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert expected[-1] < expected[0]  # it trained


# ------------------------------------------------------------------ API parity
class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            events = object.__getattribute__(self, "events")
            return lambda args, state, control, **kw: events.append(name)
        return object.__getattribute__(self, name)


def test_train_evaluate_predict_and_callback_events(tmp_path):
    data = token_examples(16, seed=2)
    rec = Recorder()
    seen = {}

    def compute_metrics(pred: EvalPrediction):
        logits, labels = pred
        seen["shapes"] = (logits.shape, labels.shape)
        acc = (logits[:, :-1].argmax(-1) == labels[:, 1:]).mean()
        return {"accuracy": float(acc)}

    args = _args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2,
                 eval_strategy="epoch", per_device_eval_batch_size=3)
    trainer = Trainer(tiny_gpt(), args, train_dataset=data, eval_dataset=data[:7],
                      compute_metrics=compute_metrics, callbacks=[rec])
    global_step, training_loss, metrics = trainer.train()
    assert global_step == 4 and np.isfinite(training_loss) and "train_runtime" in metrics
    ev = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy", "eval_runtime"} <= set(ev)
    assert seen["shapes"] == ((7, 16, 64), (7, 16))  # every eval example exactly once
    preds, label_ids, pmetrics = trainer.predict(data[:5])
    assert preds.shape == (5, 16, 64) and label_ids.shape == (5, 16) and "test_loss" in pmetrics
    ev_names = rec.events
    assert ev_names[0] == "on_init_end" and ev_names[1] == "on_train_begin"
    for name in ("on_epoch_begin", "on_step_begin", "on_substep_end", "on_pre_optimizer_step",
                 "on_optimizer_step", "on_step_end", "on_log", "on_evaluate", "on_epoch_end",
                 "on_train_end", "on_prediction_step", "on_predict"):
        assert name in ev_names, name
    assert ev_names.count("on_optimizer_step") == 4 and ev_names.count("on_substep_end") == 4
    assert trainer.pop_callback(Recorder) is rec and trainer.pop_callback(Recorder) is None
    trainer.add_callback(Recorder)
    trainer.remove_callback(Recorder)
    assert not any(isinstance(c, Recorder) for c in trainer.callback_handler.callbacks)


def test_eval_loss_is_token_weighted_mean(tmp_path):
    data = token_examples(5, ragged=True, seed=9)
    model = tiny_gpt(seed=4)
    trainer = Trainer(model, _args(tmp_path, per_device_eval_batch_size=2), eval_dataset=data)
    got = trainer.evaluate()["eval_loss"]
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in data:
            ids = ex["input_ids"][None]
            total += F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert got == pytest.approx(total / count, rel=1e-5)


def test_preprocess_logits_for_metrics_is_applied(tmp_path):
    data = token_examples(6, seed=4)
    got = {}

    def pre(logits, labels):
        return logits.argmax(-1)

    def metrics(p):
        got["dtype"] = p.predictions.dtype
        got["shape"] = p.predictions.shape
        return {"n": len(p.predictions)}

    trainer = Trainer(tiny_gpt(), _args(tmp_path), eval_dataset=data, compute_metrics=metrics,
                      preprocess_logits_for_metrics=pre)
    out = trainer.evaluate()
    assert got["shape"] == (6, 16) and got["dtype"] == np.int64 and out["eval_n"] == 6


def test_early_stopping_stops_when_metric_stalls(tmp_path):
    data = token_examples(8, seed=2)
    calls = iter([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])  # accuracy never improves after the first

    args = _args(tmp_path, per_device_train_batch_size=8, num_train_epochs=10, eval_strategy="epoch",
                 save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="loss_proxy",
                 greater_is_better=False)
    trainer = Trainer(tiny_gpt(), args, train_dataset=data, eval_dataset=data[:2],
                      compute_metrics=lambda p: {"loss_proxy": next(calls)},
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.train()
    assert trainer.state.global_step == 3  # best at epoch 1, two stalls, stop
    assert trainer.state.best_metric == 0.5
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")


# ------------------------------------------------------------------ models and outputs
class DictLossModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": F.mse_loss(self.w(x).squeeze(-1), y)}


class TupleLossModel(DictLossModel):
    def forward(self, x, y):
        return (F.mse_loss(self.w(x).squeeze(-1), y), self.w(x))


@pytest.mark.parametrize("model_cls", [DictLossModel, TupleLossModel])
def test_dict_and_tuple_loss_models_without_labels(tmp_path, model_cls):
    g = torch.Generator().manual_seed(0)
    w_true = torch.tensor([1.0, -2.0, 0.5, 3.0])
    xs = [torch.randn(4, generator=g) for _ in range(32)]
    data = [{"x": x, "y": x @ w_true} for x in xs]
    model = model_cls()
    args = _args(tmp_path, per_device_train_batch_size=8, num_train_epochs=3, learning_rate=0.1,
                 lr_scheduler_type="constant")
    trainer = Trainer(model, args, train_dataset=data)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])


# ------------------------------------------------------------------ logging outputs
def test_jsonl_and_tensorboard_logs_are_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = token_examples(16, seed=2)
    args = _args(tmp_path, per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                 report_to="tensorboard", eval_strategy="steps", eval_steps=4)
    trainer = Trainer(tiny_gpt(), args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    with open(os.path.join(args.output_dir, "log_history.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4]
    assert any("eval_loss" in r for r in lines)
    history = trainer.state.log_history  # HF's keys; the file adds the measurements
    assert len(lines) == len(history) and all(line.items() >= h.items() for line, h in zip(lines, history))
    assert all("tokens_per_second" in r for r in lines if "loss" in r)
    acc = EventAccumulator(args.logging_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags and "train/learning_rate" in tags
    tb_losses = [e.value for e in acc.Scalars("train/loss")]
    np.testing.assert_allclose(tb_losses, [r["loss"] for r in lines if "loss" in r], rtol=1e-6)


def test_state_and_control_types_are_exported():
    st, ctl = TrainerState(), TrainerControl()
    assert st.global_step == 0 and st.log_history == [] and not ctl.should_training_stop
    assert TrainerState.from_json_string(st.to_json_string()) == st


def test_plan_epochs_counts_steps_and_epochs_as_hf():
    import math
    import sys
    from types import SimpleNamespace
    from fasttrain.trainer.loaders import plan_epochs

    def args(max_steps=-1, epochs=3.0, ga=1):
        return SimpleNamespace(max_steps=max_steps, num_train_epochs=epochs, gradient_accumulation_steps=ga)
    assert plan_epochs(args(), 10) == (10, 30, 3)
    assert plan_epochs(args(epochs=2.5, ga=4), 10) == (10, 8, 3)  # ceil(10/4)=3 steps an epoch, 2.5 epochs
    assert plan_epochs(args(max_steps=7, ga=4), 10) == (10, 7, 3)  # max_steps wins, epochs it takes
    assert plan_epochs(args(max_steps=5), None) == (math.inf, 5, sys.maxsize)  # a stream: passes repeat
    with pytest.raises(ValueError, match="yields no batches.*lower the batch size"):
        plan_epochs(args(), 0)


def test_run_cleanup_runs_every_step_and_keeps_the_first_error(caplog):
    from fasttrain.trainer.utils import run_cleanup
    ran = []

    def boom(name):
        def step():
            ran.append(name)
            raise OSError(name)
        return step
    steps = (("a", boom("a")), ("skipped", None), ("b", lambda: ran.append("b")), ("c", boom("c")))
    with pytest.raises(OSError, match="^a$"):  # after success: the first error, once all ran
        run_cleanup(steps, failed=False)
    assert ran == ["a", "b", "c"] and "while stopping training, c also failed: c" in caplog.text
    ran.clear()
    run_cleanup(steps, failed=True)  # after a failure: logged, the caller's error propagates
    assert ran == ["a", "b", "c"] and "a also failed" in caplog.text
