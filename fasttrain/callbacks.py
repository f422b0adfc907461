"""Callbacks with the HuggingFace event names and flow: TrainerState, TrainerControl, the
handler, DefaultFlowCallback (when to log/evaluate/save/stop), the console callbacks and
early stopping. A foundation: imports nothing from fasttrain."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

logger = logging.getLogger("fasttrain")


@dataclass
class TrainerState:
    """The loop's progress, passed to every callback and saved as `trainer_state.json` in
    HuggingFace's layout (a file either trainer wrote loads in the other)."""
    epoch: Optional[float] = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: Optional[int] = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0.0
    log_history: list = field(default_factory=list)
    best_metric: Optional[float] = None
    best_global_step: Optional[int] = None
    best_model_checkpoint: Optional[str] = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: Optional[str] = None
    trial_params: Optional[dict] = None
    stateful_callbacks: dict = field(default_factory=dict)
    skipped_steps: int = 0  # fasttrain: optimizer steps skipped on overflow / non-finite loss

    def to_json_string(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save_to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def load_from_json(cls, path: str) -> "TrainerState":
        with open(path, encoding="utf-8") as f:
            return cls.from_json_string(f.read())

    @classmethod
    def from_json_string(cls, text: str) -> "TrainerState":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def compute_steps(self, args, max_steps: int) -> None:
        """logging/eval/save steps as absolute counts: a value below 1 is a ratio of max_steps."""
        for kind in ("logging", "eval", "save"):
            value = getattr(args, f"{kind}_steps")
            if value is not None:
                setattr(self, f"{kind}_steps", math.ceil(max_steps * value) if value < 1 else int(value))


class ExportableState:
    """A callback whose state survives a checkpoint: `state()` returns
    {"args": constructor kwargs, "attributes": values to set back}, HF's layout."""

    def state(self) -> dict:
        raise NotImplementedError("implement state() -> {'args': {...}, 'attributes': {...}}")

    @classmethod
    def from_state(cls, state: dict):
        instance = cls(**state["args"])
        for key, value in state["attributes"].items():
            setattr(instance, key, value)
        return instance


@dataclass
class TrainerControl(ExportableState):
    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self):
        self.should_training_stop = False

    def _new_epoch(self):
        self.should_epoch_stop = False

    def _new_step(self):
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict:
        return {"args": dataclasses.asdict(self), "attributes": {}}


class TrainerCallback:
    """Override any of the event methods; each receives (args, state, control, **kwargs).

    A callback that returns a TrainerControl replaces the control object. Callbacks that
    hold state worth resuming implement `state() -> dict` and `restore(dict)`.
    """

    def on_init_end(self, args, state, control, **kwargs): pass
    def on_train_begin(self, args, state, control, **kwargs): pass
    def on_train_end(self, args, state, control, **kwargs): pass
    def on_epoch_begin(self, args, state, control, **kwargs): pass
    def on_epoch_end(self, args, state, control, **kwargs): pass
    def on_step_begin(self, args, state, control, **kwargs): pass
    def on_substep_end(self, args, state, control, **kwargs): pass
    def on_pre_optimizer_step(self, args, state, control, **kwargs): pass
    def on_optimizer_step(self, args, state, control, **kwargs): pass
    def on_step_end(self, args, state, control, **kwargs): pass
    def on_evaluate(self, args, state, control, **kwargs): pass
    def on_predict(self, args, state, control, metrics=None, **kwargs): pass
    def on_save(self, args, state, control, **kwargs): pass
    def on_log(self, args, state, control, logs=None, **kwargs): pass
    def on_prediction_step(self, args, state, control, **kwargs): pass
    def on_push_begin(self, args, state, control, **kwargs): pass  # HF's event; fasttrain never pushes


# Flags the handler clears before an event's callbacks run (as HF's handler does), so a
# callback sees only what this step/epoch decided and may still set them.
_CLEARS = {"on_train_begin": ("should_training_stop",), "on_epoch_begin": ("should_epoch_stop",),
           "on_step_begin": ("should_log", "should_evaluate", "should_save"),
           "on_log": ("should_log",), "on_evaluate": ("should_evaluate",), "on_save": ("should_save",)}


# The events whose HF handler method takes a fourth positional argument, and its name.
_FOURTH_ARGUMENT = {"on_log": "logs", "on_evaluate": "metrics", "on_predict": "metrics"}


