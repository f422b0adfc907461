"""The hand-written training loop fasttrain measures its per-step overhead against, in one
place: bench/bench_overhead.py (steps/s), tests/test_step_ops.py (ATen ops per step) and
`fasttrain gpu-check`'s step overhead all run this model, these examples and this step.

The model is a small regressor returning `{"loss": mse}`, with `labels` in the batch (so
the Trainer runs its label path). One step of the loop: forward, backward,
clip_grad_norm_(1.0), AdamW(fused=True), a linear-decay LambdaLR on the host, zero_grad:
the work the Trainer's defaults do, written as anyone would by hand.

May import: torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Regressor(torch.nn.Module):
    """Linear(width, out), or with `mlp` Linear(width, width) -> ReLU -> Linear(width, out);
    forward(x, labels) -> {"loss": mean squared error}."""

    def __init__(self, width: int = 16, out: int = 1, mlp: bool = False):
        super().__init__()
        layers = [torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, out)] if mlp \
            else [torch.nn.Linear(width, out)]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x, labels):
        return {"loss": F.mse_loss(self.net(x), labels)}


def regression_examples(n: int, width: int = 16, out: int = 1, seed: int = 0) -> list[dict]:
    """`n` examples {"x": (width,), "labels": (out,)}, normal, from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(width, generator=g), "labels": torch.randn(out, generator=g)}
            for _ in range(n)]


class HandLoop:
    """The plain PyTorch step: `step(batch)` returns the loss (a device tensor, not read)."""

    def __init__(self, model: torch.nn.Module, lr: float, total_steps: int, max_grad_norm: float = 1.0):
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 - s / total_steps)

    def step(self, batch: dict) -> torch.Tensor:
        loss = self.model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss
