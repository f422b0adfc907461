"""HF's saving contract: save_model() keeps the tokenizer, PEFT checkpoints hold only the
adapter, and a run either trainer checkpointed resumes in the other (weights_only loads)."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import fasttrain  # noqa: E402
from tests.test_hf_scripts import corpus, tiny_gpt2, tokenizer  # noqa: E402,F401 (fixture)
from tests._tiny import assert_same_logged_losses  # noqa: E402


def lm_data(tok, n=48, seed=7):
    return datasets.Dataset.from_dict({"text": corpus(n, seed=seed)}).map(
        lambda e: tok(e["text"], truncation=True, max_length=16, padding="max_length"),
        batched=True, remove_columns=["text"]).map(lambda e: {"labels": e["input_ids"]})


def _args(lib, out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
                save_strategy="steps", save_steps=4, logging_steps=2, report_to="none", disable_tqdm=True,
                seed=0, lr_scheduler_type="linear")
    base.update(kw)
    return lib.TrainingArguments(**base)


class StopAt(fasttrain.TrainerCallback, transformers.TrainerCallback):
    """The job dies right after step `n`'s checkpoint (either trainer)."""

    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            control.should_training_stop = True


class Snapshot(fasttrain.TrainerCallback, transformers.TrainerCallback):
    """What the resumed run starts from: its weights, LR and step at on_train_begin/first step."""

    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.seen.setdefault("first_step", state.global_step)
        self.seen.setdefault("lr", lr_scheduler.get_last_lr()[0])


def test_save_model_keeps_the_tokenizer(tokenizer, tmp_path):
    trainer = fasttrain.Trainer(tiny_gpt2(len(tokenizer)), _args(fasttrain, tmp_path), processing_class=tokenizer)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "final"))
    text = "the good film was not bad"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in reloaded(text)["input_ids"]
    assert (tmp_path / "final" / "training_args.bin").exists()


def test_peft_checkpoint_holds_only_the_adapter_and_resumes(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        return peft.get_peft_model(tiny_gpt2(len(tokenizer)), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM", fan_in_fan_out=True))

    data = lm_data(tokenizer)
    full = fasttrain.Trainer(lora(), _args(fasttrain, tmp_path / "full"), train_dataset=data)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-8"
    names = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names and "model.safetensors" not in names
    assert os.path.getsize(ckpt / "adapter_model.safetensors") < 64 * 1024
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(len(tokenizer)), str(ckpt))
    ids = torch.tensor([data[0]["input_ids"]])
    full.model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, full.model(input_ids=ids).logits)
    # exact resume of an adapter-only checkpoint
    part = fasttrain.Trainer(lora(), _args(fasttrain, tmp_path / "part"), train_dataset=data, callbacks=[StopAt(4)])
    part.train()
    resumed = fasttrain.Trainer(lora(), _args(fasttrain, tmp_path / "part"), train_dataset=data)
    resumed.train(resume_from_checkpoint=True)

    assert_same_logged_losses(resumed, full)


