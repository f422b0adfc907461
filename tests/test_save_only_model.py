"""save_only_model=True: checkpoints hold what HF's hold (weights, trainer state, arguments;
no optimizer, scheduler, scaler or RNG state), load_best_model_at_end still works, and
resuming from one is refused with the reason (HF 5.24 resumes silently with a fresh
optimizer and a restarted schedule)."""
import os

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402
from tests._tiny import Classifier, sign_examples  # noqa: E402

NOT_IN_MODEL_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "rng_state_0.pt")


def _train(lib, out, resume=None, max_steps=4, **kw):
    settings = dict(output_dir=str(out), save_only_model=True, save_steps=2, max_steps=max_steps,
                    per_device_train_batch_size=4, learning_rate=0.1, report_to="none", disable_tqdm=True)
    args = lib.TrainingArguments(**{**settings, **kw})
    trainer = lib.Trainer(Classifier(), args, train_dataset=sign_examples(), eval_dataset=sign_examples(8))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_checkpoints_hold_what_hfs_hold(tmp_path):
    files = {}
    for lib in (transformers, fasttrain):
        _train(lib, tmp_path / lib.__name__)
        files[lib.__name__] = set(os.listdir(tmp_path / lib.__name__ / "checkpoint-2"))
    assert files["transformers"] == {"model.safetensors", "trainer_state.json", "training_args.bin"}
    assert files["transformers"] <= files["fasttrain"]
    assert not files["fasttrain"] & set(NOT_IN_MODEL_ONLY)
    full = tmp_path / "full"
    fasttrain.Trainer(Classifier(), fasttrain.TrainingArguments(
        output_dir=str(full), save_steps=2, max_steps=2, per_device_train_batch_size=4, report_to="none",
        disable_tqdm=True), train_dataset=sign_examples()).train()
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(os.listdir(full / "checkpoint-2"))


@pytest.mark.parametrize("writer", [fasttrain, transformers])
@pytest.mark.parametrize("latest", [False, True])
def test_resuming_from_a_model_only_checkpoint_is_refused_with_the_reason(tmp_path, writer, latest):
    _train(writer, tmp_path)
    resume = True if latest else str(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint-4.*save_only_model=True.*optimizer, "
                                         "LR scheduler, loss scaler and RNG state"):
        _train(fasttrain, tmp_path, resume=resume, max_steps=6, save_only_model=False)


def test_load_best_model_at_end_loads_the_best_model_only_checkpoint(tmp_path):
    scores = iter([0.1, 0.5, 0.9])  # the first evaluation (step 2) is the best

    class Scored(fasttrain.Trainer):
        pass
    args = fasttrain.TrainingArguments(
        output_dir=str(tmp_path), save_only_model=True, save_steps=2, eval_strategy="steps", eval_steps=2,
        max_steps=6, per_device_train_batch_size=4, learning_rate=0.1, report_to="none", disable_tqdm=True,
        load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=False)
    trainer = Scored(Classifier(), args, train_dataset=sign_examples(), eval_dataset=sign_examples(8),
                     compute_metrics=lambda pred: {"score": next(scores)})
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, best[name], rtol=0, atol=0)
    assert not torch.equal(best["linear.weight"], last["linear.weight"])
