"""Evaluation and prediction, as functions of what they use (they read no Trainer attribute).

The HF-overridable methods (`evaluate`, `evaluation_loop`, `prediction_step`,
`get_eval_dataloader`, `get_test_dataloader`, `predict`) stay on the Trainer and call these;
whatever a subclass may override reaches these functions as an argument (`prediction_step`,
`user_loss`: its compute_loss), so overrides are honoured.

Losses accumulate on the device as (sum over valid tokens, token count), the same
normalisation as training. Predictions leave the accelerator batch by batch, so a large
eval set does not pile up device memory. Under data parallelism each rank evaluates a
disjoint shard and predictions are gathered so compute_metrics sees every example once.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from fasttrain.data.datasets import count_valid_labels
from fasttrain.trainer.eval_collect import EvalOptions, Gatherer, to_piece
from fasttrain.trainer.utils import (EvalPrediction, PredictionOutput, denumpify, extract_logits, extract_loss,
                                     samples_in, to_device)


def run_evaluation(loader, n_examples: Optional[int], model, prediction_step, *, dist, device,
                   want_predictions: bool, metric_key_prefix: str, compute_metrics=None,
                   preprocess_logits=None, observe_batch=None, on_step=None,
                   options: EvalOptions = EvalOptions()) -> PredictionOutput:
    """Evaluate `model` over `loader` with `prediction_step(model, batch, prediction_loss_only)`
    (the Trainer's, so a subclass's override is used); `observe_batch(batch)` before and
    `on_step()` after each batch. `options` carries HF's include_for_metrics,
    batch_eval_metrics and eval_do_concat_batches."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    kept = {"predictions": [], "label_ids": [], "inputs": [], "losses": []}
    gatherer = Gatherer(dist)
    has_loss = False
    n_batches = 0
    seen = 0
    user = None
    batches = _batches_with_last_flag(loader, dist) if options.batch_metrics else ((b, False) for b in loader)
    for batch, is_last in batches:
        if batch is None:  # batch_eval_metrics: this rank's shard ended, the others' did not
            user = _batch_metrics(compute_metrics, gatherer, dict.fromkeys(kept), is_last, device) or user
            continue
        n_batches += 1
        if n_examples is None:  # a stream: count what comes (this rank's share)
            seen += samples_in(batch)
        batch = to_device(batch, device)
        if observe_batch is not None:
            observe_batch(batch)
        b_loss, b_count, logits, labels = prediction_step(model, batch, not want_predictions)
        if b_loss is not None:
            has_loss = True
            loss_sum += b_loss
            tokens += b_count
        if want_predictions and logits is not None and preprocess_logits is not None:
            logits = preprocess_logits(logits, labels)
        pieces = {"predictions": logits if want_predictions else None,
                  "label_ids": labels if want_predictions else None,
                  "inputs": _main_input(batch, options.input_name) if want_predictions else None,
                  "losses": _per_example_loss(b_loss, b_count, labels, batch)
                  if want_predictions and options.include_loss else None}
        if options.batch_metrics:
            user = _batch_metrics(compute_metrics, gatherer, pieces, is_last, device, batch) or user
        if options.keep_predictions:
            for key, value in pieces.items():
                if value is not None:
                    kept[key].append(to_piece(value))
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
    gathered = {key: gatherer.whole(pieces, options.concat_batches) if options.keep_predictions else None
                for key, pieces in kept.items()}
    predictions, labels_all = gathered["predictions"], gathered["label_ids"]
    if compute_metrics is not None and not options.batch_metrics and predictions is not None \
            and labels_all is not None:
        user = compute_metrics(EvalPrediction(predictions, labels_all, inputs=gathered["inputs"],
                                              losses=gathered["losses"]))
    if user is not None:
        if not isinstance(user, dict):
            raise TypeError(f"compute_metrics must return a dict, got {type(user).__name__}")
        for key, value in denumpify(user).items():
            name = key if key.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{key}"
            metrics[name] = value
    runtime = time.perf_counter() - start
    metrics[f"{metric_key_prefix}_runtime"] = runtime
    if n_examples is None:
        n_examples = seen * dist.world_size
    metrics[f"{metric_key_prefix}_samples_per_second"] = n_examples / max(runtime, 1e-9)
    metrics[f"{metric_key_prefix}_steps_per_second"] = n_batches / max(runtime, 1e-9)
    return PredictionOutput(predictions, labels_all, metrics)


def _main_input(batch: dict, name: Optional[str]):
    if name is None:
        return None
    if name not in batch:
        raise KeyError(f"include_for_metrics=['inputs'] passes the batch's {name!r} (the model's "
                       f"main_input_name), but the batch holds {sorted(batch)}; set the model's "
                       "main_input_name or drop 'inputs' from include_for_metrics")
    return batch[name]


def _per_example_loss(b_loss, b_count, labels, batch):
    """HF's include_for_metrics 'loss': the batch's mean loss, repeated once per example."""
    if b_loss is None:
        return None
    n = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.dim() else samples_in(batch)
    return (b_loss / b_count).detach().float().reshape(1).repeat(n)  # (N,)