def test_fasttrain_resumes_a_run_hf_started(tokenizer, tmp_path):
    data = lm_data(tokenizer)
    hf = transformers.Trainer(tiny_gpt2(len(tokenizer)), _args(transformers, tmp_path / "run"),
                              train_dataset=data, callbacks=[StopAt(4)])
    hf.train()
    hf_ckpt = tmp_path / "run" / "checkpoint-4"
    expected_weights = {k: v.detach().clone() for k, v in hf.model.state_dict().items()}
    expected_lr5 = {}

    class LR(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            expected_lr5.setdefault(state.global_step, lr_scheduler.get_last_lr()[0])

    hf_full = transformers.Trainer(tiny_gpt2(len(tokenizer)), _args(transformers, tmp_path / "hf_full"),
                                   train_dataset=data, callbacks=[LR()])
    hf_full.train()
    snap = Snapshot()
    ours = fasttrain.Trainer(tiny_gpt2(len(tokenizer), seed=5), _args(fasttrain, tmp_path / "run"),
                             train_dataset=data, callbacks=[snap])
    ours.train(resume_from_checkpoint=True)  # finds HF's checkpoint-4 (no fasttrain manifest)
    for name, value in expected_weights.items():
        torch.testing.assert_close(snap.seen["weights"][name], value, rtol=0, atol=0, msg=name)
    assert snap.seen["first_step"] == 5 and ours.state.global_step == 8
    assert snap.seen["lr"] == pytest.approx(expected_lr5[5], rel=1e-6)  # the schedule continues
    assert [r["step"] for r in ours.state.log_history if "loss" in r] == [2, 4, 6, 8]  # HF's history kept
    assert os.path.isdir(hf_ckpt)


def test_hf_resumes_a_run_fasttrain_started(tokenizer, tmp_path):
    data = lm_data(tokenizer)
    ours = fasttrain.Trainer(tiny_gpt2(len(tokenizer)), _args(fasttrain, tmp_path / "run"),
                             train_dataset=data, callbacks=[StopAt(4)])
    ours.train()
    ckpt = tmp_path / "run" / "checkpoint-4"
    for name in ("rng_state.pth", "optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"):
        assert (ckpt / name).exists(), name
    expected = {k: v.detach().clone() for k, v in ours.model.state_dict().items()}
    snap = Snapshot()
    hf = transformers.Trainer(tiny_gpt2(len(tokenizer), seed=5), _args(transformers, tmp_path / "hf"),
                              train_dataset=data, callbacks=[snap])
    hf.train(resume_from_checkpoint=str(ckpt))
    for name, value in expected.items():
        torch.testing.assert_close(snap.seen["weights"][name], value, rtol=0, atol=0, msg=name)
    assert snap.seen["first_step"] == 5 and hf.state.global_step == 8
    assert snap.seen["lr"] == pytest.approx(1e-2 * (8 - 5) / 8, rel=1e-6)  # linear decay continues


@pytest.mark.parametrize("resume, phrase", [("bogus", "Can't find a valid checkpoint at"),
                                            (True, "No valid checkpoint found in output directory")])
def test_a_resume_with_nothing_to_resume_fails_with_hf_s_words(tmp_path, resume, phrase):
    """Scripts and HF's own tests match these phrases: both trainers raise them, before any
    step, and fasttrain's message also says what to pass instead."""
    data = [{"x": torch.randn(3), "labels": torch.tensor(1.0)} for _ in range(8)]
    errors = {}
    for lib in (transformers, fasttrain):
        out = tmp_path / lib.__name__
        target = str(tmp_path / "no-such-checkpoint") if resume == "bogus" else resume
        model = torch.nn.Linear(3, 1)
        before = model.weight.detach().clone()
        trainer = lib.Trainer(_RegressionOnX(model), _args(lib, out), train_dataset=data)
        with pytest.raises(Exception) as info:
            trainer.train(resume_from_checkpoint=target)
        errors[lib.__name__] = str(info.value)
        assert torch.equal(model.weight, before)
    assert phrase in errors["transformers"] and phrase in errors["fasttrain"]
    assert "resume_from_checkpoint" in errors["fasttrain"] or "checkpoint path" in errors["fasttrain"]


class _RegressionOnX(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x, labels=None):
        pred = self.linear(x).squeeze(-1)
        return {"loss": ((pred - labels) ** 2).mean(), "logits": pred}


class _SeesSamples(torch.nn.Module):
    """Records which samples (by their id feature) each training forward received."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.batches = []

    def forward(self, x, labels=None):
        if self.training:
            self.batches.append(x[:, 0].long().tolist())
        pred = self.linear(x).squeeze(-1)
        return {"loss": ((pred - labels) ** 2).mean(), "logits": pred}


def test_resume_with_a_larger_batch_continues_at_the_next_boundary(tmp_path, caplog):
    """HF's regression test for transformers#43708 resumes a batch-2 checkpoint at batch 4: the
    new size is used. 2 consumed samples are not a multiple of 4, so the run resumes at sample
    4 of the same global order (samples 2-3 skipped, none repeated) and warns with the numbers."""
    data = [{"x": torch.tensor([float(i)]), "labels": torch.tensor(float(i))} for i in range(16)]

    def trainer(out, batch, steps, model):
        return fasttrain.Trainer(model, _args(fasttrain, out, per_device_train_batch_size=batch, max_steps=steps,
                                              save_steps=1, lr_scheduler_type="constant"), train_dataset=data)

    trainer(tmp_path / "run", 2, 2, _SeesSamples()).train()
    reference = _SeesSamples()
    trainer(tmp_path / "reference", 4, 4, reference).train()  # the epoch's order in batches of 4
    resumed = _SeesSamples()
    t = trainer(tmp_path / "run", 4, 4, resumed)
    with caplog.at_level("WARNING", logger="fasttrain"):
        t.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert t._train_batch_size == 4
    assert resumed.batches == reference.batches[1:]  # batches of 4, from sample 4 of the order on
    assert sum(len(b) for b in resumed.batches) == 12
    warning = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warning) == 1 and "resuming at sample 4, so 2 samples" in warning[0]
