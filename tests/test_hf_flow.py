"""HF's callback flow, with transformers' own Trainer as the oracle: the same tiny script runs
through both and the events, flags and log records they produce are compared."""
import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402
from tests._tiny import LinearRegressor as Regressor  # noqa: E402
from fasttrain.callbacks import (DefaultFlowCallback, PrinterCallback, ProgressCallback,  # noqa: E402
                                 TrainerControl, TrainerState)


def regression_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


FLAGS = ("should_log", "should_evaluate", "should_save", "should_training_stop")


class FlowRecorder:
    """Built per library: records what each event sees, optionally overrides flags."""

    def __new__(cls, lib, overrides=None):
        class Recorder(lib.TrainerCallback):
            def __init__(self):
                self.seen = []

            def _flags(self, control):
                return tuple(name for name in FLAGS if getattr(control, name))

            def on_step_end(self, args, state, control, **kwargs):
                for name, value in (overrides or {}).get(("step", state.global_step), {}).items():
                    setattr(control, name, value)
                self.seen.append(("step_end", state.global_step, self._flags(control)))

            def on_epoch_end(self, args, state, control, **kwargs):
                self.seen.append(("epoch_end", state.global_step, self._flags(control)))

            def on_log(self, args, state, control, logs=None, **kwargs):
                kind = next((k for k in ("train_loss", "eval_loss", "loss") if k in logs), "other")
                self.seen.append(("log", state.global_step, kind))

            def on_save(self, args, state, control, **kwargs):
                self.seen.append(("save", state.global_step))

        return Recorder()


def run_script(lib, out, overrides=None, n=12, model_init=False, **arg_overrides):
    """The same few lines an HF user writes, with `lib` being transformers or fasttrain."""
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=0.05,
                  logging_steps=2, eval_strategy="steps", eval_steps=2, save_steps=3,
                  num_train_epochs=2, report_to="none", disable_tqdm=True, seed=0)
    kwargs.update(arg_overrides)
    args = lib.TrainingArguments(**kwargs)
    rec = FlowRecorder(lib, overrides)
    model_kw = {"model_init": Regressor} if model_init else {"model": Regressor()}
    trainer = lib.Trainer(**model_kw, args=args, train_dataset=regression_data(n),
                          eval_dataset=regression_data(6, seed=1), callbacks=[rec])
    result = trainer.train()
    return trainer, rec.seen, result


