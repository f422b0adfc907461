"""Callback state across a resume, the handler's warnings and HF's on_push_begin event, with
transformers' own Trainer as the oracle: the same script runs through both trainers and what
each leaves in its callbacks, its control and its warnings is compared (the differences HF's
tests/trainer/test_trainer_callback.py found)."""
import dataclasses
import logging
import os
from unittest.mock import patch

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402
from tests._tiny import LinearRegressor as Regressor  # noqa: E402
import fasttrain.callbacks  # noqa: E402
import transformers.trainer_callback  # noqa: E402

LIBS = {"hf": (transformers, transformers.trainer_callback), "ft": (fasttrain, fasttrain.callbacks)}


def regression_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "labels": x[i].sum()} for i in range(n)]


def remembers(callbacks_module):
    """A stateful callback of one class name under either library; its value is a
    constructor argument, so only a restore that rebuilds from `args` brings it back."""
    class Remembers(callbacks_module.TrainerCallback, callbacks_module.ExportableState):
        def __init__(self, value="default"):
            self.value = value

        def state(self):
            return {"args": {"value": self.value}, "attributes": {}}

    return Remembers


def trainer(lib, out, callbacks, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=2,
                  eval_strategy="steps", eval_steps=2, per_device_train_batch_size=4,
                  report_to="none", disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return lib.Trainer(Regressor(), lib.TrainingArguments(**kwargs), train_dataset=regression_data(16),
                       eval_dataset=regression_data(8, seed=1), callbacks=callbacks)


def restored_callbacks(which, out):
    lib, module = LIBS[which]
    Remembers = remembers(module)
    trainer(lib, out, [lib.EarlyStoppingCallback(early_stopping_patience=5, early_stopping_threshold=0.2),
                       Remembers("first"), Remembers("second")], load_best_model_at_end=True).train()
    resumed = trainer(lib, out, [lib.EarlyStoppingCallback(), Remembers(), Remembers()],
                      load_best_model_at_end=True, restore_callback_states_from_checkpoint=True)
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    stopper = next(c for c in resumed.callback_handler.callbacks if isinstance(c, lib.EarlyStoppingCallback))
    values = [c.value for c in resumed.callback_handler.callbacks if isinstance(c, Remembers)]
    # not the patience counter: resumed at its last step, HF's Trainer runs one step more (and
    # evaluates), fasttrain none (test_hf_options checks the counter is restored)
    return stopper.early_stopping_patience, stopper.early_stopping_threshold, values


def test_constructor_arguments_of_stateful_callbacks_restored_as_hf(tmp_path):
    hf = restored_callbacks("hf", tmp_path / "hf")
    assert hf == (5, 0.2, ["first", "second"])  # what HF restores: the saved args, in order
    assert restored_callbacks("ft", tmp_path / "ft") == hf


@pytest.mark.parametrize("restore", [True, False])
def test_control_restored_from_trainer_state_as_hf(tmp_path, restore):
    controls = {}
    for which, (lib, _) in LIBS.items():
        trainer(lib, tmp_path / which, None, eval_strategy="no").train()
        fresh = trainer(lib, tmp_path / which, None, eval_strategy="no",
                        restore_callback_states_from_checkpoint=restore)
        fresh.state = lib.TrainerState.load_from_json(str(tmp_path / which / "checkpoint-2" / "trainer_state.json"))
        fresh._load_callback_state()
        controls[which] = dataclasses.asdict(fresh.control)
    assert controls["hf"]["should_training_stop"] is restore  # saved at the last step
    assert controls["ft"] == controls["hf"]


def test_resume_names_the_saved_callbacks_it_cannot_restore_as_hf(tmp_path, caplog):
    warnings = {}
    for which, (lib, _) in LIBS.items():
        trainer(lib, tmp_path / which, [lib.EarlyStoppingCallback()], load_best_model_at_end=True).train()
        resumed = trainer(lib, tmp_path / which, None, restore_callback_states_from_checkpoint=True)
        checkpoint = str(tmp_path / which / "checkpoint-2")
        if which == "hf":
            with patch("transformers.trainer.logger.warning") as warn:
                resumed.train(resume_from_checkpoint=checkpoint)
            warnings[which] = [str(call.args[0]) for call in warn.call_args_list]
        else:
            with caplog.at_level(logging.WARNING, logger="fasttrain"):
                resumed.train(resume_from_checkpoint=checkpoint)
            warnings[which] = [r.getMessage() for r in caplog.records]
    for which in LIBS:
        assert any("EarlyStoppingCallback" in w for w in warnings[which]), (which, warnings[which])


def test_handler_without_the_flow_callback_warns_as_hf(caplog):
    for which, (_, module) in LIBS.items():
        with patch.object(module.logger, "warning") as warn:
            module.CallbackHandler([module.ProgressCallback()], None, None, None, None)
        assert warn.called and "DefaultFlowCallback" in warn.call_args[0][0], which
        with patch.object(module.logger, "warning") as warn:
            module.CallbackHandler([module.DefaultFlowCallback(), module.ProgressCallback()], None, None, None, None)
        assert not warn.called, which


def test_duplicate_callback_warning_names_the_class_as_hf():
    for which, (lib, module) in LIBS.items():
        class Twice(module.TrainerCallback):
            pass

        with patch.object(module.logger, "warning") as warn:
            module.CallbackHandler([module.DefaultFlowCallback(), Twice, Twice], None, None, None, None)
        assert warn.call_count == 1 and "Twice" in warn.call_args[0][0], which


def test_on_push_begin_reaches_callbacks_as_hf(tmp_path):
    for which, (lib, module) in LIBS.items():
        events = []

        class Recorder(module.TrainerCallback):
            def on_push_begin(self, args, state, control, **kwargs):
                events.append(("push", "model" in kwargs))

        handler = module.CallbackHandler([module.DefaultFlowCallback(), Recorder()], None, None, None, None)
        handler.on_push_begin(None, module.TrainerState(), module.TrainerControl())
        assert events == [("push", True)], which


def test_the_callback_names_hf_exports_are_fasttrains():
    """`from transformers import X` -> `from fasttrain import X` for the callback classes, and
    transformers.trainer_callback's names in fasttrain.callbacks."""
    for name in ("TrainerCallback", "TrainerState", "TrainerControl", "EarlyStoppingCallback",
                 "DefaultFlowCallback", "ProgressCallback", "PrinterCallback"):
        assert hasattr(transformers, name) and getattr(fasttrain, name) is getattr(fasttrain.callbacks, name)
    for name in ("CallbackHandler", "ExportableState"):
        assert hasattr(transformers.trainer_callback, name) and hasattr(fasttrain.callbacks, name)


def test_handler_events_take_hfs_positional_arguments():
    """A Trainer subclass copied from HF calls handler.on_log(args, state, control, logs)."""
    for which, (lib, module) in LIBS.items():
        seen = []

        class Recorder(module.TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                seen.append(("log", logs, control.should_log))

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                seen.append(("evaluate", metrics, control.should_evaluate))

            def on_predict(self, args, state, control, metrics=None, **kwargs):
                seen.append(("predict", metrics))

        handler = module.CallbackHandler([module.DefaultFlowCallback(), Recorder()], None, None, None, None)
        control = module.TrainerControl(should_log=True, should_evaluate=True)
        handler.on_log(None, module.TrainerState(), control, {"loss": 1.0})
        handler.on_evaluate(None, module.TrainerState(), control, {"eval_loss": 2.0})
        handler.on_predict(None, module.TrainerState(), control, {"test_loss": 3.0})
        assert seen == [("log", {"loss": 1.0}, False), ("evaluate", {"eval_loss": 2.0}, False),
                        ("predict", {"test_loss": 3.0})], which
    with pytest.raises(TypeError, match="on_step_end takes"):
        fasttrain.callbacks.CallbackHandler([], None, None, None, None).on_step_end(None, None, None, 1)


EVENTS = ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_substep_end",
          "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log", "on_prediction_step",
          "on_evaluate", "on_predict", "on_save", "on_epoch_end", "on_train_end")


def every_event(module):
    """A callback of either library that records each of HF's events with the step it saw."""
    def record(name):
        return lambda self, args, state, control, **kwargs: self.events.append((name[3:], state.global_step))

    recorder = type("EveryEvent", (module.TrainerCallback,), {name: record(name) for name in EVENTS})()
    recorder.events = []
    return recorder


@pytest.mark.parametrize("case", [
    dict(gradient_accumulation_steps=2, max_steps=3, logging_steps=2, eval_strategy="steps", eval_steps=2,
         save_steps=2),  # accumulation, a partial last window, evaluation and saving mid-run
    dict(gradient_accumulation_steps=3, per_device_train_batch_size=2, num_train_epochs=1, logging_steps=1,
         eval_strategy="epoch", save_strategy="epoch"),  # 13 rows: the epoch ends mid-window
])
def test_every_event_in_hfs_order_with_accumulation(tmp_path, case):
    """All of HF's events (substeps, optimizer steps, prediction steps included) in the same
    order at the same steps, through train(), then predict() and evaluate() outside it."""
    events = {}
    for which, (lib, module) in LIBS.items():
        recorder = every_event(module)
        kwargs = dict(output_dir=str(tmp_path / which), per_device_train_batch_size=4, report_to="none",
                      disable_tqdm=True, seed=0)
        kwargs.update(case)
        run = lib.Trainer(Regressor(), lib.TrainingArguments(**kwargs), train_dataset=regression_data(13),
                          eval_dataset=regression_data(6, seed=1), callbacks=[recorder])
        run.train()
        run.predict(regression_data(5, seed=2))
        run.evaluate()
        events[which] = recorder.events
    assert ("substep_end", 0) in events["hf"] and ("prediction_step", events["hf"][-1][1]) in events["hf"]
    assert events["ft"] == events["hf"]


def test_handler_dispatch_follows_every_change_to_the_callbacks():
    """HF's handler looks every event up on every callback at every call: an edit of the list
    in place, a callback added later, or a method set on an instance is called, in order.
    Guards any per-train() dispatch cache (one was measured slower than the lookups it
    replaced: docs/perf.md, 'Callback dispatch')."""
    calls = []

    class Quiet(fasttrain.TrainerCallback):
        pass

    class Loud(fasttrain.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            calls.append("loud")

    quiet = Quiet()
    handler = fasttrain.callbacks.CallbackHandler([fasttrain.DefaultFlowCallback(), quiet])
    state, control = fasttrain.TrainerState(), fasttrain.callbacks.TrainerControl()
    handler.call_event("on_step_begin", None, state, control)
    assert calls == []
    handler.callbacks.append(Loud())  # in place, not through add_callback
    handler.call_event("on_step_begin", None, state, control)
    assert calls == ["loud"]
    quiet.on_step_begin = lambda args, state, control, **kw: calls.append("instance")
    handler.call_event("on_step_begin", None, state, control)
    assert calls == ["loud", "instance", "loud"]
    handler.callbacks[2] = Quiet()  # replaced in place: same length
    handler.call_event("on_step_begin", None, state, control)
    assert calls == ["loud", "instance", "loud", "instance"]
