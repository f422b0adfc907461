"""What predict()/evaluate() hand back as predictions and label_ids, with transformers'
Trainer running the same lines as the oracle: every model output but the loss (a tuple when
there are several), dict outputs under any key, the config's keys_to_ignore_at_inference
left out, and all label_names' columns."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402


class TwoHeads(torch.nn.Module):
    """Returns (loss, y, 2y) with labels and (y, 2y) without, like HF's test regression model."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.5))
        self.b = torch.nn.Parameter(torch.tensor(0.5))
        self.as_dict = as_dict

    def forward(self, x, labels=None, **kwargs):  # HF's default label_names come from this signature
        labels_2 = kwargs.get("labels_2")
        y = x * self.a + self.b
        if self.as_dict:  # no "logits" key at all
            out = {"output": y, "doubled": 2 * y}
            if labels is not None:
                out["loss"] = ((y - labels) ** 2).mean()
            return out
        if labels is None:
            return y, 2 * y
        loss = ((y - labels) ** 2).mean() + (0.0 if labels_2 is None else ((2 * y - labels_2) ** 2).mean())
        return loss, y, 2 * y


def data(n=10, two_labels=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    rows = [{"x": x[i], "labels": 3 * x[i]} for i in range(n)]
    if two_labels:
        for row in rows:
            row["labels_2"] = -row["labels"]
    return rows


def predict(lib, out, model, dataset, **kw):
    args = lib.TrainingArguments(output_dir=str(out), per_device_eval_batch_size=4, report_to="none",
                                 disable_tqdm=True, **kw)
    return lib.Trainer(model, args).predict(dataset)


def _same(ft, hf):
    if isinstance(hf, tuple):
        assert isinstance(ft, tuple) and len(ft) == len(hf)
        for f, h in zip(ft, hf):
            _same(f, h)
    else:
        np.testing.assert_allclose(ft, hf, rtol=1e-6)


@pytest.mark.parametrize("case", [
    dict(),                                                          # (loss, y, 2y): two predictions
    dict(two_labels=True, label_names=["labels", "labels_2"]),      # and two label columns
    dict(as_dict=True),                                              # dict without "logits"
    dict(without_labels=True),                                       # (y, 2y), no loss
])
def test_predictions_and_label_ids_as_hf(tmp_path, case):
    case = dict(case)
    as_dict, without_labels = case.pop("as_dict", False), case.pop("without_labels", False)
    dataset = data(two_labels=case.pop("two_labels", False))
    if without_labels:
        dataset = [{"x": row["x"]} for row in dataset]
    hf = predict(transformers, tmp_path / "hf", TwoHeads(as_dict), dataset, **case)
    ft = predict(fasttrain, tmp_path / "ft", TwoHeads(as_dict), dataset, **case)
    _same(ft.predictions, hf.predictions)
    assert isinstance(ft.predictions, tuple) and len(ft.predictions) == 2
    if without_labels:
        assert ft.label_ids is None and hf.label_ids is None
    else:
        _same(ft.label_ids, hf.label_ids)
        assert set(hf.metrics) & {"test_loss"} <= set(ft.metrics)


def test_the_kv_cache_is_not_a_prediction(tmp_path):
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, use_cache=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (6, 8), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": ids[i], "labels": ids[i]} for i in range(6)]
    hf = predict(transformers, tmp_path / "hf", model, dataset)
    ft = predict(fasttrain, tmp_path / "ft", model, dataset)
    assert ft.predictions.shape == hf.predictions.shape == (6, 8, 50)  # logits only, no past_key_values
    np.testing.assert_allclose(ft.predictions, hf.predictions, rtol=1e-5, atol=1e-6)
