"""Streaming (iterable) datasets: sharded across ranks and DataLoader workers, resumable.

A stream has no `len()` and no random access, so the Trainer needs `max_steps` and reads it
in order. `StreamShard` gives each (rank, worker) pair a disjoint share of the stream:
example i goes to shard `i % (world_size * num_workers)`, shard number
`rank * num_workers + worker`. Every example of a pass is read by exactly one shard (no
duplicates, no drops; each shard reads and passes over the others' examples, which costs
reading, not training). An HF `datasets.IterableDataset` is split by its own
`split_dataset_by_node` (by files when they divide evenly, else example by example) and
shards itself across workers.

Resuming, in order of preference:
1. The dataset has `state_dict()`/`load_state_dict()` and the loader has no workers (so the
   dataset object in this process is exactly where the consumed batches left it): its state
   is saved per rank and restored; nothing is re-read. Needs the same world size.
2. Otherwise the consumed examples are skipped: each shard passes over the examples it had
   already consumed (computed from the micro-batches this rank consumed, the batch size and
   the worker count), and the workers' roles are rotated so the next batch comes from the
   worker that would have produced it: the resumed run sees the batches the uninterrupted
   run would have. The cost (examples read and dropped, seconds) is logged. With another
   world size the first `global samples consumed` examples of the stream are skipped
   instead, which is exact when every shard had consumed the same number.

The built-in token-file dataset (`fasttrain.data.datasets`) stays the fast path for
pretraining: memory-mapped, random access, exact resume by sampler position, no skipping.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Optional

from torch.utils.data import IterableDataset, get_worker_info

logger = logging.getLogger("fasttrain")


def is_iterable(dataset) -> bool:
    if isinstance(dataset, IterableDataset):
        return True
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.IterableDataset)


def is_hf_iterable(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.IterableDataset)


def is_stateful(dataset) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


class StreamShard(IterableDataset):
    """This rank's share of `dataset`, split again across the DataLoader's workers.

    `resume` (from `resume_plan`): {"skip_per_shard": [...], "rotate": k} continues the
    uninterrupted run's order; {"skip_global": n} passes over the first n examples of the
    stream; {"state": ...} restores a stateful dataset (no workers)."""

    def __init__(self, dataset, rank: int = 0, world_size: int = 1, resume: Optional[dict] = None):
        if not is_iterable(dataset):
            raise TypeError(f"StreamShard needs an IterableDataset, got {type(dataset).__name__}")
        self.rank, self.world_size = rank, world_size
        self.hf = is_hf_iterable(dataset)
        if self.hf and world_size > 1:
            from datasets.distributed import split_dataset_by_node
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.resume = resume
        self.epoch = 0
        self._next_index = 0  # stream index of the next example (read by state_dict)

    @property
    def resume(self) -> dict:
        return self._resume

    @resume.setter
    def resume(self, plan: Optional[dict]) -> None:
        """A resume plan applies to the first pass started after it is set."""
        self._resume, self._plan_passes = dict(plan or {}), 0

    def set_epoch(self, epoch: int) -> None:
        """A new pass over the stream (HF datasets reshuffle their buffer by epoch). A resume
        plan is dropped at the second pass: with DataLoader workers the pass reads it in the
        workers' copies of this object, so only this call, in the main process, ends it."""
        self.epoch = epoch
        self._plan_passes += 1
        if self._plan_passes > 1:
            self._resume = {}
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        """This rank's position (no workers): the dataset's own state and the stream index
        the next example will have; {} for a dataset without state_dict()."""
        if not is_stateful(self.dataset):
            return {}
        return {"dataset": self.dataset.state_dict(), "index": self._next_index}

    def __iter__(self) -> Iterator[Any]:
        # not a generator: the resume plan is taken when the iterator is made (in each
        # worker for a multi-worker loader), and applies to the first pass only
        resume, self.resume = self.resume, {}
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if "state" in resume:
            self.dataset.load_state_dict(resume["state"]["dataset"])
        if self.hf:  # split by node above; datasets shards itself across workers
            skip = resume.get("skip_global", 0) // self.world_size + sum(resume.get("skip_per_shard", [0]))
            if skip and workers > 1:
                logger.warning("resuming a datasets.IterableDataset with dataloader_num_workers=%d: "
                               "the position is approximate (datasets splits files across workers); "
                               "use num_workers=0 for an exact resume", workers)
            return self._skipping(iter(self.dataset), skip // workers)
        # the worker that produces this rank's next batch plays the shard whose turn it is
        role = (worker + resume.get("rotate", 0)) % workers
        shards = self.world_size * workers
        return self._shard(self.rank * workers + role, shards,
                           skip_mine=resume["skip_per_shard"][role] if "skip_per_shard" in resume else 0,
                           skip_global=resume.get("skip_global", 0),
                           start=resume["state"].get("index", 0) if "state" in resume else 0)

    def _shard(self, mine: int, shards: int, skip_mine: int, skip_global: int, start: int):
        t0, logged = time.perf_counter(), not (skip_mine or skip_global)
        self._next_index = start
        for i, example in enumerate(self.dataset, start=start):
            self._next_index = i + 1
            if i < skip_global or (i - skip_global) % shards != mine:
                continue
            if skip_mine:
                skip_mine -= 1
                continue
            if not logged:
                _log_skip(i, time.perf_counter() - t0, self.rank, mine % max(1, shards // self.world_size))
                logged = True
            yield example

    def _skipping(self, iterator, skip: int):
        t0 = time.perf_counter()
        for _ in range(skip):
            next(iterator, None)
        if skip:
            _log_skip(skip, time.perf_counter() - t0, self.rank, 0)
        yield from iterator


def _log_skip(read: int, seconds: float, rank: int, worker: int) -> None:
    logger.warning("resuming a stream without state_dict(): rank %d worker %d read and dropped %d "
                   "examples to reach its position (%.1f s); a dataset with state_dict()/"
                   "load_state_dict() and dataloader_num_workers=0 resumes without re-reading",
                   rank, worker, read, seconds)


def resume_plan(saved: dict, world_size: int, batch_size: int, num_workers: int,
                stateful_state: Optional[dict] = None) -> dict:
    """How to continue a stream from a checkpoint's data state.

    saved: {"world_size", "per_device_train_batch_size", "micro_batches_done" (this rank,
    this pass), "num_workers"}; stateful_state: this rank's saved dataset state, if any."""
    same = saved["world_size"] == world_size and saved["per_device_train_batch_size"] == batch_size
    if stateful_state and same and num_workers == 0:
        return {"state": stateful_state}
    batches = saved["micro_batches_done"]
    if same and saved.get("num_workers", 0) == num_workers:
        workers = max(1, num_workers)
        # worker w produced batches w, w + workers, ...: ceil((batches - w) / workers) of them
        per_worker = [max(0, -(-(batches - w) // workers)) * batch_size for w in range(workers)]
        return {"skip_per_shard": per_worker, "rotate": batches % workers}
    return {"skip_global": batches * saved["per_device_train_batch_size"] * saved["world_size"]}
