"""HF arguments that act around the step, each against what transformers 5.24's Trainer does
with the same script: label smoothing, NEFTune, eval_on_start, include_num_input_tokens_seen,
restore_callback_states_from_checkpoint."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttrain import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from fasttrain.trainer import hf_options  # noqa: E402

VOCAB = 64


def _model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (4 + i % 5,), generator=g).tolist()), "labels": ids}
            for i in range(n)]


def _collate(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
    labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}


def _run(trainer_cls, args_cls, tmp_path, data=None, **kw):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=0.0, max_steps=1,
                    logging_steps=1, report_to="none", disable_tqdm=True, save_strategy="no")
    settings.update(kw)
    if args_cls is transformers.TrainingArguments:
        settings["use_cpu"] = True
    data = data or _data()
    trainer = trainer_cls(model=_model(), args=args_cls(**settings), data_collator=_collate,
                          train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    return trainer


def _losses(trainer):
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def test_label_smoothing_matches_hf(tmp_path):
    """The same smoothed loss sum as HF's LabelSmoother; HF 5.24 divides it by the labels
    counted before the causal shift (README: the loss difference), fasttrain by the tokens
    actually predicted."""
    batch = _collate(_data())
    predicted, unshifted = int((batch["labels"][:, 1:] != -100).sum()), int((batch["labels"] != -100).sum())
    hf = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", label_smoothing_factor=0.1)
    ours = _run(Trainer, TrainingArguments, tmp_path / "ours", label_smoothing_factor=0.1)
    plain = _run(Trainer, TrainingArguments, tmp_path / "plain")
    assert _losses(ours)[0] * predicted == pytest.approx(_losses(hf)[0] * unshifted, rel=1e-5)
    assert _losses(ours)[0] > _losses(plain)[0] + 1e-3  # smoothing changed the loss


def test_neftune_noise_is_hfs_and_only_while_training(tmp_path):
    from transformers.integrations.neftune import activate_neftune
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    outputs = []
    for activate in (lambda m: activate_neftune(m, 5.0), lambda m: hf_options.activate_neftune(m, 5.0)):
        model = _model()
        handle = activate(model)
        torch.manual_seed(7)
        outputs.append(model.get_input_embeddings()(ids))
        model.eval()
        assert torch.equal(model.get_input_embeddings()(ids), model.get_input_embeddings().weight[ids])
        handle.remove()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    clean = _model().get_input_embeddings().weight[ids]
    bound = 5.0 / (6 * 32) ** 0.5
    assert 0 < (outputs[1] - clean).abs().max() <= bound


def test_neftune_hook_removed_after_training(tmp_path):
    trainer = _run(Trainer, TrainingArguments, tmp_path, neftune_noise_alpha=5.0, learning_rate=1e-3)
    assert not trainer.model.get_input_embeddings()._forward_hooks
    with pytest.raises(ValueError, match="neftune_noise_alpha=5.0 needs a model with get_input_embeddings"):
        hf_options.activate_neftune(torch.nn.Linear(2, 2), 5.0)


def test_eval_on_start_evaluates_before_the_first_step(tmp_path):
    seen = []

    class Order(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            seen.append(("evaluate", state.global_step))

        def on_step_end(self, args, state, control, **kwargs):
            seen.append(("step", state.global_step))

    settings = dict(output_dir=str(tmp_path), max_steps=2, report_to="none", disable_tqdm=True,
                    save_strategy="no", eval_on_start=True)
    trainer = Trainer(model=_model(), args=TrainingArguments(**settings), data_collator=_collate,
                      train_dataset=_data(), eval_dataset=_data(4), callbacks=[Order()])
    trainer.train()
    assert seen[0] == ("evaluate", 0) and ("step", 1) in seen
    assert [r["step"] for r in trainer.state.log_history if "eval_loss" in r][0] == 0


@pytest.mark.parametrize("mode", ["all", "non_padding", True])
def test_num_input_tokens_seen_logged_as_hf(tmp_path, mode):
    kw = dict(include_num_input_tokens_seen=mode, max_steps=2, per_device_train_batch_size=4)
    hf = _run(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", **kw)
    ours = _run(Trainer, TrainingArguments, tmp_path / "ours", **kw)
    seen = [[r["num_input_tokens_seen"] for r in t.state.log_history if "loss" in r] for t in (hf, ours)]
    assert seen[1] == seen[0] and seen[0][0] < seen[0][1]


def test_no_tokens_seen_in_logs_by_default(tmp_path):
    ours = _run(Trainer, TrainingArguments, tmp_path)
    assert not any("num_input_tokens_seen" in r for r in ours.state.log_history)


@pytest.mark.parametrize("restore", [False, True])
def test_callback_states_restored_only_when_asked(tmp_path, restore):
    def trainer_for(max_steps):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=max_steps, eval_strategy="steps",
                                 eval_steps=1, save_strategy="steps", save_steps=1, report_to="none",
                                 disable_tqdm=True, metric_for_best_model="loss", load_best_model_at_end=True,
                                 restore_callback_states_from_checkpoint=restore, learning_rate=0.0)
        return Trainer(model=_model(), args=args, data_collator=_collate, train_dataset=_data(),
                       eval_dataset=_data(4), callbacks=[EarlyStoppingCallback(early_stopping_patience=5)])
    first = trainer_for(3)
    first.train()
    patience = next(c for c in first.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback))
    assert patience.early_stopping_patience_counter >= 1  # lr 0: the metric never improves
    resumed = trainer_for(3)  # resumed at its last step: no step runs, nothing is evaluated
    stopper = next(c for c in resumed.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert stopper.early_stopping_patience_counter == (patience.early_stopping_patience_counter if restore else 0)


def _evaluated(trainer_cls, args_cls, tmp_path, compute_metrics=None, **kw):
    settings = dict(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", disable_tqdm=True)
    settings.update(kw)
    if args_cls is transformers.TrainingArguments:
        settings["use_cpu"] = True
    return trainer_cls(model=_model(), args=args_cls(**settings), data_collator=_collate,
                       eval_dataset=_data(8), compute_metrics=compute_metrics)


def test_label_smoothed_eval_loss_matches_hf(tmp_path):
    """Evaluation smooths too, as HF's; one batch, so HF's count before the shift is the only
    difference (README)."""
    batch = _collate(_data(8))
    predicted, unshifted = int((batch["labels"][:, 1:] != -100).sum()), int((batch["labels"] != -100).sum())
    kw = dict(label_smoothing_factor=0.1, per_device_eval_batch_size=8)
    hf = _evaluated(transformers.Trainer, transformers.TrainingArguments, tmp_path / "hf", **kw)
    ours = _evaluated(Trainer, TrainingArguments, tmp_path / "ours", **kw)
    plain = _evaluated(Trainer, TrainingArguments, tmp_path / "plain", per_device_eval_batch_size=8)
    smoothed = ours.evaluate()["eval_loss"]
    assert smoothed * predicted == pytest.approx(hf.evaluate()["eval_loss"] * unshifted, rel=1e-5)
    assert smoothed > plain.evaluate()["eval_loss"] + 1e-3


def test_prediction_loss_only_as_hf(tmp_path):
    calls = []

    def metrics(pred):
        calls.append(pred)
        return {"n": 1.0}

    for cls, args_cls in ((transformers.Trainer, transformers.TrainingArguments), (Trainer, TrainingArguments)):
        trainer = _evaluated(cls, args_cls, tmp_path / cls.__module__, compute_metrics=metrics, prediction_loss_only=True)
        assert "eval_n" not in trainer.evaluate() and not calls
        assert trainer.predict(_data(4)).predictions is None


@pytest.mark.parametrize("flag,dtype", [("bf16_full_eval", torch.bfloat16), ("fp16_full_eval", torch.float16)])
def test_full_eval_casts_the_model_outside_training_as_hf(tmp_path, flag, dtype):
    for cls, args_cls in ((transformers.Trainer, transformers.TrainingArguments), (Trainer, TrainingArguments)):
        trainer = _evaluated(cls, args_cls, tmp_path / cls.__module__, **{flag: True})
        assert next(trainer.model.parameters()).dtype == torch.float32
        trainer.evaluate()
        assert next(trainer.model.parameters()).dtype == dtype, cls


def test_sequential_sampling_keeps_dataset_order(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), train_sampling_strategy="sequential", report_to="none")
    loader = Trainer(model=_model(), args=args, data_collator=_collate, train_dataset=_data(8)).get_train_dataloader()
    assert list(loader.sampler) == list(range(8))
    with pytest.raises(ValueError, match="train_sampling_strategy='batch_rebalance' is invalid: not supported"):
        TrainingArguments(train_sampling_strategy="batch_rebalance")


class _NanAtStep(TrainerCallback):
    """Makes the model's loss NaN on the given optimizer steps (its input embeddings return NaN)."""

    def __init__(self, model, steps):
        self.steps, self.now = steps, 0
        model.get_input_embeddings().register_forward_hook(
            lambda m, i, out: out * float("nan") if self.now in self.steps and m.training else out)

    def on_step_begin(self, args, state, control, **kwargs):
        self.now = state.global_step + 1


