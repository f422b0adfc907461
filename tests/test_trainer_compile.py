"""torch_compile=True in the Trainer: per-block compile, zero recompiles after warm-up
while the LR changes every step and evaluation runs in between."""
import pytest

from fasttrain import Trainer, TrainingArguments
from tests._tiny import LoggedRecords, tiny_gpt, token_examples


@pytest.mark.slow
def test_compiled_run_has_no_recompiles_after_warmup(tmp_path):
    data = token_examples(64, seed=3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2,
                             logging_steps=4, eval_strategy="steps", eval_steps=4, save_strategy="no",
                             torch_compile=True, dataloader_drop_last=True, disable_tqdm=True,
                             report_to="none", profile_warmup_steps=2, torch_compile_backend="aot_eager")
    model = tiny_gpt(seed=1, dropout=0.1)
    logged = LoggedRecords()
    trainer = Trainer(model, args, train_dataset=data, eval_dataset=data[:8], callbacks=[logged])
    trainer.train()
    logs = [r for r in logged.records if "loss" in r]
    assert logs[-1]["compile_compiles"] >= 1  # it really compiled
    # evaluation (dropout off) compiles its own variant, announced as expected; nothing else
    assert all(r["compile_unexpected_compiles_after_warmup"] == 0 for r in logs)
    assert logs[-1]["compile_recompiles_after_warmup"] <= 1
    lrs = [r["learning_rate"] for r in logs]
    assert lrs[0] != lrs[1]  # the LR did change between logs without recompiling
    assert getattr(model.transformer.h[0], "_compiled_call_impl", None) is not None  # per block


@pytest.mark.slow
def test_dynamic_padding_compiles_a_bounded_number_of_times(tmp_path):
    """A padding collator gives a new sequence length almost every step; per-block compile
    with static shapes compiled one graph per length until Dynamo's recompile limit (then
    ran eager). The Trainer switches the blocks to dynamic lengths at the first change."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    data = token_examples(64, ragged=True, seed=5)  # lengths 4..16, padded per batch
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=14, per_device_train_batch_size=2,
                             logging_steps=7, save_strategy="no", torch_compile=True, disable_tqdm=True,
                             report_to="none", torch_compile_backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    model = tiny_gpt(seed=2)
    trainer = Trainer(model, args, train_dataset=data)
    lengths = set()
    collate = trainer._collate
    trainer._collate = lambda features: (lambda b: (lengths.add(b["input_ids"].shape[1]), b)[1])(collate(features))
    trainer.train()
    assert len(lengths) >= 6  # the data really varied
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 3, graphs  # static first graph + one dynamic (+ the last partial batch at most)
    assert model._fasttrain_compile_kwargs["dynamic"] is None
