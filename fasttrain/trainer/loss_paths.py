"""The loss of a micro-batch, and the valid-token counts that normalise it.

`LossPaths` is handed what it reads (the TrainingArguments, whether the model shifts labels)
and owns the caches of a step: each micro-batch's valid-token count (counted once, reused by
the loss), the fused-loss decision per model and the reasons already logged, and the label
tensors of the last step (read on logging steps only).

The Trainer's public `compute_loss` and `training_step` call into this object, so a
subclass that overrides them (HF's contract) replaces the behaviour here exactly as before.
Normalisation is stated once, in `LossPaths.compute_loss`: the micro-batch's summed token
loss divided by the valid tokens of the whole optimizer step.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from typing import Optional

import torch

from fasttrain.data.datasets import count_valid_labels
from fasttrain.distributed.fsdp import is_fsdp
from fasttrain.trainer.utils import extract_loss

logger = logging.getLogger("fasttrain")


class LossPaths:
    def __init__(self, args, label_shift: bool):
        self.args = args
        self.label_shift = label_shift  # the Trainer updates it when it sets a new model
        self._step_counts: dict = {}  # id(labels) -> valid tokens, for the step being run
        # id(model) -> (weak model, weak unwrapped model, why the fused loss cannot run: "" / None)
        self._model_reasons: dict = {}
        self._reasons_logged: set = set()
        self.last_labels: Optional[list] = None  # the last step's label tensors (references)
        self.compute_loss_func = None  # the Trainer's compute_loss_func (HF's)
        # label smoothing's epsilon: args.label_smoothing_factor unless the Trainer turned it off
        # (a multi-label model, as HF does) or a script set trainer.label_smoother
        self.label_smoothing = float(args.label_smoothing_factor or 0.0)

    # ------------------------------------------------------------------ labels and tokens
    def labels(self, inputs: dict):
        for name in self.args.label_names or ["labels"]:
            if name in inputs:
                return inputs[name]
        return None

    def valid_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        count = self._step_counts.get(id(labels))
        if count is None:
            count = self._step_counts[id(labels)] = count_valid_labels(labels, self.label_shift)
        return count

    def step_token_count(self, batches: list, dist, always: bool = False) -> Optional[torch.Tensor]:
        """Valid label tokens of the whole optimizer step over all ranks, on the device (no
        host read), or None for one micro-batch on one rank: the model's mean is then exact
        as it is, and nothing needs counting (unless `always`: a compute_loss_func divides by
        it). Each micro-batch is counted once; compute_loss reuses the count."""
        if len(batches) == 1 and not dist.enabled and not always:
            return None
        self._step_counts = {}
        total = sum(self.valid_tokens(self.labels(b)) for b in batches)
        return dist.all_reduce_sum(total)

    def end_step(self) -> None:
        self._step_counts = {}

    def valid_tokens_of_last_step(self) -> Optional[torch.Tensor]:
        """Valid label tokens of this rank's last step (device ops on logging steps only;
        the step itself keeps just references to its label tensors)."""
        labels = self.last_labels
        if not labels or any(lab is None for lab in labels):
            return None
        return sum(count_valid_labels(lab, self.label_shift) for lab in labels)

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs: dict, return_outputs: bool, num_items_in_batch):
        """The body of `Trainer.compute_loss` (see its docstring)."""
        labels = self.labels(inputs)
        if labels is not None and self.compute_loss_func is not None:
            return self._given_loss(model, inputs, labels, return_outputs, num_items_in_batch)
        if labels is not None and self.label_smoothing:
            return self._label_smoothed_loss(model, inputs, labels, return_outputs, num_items_in_batch)
        fused = self.fused_loss(model, inputs) if labels is not None and not return_outputs else None
        outputs = None
        if fused is not None:
            loss_sum, count = fused
        else:
            outputs = model(**inputs)
            loss = extract_loss(outputs)
            if loss is None:
                raise ValueError(
                    "the model returned no loss. Batch keys: "
                    f"{sorted(inputs)}. Pass labels in the batch (see TrainingArguments.label_names) "
                    "or make the model return a loss (an object with .loss, a dict with 'loss', or "
                    "a tuple whose first item is the loss)")
            loss = loss.float()
            if labels is None or num_items_in_batch is None:
                # no labels, or one micro-batch on one rank: the model's own mean is exact
                return (loss, outputs) if return_outputs else loss
            count = self.valid_tokens(labels)
            # a mean over zero tokens is NaN; its weight is zero, so it contributes nothing
            loss_sum = torch.where(count > 0, loss * count, torch.zeros_like(loss))
        denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        loss = loss_sum / denominator
        return (loss, outputs) if return_outputs else loss

    def _given_loss(self, model, inputs, labels, return_outputs, num_items_in_batch):
        """HF's compute_loss_func: the model runs without the labels and the function makes the
        loss of its outputs, handed the step's valid-token count to normalise by (the Trainer
        counts it whenever a compute_loss_func is set)."""
        label_keys = set(self.args.label_names or ["labels"])
        outputs = model(**{k: v for k, v in inputs.items() if k not in label_keys})
        loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _label_smoothed_loss(self, model, inputs, labels, return_outputs, num_items_in_batch):
        """HF's label smoothing: the labels are taken out of the batch, the loss is computed from
        the logits (shifted for a causal LM), normalised as every other loss here."""
        from fasttrain.ops.label_smoothing import label_smoothed_sum
        label_keys = set(self.args.label_names or ["labels"])
        outputs = model(**{k: v for k, v in inputs.items() if k not in label_keys})
        logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)
        if logits is None:
            logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        loss_sum, count = label_smoothed_sum(logits, labels, self.label_smoothing,
                                             shift=self.label_shift)
        loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ the fused loss
    def fused_loss(self, model, inputs):
        """(summed loss, valid tokens) from the fused linear cross-entropy of an HF causal LM,
        run through the data-parallel wrapper when there is one (its gradient sync and
        parameter gathering stay as they are), or None: the model's own loss then runs, and
        the reason is logged once."""
        if not self.args.fused_loss:
            return None
        # the decision per model object, made once: the model's part does not change from
        # step to step (and a missing attribute costs an nn.Module a raised AttributeError)
        decided = self._model_reasons.get(id(model))
        if decided is None or decided[0]() is not model:  # weak: a freed model's id may come back
            inner = getattr(model, "module", model)  # DDP/BucketedDDP wrap; FSDP shards in place
            decided = self._model_reasons[id(model)] = (weakref.ref(model), weakref.ref(inner),
                                                        _fused_model_reason(inner))
        inner, reason = decided[1](), decided[2]
        if reason is not None:
            if reason and reason not in self._reasons_logged:  # "" for the built-in GPT: nothing to log
                self._skipped(reason)
            return None
        from fasttrain.ops import loss as fused
        reason = fused.batch_reason(inputs)
        if reason is not None:
            self._skipped(reason)
            return None
        if inner is model and not is_fsdp(model):
            # one process: call it directly (a whole-model compile would otherwise trace the
            # swapped-in forward)
            return fused.fused_causal_lm_loss(model, inputs, checked=True)
        return fused.fused_loss_through(model, inner, inputs)

    def _skipped(self, reason: str) -> None:
        if reason not in self._reasons_logged:
            self._reasons_logged.add(reason)
            logger.info("fused loss off, the model's own loss runs (full logits): %s", reason)


def _fused_model_reason(inner) -> Optional[str]:
    if is_builtin(inner):
        return ""  # its forward already uses the fused linear cross-entropy
    try:
        from fasttrain.ops import loss as fused
    except ImportError:
        return "fasttrain.kernels (Triton) is not importable"
    return fused.model_reason(inner)


def is_builtin(model) -> bool:
    from fasttrain.models import GPT
    return isinstance(getattr(model, "module", model), GPT)


def loss_is_scaled_for_ga(overridden: bool, explicit: Optional[bool], accepts_loss_kwargs: bool) -> bool:
    """Whether compute_loss's result is already normalised over the whole step. fasttrain's
    own is (it divides by num_items_in_batch). For an override (`overridden`), HF's rule: a
    subclass's `loss_is_scaled_for_ga` (`explicit`) if set, else whether the model takes loss
    kwargs (the Trainer's `model_accepts_loss_kwargs`); otherwise the loss is divided by the
    micro-batches."""
    if not overridden:
        return True
    if explicit is not None:
        return bool(explicit)
    return bool(accepts_loss_kwargs)


def model_takes_loss_kwargs(model) -> bool:
    """HF's test of a model: its `accepts_loss_kwargs`, else **kwargs in its forward."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind == p.VAR_KEYWORD for p in params)


def micro_batch_losses(loss: torch.Tensor, micro_batches: int, own_mean: bool, world: int):
    """(the loss to backpropagate, the loss to log) of one micro-batch of a step.

    own_mean (the model's or an override's own per-micro-batch mean): averaged over the
    step's micro-batches; the gradient sync averages it over ranks, and the logged window
    sums ranks, so the logged share is / world. Otherwise every rank divided by the global
    token count: the gradient sync averages over ranks, so the backward takes it x world
    (global sum / count). One micro-batch on one rank logs the loss itself (no detach op;
    everything that reads the step's loss runs under no_grad)."""
    if own_mean:
        loss = loss / micro_batches if micro_batches > 1 else loss
        return loss, (loss.detach() / world if world > 1 else loss.detach())
    return (loss * world if world > 1 else loss), (loss if micro_batches == 1 else loss.detach())