@pytest.mark.parametrize("case", [
    dict(),                                                 # 3 steps/epoch x 2 epochs
    dict(max_steps=4),                                      # max_steps ends mid-epoch
    dict(max_steps=5, save_steps=2, logging_first_step=True),
    dict(eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch"),
])
def test_events_flags_and_saves_match_hf(tmp_path, case):
    _, hf, _ = run_script(transformers, tmp_path / "hf", **case)
    _, ft, _ = run_script(fasttrain, tmp_path / "ft", **case)
    assert ft == hf


def test_a_callback_can_override_the_flags_before_the_trainer_acts(tmp_path):
    overrides = {("step", 1): {"should_log": True, "should_save": True},
                 ("step", 3): {"should_save": False}, ("step", 4): {"should_training_stop": True}}
    _, hf, _ = run_script(transformers, tmp_path / "hf", overrides=overrides)
    trainer, ft, _ = run_script(fasttrain, tmp_path / "ft", overrides=overrides)
    assert ft == hf
    assert ("save", 1) in ft and ("save", 3) not in ft and trainer.state.global_step == 4
    assert ("epoch_end", 4, ("should_training_stop",)) in ft  # on_epoch_end also on a stop


def test_default_callbacks_are_in_the_handler_as_in_hf(tmp_path):
    for tqdm_off, console in ((True, PrinterCallback), (False, ProgressCallback)):
        args = fasttrain.TrainingArguments(output_dir=str(tmp_path), disable_tqdm=tqdm_off, report_to="none")
        names = [type(c) for c in fasttrain.Trainer(Regressor(), args).callback_handler.callbacks]
        assert names[0] is DefaultFlowCallback and names[-1] is console


def test_summary_record_and_train_loss_as_hf(tmp_path):
    hf_trainer, _, hf_result = run_script(transformers, tmp_path / "hf", eval_strategy="no", save_strategy="no")
    ft_trainer, _, ft_result = run_script(fasttrain, tmp_path / "ft", eval_strategy="no", save_strategy="no")
    hf_last, ft_last = hf_trainer.state.log_history[-1], ft_trainer.state.log_history[-1]
    assert set(hf_last) <= set(ft_last)
    # the mean over every step (6 steps, logged at 2/4/6): the same training, the same number
    assert ft_result.training_loss == pytest.approx(hf_result.training_loss, rel=1e-5)
    assert ft_last["train_loss"] == pytest.approx(hf_last["train_loss"], rel=1e-5)
    assert set(hf_result.metrics) <= set(ft_result.metrics)


def test_every_metric_reaches_the_console(tmp_path, capsys):
    def compute_metrics(pred):
        return {"mae": float(abs(pred.predictions - pred.label_ids).mean())}

    args = fasttrain.TrainingArguments(output_dir=str(tmp_path), max_steps=2, logging_steps=1,
                                       disable_tqdm=True, report_to="none", save_strategy="no")
    trainer = fasttrain.Trainer(Regressor(), args, train_dataset=regression_data(8),
                                eval_dataset=regression_data(4), compute_metrics=compute_metrics)
    trainer.train()
    trainer.evaluate()
    out = capsys.readouterr().out
    for key in ("'loss'", "'learning_rate'", "'grad_norm'", "'eval_loss'", "'eval_mae'", "'train_loss'",
                "'train_runtime'"):
        assert key in out, key


def test_model_init_gives_the_same_run_as_hf(tmp_path):
    hf_trainer, _, hf_result = run_script(transformers, tmp_path / "hf", model_init=True, save_strategy="no")
    ft_trainer, _, ft_result = run_script(fasttrain, tmp_path / "ft", model_init=True, save_strategy="no")
    assert ft_result.training_loss == pytest.approx(hf_result.training_loss, rel=1e-5)
    with pytest.raises(TypeError, match="model_init"):
        fasttrain.Trainer(args=fasttrain.TrainingArguments(output_dir=str(tmp_path / "x")))


def test_trainer_state_json_and_helpers_match_hf(tmp_path):
    hf_trainer, _, _ = run_script(transformers, tmp_path / "hf", max_steps=3, save_steps=3)
    path = tmp_path / "hf" / "checkpoint-3" / "trainer_state.json"
    ours = TrainerState.load_from_json(str(path))
    theirs = transformers.TrainerState.load_from_json(str(path))
    for key in json.loads(path.read_text()):
        assert getattr(ours, key) == getattr(theirs, key), key
    for steps in (dict(logging_steps=0.25, eval_steps=0.5, save_steps=7), dict(logging_steps=3)):
        hf_args = transformers.TrainingArguments(output_dir=str(tmp_path / "a"), eval_strategy="steps", **steps)
        ft_args = fasttrain.TrainingArguments(output_dir=str(tmp_path / "a"), eval_strategy="steps", **steps)
        a, b = transformers.TrainerState(), TrainerState()
        a.compute_steps(hf_args, 10)
        b.compute_steps(ft_args, 10)
        assert (a.logging_steps, a.eval_steps, a.save_steps) == (b.logging_steps, b.eval_steps, b.save_steps)
    control = TrainerControl(should_save=True)
    assert control.state() == transformers.TrainerControl(should_save=True).state()
    assert TrainerControl.from_state(control.state()) == control


def test_early_stopping_counts_as_hf_and_says_why(tmp_path, caplog):
    ours, theirs = fasttrain.EarlyStoppingCallback(2, 0.1), transformers.EarlyStoppingCallback(2, 0.1)
    args = fasttrain.TrainingArguments(output_dir=str(tmp_path), metric_for_best_model="loss",
                                       greater_is_better=False)
    state = TrainerState(best_metric=1.0)
    for value in (0.95, 0.5, 0.45, 0.8, 0.3):
        ours.check_metric_value(args, state, TrainerControl(), value)
        theirs.check_metric_value(args, state, TrainerControl(), value)
        assert ours.early_stopping_patience_counter == theirs.early_stopping_patience_counter
        state.best_metric = min(state.best_metric, value)
    assert ours.state() == theirs.state()
    stopper = fasttrain.EarlyStoppingCallback(1)
    state, control = TrainerState(best_metric=0.5, global_step=7), TrainerControl()
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        stopper.on_evaluate(args, state, control, metrics={"eval_loss": 0.9})
    assert control.should_training_stop
    assert "early stopping at step 7" in caplog.text and "eval_loss=0.9" in caplog.text


def test_early_stopping_without_load_best_stops_where_hf_stops(tmp_path):
    def make_metrics():
        scores = iter([0.5, 0.7, 0.6, 0.65, 0.4, 0.3, 0.2, 0.1])

        def compute_metrics(pred):
            return {"score": next(scores)}
        return compute_metrics

    stops = {}
    for lib in (transformers, fasttrain):
        args = lib.TrainingArguments(output_dir=str(tmp_path / lib.__name__), per_device_train_batch_size=4,
                                     max_steps=8, eval_strategy="steps", eval_steps=1, save_strategy="no",
                                     metric_for_best_model="score", greater_is_better=True,
                                     report_to="none", disable_tqdm=True)
        trainer = lib.Trainer(Regressor(), args, train_dataset=regression_data(40),
                              eval_dataset=regression_data(4, seed=1), compute_metrics=make_metrics(),
                              callbacks=[lib.EarlyStoppingCallback(early_stopping_patience=2)])
        trainer.train()
        stops[lib.__name__] = (trainer.state.global_step, trainer.state.best_metric)
    assert stops["fasttrain"] == stops["transformers"]
    assert stops["fasttrain"][0] < 8
