"""The bodies of HF's evaluate() (one dataset) and predict(): memory metrics around the
overridable calls, the evaluate/predict events, and an evaluation's out-of-memory error
during auto_find_batch_size said as HF says it.

Handed the Trainer itself, like lifecycle.py: both go through the methods an HF subclass may
override (get_eval_dataloader, get_test_dataloader, evaluation_loop, log), so overrides are
honoured; the evaluation itself is evaluation.py's. May import the trainer package's
siblings and every lower layer; trainer.py only for its type.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from fasttrain.trainer.batch_size_search import evaluation_oom_error, is_out_of_memory
from fasttrain.trainer.utils import PredictionOutput

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
        output = trainer.evaluation_loop(loader, "Prediction", prediction_loss_only=trainer.args.prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        trainer._event("on_predict", metrics=output.metrics)
        trainer._memory.stop_and_update("test", output.metrics)
    finally:
        trainer._memory.stop("test")  # after a failure
    return output
