"""Tiny deterministic models and datasets shared by the trainer tests."""
import functools

import torch

from fasttrain import TrainerCallback
from fasttrain.models import GPT, GPTConfig


def tiny_gpt(seed: int = 0, dropout: float = 0.0, n_layer: int = 2, block_size: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=block_size, n_layer=n_layer, n_head=2,
                         n_embd=32, dropout=dropout))


def token_examples(n: int, seq_len: int = 16, vocab: int = 64, seed: int = 1, ragged: bool = False):
    """A list of {'input_ids', 'labels'} examples; with ragged=True lengths vary and the
    collator pads labels with -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, seq_len + 1, (1,), generator=g)) if ragged else seq_len
        ids = torch.randint(0, vocab, (length,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class PoisonSteps(TrainerCallback):
    """A real NaN in the forward pass of the chosen (1-based) steps: the loss becomes non-finite."""

    def __init__(self, steps):
        self.steps = steps

    def on_step_begin(self, args, state, control, model=None, **kw):
        model._poison = (state.global_step + 1) in self.steps


class LoggedRecords(TrainerCallback):
    """Every record the Trainer logged, its measurements included (what on_log receives;
    state.log_history keeps HF's keys only)."""

    def __init__(self):
        self.records = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.records.append({**logs, "step": state.global_step})


def poisonable_gpt():
    """tiny_gpt() whose loss is multiplied by NaN while `model._poison` is set (PoisonSteps)."""
    model = tiny_gpt()
    forward = model.forward

    @functools.wraps(forward)  # the Trainer reads forward's parameter names to pick batch keys
    def poisoned(*a, **kw):
        out = forward(*a, **kw)
        if getattr(model, "_poison", False):
            out.loss = out.loss * float("nan")
        return out
    model.forward = poisoned
    return model


class Classifier(torch.nn.Module):
    """Linear(4, 2) with cross-entropy, HF-style: {"loss" (None without labels), "logits"}."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def sign_examples(n: int = 16) -> list:
    """`n` examples for Classifier: 4 normal features, label 1 where the first is positive."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "labels": (x[i, 0] > 0).long()} for i in range(n)]


class LinearRegressor(torch.nn.Module):
    """Linear(4, 1) regression, HF-style: {"loss" (None without labels), "logits"}; runs
    unchanged under both trainers. Its weights come from seed 0 (`SEED`)."""
    SEED = 0

    def __init__(self):
        super().__init__()
        if self.SEED is not None:
            torch.manual_seed(self.SEED)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        pred = self.linear(x).squeeze(-1)
        loss = None if labels is None else ((pred - labels) ** 2).mean()
        return {"loss": loss, "logits": pred}


class UnseededRegressor(LinearRegressor):
    """LinearRegressor whose weights come from the caller's RNG state (a Trainer's seed)."""
    SEED = None


def assert_same_logged_losses(resumed, full, rel: float = 1e-6) -> None:
    """A resumed Trainer logged the training losses of the uninterrupted one, step for step."""
    import pytest

    def losses(t):
        return [(r["step"], r["loss"]) for r in t.state.log_history if "loss" in r]
    got, want = losses(resumed), losses(full)
    assert [step for step, _ in got] == [step for step, _ in want]
    # pytest >= 9.2's approx refuses nested (step, loss) pairs: compare the losses alone
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=rel)
