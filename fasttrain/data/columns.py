"""Columns a model cannot take are removed from the dataset before the collator sees them,
as HF's Trainer does, so run_glue's pattern (a raw `sentence` column left in the dataset,
`DataCollatorWithPadding(tokenizer)`) collates only what the model consumes.

A `datasets.Dataset` loses the columns (`remove_columns`); any other dataset of dict
examples is read through a view that drops the keys per example. A collator that still
fails gets an error naming the columns it saw and the way out.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional

logger = logging.getLogger("fasttrain")

# what a model's targets may be called in a dataset (HF collators rename them to `labels`)
LABEL_COLUMNS = ("label", "label_ids")


def kept_columns(model, label_names) -> Optional[set]:
    """Names a dataset column may have to reach the model: the named parameters of its
    forward (of the base model under PEFT), the label columns and `label_names`. As in HF,
    a forward that also takes **kwargs keeps only its named parameters; None (keep all) when
    forward names no parameter at all."""
    if hasattr(model, "get_base_model"):  # a peft.PeftModel: the wrapped model's signature
        model = model.get_base_model()
    params = inspect.signature(model.forward).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if not named:  # forward(*args, **kwargs), e.g. a wrapper: nothing to go by, keep every column
        return None
    return named | set(LABEL_COLUMNS) | set(label_names or ["labels"])


class _DropKeys:
    """A map-style dataset of dict examples, seen without some keys."""

    def __init__(self, dataset, keep: set):
        self.dataset, self.keep = dataset, keep

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        example = self.dataset[index]
        if isinstance(example, dict):
            return {k: v for k, v in example.items() if k in self.keep}
        return example


def remove_unused_columns(dataset, keep: Optional[set], description: str, model_name: str):
    """`dataset` without the columns outside `keep` (None: unchanged)."""
    if keep is None or dataset is None:
        return dataset
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list) and hasattr(dataset, "remove_columns"):  # a datasets.Dataset
        dropped = [c for c in columns if c not in keep]
        if not dropped:
            return dataset
        if len(dropped) == len(columns):
            raise ValueError(
                f"none of the {description} columns {columns} is an argument of {model_name}.forward "
                f"(it takes {sorted(keep)}); tokenize the dataset first (e.g. dataset.map(tokenize)) "
                "or set remove_unused_columns=False if a custom collator builds the inputs")
        logger.info("the %s columns %s are not arguments of %s.forward and were removed "
                    "(remove_unused_columns=False keeps them)", description, dropped, model_name)
        return dataset.remove_columns(dropped)
    try:
        first = dataset[0]
    except Exception:  # not indexable by position: leave it to the collator
        return dataset
    if isinstance(first, dict) and any(k not in keep for k in first):
        return _DropKeys(dataset, keep)
    return dataset


def collate_or_explain(collator: Callable, features: list):
    """Run the collator; when it fails, say which columns it was given and what to do."""
    try:
        return collator(features)
    except (ValueError, TypeError, KeyError) as e:
        first = features[0] if features else None
        if not isinstance(first, dict):
            raise
        text = sorted(k for k, v in first.items() if isinstance(v, str))
        hint = (f"the columns {text} hold raw text, which no collator can turn into tensors: "
                "tokenize them, or drop them with dataset.remove_columns(...) or "
                "remove_unused_columns=True (the default) if the model does not take them"
                if text else "check that every column is numeric and of equal length, or pass a "
                "collator that pads (e.g. DataCollatorWithPadding)")
        raise type(e)(f"the data collator {getattr(collator, '__name__', type(collator).__name__)} "
                      f"failed on a batch with columns {sorted(first)}: {e}. {hint}") from e
