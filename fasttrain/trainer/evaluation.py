"""Evaluation and prediction for the Trainer.

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
from torch.utils.data import DataLoader

from fasttrain.data.datasets import count_valid_labels
from fasttrain.distributed.sampler import ShardedSampler
from fasttrain.trainer.utils import (EvalPrediction, PredictionOutput, dataset_len, denumpify,
                                     extract_logits, extract_loss, pad_and_concat, to_device)


class EvaluationMixin:
    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """The evaluation DataLoader (HF's contract: a subclass may return its own).
        `eval_dataset` may be a dataset, or the name of one when Trainer(eval_dataset=...)
        is a dict."""
        if isinstance(eval_dataset, str):
            if not isinstance(self.eval_dataset, dict) or eval_dataset not in self.eval_dataset:
                raise KeyError(f"get_eval_dataloader({eval_dataset!r}): Trainer(eval_dataset=...) is not a "
                               f"dict with that key (keys: {sorted(self.eval_dataset or {}) if isinstance(self.eval_dataset, dict) else None})")
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval dataset: pass Trainer(eval_dataset=...) "
                             "or evaluate(eval_dataset=...)")
        return self._eval_loader(dataset, "evaluation")

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        """The DataLoader predict() reads `test_dataset` with."""
        if test_dataset is None:
            raise ValueError("predict() needs a test dataset: predict(test_dataset)")
        return self._eval_loader(test_dataset, "test")

    def _eval_loader(self, dataset, description: str) -> DataLoader:
        n = dataset_len(dataset, f"{description} dataset")
        sampler = ShardedSampler(n, rank=self.dist.rank, world_size=self.dist.world_size,
                                 shuffle=False, pad=False)
        dataset = self._remove_unused_columns(dataset, description)
        return self._loader(dataset, sampler, self.args.per_device_eval_batch_size, False)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        if eval_dataset is None and isinstance(self.eval_dataset, dict):
            eval_dataset = self.eval_dataset
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, ds in eval_dataset.items():
                metrics.update(self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        loader = self.get_eval_dataloader(eval_dataset)
        output = self.evaluation_loop(loader, "Evaluation", prediction_loss_only=self.compute_metrics is None,
                                      ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        self.log(dict(output.metrics))
        self._event("on_evaluate", metrics=output.metrics)
        return output.metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        loader = self.get_test_dataloader(test_dataset)
        output = self.evaluation_loop(loader, "Prediction", prediction_loss_only=False,
                                      ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        self._event("on_predict", metrics=output.metrics)
        return output

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        """(loss_sum, token_count, logits, labels) of one batch; logits None when not needed."""
        labels = self._labels(inputs)
        if self._compute_loss_overridden() and labels is not None:
            return self._prediction_step_user_loss(model, inputs, prediction_loss_only, labels)
        with torch.no_grad(), self._autocast():
            fused = None
            if prediction_loss_only and labels is not None:
                fused = self._fused_loss(model, inputs)
            if fused is not None:
                return fused[0].detach(), fused[1], None, labels
            kwargs = {}
            if not prediction_loss_only and self._forward_args and "return_logits" in self._forward_args:
                kwargs["return_logits"] = True
            outputs = model(**inputs, **kwargs)
        loss = extract_loss(outputs)
        logits = None if prediction_loss_only else extract_logits(outputs)
        if loss is None or labels is None:
            return None, None, logits, labels
        count = count_valid_labels(labels, self._label_shift)
        loss_sum = torch.where(count > 0, loss.float() * count, torch.zeros_like(loss, dtype=torch.float32))
        return loss_sum.detach(), count, logits, labels

    def _prediction_step_user_loss(self, model, inputs, prediction_loss_only, labels):
        """A subclass's compute_loss decides the evaluation loss too (as in HF), so best-model
        selection and early stopping see the loss it trains with. HF averages that per-batch
        loss over examples; so does this: weight = the batch's example count."""
        with torch.no_grad(), self._autocast():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().float().mean()
        count = torch.tensor(float(labels.shape[0]), device=loss.device)
        logits = None if prediction_loss_only else extract_logits(outputs)
        return loss * count, count, logits, labels

    def evaluation_loop(self, dataloader, description: str = "Evaluation", prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix: str = "eval") -> PredictionOutput:
        """Loss (token-weighted, as training), predictions and metrics over `dataloader`."""
        loader = dataloader
        want_predictions = not prediction_loss_only
        n_examples = self.num_examples(loader)
        self.callback_handler.eval_dataloader = loader
        model = self.model
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        preds, label_ids = [], []
        has_loss = False
        instruments = getattr(self, "_instruments", None)
        n_batches = 0
        for batch in loader:
            n_batches += 1
            batch = to_device(batch, self.device)
            if instruments is not None:
                instruments.observe_batch(batch)
            b_loss, b_count, logits, labels = self.prediction_step(model, batch, not want_predictions)
            if b_loss is not None:
                has_loss = True
                loss_sum += b_loss
                tokens += b_count
            if want_predictions and logits is not None:
                if self.preprocess_logits_for_metrics is not None:
                    logits = self.preprocess_logits_for_metrics(logits, labels)
                preds.append(_to_numpy(logits))  # sync: eval moves each batch off the device
            if want_predictions and labels is not None:
                label_ids.append(_to_numpy(labels))
            self._event("on_prediction_step")
        model.train(was_training)
        metrics = {}
        # every rank joins this reduction, also one whose shard was empty
        flag = torch.tensor(float(has_loss), device=self.device)
        totals = self.dist.all_reduce_sum(torch.stack([loss_sum, tokens, flag]))
        total_loss, total_tokens, any_loss = totals.tolist()  # sync: end of evaluation
        if any_loss:
            metrics[f"{metric_key_prefix}_loss"] = total_loss / total_tokens if total_tokens else float("nan")
        predictions = _gather(self.dist, preds, n_examples)
        labels_all = _gather(self.dist, label_ids, n_examples)
        if self.compute_metrics is not None and predictions is not None and labels_all is not None:
            user = self.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels_all))
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

    def _update_best(self, metrics: dict) -> bool:
        """Record a new best metric; returns whether this evaluation is the new best."""
        args, st = self.args, self.state
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
        best = st.best_metric
        better = best is None or (value > best if args.greater_is_better else value < best)
        if better:
            st.best_metric = value
            self._pending_best = True
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
