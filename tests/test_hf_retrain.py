"""Training again, as HF scripts and HF's own tests do: `train()` twice on one Trainer (with
`model_init`, a fresh model each time), or a new Trainer writing into an output_dir that holds
an earlier run's checkpoints. transformers' Trainer running the same lines is the oracle."""
import json
import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402
from tests._tiny import UnseededRegressor as Regressor  # noqa: E402


def regression_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _args(lib, out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=0.05, logging_steps=2,
                save_strategy="steps", save_steps=2, num_train_epochs=2, report_to="none",
                disable_tqdm=True, seed=0)
    base.update(kw)
    return lib.TrainingArguments(**base)


def _checkpoints(out):
    return sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))


def _train_twice_with_model_init(lib, out):
    trainer = lib.Trainer(model_init=Regressor, args=_args(lib, out), train_dataset=regression_data())
    first = trainer.train()
    trainer.args.seed = 1  # the second run reseeds: another data order
    second = trainer.train()
    return trainer, first, second


def test_train_again_starts_a_fresh_run_as_hf(tmp_path):
    hf, hf_first, hf_second = _train_twice_with_model_init(transformers, tmp_path / "hf")
    ft, ft_first, ft_second = _train_twice_with_model_init(fasttrain, tmp_path / "ft")
    # the second run counts its steps from 0 again and trains the fresh model: not a no-op
    assert ft_second.global_step == hf_second.global_step == 8
    assert ft.state.global_step == hf.state.global_step == 8
    assert ft_second.training_loss == pytest.approx(hf_second.training_loss, rel=1e-5)
    assert ft_second.training_loss != pytest.approx(ft_first.training_loss, rel=1e-3)  # seed 1 took effect
    for ft_p, hf_p in zip(ft.model.parameters(), hf.model.parameters()):
        torch.testing.assert_close(ft_p, hf_p, rtol=1e-5, atol=1e-6)
    # the log history is the second run's only, as HF's
    ft_losses = [r["loss"] for r in ft.state.log_history if "loss" in r]
    hf_losses = [r["loss"] for r in hf.state.log_history if "loss" in r]
    assert len(ft_losses) == len(hf_losses) == 4
    assert ft_losses == pytest.approx(hf_losses, rel=1e-5)
    assert _checkpoints(tmp_path / "ft") == _checkpoints(tmp_path / "hf")


def test_a_new_run_in_a_used_output_dir_starts_over_as_hf(tmp_path, caplog):
    for lib, out in ((transformers, tmp_path / "hf"), (fasttrain, tmp_path / "ft")):
        torch.manual_seed(0)
        lib.Trainer(Regressor(), _args(lib, out, num_train_epochs=3), train_dataset=regression_data()).train()
    assert _checkpoints(tmp_path / "ft") == _checkpoints(tmp_path / "hf") == \
        ["checkpoint-10", "checkpoint-12", "checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]

    runs = {}
    for lib, out in ((transformers, tmp_path / "hf"), (fasttrain, tmp_path / "ft")):
        with caplog.at_level(logging.WARNING, logger="fasttrain"):
            torch.manual_seed(0)
            trainer = lib.Trainer(Regressor(), _args(lib, out, seed=1), train_dataset=regression_data())
            runs[lib.__name__] = trainer, trainer.train()
    assert "already holds checkpoints of an earlier run" in caplog.text  # fasttrain says so
    assert "resume_from_checkpoint=True" in caplog.text and "overwrite_output_dir=True" in caplog.text
    # the new run's checkpoints replaced the old ones of their steps; the others are left, as HF
    assert _checkpoints(tmp_path / "ft") == _checkpoints(tmp_path / "hf")
    for name, out in (("transformers", tmp_path / "hf"), ("fasttrain", tmp_path / "ft")):
        trainer, result = runs[name]
        saved = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
        assert saved["global_step"] == 8 and saved["max_steps"] == 8  # the second run's (8 steps, not 12)
        assert [r["loss"] for r in saved["log_history"] if "loss" in r] == \
            pytest.approx([r["loss"] for r in trainer.state.log_history if "loss" in r][:4])
        assert json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["max_steps"] == 12
    assert runs["fasttrain"][1].training_loss == pytest.approx(runs["transformers"][1].training_loss, rel=1e-5)

