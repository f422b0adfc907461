"""Part 4: speed against its bound, side by side in one process (being written: reports skipped)."""
from __future__ import annotations

from fasttrain.cli.gpu_check.common import NO_GPU, skipped


def adamw(ctx: dict) -> dict:
    return skipped(NO_GPU)


def linear_cross_entropy(ctx: dict) -> dict:
    return skipped(NO_GPU)


def step_overhead(ctx: dict) -> dict:
    return skipped(NO_GPU)


def end_to_end(ctx: dict) -> dict:
    return skipped(NO_GPU)