class CallbackHandler:
    """Calls every callback's event in order; owned by the Trainer. The Trainer puts
    DefaultFlowCallback first, so the other callbacks see (and may override) the flags it
    sets on on_step_end/on_epoch_end before the Trainer acts on them."""

    def __init__(self, callbacks, model=None, processing_class=None, optimizer=None, lr_scheduler=None):
        self.callbacks: list[TrainerCallback] = []
        for cb in callbacks or []:
            self.add_callback(cb)
        self.model = model
        self.processing_class = processing_class
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader = None
        self.eval_dataloader = None
        if not any(isinstance(cb, DefaultFlowCallback) for cb in self.callbacks):
            names = ", ".join(type(cb).__name__ for cb in self.callbacks) or "none"
            logger.warning(f"no DefaultFlowCallback among the callbacks ({names}): nothing will decide "
                           "when to log, evaluate, save or stop; add DefaultFlowCallback first")

    def add_callback(self, callback):
        cb = callback() if isinstance(callback, type) else callback
        if not isinstance(cb, TrainerCallback) and not hasattr(cb, "on_step_end"):
            raise TypeError(f"callback {callback!r} is not a TrainerCallback; subclass "
                            "fasttrain.TrainerCallback and override the events you need")
        if any(type(c) is type(cb) for c in self.callbacks):
            names = ", ".join(type(c).__name__ for c in self.callbacks + [cb])
            logger.warning(f"adding a second {type(cb).__name__}; the callbacks are now: {names}")
        self.callbacks.append(cb)

    def pop_callback(self, callback):
        for cb in self.callbacks:
            if (isinstance(callback, type) and isinstance(cb, callback)) or cb is callback:
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback):
        self.pop_callback(callback)

    @property
    def callback_list(self) -> str:
        return "\n".join(type(cb).__name__ for cb in self.callbacks)

    def call_event(self, event: str, args, state, control, **kwargs):
        for flag in _CLEARS.get(event, ()):
            setattr(control, flag, False)
        base = getattr(TrainerCallback, event, None)
        for cb in self.callbacks:
            method = getattr(cb, event)
            if base is not None and getattr(method, "__func__", None) is base:
                continue  # the base class's no-op: not worth a call with ten keywords per step
            result = method(
                args, state, control, model=self.model, processing_class=self.processing_class,
                tokenizer=self.processing_class, optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler, train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader, **kwargs)
            if result is not None:
                control = result
        return control

    def __getattr__(self, name):  # handler.on_step_end(args, state, control), as HF's handler
        if not (name.startswith("on_") and hasattr(TrainerCallback, name)):
            raise AttributeError(name)
        fourth = _FOURTH_ARGUMENT.get(name)

        def event(args, state, control, *positional, **kwargs):
            if positional:  # HF's handler.on_log(args, state, control, logs), as Trainer subclasses call it
                if fourth is None or len(positional) > 1:
                    raise TypeError(f"CallbackHandler.{name} takes (args, state, control"
                                    f"{', ' + fourth if fourth else ''}, **kwargs); got {len(positional)} "
                                    "more positional argument(s)")
                kwargs[fourth] = positional[0]
            return self.call_event(name, args, state, control, **kwargs)
        return event

    def stateful_state(self, control: Optional[TrainerControl] = None) -> dict:
        """HF's `stateful_callbacks` layout: class name -> state (a list for repeats)."""
        saved: dict = {}
        for cb in self.callbacks + ([control] if control is not None else []):
            if not callable(getattr(cb, "state", None)):
                continue
            name, value = type(cb).__name__, cb.state()
            if name in saved:
                saved[name] = (saved[name] if isinstance(saved[name], list) else [saved[name]]) + [value]
            else:
                saved[name] = value
        return saved

    def restore_state(self, saved: dict, control: Optional[TrainerControl] = None) -> None:
        """Put back the states a checkpoint saved (`stateful_callbacks`), as HF's Trainer does:
        a state in HF's layout rebuilds each callback of that class name, in order, as
        `type(cb)(**args)` with `attributes` set on it, and `control` likewise. Unlike HF's
        (which puts a new object in the list), the rebuilt values go into the existing object,
        so a callback the caller still holds is the restored one. Saved names this trainer has
        no callback for are named in a warning and ignored."""
        targets = self.callbacks + ([control] if control is not None else [])
        missing = []
        for name, values in saved.items():
            same = [cb for cb in targets if type(cb).__name__ == name]
            if not same:
                missing.append(name)
            for cb, value in zip(same, values if isinstance(values, list) else [values]):
                if isinstance(value, dict) and {"args", "attributes"} <= set(value):
                    rebuilt = type(cb)(**value["args"])
                    for key, attr in value["attributes"].items():
                        setattr(rebuilt, key, attr)
                    vars(cb).update(vars(rebuilt))
                elif callable(getattr(cb, "restore", None)):  # the layout fasttrain wrote before HF's
                    cb.restore(value)
        if missing:
            logger.warning(f"the checkpoint holds the state of callbacks this Trainer does not have: "
                           f"{', '.join(missing)}; their state is ignored (pass them in callbacks=[...] "
                           "to restore it)")


