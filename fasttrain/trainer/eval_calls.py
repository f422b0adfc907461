"""The bodies of HF's evaluate() (one dataset), predict(), evaluation_loop() and
prediction_step(): memory metrics around the overridable calls, the evaluate/predict events,
an evaluation's out-of-memory error during auto_find_batch_size said as HF says it, and what
evaluation.py's functions are handed from the Trainer.

Handed the Trainer itself, like lifecycle.py: both go through the methods an HF subclass may
override (get_eval_dataloader, get_test_dataloader, evaluation_loop, prediction_step,
compute_loss, num_examples, log), so overrides are
honoured; the evaluation itself is evaluation.py's. May import the trainer package's
siblings and every lower layer; trainer.py only for its type.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from fasttrain.callbacks import has_length
from fasttrain.trainer import hf_options
from fasttrain.trainer.batch_size_search import evaluation_oom_error, is_out_of_memory
from fasttrain.trainer.eval_collect import EvalOptions
from fasttrain.trainer.evaluation import predict_batch, run_evaluation
from fasttrain.trainer.utils import PredictionOutput, ignored_output_keys

if TYPE_CHECKING:
    from fasttrain.trainer.trainer import Trainer


def evaluate_one(trainer: Trainer, eval_dataset, ignore_keys, metric_key_prefix: str) -> dict:
    """Metrics of one evaluation set (None: the Trainer's), logged and handed to on_evaluate."""
    trainer._memory.start("eval")
    try:
        loader = trainer.get_eval_dataloader(eval_dataset)
        only_loss = trainer.compute_metrics is None or trainer.args.prediction_loss_only
        output = trainer.evaluation_loop(loader, "Evaluation", prediction_loss_only=only_loss,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        trainer.log(dict(output.metrics))
        trainer._event("on_evaluate", metrics=output.metrics)
        trainer._memory.stop_and_update("eval", output.metrics)  # as HF: returned, not logged
    except RuntimeError as e:
        if trainer._in_train and trainer.args.auto_find_batch_size and is_out_of_memory(e):
            raise evaluation_oom_error(e) from e
        raise
    finally:
        trainer._memory.stop("eval")  # after a failure
    return output.metrics


def predict(trainer: Trainer, test_dataset, ignore_keys, metric_key_prefix: str) -> PredictionOutput:
    trainer._memory.start("test")
    try:
        loader = trainer.get_test_dataloader(test_dataset)
        output = trainer.evaluation_loop(loader, "Prediction",
                                         prediction_loss_only=trainer.args.prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        trainer._event("on_predict", metrics=output.metrics)
        trainer._memory.stop_and_update("test", output.metrics)
    finally:
        trainer._memory.stop("test")  # after a failure
    return output


def evaluation_loop(trainer: Trainer, dataloader, description: str, prediction_loss_only,
                    metric_key_prefix: str) -> PredictionOutput:
    """Loss (token-weighted, as training), predictions and metrics over `dataloader`, batch by
    batch through `trainer.prediction_step`."""
    trainer.callback_handler.eval_dataloader = dataloader
    hf_options.cast_for_full_eval(trainer.model, trainer.args, in_train=trainer._in_train)
    instruments = trainer._instruments
    return run_evaluation(
        dataloader, trainer.num_examples(dataloader) if has_length(dataloader) else None, trainer.model,
        trainer.prediction_step, dist=trainer.dist,
        device=trainer.device, want_predictions=not prediction_loss_only, metric_key_prefix=metric_key_prefix,
        compute_metrics=trainer.compute_metrics, preprocess_logits=trainer.preprocess_logits_for_metrics,
        observe_batch=instruments.observe_batch if instruments is not None else None,
        on_step=lambda: trainer._event("on_prediction_step"),
        options=EvalOptions.from_args(trainer.args, trainer.model, description))


def prediction_step(trainer: Trainer, model, inputs: dict, prediction_loss_only: bool, ignore_keys):
    """(loss_sum, token_count, logits, labels) of one batch; logits None when not needed."""
    user_loss = None  # a subclass's compute_loss (or label smoothing) decides the loss
    if trainer._compute_loss_overridden() or trainer._losses.label_smoothing:
        user_loss = functools.partial(trainer.compute_loss, return_outputs=True)
    return predict_batch(model, inputs, prediction_loss_only, losses=trainer._losses, autocast=trainer._autocast,
                         forward_args=trainer._forward_args,
                         ignored_keys=ignored_output_keys(trainer.model, ignore_keys), user_loss=user_loss)

