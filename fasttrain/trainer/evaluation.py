"""Evaluation and prediction, as functions of what they use (they read no Trainer attribute).

The HF-overridable methods (`evaluate`, `evaluation_loop`, `prediction_step`,
`get_eval_dataloader`, `get_test_dataloader`, `predict`) stay on the Trainer and call these.

Losses accumulate on the device as (sum over valid tokens, token count), the same
normalisation as training. Predictions leave the accelerator batch by batch, so a large
eval set does not pile up device memory. Under data parallelism each rank evaluates a
disjoint shard and predictions are gathered so compute_metrics sees every example once.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from fasttrain.data.datasets import count_valid_labels
from fasttrain.trainer.utils import EvalPrediction, PredictionOutput, denumpify, pad_and_concat, to_device


def run_evaluation(loader, n_examples: int, model, prediction_step, *, dist, device,
                   want_predictions: bool, metric_key_prefix: str, compute_metrics=None,
                   preprocess_logits=None, observe_batch=None, on_step=None) -> PredictionOutput:
    """Evaluate `model` over `loader` with `prediction_step(model, batch, prediction_loss_only)`
    (the Trainer's, so a subclass's override is used); `observe_batch(batch)` before and
    `on_step()` after each batch."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    preds, label_ids = [], []
    has_loss = False
    n_batches = 0
    for batch in loader:
        n_batches += 1
        batch = to_device(batch, device)
        if observe_batch is not None:
            observe_batch(batch)
        b_loss, b_count, logits, labels = prediction_step(model, batch, not want_predictions)
        if b_loss is not None:
            has_loss = True
            loss_sum += b_loss
            tokens += b_count
        if want_predictions and logits is not None:
            if preprocess_logits is not None:
                logits = preprocess_logits(logits, labels)
            preds.append(_to_numpy(logits))  # sync: eval moves each batch off the device
        if want_predictions and labels is not None:
            label_ids.append(_to_numpy(labels))
        if on_step is not None:
            on_step()
    model.train(was_training)
    metrics = {}
    # every rank joins this reduction, also one whose shard was empty
    flag = torch.tensor(float(has_loss), device=device)
    totals = dist.all_reduce_sum(torch.stack([loss_sum, tokens, flag]))
    total_loss, total_tokens, any_loss = totals.tolist()  # sync: end of evaluation
    if any_loss:
        metrics[f"{metric_key_prefix}_loss"] = total_loss / total_tokens if total_tokens else float("nan")
    predictions = _gather(dist, preds, n_examples)
    labels_all = _gather(dist, label_ids, n_examples)
    if compute_metrics is not None and predictions is not None and labels_all is not None:
        user = compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels_all))
        if not isinstance(user, dict):
            raise TypeError(f"compute_metrics must return a dict, got {type(user).__name__}")
        for key, value in denumpify(user).items():
            name = key if key.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{key}"
            metrics[name] = value
    runtime = time.perf_counter() - start
    metrics[f"{metric_key_prefix}_runtime"] = runtime
    metrics[f"{metric_key_prefix}_samples_per_second"] = n_examples / max(runtime, 1e-9)
    metrics[f"{metric_key_prefix}_steps_per_second"] = n_batches / max(runtime, 1e-9)
    return PredictionOutput(predictions, labels_all, metrics)


def loss_sum_and_count(loss: torch.Tensor, labels: torch.Tensor, label_shift: bool):
    """A model's mean loss over a batch as (sum over valid tokens, valid token count)."""
    count = count_valid_labels(labels, label_shift)
    # a mean over zero tokens is NaN; its weight is zero, so it contributes nothing
    loss_sum = torch.where(count > 0, loss.float() * count, torch.zeros_like(loss, dtype=torch.float32))
    return loss_sum, count


def update_best(metrics: dict, args, state) -> bool:
    """Record a new best metric in `state` (a TrainerState); returns whether this
    evaluation is the new best."""
    if args.metric_for_best_model is None:
        return False
    name = args.metric_for_best_model
    name = name if name.startswith("eval_") else f"eval_{name}"
    if name not in metrics:
        raise KeyError(f"metric_for_best_model={args.metric_for_best_model!r} is not among the "
                       f"evaluation metrics {sorted(metrics)}; set it to one of them")
    value = metrics[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    best = state.best_metric
    better = best is None or (value > best if args.greater_is_better else value < best)
    if better:
        state.best_metric = value
    return better


def _to_numpy(t):
    if isinstance(t, (tuple, list)):
        return tuple(_to_numpy(x) for x in t)
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()


def _gather(dist, arrays: list, n_examples: int):
    """This rank's batches (arrays, or tuples of arrays) and, under data parallelism, every
    rank's, concatenated in dataset order: rank r evaluated examples r, r+W, r+2W, ...
    One collective per call whatever the structure, so ranks with empty shards never hang."""
    if not dist.enabled:
        return _concat(arrays) if arrays else None
    parts = dist.all_gather_object(arrays)
    ranks = [(r, _concat(p)) for r, p in enumerate(parts) if p]
    return _interleave(ranks, n_examples, len(parts)) if ranks else None


def _concat(arrays: list):
    if isinstance(arrays[0], tuple):
        return tuple(pad_and_concat([a[i] for a in arrays]) for i in range(len(arrays[0])))
    return pad_and_concat(arrays)


def _interleave(ranks: list, n_examples: int, world: int):
    first = ranks[0][1]
    if isinstance(first, tuple):
        return tuple(_interleave([(r, a[i]) for r, a in ranks], n_examples, world)
                     for i in range(len(first)))
    merged = pad_and_concat([a for _, a in ranks])
    positions = np.concatenate([np.arange(r, n_examples, world) for r, _ in ranks])
    out = np.empty_like(merged)
    out[positions] = merged
    return out