class DefaultFlowCallback(TrainerCallback):
    """Decides when to log, evaluate, save and stop, as HF's DefaultFlowCallback does: on
    the logging/eval/save cadence, and at the last step (stop; evaluate and save under the
    'steps' strategies if that step was not already on the cadence)."""

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        eval_delay = getattr(args, "eval_delay", 0) or 0
        if step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == "steps" and step % state.logging_steps == 0:
            control.should_log = True
        if args.eval_strategy == "steps" and step % state.eval_steps == 0 and eval_delay <= step:
            control.should_evaluate = True
        if args.save_strategy == "steps" and state.save_steps > 0 and step % state.save_steps == 0:
            control.should_save = True
        if step >= state.max_steps:
            control.should_training_stop = True
            if args.eval_strategy == "steps" and step % state.eval_steps != 0 and eval_delay <= step:
                control.should_evaluate = True
            if args.save_strategy == "steps":
                control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.logging_strategy == "epoch":
            control.should_log = True
        if args.eval_strategy == "epoch" and (getattr(args, "eval_delay", 0) or 0) <= (state.epoch or 0):
            control.should_evaluate = True
        if args.save_strategy == "epoch":
            control.should_save = True
        return control


def _console_format(logs: dict) -> dict:
    """Every logged metric for the console, floats to 4 significant digits; total_flos
    (a large, uninformative number) left out as HF does."""
    return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}


PROGRESS_REFRESH_S = 1.0  # the bar redraws at most this often: by time, however long a step takes


def _bar(**kwargs):
    """A tqdm bar that redraws on the first update and then at most every PROGRESS_REFRESH_S
    (miniters=1: by time, never by step count) and starts no tqdm monitor thread (in tqdm
    4.70 that thread outlives every bar, so it would outlive train())."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        monitor_interval = 0

    return Bar(miniters=1, mininterval=PROGRESS_REFRESH_S, dynamic_ncols=True, **kwargs)


class ProgressCallback(TrainerCallback):
    """A tqdm bar over the optimizer steps (main process only); each log record is written
    above it in full. `close_bars()` releases the bars when train() fails (HF calls no
    on_train_end then)."""

    def __init__(self):
        self.training_bar = None
        self.prediction_bar = None
        self.current_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = _bar(total=state.max_steps, initial=state.global_step)
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
        self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and eval_dataloader is not None and has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = _bar(total=len(eval_dataloader), leave=self.training_bar is None)
            self.prediction_bar.update(1)

    def _close_prediction_bar(self):
        if self.prediction_bar is not None:
            self.prediction_bar.close()
        self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_predict(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.training_bar is not None:
            self.training_bar.write(str(_console_format(logs)))
        else:  # evaluate()/predict() outside train(): no bar to write above
            print(_console_format(logs))

    def on_train_end(self, args, state, control, **kwargs):
        self.close_bars()

    def close_bars(self) -> None:
        self._close_prediction_bar()
        if self.training_bar is not None:
            self.training_bar.close()
        self.training_bar = None


class PrinterCallback(TrainerCallback):
    """Prints every log record (used instead of the bar when disable_tqdm=True)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(_console_format(logs))


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stop when `metric_for_best_model` fails to improve `early_stopping_patience` times in
    a row, as HF's callback does; an improvement must beat the best by more than
    `early_stopping_threshold`. Says why when it stops."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: Optional[float] = 0.0):
        if early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience={early_stopping_patience} must be >= 1")
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold or 0.0
        self.early_stopping_patience_counter = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.load_best_model_at_end:  # as HF: it still stops, the best model is not reloaded
            logger.warning("EarlyStoppingCallback without load_best_model_at_end=True: training stops "
                           "early, but the best model is not loaded at the end")
        if args.metric_for_best_model is None:
            raise ValueError("EarlyStoppingCallback needs metric_for_best_model")
        if args.eval_strategy == "no":
            raise ValueError("EarlyStoppingCallback needs eval_strategy 'steps' or 'epoch'")

    def check_metric_value(self, args, state, control, metric_value) -> None:
        """Count one more evaluation without improvement, or reset the count."""
        best = state.best_metric
        if best is None or ((metric_value > best if args.greater_is_better else metric_value < best)
                            and abs(metric_value - best) > self.early_stopping_threshold):
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = args.metric_for_best_model
        name = name if name.startswith("eval_") else f"eval_{name}"
        value = (metrics or {}).get(name)
        if value is None:
            logger.warning("early stopping needs %s among the evaluation metrics (got %s); "
                           "early stopping is off for this evaluation", name, sorted(metrics or {}))
            return
        self.check_metric_value(args, state, control, value)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True
            logger.warning(
                "early stopping at step %d: %s=%.6g has not improved on the best %.6g (by more than "
                "early_stopping_threshold=%g) for %d evaluation(s) in a row (early_stopping_patience=%d)",
                state.global_step, name, value, state.best_metric, self.early_stopping_threshold,
                self.early_stopping_patience_counter, self.early_stopping_patience)

    def state(self) -> dict:
        return {"args": {"early_stopping_patience": self.early_stopping_patience,
                         "early_stopping_threshold": self.early_stopping_threshold},
                "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter}}

    def restore(self, saved: dict) -> None:  # the layout fasttrain wrote before HF's
        self.early_stopping_patience_counter = saved["early_stopping_patience_counter"]


def has_length(loader) -> bool:
    """Whether len(loader) works: a DataLoader over a stream has __len__ but raises TypeError
    (no progress-bar total, examples counted as they come)."""
    try:
        len(loader)
    except TypeError:
        return False
    return True
