"""Callbacks with the HuggingFace event names, TrainerState and TrainerControl."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrainerState:
    epoch: Optional[float] = None
    global_step: int = 0
    max_steps: int = 0
    num_train_epochs: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: Optional[int] = None
    num_input_tokens_seen: int = 0
    total_flos: float = 0.0
    log_history: list = field(default_factory=list)
    best_metric: Optional[float] = None
    best_model_checkpoint: Optional[str] = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    skipped_steps: int = 0
    stateful_callbacks: dict = field(default_factory=dict)

    def to_json_string(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save_to_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_string(cls, text: str) -> "TrainerState":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class TrainerControl:
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


class CallbackHandler:
    """Calls every callback's event in order; owned by the Trainer."""

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

    def add_callback(self, callback):
        cb = callback() if isinstance(callback, type) else callback
        if not isinstance(cb, TrainerCallback) and not hasattr(cb, "on_step_end"):
            raise TypeError(f"callback {callback!r} is not a TrainerCallback; subclass "
                            "fasttrain.TrainerCallback and override the events you need")
        self.callbacks.append(cb)

    def pop_callback(self, callback):
        for cb in self.callbacks:
            if (isinstance(callback, type) and isinstance(cb, callback)) or cb is callback:
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback):
        self.pop_callback(callback)

    def call_event(self, event: str, args, state, control, **kwargs):
        for cb in self.callbacks:
            result = getattr(cb, event)(
                args, state, control, model=self.model, processing_class=self.processing_class,
                tokenizer=self.processing_class, optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler, train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader, **kwargs)
            if result is not None:
                control = result
        return control

    def stateful_state(self) -> dict:
        return {type(cb).__name__: cb.state() for cb in self.callbacks if hasattr(cb, "state")}

    def restore_state(self, saved: dict) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "restore") and type(cb).__name__ in saved:
                cb.restore(saved[type(cb).__name__])


class EarlyStoppingCallback(TrainerCallback):
    """Stop when `metric_for_best_model` fails to improve `early_stopping_patience` times in
    a row, as HF's callback does; an improvement must beat the best by more than
    `early_stopping_threshold`."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0):
        if early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience={early_stopping_patience} must be >= 1")
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        self.early_stopping_patience_counter = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.load_best_model_at_end:
            raise ValueError("EarlyStoppingCallback needs load_best_model_at_end=True in "
                             "TrainingArguments (as in HuggingFace)")
        if args.metric_for_best_model is None:
            raise ValueError("EarlyStoppingCallback needs metric_for_best_model")
        if args.eval_strategy == "no":
            raise ValueError("EarlyStoppingCallback needs eval_strategy 'steps' or 'epoch'")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = args.metric_for_best_model
        name = name if name.startswith("eval_") else f"eval_{name}"
        value = (metrics or {}).get(name)
        if value is None:
            return
        better = (lambda a, b: a > b) if args.greater_is_better else (lambda a, b: a < b)
        best = state.best_metric
        improved = best is None or (better(value, best) and
                                    abs(value - best) > self.early_stopping_threshold)
        if improved and not math.isnan(value):
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def state(self) -> dict:
        return {"early_stopping_patience_counter": self.early_stopping_patience_counter}

    def restore(self, saved: dict) -> None:
        self.early_stopping_patience_counter = saved["early_stopping_patience_counter"]
