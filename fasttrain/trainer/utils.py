"""Small helpers the Trainer composes: seeds, loss extraction, batches, cleanup."""
from __future__ import annotations

import inspect
import logging
import random
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from fasttrain.data.datasets import IGNORE_INDEX

logger = logging.getLogger("fasttrain")


class EvalPrediction:
    """What `compute_metrics` receives: predictions and label_ids as numpy arrays (or
    tuples of them; torch tensors under batch_eval_metrics), plus `inputs` and `losses` when
    include_for_metrics asks for them. Unpacks as HF's: `preds, labels = eval_pred`, or
    with the included extras after them, in the order inputs, losses."""

    def __init__(self, predictions, label_ids, inputs=None, losses=None):
        self.predictions = predictions
        self.label_ids = label_ids
        self.inputs = inputs
        self.losses = losses
        self.elements = (predictions, label_ids) + tuple(x for x in (inputs, losses) if x is not None)

    def __iter__(self):
        return iter(self.elements)

    def __getitem__(self, i):
        if not 0 <= i < len(self.elements):  # as a tuple would, negative indices excepted (as HF)
            raise IndexError("tuple index out of range")
        return self.elements[i]

    def __len__(self):
        return len(self.elements)


class PredictionOutput(NamedTuple):
    predictions: Any
    label_ids: Any
    metrics: dict


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def extract_loss(outputs) -> Optional[torch.Tensor]:
    """The loss of a model output: `.loss`, `["loss"]`, or the first tuple item."""
    if outputs is None:
        return None
    if isinstance(outputs, dict):
        return outputs.get("loss")
    if hasattr(outputs, "loss"):
        return outputs.loss
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0] if outputs[0].dim() == 0 else None
    if isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
        return outputs
    return None


def extract_logits(outputs, loss_first: bool = False, ignore_keys=()):
    """The predictions of a model output, as HF's prediction_step takes them: every output
    but the loss and `ignore_keys` (a dict's keys; a ModelOutput holds only its set fields),
    in order, and the one tensor itself when only one is left. `loss_first`: a tuple output
    starts with the loss (labels were given)."""
    if isinstance(outputs, dict):
        kept = [v for k, v in outputs.items() if k != "loss" and k not in ignore_keys]
    elif isinstance(outputs, (tuple, list)):
        kept = list(outputs[1:] if loss_first else outputs)
    elif isinstance(outputs, torch.Tensor):
        return outputs
    else:
        return getattr(outputs, "logits", None)
    kept = [v for v in kept if v is not None]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else tuple(kept)


def ignored_output_keys(model, ignore_keys=None) -> list:
    """HF's default for prediction_step's ignore_keys: the config's keys_to_ignore_at_inference
    (the KV cache, for most language models)."""
    if ignore_keys is not None:
        return list(ignore_keys)
    config = getattr(model, "config", None)
    if config is None:
        return []
    return list(getattr(config, "keys_to_ignore_at_inference", ["cache"]))


def forward_arg_names(model: torch.nn.Module) -> Optional[set]:
    """Names the model's forward accepts, or None when it takes **kwargs."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def uses_label_shift(model: torch.nn.Module) -> bool:
    """Whether the model predicts labels[t+1] at position t (causal LMs in the HF
    convention), which decides how valid label tokens are counted."""
    explicit = getattr(model, "fasttrain_label_shift", None)
    if explicit is not None:
        return bool(explicit)
    from fasttrain.models import GPT
    name = type(model).__name__
    return isinstance(model, GPT) or name.endswith(("ForCausalLM", "LMHeadModel"))


def vocab_size_of(model: torch.nn.Module) -> Optional[int]:
    """Rows of the input embedding (what input_ids may index), or None when unknown."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if isinstance(embedding, torch.nn.Embedding):
        return embedding.num_embeddings
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type != "cpu"  # from pinned memory (the loader pins on a GPU)
    return {k: v.to(device, non_blocking=non_blocking)
            if isinstance(v, torch.Tensor) and v.device != device else v for k, v in batch.items()}


def pad_and_concat(arrays: list, pad_value=IGNORE_INDEX) -> np.ndarray:
    """Concatenate per-batch arrays along dim 0, right-padding dim 1 when lengths differ."""
    if not arrays:
        return np.zeros((0,))
    if arrays[0].ndim < 2 or all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays, axis=0)
    width = max(a.shape[1] for a in arrays)
    out = []
    for a in arrays:
        pad = [(0, 0)] * a.ndim
        pad[1] = (0, width - a.shape[1])
        out.append(np.pad(a, pad, constant_values=pad_value))
    return np.concatenate(out, axis=0)


def denumpify(metrics: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}


def samples_in(batch: dict) -> int:
    for v in batch.values():  # a loop, not a generator: called every step
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 0


def tokens_in(batch: dict) -> int:
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def dataset_len(dataset, name: str) -> int:
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError(f"{name} must be a map-style dataset with __len__ and __getitem__") from None
    if n == 0:
        raise ValueError(f"{name} is empty (0 examples); pass a dataset with at least one example")
    return n


def take(iterator, n: int) -> list:
    """Up to `n` items of `iterator` (fewer when it runs out)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out


def run_cleanup(steps, failed: bool) -> None:
    """Run every (what, call) step in order, a None call skipped. After a failure (`failed`)
    a step that raises is logged and the original error propagates; after success the first
    step that raised is re-raised once every step has run."""
    first_error = None
    for what, step in steps:
        if step is None:
            continue
        try:
            step()
        except BaseException as e:  # noqa: BLE001 - see the docstring
            if failed or first_error is not None:
                logger.error("while stopping training, %s also failed: %s", what, e)
            else:
                first_error = e
    if first_error is not None:
        raise first_error
