"""The optimizer tail replayed from a CUDA graph (trainer/graph_tail.py, cuda_graph_optimizer).

No GPU here, so the CPU proves what a capture relies on, on the same code the GPU runs:
- the tail's device work, run eagerly (what the warm-up steps do), trains bit-identically
  to the ordinary tail, skipped non-finite steps and the LR schedule included;
- every tensor the tail reads from outside itself sits at the same address in every step
  (a graph replays addresses), and it issues no host read or data-dependent-shape op;
- where it cannot apply, the Trainer says why once and trains exactly as without it.
The capture itself is a `gpu` test: skipped here, run by `fasttrain gpu-check`.
"""
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fasttrain
from fasttrain.trainer import graph_tail, lifecycle
from tests._tiny import PoisonSteps, poisonable_gpt, token_examples

FORBIDDEN = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal"}


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=8, learning_rate=3e-3,
                warmup_steps=2, lr_scheduler_type="cosine", logging_steps=2, save_strategy="no",
                report_to="none", disable_tqdm=True, seed=0, optim="adamw_torch_fused")
    base.update(kw)
    return fasttrain.TrainingArguments(**base)


def _use_graph_tail(monkeypatch, capture):
    """The Trainer builds a GraphedTail although this is a CPU: capture=False runs its device
    work eagerly every step (what the warm-up steps run); capture=True really tries to capture
    at the third step, which fails here (no CUDA) and must fall back."""
    def build(args, **parts):
        parts.pop("device"), parts.pop("scaler"), parts.pop("callbacks")
        return graph_tail.GraphedTail(args=args, capture=capture, **parts)
    monkeypatch.setattr(lifecycle, "graph_tail_for", build)


def _train(out, poison=(), eager_graph_tail=False, monkeypatch=None, model=None, **kw):
    if eager_graph_tail:
        _use_graph_tail(monkeypatch, capture=False)
    trainer = fasttrain.Trainer(model or poisonable_gpt(), _args(out, **kw), train_dataset=token_examples(64),
                                callbacks=[PoisonSteps(poison)])
    trainer.train()
    return trainer


def _state(trainer):
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    logged = [repr((r["step"], r["loss"], r.get("grad_norm"), r["learning_rate"]))  # repr: nan == nan
              for r in trainer.state.log_history if "loss" in r]
    return weights, logged, trainer.state.skipped_steps


@pytest.mark.parametrize("kw", [{}, {"max_grad_norm": 0.0}, {"nonfinite_loss_policy": "stop"},
                                {"optim": "fasttrain_adamw", "gradient_accumulation_steps": 2}],
                         ids=["clip", "no-clip", "stop-policy", "fasttrain-adamw-accum"])
def test_the_tail_s_device_work_trains_exactly_as_the_ordinary_tail(tmp_path, monkeypatch, kw):
    plain = _state(_train(tmp_path / "plain", poison=(3, 6), **kw))
    graphed_trainer = _train(tmp_path / "graph", poison=(3, 6), eager_graph_tail=True, monkeypatch=monkeypatch, **kw)
    assert isinstance(graphed_trainer._graph_tail, graph_tail.GraphedTail)
    graphed = _state(graphed_trainer)
    assert plain[2] == graphed[2] == 2  # both poisoned steps skipped
    assert plain[1] == graphed[1]  # losses, grad norms and LRs of every logged window, exactly
    for name, w in plain[0].items():
        assert torch.equal(w, graphed[0][name]), name
    # zeroed in place during the run (the same-memory test below), dropped after it as the ordinary tail does
    assert all(p.grad is None for p in graphed_trainer.model.parameters())


class ReadsOfTheTail(TorchDispatchMode):
    """Per op inside the tail: the addresses of tensor inputs not made inside it, the host
    numbers passed (a graph would replay them as captured), and the op names."""

    def __init__(self):
        super().__init__()
        self.external, self.made, self.ops = [], set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        for t in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.made:
                self.external.append((self.ops[-1], t.untyped_storage().data_ptr(), tuple(t.shape)))
            elif isinstance(t, (int, float)) and not isinstance(t, bool):  # a host number baked in
                self.external.append((self.ops[-1], "number", t))
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not any(t is a for a in torch.utils._pytree.tree_leaves(args)):
                self.made.add(t.untyped_storage().data_ptr())
        return out


def test_the_tail_reads_the_same_memory_every_step_and_never_the_host(tmp_path, monkeypatch):
    """What makes it capturable: steps 3-6 (after the warm-up steps, where the optimizer state
    is created) read exactly the same external tensors, at the same addresses, and the same
    host numbers, in the same order, and nothing in the tail reads a value on the host or
    makes a shape from data."""
    seen = []
    original = graph_tail.GraphedTail._device_tail

    def recorded(self, loss):
        with ReadsOfTheTail() as mode:
            out = original(self, loss)
        seen.append(mode)
        return out
    monkeypatch.setattr(graph_tail.GraphedTail, "_device_tail", recorded)
    _train(tmp_path / "g", poison=(4,), eager_graph_tail=True, monkeypatch=monkeypatch, max_steps=6)
    assert len(seen) == 6
    later = seen[2:]
    assert all(m.external == later[0].external for m in later[1:])
    assert all(m.ops == later[0].ops for m in later[1:])  # the same work, skipped step included
    reads = {name for name, _, _ in later[0].external}
    assert {"_fused_adamw_", "index_select"} <= reads  # the update and the LR write are in it
    assert not FORBIDDEN & {op for m in seen for op in m.ops}


