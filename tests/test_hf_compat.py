"""The seed card's example with `from fasttrain import ...` and a transformers model."""
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttrain import EarlyStoppingCallback, Trainer, TrainingArguments  # noqa: E402


def _classification_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        ids = torch.randint(3, 50, (length,), generator=g)
        label = int(ids.float().mean() > 26)  # learnable from the tokens
        out.append({"input_ids": ids.tolist(), "attention_mask": [1] * length, "label": label})
    return out


def _pad_collator(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    mask = torch.tensor([f["attention_mask"] + [0] * (width - len(f["attention_mask"])) for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["label"] for f in features])}


def test_seed_card_example_runs_train_evaluate_early_stopping(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2))
    seen = []

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        predictions = np.argmax(logits, axis=-1)
        seen.append(len(labels))
        return {"accuracy": float((predictions == labels).mean())}

    training_args = TrainingArguments(
        output_dir=str(tmp_path / "results"),
        learning_rate=2e-3,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        num_train_epochs=3,
        weight_decay=0.01,
        evaluation_strategy="epoch",
        save_strategy="epoch",
        fp16=True,
        logging_dir=str(tmp_path / "logs"),
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=_classification_data(64, 1),
        eval_dataset=_classification_data(40, 2),
        tokenizer=None,
        data_collator=_pad_collator,
        compute_metrics=compute_metrics,
    )
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=3))
    out = trainer.train()
    metrics = trainer.evaluate()
    assert out.global_step == 12
    assert seen and all(n == 40 for n in seen)  # every eval example exactly once, each time
    assert {"eval_loss", "eval_accuracy"} <= set(metrics)
    assert trainer.state.best_model_checkpoint is not None
    for step in (4, 8, 12):  # per-epoch saves
        assert os.path.isdir(os.path.join(training_args.output_dir, f"checkpoint-{step}"))
    assert any("eval_accuracy" in r for r in trainer.state.log_history)


def test_evaluation_strategy_alias_maps_to_eval_strategy(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), evaluation_strategy="steps")
    assert args.eval_strategy == "steps"


def test_causal_lm_from_transformers_trains(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    g = torch.Generator().manual_seed(3)
    data = []
    for _ in range(32):
        ids = torch.arange(16) % 8 + int(torch.randint(0, 8, (1,), generator=g))  # predictable
        data.append({"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=4,
                             learning_rate=5e-3, logging_steps=1, save_strategy="no", disable_tqdm=True,
                             report_to="none")
    trainer = Trainer(model, args, train_dataset=data)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])


def test_fused_loss_switch_gives_the_models_own_losses(tmp_path):
    """fused_loss=True (linear cross-entropy from the final hidden states) and the model's
    own loss agree step by step, ignore_index labels included."""
    from transformers import GPT2Config, GPT2LMHeadModel
    g = torch.Generator().manual_seed(4)
    data = []
    for _ in range(16):
        ids = torch.randint(0, 64, (12,), generator=g)
        labels = ids.clone()
        labels[:3] = -100  # a prompt that is not trained on
        data.append({"input_ids": ids, "labels": labels})
    losses = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
        args = TrainingArguments(output_dir=str(tmp_path / str(fused)), per_device_train_batch_size=4,
                                 max_steps=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                                 disable_tqdm=True, report_to="none", fused_loss=fused, seed=1)
        trainer = Trainer(model, args, train_dataset=data)
        trainer.train()
        losses[fused] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-5)
