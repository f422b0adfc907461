"""Label-smoothed cross-entropy from a model's logits, as HF's `LabelSmoother` defines it,
returned as (summed loss, valid tokens) so the Trainer normalises it like every other loss.

Per valid token: (1 - eps) * (-log p[label]) + eps * mean over the vocabulary of (-log p).
Ignored labels (-100) add nothing; a causal LM's labels are shifted first.
"""
from __future__ import annotations

import torch


def label_smoothed_sum(logits: torch.Tensor, labels: torch.Tensor, epsilon: float, shift: bool,
                       ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., V), labels (...) -> (summed smoothed loss, number of valid labels), fp32."""
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    neg_log_probs = -torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    ignored = labels.eq(ignore_index)
    index = labels.clamp(min=0).unsqueeze(-1)
    nll = neg_log_probs.gather(dim=-1, index=index).squeeze(-1).masked_fill(ignored, 0.0)
    uniform = neg_log_probs.mean(dim=-1).masked_fill(ignored, 0.0)
    count = (~ignored).sum()
    return ((1.0 - epsilon) * nll + epsilon * uniform).sum(), count


class LabelSmoother:
    """HF's `Trainer.label_smoother` callable (what compute_loss overrides copied from HF call):
    `smoother(outputs, labels, shift_labels=False, num_items_in_batch=None)` -> the smoothed
    loss, divided by num_items_in_batch when given, else by this batch's valid labels."""

    def __init__(self, epsilon: float, ignore_index: int = -100):
        self.epsilon, self.ignore_index = float(epsilon), ignore_index

    def __call__(self, model_output, labels, shift_labels: bool = False, num_items_in_batch=None):
        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
        total, count = label_smoothed_sum(logits, labels, self.epsilon, shift_labels, self.ignore_index)
        if num_items_in_batch is None:
            return total / count
        return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                        else num_items_in_batch)
