"""Inputs and arguments HF's Trainer accepts or refuses, with transformers' Trainer running the
same lines as the oracle."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402


class FeatureClassifier(torch.nn.Module):
    """Float features under the name `input_ids`, as in HF's own resume tests: no token embedding."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(10, 2)

    def forward(self, input_ids=None, labels=None):
        logits = self.linear(input_ids.float())
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def features(n=12):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 10, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": x[i], "labels": y[i]} for i in range(n)]


def _train(lib, out):
    torch.manual_seed(0)
    args = lib.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                                 report_to="none", disable_tqdm=True, save_strategy="no", seed=0)
    trainer = lib.Trainer(FeatureClassifier(), args, train_dataset=features())
    trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def test_float_features_named_input_ids_train_as_in_hf(tmp_path):
    hf = _train(transformers, tmp_path / "hf")
    ft = _train(fasttrain, tmp_path / "ft")
    assert len(ft) == len(hf) == 3
    assert ft == pytest.approx(hf, rel=1e-5)


def test_save_strategy_best_needs_a_metric_as_in_hf(tmp_path):
    kwargs = dict(output_dir=str(tmp_path), eval_strategy="epoch", save_strategy="best", report_to="none")
    with pytest.raises(ValueError, match="metric_for_best_model"):
        transformers.Trainer(FeatureClassifier(), transformers.TrainingArguments(**kwargs), eval_dataset=features())
    with pytest.raises(ValueError, match=r"TrainingArguments\.metric_for_best_model.*must be provided"):
        fasttrain.TrainingArguments(**kwargs)
    fasttrain.TrainingArguments(**kwargs, metric_for_best_model="loss")  # named: accepted
