"""HF's arguments that shape what compute_metrics receives (include_for_metrics,
batch_eval_metrics, eval_do_concat_batches, eval_use_gather_object), each run through
transformers' own Trainer and fasttrain's on the same model and data."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBS = (transformers, fasttrain)


class Tagger(torch.nn.Module):
    """Per-token classes over a padded `x`: predictions and inputs have a second dim."""
    main_input_name = "x"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 3)

    def forward(self, x, labels=None):
        logits = self.emb(x)  # (B, T, 3)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


def tag_data(n=7):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        x = torch.randint(0, 10, (4,), generator=g)  # one length: HF and fasttrain pad alike
        out.append({"x": x, "labels": x % 3})
    return out


def _args(lib, out, **kw):
    base = dict(output_dir=str(out), per_device_eval_batch_size=3, report_to="none", disable_tqdm=True,
                save_strategy="no")
    base.update(kw)
    return lib.TrainingArguments(**base)


def _evaluate(lib, tmp_path, compute_metrics, predict=False, **kw):
    trainer = lib.Trainer(Tagger(), _args(lib, tmp_path / lib.__name__, **kw), eval_dataset=tag_data(),
                          compute_metrics=compute_metrics)
    if predict:
        return trainer.predict(tag_data())
    return trainer.evaluate()


def test_include_for_metrics_inputs_and_loss_as_hf(tmp_path):
    seen = {}
    for lib in LIBS:
        def compute_metrics(pred, name=lib.__name__):
            preds, labels, inputs, losses = pred  # HF's unpacking order with both included
            seen[name] = (preds, labels, inputs, losses, len(tuple(pred)))
            return {"mean_loss": float(np.mean(losses))}
        metrics = _evaluate(lib, tmp_path, compute_metrics, include_for_metrics=["inputs", "loss"])
        seen[lib.__name__ + "_metric"] = metrics["eval_mean_loss"]
    hf, ft = seen["transformers"], seen["fasttrain"]
    assert ft[4] == hf[4] == 4
    for ours, theirs in zip(ft[:4], hf[:4]):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert hf[3].shape == (7,)  # one loss per example: the batch's mean, repeated
    assert seen["fasttrain_metric"] == pytest.approx(seen["transformers_metric"], rel=1e-6)


def test_include_for_metrics_unset_leaves_inputs_and_losses_none(tmp_path):
    for lib in LIBS:
        got = []
        _evaluate(lib, tmp_path, lambda pred: got.append(pred) or {})
        assert got[0].inputs is None and got[0].losses is None and len(tuple(got[0])) == 2


def test_main_input_missing_from_the_batch_is_named(tmp_path):
    class Renamed(Tagger):
        main_input_name = "input_ids"
    trainer = fasttrain.Trainer(Renamed(), _args(fasttrain, tmp_path, include_for_metrics=["inputs"]),
                                eval_dataset=tag_data(), compute_metrics=lambda p: {})
    with pytest.raises(KeyError, match="include_for_metrics.*'input_ids'.*main_input_name"):
        trainer.evaluate()


def _batch_recorder(calls):
    totals = {"right": 0, "n": 0}

    def compute_metrics(pred, compute_result):
        preds, labels = pred.predictions, pred.label_ids
        calls.append((type(preds).__name__, tuple(preds.shape), tuple(labels.shape), compute_result,
                      None if pred.losses is None else tuple(pred.losses.shape)))
        totals["right"] += int((preds.argmax(-1) == labels).sum())
        totals["n"] += labels.numel()
        if compute_result:
            return {"accuracy": totals["right"] / totals["n"]}
        return {"partial": 0.0}
    return compute_metrics


def test_batch_eval_metrics_calls_per_batch_with_compute_result_on_the_last(tmp_path):
    calls, metrics = {}, {}
    for lib in LIBS:
        calls[lib.__name__] = []
        metrics[lib.__name__] = _evaluate(lib, tmp_path, _batch_recorder(calls[lib.__name__]),
                                          batch_eval_metrics=True, include_for_metrics=["loss"])
    assert calls["fasttrain"] == calls["transformers"]
    assert [c[3] for c in calls["fasttrain"]] == [False, False, True]  # 7 examples, batches of 3
    assert calls["fasttrain"][0][0] == "Tensor"
    assert metrics["fasttrain"]["eval_accuracy"] == metrics["transformers"]["eval_accuracy"]
    assert "eval_partial" not in metrics["fasttrain"]  # only the last call's result counts


def test_batch_eval_metrics_predict_still_returns_every_prediction(tmp_path):
    out = {}
    for lib in LIBS:
        out[lib.__name__] = _evaluate(lib, tmp_path, _batch_recorder([]), predict=True, batch_eval_metrics=True)
    np.testing.assert_allclose(out["fasttrain"].predictions, out["transformers"].predictions, rtol=1e-6)
    assert out["fasttrain"].predictions.shape == (7, 4, 3)
    assert out["fasttrain"].metrics["test_accuracy"] == out["transformers"].metrics["test_accuracy"]


@pytest.mark.parametrize("predict", [False, True])
def test_eval_do_concat_batches_false_gives_one_array_per_batch(tmp_path, predict):
    got = {}
    for lib in LIBS:
        def compute_metrics(pred, name=lib.__name__):
            got[name] = pred
            return {}
        result = _evaluate(lib, tmp_path, compute_metrics, predict=predict, eval_do_concat_batches=False,
                           include_for_metrics=["inputs"])
        if predict:
            got[lib.__name__ + "_out"] = result.predictions
    hf, ft = got["transformers"], got["fasttrain"]
    for field in ("predictions", "label_ids", "inputs"):
        ours, theirs = getattr(ft, field), getattr(hf, field)
        assert isinstance(ours, list) and [a.shape for a in ours] == [a.shape for a in theirs] == \
            [a.shape for a in theirs]
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    assert [a.shape[0] for a in ft.predictions] == [3, 3, 1]
    if predict:
        assert [a.shape for a in got["fasttrain_out"]] == [a.shape for a in got["transformers_out"]]


class WordTrainer(fasttrain.Trainer):
    """A prediction_step that predicts Python strings (fasttrain's 4-tuple contract)."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, count, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        words = [f"w{int(v)}" for v in inputs["x"][:, 0]]
        return loss, count, words, labels


@pytest.mark.parametrize("concat", [True, False])
def test_object_predictions_single_process(tmp_path, concat):
    got = []
    trainer = WordTrainer(Tagger(), _args(fasttrain, tmp_path, eval_use_gather_object=True,
                                          eval_do_concat_batches=concat),
                          eval_dataset=tag_data(), compute_metrics=lambda p: got.append(p) or {})
    trainer.evaluate()
    words = [f"w{int(e['x'][0])}" for e in tag_data()]
    assert got[0].predictions == (words if concat else [words[0:3], words[3:6], words[6:7]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_gloo_ranks_gather_objects_and_batches_in_dataset_order(tmp_path):
    """Also: the Trainer's group_by_length sampler on each rank is HF's distributed one."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "tests._eval_gather_worker", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    words = [f"w{int(e['x'][0])}" for e in tag_data()]
    for rank in (0, 1):  # every rank's compute_metrics sees every example once, in dataset order
        assert result[rank]["words"] == words
        assert result[rank]["word_batches"] == [words[0:6], words[6:7]]  # batch steps of 2 ranks x 3
        np.testing.assert_array_equal(result[rank]["inputs"], np.stack([e["x"].numpy() for e in tag_data()]))
        assert result[rank]["batch_calls"] == [((6, 4, 3), False), ((1, 4, 3), True)]
    single = _evaluate(fasttrain, tmp_path, _batch_recorder([]), batch_eval_metrics=True)
    assert result[0]["batch_accuracy"] == single["eval_accuracy"]
    # the same launch checks group_by_length's distributed variant against HF's own sampler
    from transformers.trainer_pt_utils import DistributedLengthGroupedSampler
    lengths = [1 + (i * 7) % 11 for i in range(23)]
    for rank in (0, 1):
        hf = DistributedLengthGroupedSampler(2 * 2, num_replicas=2, rank=rank, seed=4, lengths=lengths)
        assert result[rank]["grouped_order"] == list(hf)


def test_tensors_among_object_predictions_come_back_as_arrays_bf16_included():
    from fasttrain.trainer.eval_collect import to_piece
    piece = to_piece([torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "text", 3])
    assert isinstance(piece[0], np.ndarray) and piece[0].dtype == np.float32
    assert piece[0].tolist() == [1.5, -2.0] and piece[1:] == ["text", 3]
