"""Every bad input gets an error that says what is wrong and how to fix it, before work."""
import os

import pytest
import torch

from fasttrain import Trainer, TrainingArguments
from tests._tiny import tiny_gpt, token_examples


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), disable_tqdm=True, report_to="none", save_strategy="no")
    return TrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("field,value,needle", [
    ("optim", "adamw_bogus", "accepted values are adamw_torch"),
    ("lr_scheduler_type", "triangle", "accepted values are linear, cosine"),
    ("per_device_train_batch_size", 0, "positive integer"),
    ("per_device_train_batch_size", -4, "positive integer"),
    ("per_device_eval_batch_size", 0, "positive integer"),
    ("gradient_accumulation_steps", 0, "positive integer"),
    ("learning_rate", -1.0, ">= 0"),
    ("learning_rate", float("nan"), "finite"),
    ("adam_beta1", 1.0, "[0, 1)"),
    ("max_steps", 0, "positive integer, or -1"),
    ("eval_strategy", "sometimes", "accepted values are no, steps, epoch"),
    ("save_strategy", "always", "accepted values are no, steps, epoch, best"),
    ("report_to", ["wandb"], "each entry must be one of"),
    ("warmup_ratio", 1.5, "[0, 1]"),
    ("logging_steps", 0, "must be > 0"),
    ("save_total_limit", 0, ">= 1"),
    ("profiler_trace_steps", "5", "START:END"),
])
def test_invalid_argument_names_field_value_and_choices(tmp_path, field, value, needle):
    with pytest.raises(ValueError) as e:
        _args(tmp_path, **{field: value})
    msg = str(e.value)
    assert field in msg and repr(value) in msg and needle in msg


def test_fp16_and_bf16_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="fp16=True and bf16=True are both set"):
        _args(tmp_path, fp16=True, bf16=True)


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("precious")
    with pytest.raises(ValueError, match="is an existing file"):
        TrainingArguments(output_dir=str(f))
    assert f.read_text() == "precious"  # nothing was lost


def test_missing_train_dataset(tmp_path):
    with pytest.raises(ValueError, match="needs train_dataset"):
        Trainer(tiny_gpt(), _args(tmp_path, max_steps=1)).train()


def test_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        Trainer(tiny_gpt(), _args(tmp_path, max_steps=1), train_dataset=[]).train()


def test_missing_eval_dataset(tmp_path):
    with pytest.raises(ValueError, match="needs an eval dataset"):
        Trainer(tiny_gpt(), _args(tmp_path)).evaluate()


def test_batch_without_labels_when_the_model_needs_them(tmp_path):
    data = [{"input_ids": ex["input_ids"]} for ex in token_examples(4)]
    with pytest.raises(ValueError, match="the model returned no loss.*Pass labels"):
        Trainer(tiny_gpt(), _args(tmp_path, max_steps=1), train_dataset=data).train()


class NoLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, labels=None):
        return {"logits": self.lin(x)}


def test_model_that_returns_no_loss(tmp_path):
    data = [{"x": torch.randn(2), "labels": torch.tensor(1)} for _ in range(4)]
    with pytest.raises(ValueError, match="the model returned no loss"):
        Trainer(NoLoss(), _args(tmp_path, max_steps=1), train_dataset=data).train()


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Trainer(model=lambda x: x)


def test_frozen_model(tmp_path):
    model = tiny_gpt()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, _args(tmp_path, max_steps=1), train_dataset=token_examples(4)).train()


def test_best_model_needs_a_checkpoint_at_every_best_candidate(tmp_path):
    with pytest.raises(ValueError, match="save_steps to be a multiple of eval_steps"):
        _args(tmp_path, load_best_model_at_end=True, eval_strategy="steps", eval_steps=100,
              save_strategy="steps", save_steps=250)


def test_overwrite_output_dir_replaces_the_old_runs_checkpoints(tmp_path):
    args = _args(tmp_path, max_steps=4, per_device_train_batch_size=2)
    args.save_strategy, args.save_steps = "steps", 2
    Trainer(tiny_gpt(), args, train_dataset=token_examples(8)).train()
    assert sorted(os.listdir(args.output_dir)).count("checkpoint-4") == 1
    args.max_steps, args.overwrite_output_dir = 2, True
    Trainer(tiny_gpt(), args, train_dataset=token_examples(8)).train()
    names = sorted(p for p in os.listdir(args.output_dir) if p.startswith("checkpoint-"))
    assert names == ["checkpoint-2"]  # the stale checkpoint-4 would have been resumed from