def test_where_it_cannot_apply_it_says_why_once_and_trains_as_without(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        asked = _train(tmp_path / "asked", cuda_graph_optimizer=True)
    plain = _train(tmp_path / "plain")
    said = [r.getMessage() for r in caplog.records if "cuda_graph_optimizer" in r.getMessage()]
    assert len(said) == 1 and "CUDA device" in said[0] and "cpu" in said[0]
    assert asked._graph_tail is None
    for (k, w), v in zip(asked.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(w, v), k


class LateBranch(torch.nn.Module):
    """tiny_gpt plus a scale parameter used only from step `first` on: its first gradient
    (and so its optimizer state) appears mid-run, as a rarely routed expert's would."""

    def __init__(self, first):
        super().__init__()
        self.gpt, self.first = poisonable_gpt(), first
        self.late = torch.nn.Parameter(torch.ones(()))
        self.steps = 0

    def forward(self, input_ids, labels=None):
        self.steps += self.training
        out = self.gpt(input_ids=input_ids, labels=labels)
        if self.steps >= self.first:
            out.loss = out.loss * self.late
        return out


@pytest.mark.parametrize("first_late_step, first_attempt", [(99, 3), (3, 4)])
def test_capture_waits_until_every_gradient_has_its_optimizer_state(tmp_path, monkeypatch, caplog,
                                                                      first_late_step, first_attempt):
    """Capture is tried once two eager steps are done and this step's gradients are the last
    eager step's tensors with their optimizer state; a parameter whose first gradient comes
    at step 3 defers it to step 4 (captured at 3, the replay would re-zero its moments every
    step). On this CPU the attempt itself fails: one warning, the tail stays eager, the
    optimizer's capturable flags are put back, and training equals the ordinary tail's."""
    attempts = []
    real = graph_tail.GraphedTail._capture

    def attempt(self, loss):
        attempts.append(self.lr_scheduler._host_step + 1)
        return real(self, loss)
    monkeypatch.setattr(graph_tail.GraphedTail, "_capture", attempt)
    plain = _train(tmp_path / "plain", model=LateBranch(first_late_step))
    _use_graph_tail(monkeypatch, capture=True)
    with caplog.at_level(logging.WARNING, logger="fasttrain"):
        tried = _train(tmp_path / "tried", model=LateBranch(first_late_step))
    assert attempts == [first_attempt]  # failed once, then never tried again
    said = [r.getMessage() for r in caplog.records if "capturing the optimizer tail failed" in r.getMessage()]
    assert len(said) == 1 and "runs eagerly for the rest of the run" in said[0]
    assert all(g["capturable"] is False for g in tried.optimizer.param_groups)
    for (k, w), v in zip(tried.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(w, v), k


class ReadsGradients(fasttrain.TrainerCallback):
    def on_optimizer_step(self, args, state, control, **kw):
        pass


def test_why_not_names_each_obstacle(tmp_path):
    trainer = fasttrain.Trainer(poisonable_gpt(), _args(tmp_path, max_steps=1), train_dataset=token_examples(8))
    trainer.train()
    parts = dict(optimizer=trainer.optimizer, scaler=None, lr_scheduler=trainer.lr_scheduler,
                 clipper=trainer._clipper, callbacks=trainer.callback_handler.callbacks)
    cuda = torch.device("cuda")  # these parts live on the CPU: only the last check can tell
    assert graph_tail.why_not(device=cuda, **parts) == \
        "the learning rates are tensors on cpu, not on the CUDA device"
    assert "CUDA device" in graph_tail.why_not(device=torch.device("cpu"), **parts)
    assert "fp16" in graph_tail.why_not(device=cuda, **{**parts, "scaler": object()})
    sgd = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    assert "SGD cannot skip" in graph_tail.why_not(device=cuda, **{**parts, "optimizer": sgd})
    lam = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    assert "LR schedule" in graph_tail.why_not(device=cuda, **{**parts, "lr_scheduler": lam})
    hooked = graph_tail.why_not(device=cuda, **{**parts, "callbacks": parts["callbacks"] + [ReadsGradients()]})
    assert "ReadsGradients overrides on_optimizer_step" in hooked
    transformers = pytest.importorskip("transformers")
    plain_hf = type("PlainHF", (transformers.TrainerCallback,), {})()
    assert "learning rates" in graph_tail.why_not(device=cuda, **{**parts, "callbacks": [plain_hf]})


@pytest.mark.gpu
def test_cuda_graph_replay_trains_as_the_eager_tail(tmp_path):
    """On a GPU: captured once after two eager steps, replayed for the rest, and the weights
    equal the ordinary tail's (the same kernels on the same inputs)."""
    runs = {}
    for graphed in (False, True):
        trainer = fasttrain.Trainer(poisonable_gpt().cuda(), _args(tmp_path / str(graphed), bf16=True,
                                                                    cuda_graph_optimizer=graphed),
                                    train_dataset=token_examples(64), callbacks=[PoisonSteps((5,))])
        trainer.train()
        runs[graphed] = trainer
    assert runs[True]._graph_tail.captures == 1
    assert runs[True].state.skipped_steps == runs[False].state.skipped_steps == 1
    for (k, w), v in zip(runs[True].model.state_dict().items(), runs[False].model.state_dict().values()):
        assert torch.equal(w, v), k
