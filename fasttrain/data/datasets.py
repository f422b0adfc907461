"""Data: token files, fixed-length windows and the collator (the resumable sharded sampler
is `fasttrain.distributed.ShardedSampler`).

Token file format (llm.c's): a 256 x int32 header (magic 20240520, version 1 = uint16
tokens / 2 = uint32, token count) followed by the tokens. Headerless nanoGPT files (raw
uint16) are read too.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

MAGIC = 20240520
HEADER_INTS = 256
BYTE_VOCAB = 256
IGNORE_INDEX = -100


# ---------------------------------------------------------------- token files
def write_token_file(tokens: np.ndarray, path: str) -> None:
    """Write tokens atomically (temp file + fsync + rename)."""
    dtype = np.uint16 if int(tokens.max(initial=0)) < 2**16 else np.uint32
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, 1 if dtype == np.uint16 else 2, len(tokens))
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_token_file(path: str) -> np.ndarray:
    """Memory-map a token file; returns a read-only 1-D uint16/uint32 array."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file {path!r} does not exist; build one with "
                                "fasttrain.data.datasets.build_token_file(text_dir, path)")
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=3) if size >= 12 else np.zeros(3, np.int32)
    if header[0] == MAGIC:
        if header[1] not in (1, 2):
            raise ValueError(f"token file {path!r} has unknown version {header[1]} (expected 1 or 2)")
        dtype = np.uint16 if header[1] == 1 else np.uint32
        count = int(header[2])
        expected = HEADER_INTS * 4 + count * np.dtype(dtype).itemsize
        if size != expected:
            raise ValueError(f"token file {path!r} is {size} bytes but its header promises "
                             f"{expected}: it is truncated or corrupt; rebuild it")
        return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(count,))
    if size % 2:
        raise ValueError(f"{path!r} is neither an llm.c token file nor raw uint16 tokens")
    return np.memmap(path, dtype=np.uint16, mode="r")


def build_token_file(text_files: Sequence[str], path: str) -> str:
    """Encode text files with the byte-level vocabulary (token = byte value) into `path`."""
    if not text_files:
        raise ValueError("build_token_file got no input files; pass a non-empty list of text files")
    chunks = []
    for name in sorted(text_files):
        with open(name, "rb") as f:
            chunks.append(np.frombuffer(f.read(), dtype=np.uint8))
        chunks.append(np.frombuffer(b"\n\n", dtype=np.uint8))
    write_token_file(np.concatenate(chunks).astype(np.uint16), path)
    return path


def text_files_in(folder: str, patterns=("*.py", "*.txt", "*.md", "*.rst")) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"text folder {folder!r} does not exist")
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(folder, "**", p), recursive=True)})
    if not files:
        raise ValueError(f"no text files matching {patterns} under {folder!r}")
    return files


def cache_dir() -> str:
    root = os.environ.get("FASTTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fasttrain")
    os.makedirs(root, exist_ok=True)
    return root