@pytest.mark.parametrize("nan_filter", [True, False])
def test_logging_nan_inf_filter_leaves_nonfinite_steps_out_of_the_logged_loss(tmp_path, nan_filter):
    def run(bad_steps, out):
        model = _model()
        args = TrainingArguments(output_dir=str(out), max_steps=4, logging_steps=4, per_device_train_batch_size=2,
                                 learning_rate=0.0, report_to="none", disable_tqdm=True, save_strategy="no",
                                 logging_nan_inf_filter=nan_filter, train_sampling_strategy="sequential")
        trainer = Trainer(model=model, args=args, data_collator=_collate, train_dataset=_data(8),
                          callbacks=[_NanAtStep(model, bad_steps)])
        trainer.train()
        return [r for r in trainer.state.log_history if "loss" in r][0]["loss"]

    with_nan = run({2}, tmp_path / "nan")
    if not nan_filter:
        assert with_nan != with_nan  # NaN, as before
        return
    # lr 0: every step's loss is the model's loss on its batch; the NaN step is left out
    per_step = []
    for s in (1, 3, 4):
        model = _model()
        batch = _collate(_data(8)[2 * (s - 1): 2 * s])
        with torch.no_grad():
            per_step.append(Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "x"),
                                                                        report_to="none"))
                            .compute_loss(model, batch).item())
    assert with_nan == pytest.approx(sum(per_step) / 3, rel=1e-5)


@pytest.mark.parametrize("ignore", [False, True])
def test_ignore_data_skip_restarts_the_epochs_data_on_resume(tmp_path, ignore):
    """HF: resuming mid-epoch skips the batches already seen, unless ignore_data_skip=True,
    which starts the saved epoch's data from its beginning (the step count is kept)."""
    seen = []

    def collate(features):
        seen.append(tuple(features[0]["input_ids"]))
        return _collate(features)

    def trainer(max_steps):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=max_steps, save_strategy="steps",
                                 save_steps=2, per_device_train_batch_size=1, report_to="none", disable_tqdm=True,
                                 ignore_data_skip=ignore, learning_rate=0.0)
        return Trainer(model=_model(), args=args, data_collator=collate, train_dataset=_data(8))
    trainer(4).train()
    first_run = list(seen)
    seen.clear()
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert seen[:2] == (first_run[:2] if ignore else first_run[2:4])
