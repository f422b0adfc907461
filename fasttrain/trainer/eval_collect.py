"""What evaluation hands compute_metrics, collected batch by batch and gathered over ranks.

A "piece" is one batch's value on the host: a numpy array, a tuple of pieces (models that
return several outputs), or a list of Python objects (a prediction_step that returns
strings, say: HF gathers those with `gather_object`). Pieces of one kind concatenate along
the examples; arrays are right-padded on dim 1 with -100, as HF pads.

Order under data parallelism: evaluation shards are interleaved (rank r holds examples
r, r + W, r + 2W, ...; `distributed.sampler.ShardedSampler` with pad=False), so the k-th
batches of all ranks together hold one contiguous block of the dataset. Gathering puts
every example back at its dataset position, whether the whole set is gathered at once or
one batch step at a time (batch_eval_metrics, eval_do_concat_batches=False). Every gather
is one `all_gather_object`, also on a rank with nothing to send, so ranks never hang.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fasttrain.trainer.utils import pad_and_concat


@dataclass(frozen=True)
class EvalOptions:
    """HF's arguments that shape what compute_metrics receives (see `from_args`)."""
    input_name: Optional[str] = None  # the batch key of the model's main input, when "inputs" is included
    include_loss: bool = False  # include_for_metrics "loss": the batch's mean loss, once per example
    batch_metrics: bool = False  # batch_eval_metrics: compute_metrics per batch, compute_result on the last
    concat_batches: bool = True  # eval_do_concat_batches
    keep_predictions: bool = True  # predict() keeps them even with batch_eval_metrics (as HF)

    @classmethod
    def from_args(cls, args, model, description: str) -> "EvalOptions":
        include = set(args.include_for_metrics or ())
        name = getattr(model, "main_input_name", "input_ids") if "inputs" in include else None
        return cls(input_name=name, include_loss="loss" in include, batch_metrics=args.batch_eval_metrics,
                   concat_batches=args.eval_do_concat_batches,
                   keep_predictions=not args.batch_eval_metrics or description == "Prediction")


def to_piece(value):
    """A batch's value (tensor, tuple of tensors, or list of objects) on the host."""
    if isinstance(value, tuple):
        return tuple(to_piece(v) for v in value)
    if isinstance(value, list):
        # a tensor among the objects goes through the tensor path (bf16 upcast, then one copy)
        return [to_piece(v) if isinstance(v, torch.Tensor) else v for v in value]
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"evaluation got a {type(value).__name__} where it expects a tensor, a tuple of "
                        "tensors or a list of Python objects (one per example)")
    t = value.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()  # sync: evaluation moves each batch off the device


def piece_len(piece) -> int:
    if isinstance(piece, tuple):
        return piece_len(piece[0]) if piece else 0
    return len(piece) if isinstance(piece, list) else int(piece.shape[0]) if piece.ndim else 1


def concat(pieces: list):
    """Pieces of consecutive batches as one."""
    first = pieces[0]
    if isinstance(first, tuple):
        return tuple(concat([p[i] for p in pieces]) for i in range(len(first)))
    if isinstance(first, list):
        return [x for p in pieces for x in p]
    return pad_and_concat(pieces)


def interleave(ranks: list, world: int):
    """[(rank, piece)] of one interleaved block (the share of each rank that has one) as one
    piece in dataset order: rank r's i-th example is the block's example r + i * world."""
    first = ranks[0][1]
    if isinstance(first, tuple):
        return tuple(interleave([(r, p[i]) for r, p in ranks], world) for i in range(len(first)))
    n = sum(piece_len(p) for _, p in ranks)
    positions = np.concatenate([np.arange(r, n, world)[:piece_len(p)] for r, p in ranks])
    if isinstance(first, list):
        out = [None] * n
        for pos, x in zip(positions, [x for _, p in ranks for x in p]):  # numpy positions: host only
            out[pos] = x
        return out
    merged = pad_and_concat([p for _, p in ranks])
    out = np.empty_like(merged)
    out[positions] = merged
    return out


class Gatherer:
    """Gathers pieces over the ranks of `dist` (a DistContext) into dataset order."""

    def __init__(self, dist):
        self.dist = dist

    def block(self, piece):
        """One batch step's piece of every rank, as one piece in dataset order (None when no
        rank had one)."""
        if not self.dist.enabled:
            return piece
        parts = self.dist.all_gather_object(piece)
        ranks = [(r, p) for r, p in enumerate(parts) if p is not None and piece_len(p)]
        return self._interleave(ranks)

    def whole(self, pieces: list, concat_batches: bool):
        """This rank's per-batch pieces, gathered: one piece for the whole set, or (with
        concat_batches=False) one per batch step."""
        if not self.dist.enabled:
            if not pieces:
                return None
            return concat(pieces) if concat_batches else list(pieces)
        parts = self.dist.all_gather_object(pieces)
        if concat_batches:
            ranks = [(r, concat(p)) for r, p in enumerate(parts) if p]
            return self._interleave(ranks)
        steps = max(len(p) for p in parts)
        out = [self._interleave([(r, p[k]) for r, p in enumerate(parts) if k < len(p) and piece_len(p[k])])
               for k in range(steps)]
        return [b for b in out if b is not None] or None

    def _interleave(self, ranks: list):
        if not ranks:
            return None
        return interleave(ranks, self.dist.world_size)