def _batches_with_last_flag(loader, dist):
    """(batch, is_last) pairs; under data parallelism every rank yields as many as the rank
    with the most batches (None once its own ran out), so per-batch gathers pair up and
    is_last marks the last batch step of the whole evaluation, as HF's compute_result."""
    if not dist.enabled:  # look one batch ahead: the loader need not have a length
        iterator = iter(loader)
        batch = next(iterator, None)
        while batch is not None:
            following = next(iterator, None)
            yield batch, following is None
            batch = following
        return
    steps = max(dist.all_gather_object(len(loader)))
    iterator = iter(loader)
    for step in range(steps):
        yield next(iterator, None), step == steps - 1


def _batch_metrics(compute_metrics, gatherer, pieces: dict, is_last: bool, device, batch=None):
    """batch_eval_metrics: compute_metrics on this batch step (gathered over ranks) as
    tensors, as HF calls it; its return value counts only from the last call."""
    if compute_metrics is None:
        return None
    if not gatherer.dist.enabled:
        local = pieces
    else:
        host = {k: to_piece(v) if v is not None else None for k, v in pieces.items()}
        local = {k: _to_tensor(gatherer.block(v), device) for k, v in host.items()}
    if local.get("predictions") is None or local.get("label_ids") is None:
        return None
    result = compute_metrics(EvalPrediction(local["predictions"], local["label_ids"],
                                            inputs=batch if local.get("inputs") is not None else None,
                                            losses=local.get("losses")), compute_result=is_last)
    return result if is_last else None


def _to_tensor(piece, device):
    if piece is None or isinstance(piece, list):
        return piece
    if isinstance(piece, tuple):
        return tuple(_to_tensor(p, device) for p in piece)
    return torch.from_numpy(piece).to(device)


def resolve_eval_dataset(eval_dataset, default):
    """The dataset to evaluate: `eval_dataset`, the name of one when `default` (the
    Trainer's eval_dataset) is a dict, or `default`."""
    if isinstance(eval_dataset, str):
        if not isinstance(default, dict) or eval_dataset not in default:
            raise KeyError(f"get_eval_dataloader({eval_dataset!r}): Trainer(eval_dataset=...) is not a "
                           f"dict with that key (keys: {sorted(default or {}) if isinstance(default, dict) else None})")
        eval_dataset = default[eval_dataset]
    dataset = eval_dataset if eval_dataset is not None else default
    if dataset is None:
        raise ValueError("evaluate() needs an eval dataset: pass Trainer(eval_dataset=...) "
                         "or evaluate(eval_dataset=...)")
    return dataset


def predict_batch(model, inputs: dict, prediction_loss_only: bool, *, losses, autocast, forward_args,
                  ignored_keys=(), user_loss=None):
    """(loss_sum, token_count, predictions, label_ids) of one batch; predictions None when not
    needed. `losses`: the Trainer's LossPaths (labels, the fused loss, the label shift);
    `autocast()`: the precision context; `ignored_keys`: model outputs that are not
    predictions (HF's ignore_keys); `user_loss(model, inputs) -> (loss, outputs)`: the
    compute_loss that decides the loss when a subclass overrides it or label smoothing is
    on, else None."""
    labels = losses.labels(inputs)
    label_names = losses.args.label_names
    if labels is not None and user_loss is not None:
        with torch.no_grad(), autocast():
            loss, outputs = user_loss(model, inputs)
        # a subclass's compute_loss decides the evaluation loss too (as in HF), so best-model
        # selection and early stopping see the loss it trains with; HF averages that per-batch
        # loss over examples, so does this: weight = the batch's example count
        loss = loss.detach().float().mean()
        count = loss.new_full((), float(labels.shape[0]))  # filled on the device: no host-to-device copy
        logits = None if prediction_loss_only else extract_logits(outputs, loss_first=True, ignore_keys=ignored_keys)
        return loss * count, count, logits, prediction_labels(inputs, labels, label_names)
    with torch.no_grad(), autocast():
        fused = None
        if prediction_loss_only and labels is not None:
            fused = losses.fused_loss(model, inputs)
        if fused is not None:
            return fused[0].detach(), fused[1], None, labels
        kwargs = {}
        if not prediction_loss_only and forward_args and "return_logits" in forward_args:
            kwargs["return_logits"] = True
        outputs = model(**inputs, **kwargs)
    loss = extract_loss(outputs)
    logits = None if prediction_loss_only else extract_logits(
        outputs, loss_first=loss is not None, ignore_keys=ignored_keys)
    if loss is None or labels is None:
        return None, None, logits, prediction_labels(inputs, labels, label_names)
    loss_sum, count = loss_sum_and_count(loss, labels, losses.label_shift)
    return loss_sum.detach(), count, logits, prediction_labels(inputs, labels, label_names)


def prediction_labels(inputs: dict, labels, label_names):
    """The label_ids predictions carry: with several label_names, all of them (a tuple, as
    HF); the loss is counted on the first."""
    names = label_names or []
    if len(names) > 1 and all(inputs.get(n) is not None for n in names):
        return tuple(inputs[n] for n in names)
    return labels


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
        state.best_metric, state.best_global_step = value, state.global_step  # as HF 5 records both
    return better
