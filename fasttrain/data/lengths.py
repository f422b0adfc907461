"""Example lengths for train_sampling_strategy="group_by_length", read as HF's Trainer reads them.

A `datasets.Dataset` that (still, after unused columns are removed) has the column
`length_column_name` gives them directly; otherwise each example must be a dict holding
`model_input_name` (the processing class's first `model_input_names`, else "input_ids")
and its length is `len()` of that value.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional


def example_lengths(dataset, length_column_name: str, model_input_name: Optional[str]) -> list[int]:
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list) and length_column_name in columns:
        return [int(n) for n in dataset[length_column_name]]
    name = model_input_name or "input_ids"
    first = dataset[0]
    if not isinstance(first, Mapping) or name not in first:
        found = sorted(first) if isinstance(first, Mapping) else type(first).__name__
        raise ValueError(f"train_sampling_strategy='group_by_length' needs each example's length: add a "
                         f"{length_column_name!r} column (TrainingArguments.length_column_name) or give examples "
                         f"a {name!r} key (the processing class's first model_input_names); the examples hold {found}")
    return [len(example[name]) for example in dataset]


def model_input_name_of(processing_class) -> Optional[str]:
    names = getattr(processing_class, "model_input_names", None)
    return names[0] if names else None
