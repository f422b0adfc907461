"""The loss difference with transformers 5.24, kept on purpose (README: "Where fasttrain
deliberately differs from HF"). For a causal LM whose config leaves `loss_type` unset (GPT-2),
HF counts the labels before the causal shift and divides the shifted-token loss sum by that
larger count; fasttrain divides by the tokens actually predicted: the model's true mean."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttrain import Trainer, TrainingArguments  # noqa: E402

VOCAB = 64


def _model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1,
                                                                n_head=2, n_positions=64, resid_pdrop=0.0,
                                                                embd_pdrop=0.0, attn_pdrop=0.0))


def _data():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (4 + i,), generator=g).tolist()), "labels": ids}
            for i in range(8)]


def _collate(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}


def _one_step_loss(trainer_cls, args_cls, tmp_path, **extra):
    args = args_cls(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=0.0, max_steps=1,
                    logging_steps=1, report_to="none", disable_tqdm=True, save_strategy="no", **extra)
    trainer = trainer_cls(model=_model(), args=args, data_collator=_collate, train_dataset=_data())
    trainer.train()
    return next(r["loss"] for r in trainer.state.log_history if "loss" in r)


def test_fasttrain_reports_the_true_mean_where_hf_divides_by_unshifted_labels(tmp_path):
    batch = _collate(_data())
    with torch.no_grad():
        logits = _model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                                                 reduction="sum", ignore_index=-100).item()
    predicted = int((batch["labels"][:, 1:] != -100).sum())
    unshifted = int((batch["labels"] != -100).sum())
    true_mean, hf_style = loss_sum / predicted, loss_sum / unshifted
    hf = _one_step_loss(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", use_cpu=True)
    ours = _one_step_loss(Trainer, TrainingArguments, tmp_path / "ours")
    assert hf == pytest.approx(hf_style, rel=1e-5)  # HF 5.24's number
    assert ours == pytest.approx(true_mean, rel=1e-5)  # fasttrain's: the model's own mean
    assert ours / hf == pytest.approx(unshifted / predicted, rel=1e-5)  # 8 more labels than targets
