"""HF's auto_find_batch_size: run training, and when it runs out of memory run it again with
a smaller per-device batch.

As transformers 5.24 does it (through accelerate's find_executable_batch_size): an error
counts as out of memory when it is a RuntimeError (torch.OutOfMemoryError is one) whose one
argument contains one of the allocators' out-of-memory messages; then the garbage is
collected, the device cache emptied and the batch size multiplied by 0.9 (rounded down: 8
-> 7 -> 6 -> 5 -> 4 -> 3 -> 2 -> 1); at 0 the search gives up. Any other error propagates
at once. Only the training batch shrinks: an evaluation that runs out of memory is reported
as such (`evaluation_oom_error`), not retried with a smaller training batch.
"""
from __future__ import annotations

import gc
import logging
from typing import Callable

import torch

from fasttrain.checkpoint import storage
from fasttrain.checkpoint.checkpointer import Checkpointer

logger = logging.getLogger("fasttrain")

OOM_MESSAGES = (" out of memory.", "MPS backend out of memory", "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
                "DefaultCPUAllocator: can't allocate memory", "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed")


def is_out_of_memory(error: BaseException) -> bool:
    return (isinstance(error, RuntimeError) and len(error.args) == 1 and isinstance(error.args[0], str)
            and any(message in error.args[0] for message in OOM_MESSAGES))


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_batch_size(args, resume) -> int:
    """The search starts from the batch size a resumed run had found (as HF)."""
    if resume:
        try:
            path = Checkpointer(args.output_dir, None).resolve(resume)
            saved = storage.read_json(path, "trainer_state.json").get("train_batch_size")
        except Exception:  # noqa: BLE001 - the resume itself reports a bad checkpoint
            saved = None
        if saved:
            return int(saved)
    return args.per_device_train_batch_size


def run_with_shrinking_batch(attempt: Callable[[int], object], start: int):
    """`attempt(batch_size)` from `start` down, until one does not run out of memory."""
    batch_size = start
    _free_device_memory()
    while True:
        if batch_size == 0:
            raise RuntimeError(f"auto_find_batch_size: training ran out of memory at every per-device batch "
                               f"size from {start} down to 1; use a smaller model or sequence length, "
                               "gradient checkpointing (activation_checkpointing=True) or more devices")
        try:
            return attempt(batch_size)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            smaller = int(batch_size * 0.9)
            logger.warning("auto_find_batch_size: out of memory at per_device_train_batch_size=%d; "
                           "retrying with %d", batch_size, smaller)
            del e
            _free_device_memory()
            batch_size = smaller


def evaluation_oom_error(error: RuntimeError) -> RuntimeError:
    """An evaluation's out-of-memory error during a batch-size search, said as HF says it; it
    does not match `is_out_of_memory` (the search would only shrink the training batch).
    Raise it `from` the original, which keeps the allocator's message."""
    return RuntimeError("Evaluation hit an out-of-memory error. auto_find_batch_size only adjusts the "
                        "training batch size; reduce per_device_eval_batch_size instead")
