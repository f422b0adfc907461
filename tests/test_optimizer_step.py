"""The end of the Trainer's default step (fasttrain/trainer/optimizer_step.py): clipping by the
fused optimizer's grad_scale, the norm, divisor and skip flag from fasttrain::grad_norm_clip
(or its torch fallback), and a skipped update when a gradient alone is NaN/inf (the loss stays
finite, so only the clip op's flag can catch it)."""
import tempfile

import pytest
import torch

from fasttrain import Trainer, TrainerCallback, TrainingArguments
from fasttrain.ops import dispatch, native
from fasttrain.profiler.hand_loop import Regressor, regression_examples

POISONED_STEP = 3


class _Watch(TrainerCallback):
    """The weights before and after each optimizer step, and the logged grad norms."""

    def __init__(self):
        self.before, self.after, self.logs = {}, {}, []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.before[state.global_step + 1] = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after[state.global_step] = [p.detach().clone() for p in model.parameters()]

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def _run(poison, implementation, monkeypatch):
    if implementation == "torch":
        monkeypatch.setattr(dispatch, "implementation", lambda op, device_type: "torch")
    elif not native.has_kernel_on("grad_norm_clip", "cpu"):
        pytest.skip("the ops library is not built here (bash scripts/build_ops.sh); CI builds it")
    torch.manual_seed(0)
    model = Regressor()
    watch = _Watch()
    step = {"n": 0}

    def poison_grad(grad):  # the weight's gradient at one step only; the loss stays finite
        return grad * poison if step["n"] == POISONED_STEP else grad

    model.net[0].weight.register_hook(poison_grad)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=5, per_device_train_batch_size=4,
                             save_strategy="no", disable_tqdm=True, report_to="none", logging_steps=1)
    assert args.max_grad_norm == 1.0 and args.optim == "adamw_torch_fused"  # the default tail
    trainer = Trainer(model, args, train_dataset=regression_examples(64), callbacks=[watch])

    class _Count(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            step["n"] += 1

    trainer.add_callback(_Count())
    trainer.train()
    return trainer, watch


@pytest.mark.parametrize("implementation", ["c++", "torch"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_gradient_skips_the_update_and_only_that_one(poison, implementation, monkeypatch):
    trainer, watch = _run(poison, implementation, monkeypatch)
    assert trainer.state.skipped_steps == 1
    for n in range(1, 6):
        unchanged = all(torch.equal(a, b) for a, b in zip(watch.before[n], watch.after[n]))
        assert unchanged == (n == POISONED_STEP), n
        assert all(torch.isfinite(p).all() for p in watch.after[n])
    norms = [log["grad_norm"] for log in watch.logs if "grad_norm" in log]
    assert len(norms) == 5
    bad = norms[POISONED_STEP - 1]
    assert bad != bad if poison != poison else bad == float("inf")  # logged as the op gave it
    assert all(0 < x < float("inf") for i, x in enumerate(norms) if i != POISONED_STEP - 1)


def test_the_op_and_the_fallback_log_the_same_norms(monkeypatch):
    """Same divisor, same skip: the two implementations train the same weights."""
    ours, ours_watch = _run(1.0, "c++", monkeypatch)
    with monkeypatch.context() as m:
        ref, ref_watch = _run(1.0, "torch", m)
    for a, b in zip(ours.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ours_watch.logs, ref_watch.logs):
        if "grad_norm" in a:
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