def default_corpus(val_fraction: float = 0.02) -> tuple[str, str]:
    """The default job's corpus: this Python's standard-library sources, which every machine
    has. Built once into the cache; returns (train_path, val_path)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [f for f in text_files_in(stdlib, ("*.py",)) if "site-packages" not in f]
    key = hashlib.sha1(f"{sys.version}|{stdlib}|{len(files)}".encode()).hexdigest()[:12]
    train_path = os.path.join(cache_dir(), f"stdlib-{key}-train.bin")
    val_path = os.path.join(cache_dir(), f"stdlib-{key}-val.bin")
    if not (os.path.exists(train_path) and os.path.exists(val_path)):
        all_path = os.path.join(cache_dir(), f"stdlib-{key}-all.bin")
        build_token_file(files, all_path)
        tokens = np.asarray(read_token_file(all_path))
        split = int(len(tokens) * (1 - val_fraction))
        write_token_file(tokens[split:], val_path)
        write_token_file(tokens[:split], train_path)
        os.remove(all_path)
    return train_path, val_path


class TokenDataset(Dataset):
    """Non-overlapping fixed-length windows over a token file: item i is tokens
    [i*T, (i+1)*T) as `input_ids`, with `labels` equal to it (the model shifts)."""

    def __init__(self, path: str, seq_len: int, max_windows: Optional[int] = None):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2")
        self.path = path
        self.seq_len = seq_len
        self.tokens = read_token_file(path)
        n = len(self.tokens) // seq_len
        self.num_windows = n if max_windows is None else min(n, max_windows)
        if self.num_windows == 0:
            raise ValueError(f"token file {path!r} holds {len(self.tokens)} tokens, fewer than one "
                             f"window of seq_len={seq_len}; use more text or a shorter seq_len")

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> dict:
        start = i * self.seq_len
        x = torch.from_numpy(self.tokens[start:start + self.seq_len].astype(np.int64))
        return {"input_ids": x, "labels": x}


# ---------------------------------------------------------------- collation
PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def default_data_collator(features: list) -> dict:
    """Stack a list of dict examples into a batch of tensors; ragged 1-D sequences are
    right-padded (labels with -100, attention_mask with 0, other keys with 0)."""
    if not features:
        raise ValueError("cannot collate an empty list of examples")
    first = features[0]
    if not isinstance(first, dict):
        raise TypeError(f"examples must be dicts of features (got {type(first).__name__}); "
                        "return e.g. {'input_ids': ..., 'labels': ...} from the dataset")
    batch = {}
    for key in first:
        values = [f[key] for f in features]
        if key in ("label", "label_ids"):  # HF datasets' column names for the targets
            key = "labels"
        if isinstance(values[0], str) or values[0] is None:
            continue
        tensors = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values]
        if all(t.shape == tensors[0].shape for t in tensors):
            batch[key] = torch.stack(tensors)
        else:
            batch[key] = torch.nn.utils.rnn.pad_sequence(
                tensors, batch_first=True, padding_value=PAD_VALUES.get(key, 0))
    return batch


def check_examples(features: list, dataset_name: str) -> None:
    """Every item of a batch is an example (a dict), not None: one isinstance per item."""
    for i, f in enumerate(features):
        if f is None or not (isinstance(f, dict) or hasattr(f, "keys")):
            raise TypeError(
                f"{dataset_name} returned {'None' if f is None else type(f).__name__} for an example "
                f"(item {i} of a batch of {len(features)}); each item must be a dict such as "
                "{'input_ids': [...], 'labels': [...]}. Filter out empty examples before training, "
                "e.g. dataset.filter(lambda x: x is not None)")


def check_first_batch(batch: dict, vocab_size: Optional[int], dataset_name: str) -> None:
    """Token ids a model can embed: integers in [0, vocab_size). Run on the first batch only
    (a min/max over it: no cost on later steps). A model without a known vocabulary (no token
    embedding) may take anything under the name input_ids, float features included, as HF's
    Trainer allows."""
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or vocab_size is None:
        return
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(
            f"{dataset_name}: batch key 'input_ids' has dtype {ids.dtype}; token ids must be "
            "integers: build them with dtype=torch.long (or return lists of ints) in the dataset "
            "or the collator")
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())  # sync: first batch only
        bad = high if high >= vocab_size else low if low < 0 else None
        if bad is not None:
            raise ValueError(
                f"{dataset_name}: batch key 'input_ids' holds token id {bad}, outside the model's "
                f"vocabulary [0, {vocab_size}); tokenize with the tokenizer the model was built "
                "for, or resize the model's token embeddings (config.vocab_size) to cover it")


def count_valid_labels(labels: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Number of label positions that contribute to the loss (labels != -100); with the
    causal shift the first position of each row is never a target."""
    if shifted and labels.dim() >= 2:
        labels = labels[..., 1:]
    return (labels != IGNORE_INDEX).sum()
