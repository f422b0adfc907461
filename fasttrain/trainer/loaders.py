"""The Trainer's DataLoaders: training (a map-style dataset through the sharded sampler, or
a stream sharded over ranks x workers), evaluation and prediction (unpadded shards).

Functions of what they use. The Trainer's HF-overridable `get_train_dataloader`,
`get_eval_dataloader` and `get_test_dataloader` call these; its `_collate` is passed in as
the collate function, read when a loader is built (a test or subclass may replace it).
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Optional

import torch
from torch.utils.data import DataLoader

from fasttrain.data.columns import kept_columns, remove_unused_columns
from fasttrain.data.lengths import example_lengths, model_input_name_of
from fasttrain.distributed.sampler import ShardedSampler
from fasttrain.data.streaming import StreamShard, is_iterable
from fasttrain.trainer import hf_options
from fasttrain.trainer.utils import dataset_len

logger = logging.getLogger("fasttrain")


def plan_epochs(args, batches_per_epoch: Optional[int]) -> tuple[float, int, int]:
    """(micro-batches per epoch, optimizer steps, epochs) of a training run, as HF counts them:
    max_steps when set (the epochs it takes), else num_train_epochs (fractions included).
    `batches_per_epoch` is the loader's length, or None for a stream: passes then repeat
    until max_steps, each as long as the stream."""
    if batches_per_epoch is None:
        return math.inf, args.max_steps, sys.maxsize
    if batches_per_epoch == 0:
        raise ValueError("the training dataloader yields no batches: the dataset has fewer "
                         "examples than one batch with dataloader_drop_last=True; lower the batch size")
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_steps > 0:
        return batches_per_epoch, args.max_steps, math.ceil(args.max_steps / steps_per_epoch)
    return (batches_per_epoch, math.ceil(args.num_train_epochs * steps_per_epoch),
            math.ceil(args.num_train_epochs))


def train_sampler(n: int, dataset, args, dist, processing_class=None) -> ShardedSampler:
    """Per-epoch permutation of `n` examples from (data_seed or seed, epoch), sharded by rank;
    with train_sampling_strategy='group_by_length', HF's length-grouped order over the
    lengths of `dataset`'s examples (length_column_name, or the processing class's main
    input, as HF's Trainer reads them)."""
    seed = args.data_seed if args.data_seed is not None else args.seed
    grouped = args.train_sampling_strategy == "group_by_length"
    return ShardedSampler(
        n, rank=dist.rank, world_size=dist.world_size,
        shuffle=args.train_sampling_strategy == "random", seed=seed,
        drop_last=args.dataloader_drop_last,
        lengths=example_lengths(dataset, args.length_column_name,
                                model_input_name_of(processing_class)) if grouped else None,
        group_batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps)


def eval_sampler(dataset, description: str, dist) -> ShardedSampler:
    n = dataset_len(dataset, f"{description} dataset")
    return ShardedSampler(n, rank=dist.rank, world_size=dist.world_size, shuffle=False, pad=False)


def loader(dataset, sampler, batch_size: int, drop_last: bool, *, collate, args, device) -> DataLoader:
    # The loader gets its own generator: creating an iterator (with workers) then draws no
    # numbers from the global RNG, which dropout uses; a resumed run stays bit-exact.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      collate_fn=collate, num_workers=args.dataloader_num_workers,
                      pin_memory=args.dataloader_pin_memory and device.type == "cuda",
                      generator=torch.Generator().manual_seed(args.seed),
                      **hf_options.loader_options(args))


def stream_loader(dataset, *, collate, args, dist, device) -> tuple[StreamShard, DataLoader]:
    """An iterable train_dataset: sharded over ranks x workers by StreamShard, read in order.
    Returns the shard (its position is saved with checkpoints) and its loader."""
    if args.train_sampling_strategy == "group_by_length":  # as HF
        logger.warning("train_sampling_strategy='group_by_length' is ignored: the streaming train_dataset "
                       "has no length, so examples come in the dataset's own order")
    if args.max_steps <= 0:
        raise ValueError(f"TrainingArguments.max_steps={args.max_steps}: a streaming train_dataset "
                         f"({type(dataset).__name__}, no len()) needs max_steps > 0, the "
                         "number of optimizer steps to train")
    stream = StreamShard(dataset, dist.rank, dist.world_size)
    return stream, DataLoader(stream, batch_size=args.per_device_train_batch_size,
                              drop_last=args.dataloader_drop_last, collate_fn=collate,
                              num_workers=args.dataloader_num_workers,
                              pin_memory=args.dataloader_pin_memory and device.type == "cuda",
                              generator=torch.Generator().manual_seed(args.seed))  # see loader()


def train_loader(dataset, model, *, collate, args, dist, device, processing_class):
    """(loader, stream, sampler) of train_dataset: a stream's shard and loader (no sampler),
    or a map-style dataset through the sharded sampler (no stream)."""
    if dataset is None:
        raise ValueError("Trainer.train() needs train_dataset; pass Trainer(train_dataset=...)")
    if is_iterable(dataset):
        stream, stream_loader_ = stream_loader(dataset, collate=collate, args=args, dist=dist, device=device)
        return stream_loader_, stream, None
    n = dataset_len(dataset, "train_dataset")
    dataset = drop_unused_columns(dataset, model, args, "training")
    sampler = train_sampler(n, dataset, args, dist, processing_class)
    return (loader(dataset, sampler, args.per_device_train_batch_size, args.dataloader_drop_last,
                   collate=collate, args=args, device=device), None, sampler)


def eval_loader(dataset, description: str, model, *, collate, args, dist, device) -> DataLoader:
    """An evaluation or test set, in order, each rank its unpadded shard (an iterable
    dataset: its stream, split over ranks and workers as a training stream is). Every
    example is evaluated: unlike HF's, dataloader_drop_last does not drop a last partial
    batch here (with small shards over many ranks it would drop all of them)."""
    if is_iterable(dataset):
        dataset = drop_unused_columns(dataset, model, args, description)
        return DataLoader(StreamShard(dataset, dist.rank, dist.world_size), batch_size=args.per_device_eval_batch_size,
                          drop_last=False, collate_fn=collate,
                          num_workers=args.dataloader_num_workers,
                          pin_memory=args.dataloader_pin_memory and device.type == "cuda",
                          generator=torch.Generator().manual_seed(args.seed))  # see loader()
    sampler = eval_sampler(dataset, description, dist)
    dataset = drop_unused_columns(dataset, model, args, description)
    return loader(dataset, sampler, args.per_device_eval_batch_size, False,
                  collate=collate, args=args, device=device)


def drop_unused_columns(dataset, model, args, description: str):
    """HF's remove_unused_columns: the columns `model.forward` does not take, removed before
    collation (a no-op when the argument is off)."""
    if not args.remove_unused_columns:
        return dataset
    keep = kept_columns(model, args.label_names)
    return remove_unused_columns(dataset, keep, description, type(model).__name__)
