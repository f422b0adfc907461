"""A sharded, resumable sampler: each rank reads a disjoint slice of every epoch.

Layout (the one `gather_eval_predictions` assumes): the epoch's index list (shuffled by
`seed + epoch` when `shuffle`) is padded to a multiple of `world_size` by repeating its
first indices, and rank r takes positions r, r + world, r + 2 * world, ...; with
`drop_last` the tail is cut instead of padded; with `pad=False` (evaluation) shards are
uneven and every sample appears exactly once. Resuming: `set_epoch(epoch, skip=k)` makes
the next iteration start after the k samples this rank already consumed in that epoch,
so a run restored from a checkpoint sees exactly the samples it would have seen.

Length grouping (HF's train_sampling_strategy="group_by_length"): given every example's
length, the epoch's order is `length_grouped_order`: the shuffled indices cut into
mega-batches of `mega_batch_mult * group_batch_size` (mult: 50, or fewer so there are at
least 4 mega-batches), each sorted longest first, and the longest example of all swapped
to the very front so an out-of-memory shows at the first step. Padding and the rank
interleave are as above, which is HF's DistributedLengthGroupedSampler; with one rank it
is HF's LengthGroupedSampler (seeded with seed + epoch).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pad: bool = True,
        lengths: Optional[Sequence[int]] = None,
        group_batch_size: int = 1,
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and num_samples < world_size:
            raise ValueError(
                f"drop_last with {num_samples} samples and {world_size} ranks leaves every rank empty"
            )
        self.total = num_samples
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last, self.pad = shuffle, seed, drop_last, pad
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        self.lengths, self.group_batch_size = (list(lengths) if lengths is not None else None), group_batch_size
        self.epoch, self.skip = 0, 0

    @property
    def per_rank(self) -> int:
        if not self.pad and not self.drop_last:
            return len(range(self.rank, self.total, self.world_size))
        if self.drop_last:
            return self.total // self.world_size
        return math.ceil(self.total / self.world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch (reshuffles) and how many of this rank's samples to skip."""
        if not 0 <= skip <= self.per_rank:
            raise ValueError(f"skip must be in [0, {self.per_rank}], got {skip}")
        self.epoch, self.skip = epoch, skip

    def state_dict(self, consumed: int) -> dict:
        """What a checkpoint stores; `consumed` = samples this rank used in this epoch."""
        return {"epoch": self.epoch, "consumed": consumed, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was written with world_size={state['world_size']}, seed={state['seed']}; "
                f"this run has world_size={self.world_size}, seed={self.seed}: exact resumption needs both equal"
            )
        self.set_epoch(state["epoch"], skip=state["consumed"])

    def _epoch_indices(self) -> list[int]:
        if self.lengths is not None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = length_grouped_order(self.lengths, self.group_batch_size, generator)
        elif self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.total, generator=generator).tolist()
        else:
            indices = list(range(self.total))
        if not self.pad and not self.drop_last:
            return indices
        wanted = self.per_rank * self.world_size
        while len(indices) < wanted:
            indices.extend(indices[: wanted - len(indices)])
        return indices[:wanted]

    def __iter__(self) -> Iterator[int]:
        mine = self._epoch_indices()[self.rank :: self.world_size]
        return iter(mine[self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip


def length_grouped_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """A shuffled order in which runs of `batch_size` hold examples of similar length (see
    the module docstring); HF's get_length_grouped_indices, the same order for the same
    generator state."""
    n = len(lengths)
    mult = max(1, min(n // (batch_size * 4), 50))
    size = mult * batch_size
    shuffled = torch.randperm(n, generator=generator).tolist()  # sync: none, a CPU generator's host tensor, once per epoch
    groups = [sorted(shuffled[i:i + size], key=lambda j: lengths[j], reverse=True) for i in range(0, n, size)]
    longest = max(range(len(groups)), key=lambda g: (lengths[groups[g][0]], -g))  # the first of equals
    groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
    return [i for group in groups for i in group]
