"""The Trainer methods HF scripts and subclasses rely on, each against transformers' own
Trainer running the same lines."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402
from tests._tiny import Classifier  # noqa: E402


def class_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0.4).long()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _args(lib, out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=3,
                report_to="none", disable_tqdm=True, save_strategy="no", max_steps=3, learning_rate=0.1)
    base.update(kw)
    return lib.TrainingArguments(**base)


def weighted_trainer(lib):
    class WeightedLossTrainer(lib.Trainer):
        """The class-weighted loss of HF's documentation example."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            weight = torch.tensor([1.0, 3.0])
            loss = torch.nn.functional.cross_entropy(outputs["logits"], labels, weight=weight)
            return (loss, outputs) if return_outputs else loss
    return WeightedLossTrainer


def test_compute_loss_override_is_the_evaluation_loss_as_in_hf(tmp_path):
    results = {}
    for lib in (transformers, fasttrain):
        trainer = weighted_trainer(lib)(Classifier(), _args(lib, tmp_path / lib.__name__),
                                        eval_dataset=class_data(7, seed=3))
        results[lib.__name__] = trainer.evaluate()["eval_loss"]
    plain = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path / "plain"),
                              eval_dataset=class_data(7, seed=3)).evaluate()["eval_loss"]
    assert results["fasttrain"] == pytest.approx(results["transformers"], rel=1e-6)
    assert abs(plain - results["fasttrain"]) > 1e-3  # the override really changes the number


def test_get_eval_dataloader_returns_a_dataloader_a_subclass_may_replace(tmp_path):
    batches = {}

    class Counter(fasttrain.TrainerCallback):
        def on_prediction_step(self, args, state, control, **kwargs):
            batches["n"] = batches.get("n", 0) + 1

    class OwnLoader(fasttrain.Trainer):
        def get_eval_dataloader(self, eval_dataset=None):
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            return DataLoader(dataset, batch_size=1, collate_fn=self.data_collator)

    plain = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path / "a"), eval_dataset=class_data(5))
    assert isinstance(plain.get_eval_dataloader(), DataLoader)
    assert isinstance(plain.get_test_dataloader(class_data(4)), DataLoader)
    trainer = OwnLoader(Classifier(), _args(fasttrain, tmp_path / "b"), eval_dataset=class_data(5),
                        callbacks=[Counter])
    metrics = trainer.evaluate()
    assert batches["n"] == 5 and metrics["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)
    named = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path / "c"),
                              eval_dataset={"dev": class_data(5), "test": class_data(4, seed=2)})
    assert len(named.get_eval_dataloader("test").dataset) == 4
    assert {"eval_dev_loss", "eval_test_loss"} <= set(named.evaluate())


def test_script_helpers_match_hf(tmp_path, capsys):
    out = {}
    for lib in (transformers, fasttrain):
        d = tmp_path / lib.__name__
        trainer = lib.Trainer(Classifier(), _args(lib, d), train_dataset=class_data(12),
                              eval_dataset=class_data(6, seed=1))
        result = trainer.train()
        metrics = dict(result.metrics, train_samples=12)
        capsys.readouterr()
        trainer.log_metrics("train", metrics)
        printed = capsys.readouterr().out.splitlines()
        trainer.save_metrics("train", metrics)
        trainer.save_metrics("eval", {"eval_loss": 0.5})
        trainer.save_state()
        batch = next(iter(trainer.get_train_dataloader()))
        out[lib.__name__] = dict(
            header=printed[0], keys=[line.split("=")[0].strip() for line in printed[1:]],
            files=sorted(p.name for p in d.iterdir() if p.suffix == ".json"),
            all_results=set(json.loads((d / "all_results.json").read_text())),
            state_keys=set(json.loads((d / "trainer_state.json").read_text())),
            world=trainer.is_world_process_zero(), local=trainer.is_local_process_zero(),
            n=trainer.num_examples(trainer.get_eval_dataloader()),
            params=trainer.get_num_trainable_parameters(), flops=trainer.floating_point_ops(batch))
    ft, hf = out["fasttrain"], out["transformers"]
    assert ft["header"] == hf["header"] == "***** train metrics *****"
    assert set(hf["keys"]) <= set(ft["keys"]) and hf["all_results"] <= ft["all_results"]
    assert {"all_results.json", "train_results.json", "eval_results.json", "trainer_state.json"} <= set(ft["files"])
    assert hf["state_keys"] <= ft["state_keys"]
    loaded = transformers.TrainerState.load_from_json(str(tmp_path / "fasttrain" / "trainer_state.json"))
    assert loaded.global_step == 3 and loaded.stateful_callbacks["TrainerControl"]["args"]
    for key in ("world", "local", "n", "params", "flops"):
        assert ft[key] == hf[key], key


def test_floating_point_ops_uses_the_models_own_count(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    inputs = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    ours = fasttrain.Trainer(model, _args(fasttrain, tmp_path / "ft")).floating_point_ops(inputs)
    theirs = transformers.Trainer(model, _args(transformers, tmp_path / "hf")).floating_point_ops(inputs)
    assert ours == theirs == 6 * 16 * model.num_parameters(exclude_embeddings=True)


def test_compute_loss_override_with_accumulation_is_normalised_as_hf(tmp_path):
    """An override returning a per-batch mean on a model without loss kwargs: HF divides it
    by the accumulation steps. lr=0 and one log per epoch make the number order-independent."""
    logged = {}
    for lib in (transformers, fasttrain):
        args = _args(lib, tmp_path / lib.__name__, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=-1, num_train_epochs=1, logging_steps=3, learning_rate=0.0)
        trainer = weighted_trainer(lib)(Classifier(), args, train_dataset=class_data(12))
        trainer.train()
        logged[lib.__name__] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert logged["fasttrain"] == pytest.approx(logged["transformers"], rel=1e-5)
    assert len(logged["fasttrain"]) == 1


def recording_trainer(lib):
    class Recording(lib.Trainer):
        """Overrides HF's evaluation-during-training hook and sees what train() hands it."""

        def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler=False):
            metrics = super()._evaluate(trial, ignore_keys_for_eval, skip_scheduler)
            self.calls.append((self.state.global_step, trial, ignore_keys_for_eval, round(metrics["eval_loss"], 5)))
            metrics["eval_made_up"] = float(self.state.global_step)  # what the override returns counts
            return metrics

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            self.ignore_keys_seen.append(ignore_keys)
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
    return Recording


def test_train_takes_hfs_arguments_and_evaluates_through_the_overridable_evaluate(tmp_path):
    """train(ignore_keys_for_eval=...) reaches every evaluation during training, each through
    `_evaluate(trial, ignore_keys_for_eval)`, whose returned metrics pick the best checkpoint:
    the same calls and the same best step as transformers' Trainer on the same lines."""
    seen = {}
    for lib in (transformers, fasttrain):
        trainer = recording_trainer(lib)(
            Classifier(), _args(lib, tmp_path / lib.__name__, max_steps=6, eval_strategy="steps", eval_steps=2,
                                save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                                metric_for_best_model="made_up", greater_is_better=False),
            train_dataset=class_data(32), eval_dataset=class_data(7, seed=3))
        trainer.calls, trainer.ignore_keys_seen = [], []
        trainer.train(ignore_keys_for_eval=["hidden"])
        seen[lib.__name__] = (trainer.calls, trainer.ignore_keys_seen, trainer.state.best_model_checkpoint)
    calls, ignore_keys, best = seen["fasttrain"]
    assert [c[:3] for c in calls] == [(2, None, ["hidden"]), (4, None, ["hidden"]), (6, None, ["hidden"])]
    assert ignore_keys == [["hidden"]] * 3
    assert best.endswith("checkpoint-2")  # the override's made-up metric, lowest at step 2
    hf_calls, hf_ignore_keys, hf_best = seen["transformers"]
    assert [c[:3] for c in hf_calls] == [c[:3] for c in calls] and hf_ignore_keys == ignore_keys
    assert hf_best.endswith("checkpoint-2")
    assert [c[3] for c in calls] == pytest.approx([c[3] for c in hf_calls], rel=1e-4)


def test_eval_on_start_goes_through_evaluate_too_as_in_hf(tmp_path):
    seen = {}
    for lib in (transformers, fasttrain):
        trainer = recording_trainer(lib)(
            Classifier(), _args(lib, tmp_path / lib.__name__, max_steps=2, eval_strategy="steps", eval_steps=2,
                                eval_on_start=True),
            train_dataset=class_data(16), eval_dataset=class_data(7, seed=3))
        trainer.calls, trainer.ignore_keys_seen = [], []
        trainer.train(ignore_keys_for_eval=["hidden"])
        seen[lib.__name__] = [c[:3] for c in trainer.calls]
    assert seen["fasttrain"] == [(0, None, ["hidden"]), (2, None, ["hidden"])] == seen["transformers"]


def test_train_refuses_a_trial_and_unknown_arguments_by_name(tmp_path):
    trainer = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path), train_dataset=class_data(8))
    with pytest.raises(ValueError, match="hyperparameter"):
        trainer.train(trial={"learning_rate": 0.1})
    with pytest.raises(TypeError, match=r"unexpected arguments \['model_path'\]"):
        trainer.train(model_path="x")
    assert not (tmp_path / "checkpoint-1").exists()  # refused before any training


def hf_style_optimizer_trainer(lib):
    class OwnGroups(lib.Trainer):
        """create_optimizer overridden the way subclasses copy it from HF: decay names and the
        optimizer class from the Trainer's helpers, a second LR for the last layer."""

        def create_optimizer(self, model=None):
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay and not n.startswith("out")],
                       "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                      {"params": [p for n, p in named if n in decay and n.startswith("out")],
                       "weight_decay": self.args.weight_decay, "lr": self.args.learning_rate / 10}]
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = cls(groups, **kwargs)
            return self.optimizer
    return OwnGroups


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "sgd"])
def test_an_hf_style_create_optimizer_trains_as_in_hf(tmp_path, optim):
    final = {}
    for lib in (transformers, fasttrain):
        torch.manual_seed(0)
        model = Classifier()
        trainer = hf_style_optimizer_trainer(lib)(
            model, _args(lib, tmp_path / lib.__name__, max_steps=5, weight_decay=0.1, optim=optim,
                         lr_scheduler_type="constant", max_grad_norm=0.0),
            train_dataset=class_data(40))
        trainer.train()
        final[lib.__name__] = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert len(trainer.optimizer.param_groups) == 3
    hf, ft = final["transformers"], final["fasttrain"]
    assert hf.keys() == ft.keys()
    for name in hf:
        torch.testing.assert_close(ft[name], hf[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(0)
    untrained = Classifier()
    assert any((untrained.state_dict()[n] - ft[n]).abs().max() > 1e-3 for n in ft)  # it trained


def test_decay_parameter_names_follow_hfs_rule_on_a_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(output_dir="unused", report_to="none")
    hf = transformers.Trainer(model, args).get_decay_parameter_names(model)
    ft_args = fasttrain.TrainingArguments(output_dir="unused", report_to="none")
    ft = fasttrain.Trainer(model, ft_args).get_decay_parameter_names(model)
    assert ft == hf
    assert "transformer.h.0.attn.c_attn.weight" in ft and "transformer.h.0.ln_1.weight" not in ft
    assert not any("bias" in n for n in ft)


def test_the_small_hf_helpers_answer_as_hfs(tmp_path):
    out = {}
    for lib in (transformers, fasttrain):
        trainer = lib.Trainer(Classifier(), _args(lib, tmp_path / lib.__name__, gradient_accumulation_steps=3,
                                                  include_num_input_tokens_seen="all"),
                              train_dataset=class_data(12))
        trainer.train()  # HF's log(logs, start_time) needs a run's token count
        with trainer.compute_loss_context_manager():
            pass
        flos = trainer.state.total_flos
        trainer.store_flos()
        assert trainer.state.total_flos == flos  # nothing pending after train()
        logs = {"loss": 1.0}
        trainer.log(logs, start_time=__import__("time").time() - 2.0)
        out[lib.__name__] = (trainer.get_total_train_batch_size(trainer.args), sorted(logs))
        trainer.save_model(str(tmp_path / lib.__name__ / "model"), _internal_call=True)
        assert (tmp_path / lib.__name__ / "model" / "model.safetensors").exists()
    assert out["fasttrain"][0] == out["transformers"][0] == 12
    assert out["fasttrain"][1] == out["transformers"][1]
    assert "train_runtime" in out["fasttrain"][1]


def hf_style_step_trainer(lib):
    class ManualDecay(lib.Trainer):
        """training_step overridden as research code does: HF's signature, super()'s forward and
        backward, then a hand-made change to the gradients of every micro-batch."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append((sorted(inputs), num_items_in_batch is None))
            loss = super().training_step(model, inputs, num_items_in_batch)
            with torch.no_grad():
                for p in model.parameters():
                    p.grad.add_(p, alpha=0.05)
            return loss
    return ManualDecay


@pytest.mark.parametrize("accumulation", [1, 2])
def test_an_hf_style_training_step_override_runs_every_micro_batch_as_in_hf(tmp_path, accumulation):
    final, logged, seen = {}, {}, {}
    for lib in (transformers, fasttrain):
        model = Classifier()
        trainer = hf_style_step_trainer(lib)(
            model, _args(lib, tmp_path / lib.__name__, max_steps=4, gradient_accumulation_steps=accumulation,
                         lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1),
            train_dataset=class_data(64))
        trainer.seen = []
        trainer.train()
        final[lib.__name__] = {n: p.detach().clone() for n, p in model.named_parameters()}
        logged[lib.__name__] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        seen[lib.__name__] = trainer.seen
    assert len(seen["fasttrain"]) == 4 * accumulation  # once per micro-batch
    assert seen["fasttrain"] == seen["transformers"]
    for name, weight in final["transformers"].items():
        torch.testing.assert_close(final["fasttrain"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert logged["fasttrain"] == pytest.approx(logged["transformers"], rel=1e-4)
    plain = Classifier()
    fasttrain.Trainer(plain, _args(fasttrain, tmp_path / "plain", max_steps=4, gradient_accumulation_steps=accumulation,
                                   lr_scheduler_type="constant", max_grad_norm=0.0),
                      train_dataset=class_data(64)).train()
    assert (plain.linear.weight - final["fasttrain"]["linear.weight"]).abs().max() > 1e-3  # the override acted


def test_training_step_called_directly_does_one_micro_batch_as_in_hf(tmp_path):
    grads, losses = {}, {}
    for lib in (transformers, fasttrain):
        model = Classifier()
        trainer = lib.Trainer(model, _args(lib, tmp_path / lib.__name__, gradient_accumulation_steps=2))
        if lib is transformers:
            trainer.current_gradient_accumulation_steps = 2  # HF sets it in train(); it divides by it
        batch = {"x": torch.stack([e["x"] for e in class_data(4)]),
                 "labels": torch.stack([e["labels"] for e in class_data(4)])}
        losses[lib.__name__] = trainer.training_step(model, batch).item()
        grads[lib.__name__] = model.linear.weight.grad.clone()
    assert losses["fasttrain"] == pytest.approx(losses["transformers"], rel=1e-6)
    torch.testing.assert_close(grads["fasttrain"], grads["transformers"])


def test_compute_loss_func_and_optimizer_cls_and_kwargs_train_as_in_hf(tmp_path):
    """Trainer(compute_loss_func=..., optimizer_cls_and_kwargs=...): HF 5's two constructor
    arguments, by keyword, train to HF's weights; the function sees HF's num_items_in_batch."""
    final, counts = {}, {}
    for lib in (transformers, fasttrain):
        model = Classifier()
        seen = []

        def summed_loss(outputs, labels, num_items_in_batch=None):
            seen.append(None if num_items_in_batch is None else int(num_items_in_batch))
            return torch.nn.functional.cross_entropy(outputs["logits"], labels, reduction="sum") / num_items_in_batch

        trainer = lib.Trainer(model, _args(lib, tmp_path / lib.__name__, max_steps=3, gradient_accumulation_steps=2,
                                           lr_scheduler_type="constant", max_grad_norm=0.0),
                              train_dataset=class_data(48), compute_loss_func=summed_loss,
                              optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}))
        trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # HF wraps it for accelerate
        assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
        final[lib.__name__] = model.linear.weight.detach().clone()
        counts[lib.__name__] = seen
    assert counts["fasttrain"] == counts["transformers"] == [8] * 6  # the step's 8 labels, each micro-batch
    torch.testing.assert_close(final["fasttrain"], final["transformers"], rtol=1e-5, atol=1e-6)
    assert (Classifier().linear.weight - final["fasttrain"]).abs().max() > 1e-2  # it trained


def test_both_optimizers_and_optimizer_cls_and_kwargs_are_refused(tmp_path):
    model = Classifier()
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        fasttrain.Trainer(model, _args(fasttrain, tmp_path), optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
                          optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))


def test_hfs_trainer_attributes_read_as_hfs(tmp_path):
    """The attributes callbacks and overrides copied from HF's methods read on the Trainer."""
    seen = {}
    for lib in (transformers, fasttrain):
        during = []

        class Watch(lib.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                during.append(trainer.is_in_train)

        trainer = lib.Trainer(Classifier(), _args(lib, tmp_path / lib.__name__, max_steps=2),
                              train_dataset=class_data(8), callbacks=[Watch()])
        before = trainer.is_in_train
        trainer.train()
        seen[lib.__name__] = (before, during, trainer.is_in_train, trainer.model_accepts_loss_kwargs,
                              trainer.label_names, trainer.is_deepspeed_enabled, trainer.is_fsdp_enabled,
                              trainer.place_model_on_device)
    assert seen["fasttrain"] == seen["transformers"] == (False, [True, True], False, False, ["labels"], False, False, True)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    assert fasttrain.Trainer(gpt2, _args(fasttrain, tmp_path / "g")).model_accepts_loss_kwargs is \
        transformers.Trainer(gpt2, _args(transformers, tmp_path / "h")).model_accepts_loss_kwargs is True


def test_the_label_smoother_gives_hfs_loss():
    from transformers.trainer_pt_utils import LabelSmoother as HFLabelSmoother
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    ours = fasttrain.Trainer(Classifier(), fasttrain.TrainingArguments(
        output_dir="unused", report_to="none", label_smoothing_factor=0.2)).label_smoother
    theirs = HFLabelSmoother(epsilon=0.2)
    for shift in (False, True):
        for items in (None, torch.tensor(40)):
            expected = theirs({"logits": logits}, labels, shift_labels=shift, num_items_in_batch=items)
            got = ours({"logits": logits}, labels, shift_labels=shift, num_items_in_batch=items)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    plain = fasttrain.Trainer(Classifier(), fasttrain.TrainingArguments(output_dir="unused", report_to="none"))
    assert plain.label_smoother is None


@pytest.mark.parametrize("schedule, kwargs", [("linear", {}), ("cosine", {}),
                                              ("cosine_with_min_lr", {"min_lr": 1e-5})])
def test_logged_and_reported_learning_rates_are_hfs_numbers(tmp_path, schedule, kwargs):
    """The schedule runs on the device in float32, but what is logged and reported is HF's
    float64 value: log_history's learning_rate, get_learning_rates(), get_last_lr()."""
    seen = {}
    for lib in (transformers, fasttrain):
        trainer = lib.Trainer(Classifier(), _args(lib, tmp_path / lib.__name__, max_steps=6, logging_steps=1,
                                                  learning_rate=0.2, warmup_steps=2, lr_scheduler_type=schedule,
                                                  lr_scheduler_kwargs=kwargs),
                              train_dataset=class_data(32))
        trainer.train()
        seen[lib.__name__] = ([h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h],
                              trainer.get_learning_rates(), trainer.lr_scheduler.get_last_lr())
    assert seen["fasttrain"] == seen["transformers"]  # exactly, not approximately; both of HF's groups
    assert len(seen["fasttrain"][1]) == 2
    assert seen["fasttrain"][0][2] == 0.2  # the peak after warm-up, as given


class KwargsClassifier(Classifier):
    """Classifier whose forward takes **kwargs: HF's test says it accepts loss kwargs."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


def test_model_accepts_loss_kwargs_can_be_set_as_hfs_test_helpers_do(tmp_path):
    """HF's own test helpers assign `trainer.model_accepts_loss_kwargs = False` (a model that
    returns a per-batch mean): the assignment holds, and an overridden compute_loss under
    accumulation is then divided by the micro-batches, as HF does (the model's **kwargs alone
    would say it is normalised over the step)."""
    logged = {}
    for lib in (transformers, fasttrain):
        args = _args(lib, tmp_path / lib.__name__, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=-1, num_train_epochs=1, logging_steps=3, learning_rate=0.0)
        trainer = weighted_trainer(lib)(KwargsClassifier(), args, train_dataset=class_data(12))
        assert trainer.model_accepts_loss_kwargs is True
        trainer.model_accepts_loss_kwargs = False
        assert trainer.model_accepts_loss_kwargs is False
        trainer.train()
        logged[lib.__name__] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert logged["fasttrain"] == pytest.approx(logged["transformers"], rel=1e-5)
    assert len(logged["fasttrain"]) == 1


class StreamOfExamples(torch.utils.data.IterableDataset):
    def __init__(self, examples):
        self.examples = examples

    def __iter__(self):
        return iter(self.examples)


def test_evaluate_and_predict_take_an_iterable_dataset_as_hf(tmp_path):
    results = {}
    for lib in (transformers, fasttrain):
        trainer = lib.Trainer(Classifier(), _args(lib, tmp_path / lib.__name__))
        data = StreamOfExamples(class_data(11, seed=4))
        metrics = trainer.evaluate(eval_dataset=data)
        predicted = trainer.predict(data)
        results[lib.__name__] = (metrics["eval_loss"], predicted.predictions, predicted.label_ids)
    ft, hf = results["fasttrain"], results["transformers"]
    assert ft[0] == pytest.approx(hf[0], rel=1e-6)
    assert ft[1].shape == hf[1].shape == (11, 2)
    torch.testing.assert_close(torch.as_tensor(ft[1]), torch.as_tensor(hf[1]))
    assert (ft[2] == hf[2]).all()


def test_a_metric_driven_scheduler_handed_in_steps_on_evaluations_as_hf(tmp_path):
    """torch's ReduceLROnPlateau through optimizers=: stepped with the evaluation metric (a
    flat one: halved after every evaluation past `patience`), never per optimizer step."""
    lrs = {}
    for lib in (transformers, fasttrain):
        model = Classifier()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the metric stays flat
        for group in optimizer.param_groups:
            group["lr"] = 0.4
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
        args = _args(lib, tmp_path / lib.__name__, max_steps=6, eval_strategy="steps", eval_steps=2,
                     metric_for_best_model="eval_loss", learning_rate=0.0)
        trainer = lib.Trainer(model, args, train_dataset=class_data(24), eval_dataset=class_data(6, seed=1),
                              optimizers=(optimizer, scheduler))
        for group in optimizer.param_groups:
            group["lr"] = 0.0  # lr 0: the weights and so the metric do not move
        trainer.train()
        lrs[lib.__name__] = [float(g["lr"]) for g in optimizer.param_groups] + [scheduler.num_bad_epochs]
    assert lrs["fasttrain"] == lrs["transformers"]


def test_learning_rates_and_schedule_helpers_see_hfs_float_before_any_schedule(tmp_path):
    """Right after create_optimizer, get_learning_rates() is HF's number (not a float32
    rounding), and HF's schedule helpers read the given float as the optimizer's base LR."""
    seen = {}
    for lib in (transformers, fasttrain):
        trainer = lib.Trainer(Classifier(), _args(lib, tmp_path / lib.__name__, learning_rate=5e-5))
        trainer.create_optimizer()
        seen[lib.__name__] = trainer.get_learning_rates()
        transformers.get_polynomial_decay_schedule_with_warmup(trainer.optimizer, 2, 10, lr_end=1e-5, power=5.0)
    assert seen["fasttrain"] == seen["transformers"] == [5e-05, 5e-05]


def test_a_logged_zero_d_tensor_lands_in_the_history_as_a_number(tmp_path):
    trainer = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path, learning_rate=0.1))
    trainer.log({"learning_rate": torch.tensor(0.25), "note": 1})
    assert trainer.state.log_history[-1]["learning_rate"] == 0.25
    assert isinstance(trainer.state.log_history[-1]["learning_rate"], float)


class MultiLabel(Classifier):
    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig(problem_type="multi_label_classification")


def test_label_smoothing_on_a_multi_label_model_warns_and_is_off_as_hf(tmp_path):
    import warnings
    for lib in (transformers, fasttrain):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = lib.Trainer(MultiLabel(), _args(lib, tmp_path / lib.__name__, label_smoothing_factor=0.1))
        assert any("Label smoothing is not compatible with multi-label classification" in str(w.message)
                   for w in caught), lib.__name__
        assert trainer.label_smoother is None


def test_label_smoother_can_be_switched_off_as_hfs_attribute(tmp_path):
    losses = {}
    for name, smoothing, off in (("smoothed", 0.2, False), ("switched_off", 0.2, True), ("plain", 0.0, False)):
        trainer = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path / name, label_smoothing_factor=smoothing),
                                    eval_dataset=class_data(7, seed=3))
        if off:
            trainer.label_smoother = None
        losses[name] = trainer.evaluate()["eval_loss"]
    assert losses["switched_off"] == pytest.approx(losses["plain"], rel=1e-6)
    assert abs(losses["smoothed"] - losses["plain"]) > 1e-3
    with pytest.raises(TypeError, match="label_smoother must be None or a LabelSmoother"):
        trainer.label_smoother = lambda outputs, labels: 0.0


def test_any_scheduler_whose_step_takes_a_metric_is_stepped_on_evaluations(tmp_path):
    """HF's GreedyLR or a user's own scheduler with step(metrics), handed in: it gets each
    evaluation's metric_for_best_model, never a bare per-step step()."""
    class Recorder:
        def __init__(self, optimizer):
            self.optimizer, self.seen = optimizer, []

        def step(self, metrics):
            self.seen.append(metrics)

        def state_dict(self):
            return {}

        def get_last_lr(self):
            return [g["lr"] for g in self.optimizer.param_groups]

    model = Classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = Recorder(optimizer)
    args = _args(fasttrain, tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, metric_for_best_model="eval_loss")
    trainer = fasttrain.Trainer(model, args, train_dataset=class_data(24), eval_dataset=class_data(6, seed=1),
                                optimizers=(optimizer, scheduler))
    trainer.train()
    evals = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    assert scheduler.seen == pytest.approx(evals) and len(evals) == 3


def test_resuming_with_other_step_arguments_says_the_checkpoints_win(tmp_path, caplog):
    """As HF's compare_trainer_and_checkpoint_args: logging/eval/save steps and the batch size
    come from trainer_state.json on resume, and a difference from the arguments is warned."""
    first = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path, max_steps=4, save_strategy="steps",
                                                  save_steps=2, logging_steps=1), train_dataset=class_data(40))
    first.train()
    again = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path, max_steps=4, save_strategy="steps",
                                                  save_steps=2, logging_steps=3), train_dataset=class_data(40))
    with caplog.at_level("WARNING", logger="fasttrain"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "logging_steps: 3 (from args) != 1 (from trainer_state.json)" in caplog.text
    assert "save_steps" not in caplog.text  # only what differs is named
    assert again.state.logging_steps == 1


def test_persistent_workers_keep_one_eval_loader_per_dataset_as_hf(tmp_path):
    data, other = class_data(8, seed=5), class_data(8, seed=6)
    kept = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path / "kept", dataloader_num_workers=1,
                                                 dataloader_persistent_workers=True), eval_dataset=data)
    assert kept.get_eval_dataloader() is kept.get_eval_dataloader()
    assert kept.get_eval_dataloader(other) is not kept.get_eval_dataloader()
    fresh = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path / "fresh"), eval_dataset=data)
    assert fresh.get_eval_dataloader() is not fresh.get_eval_dataloader()


def test_evaluation_keeps_every_example_under_dataloader_drop_last(tmp_path):
    """dataloader_drop_last drops training batches only: an eval set smaller than a batch is
    still evaluated whole (dropping it left 4-rank FSDP runs with no eval_loss at all)."""
    trainer = fasttrain.Trainer(Classifier(), _args(fasttrain, tmp_path, dataloader_drop_last=True,
                                                    per_device_eval_batch_size=5))
    out = trainer.predict(class_data(7, seed=2))
    assert out.predictions.shape == (7, 2) and "test_loss" in out.metrics
    assert "eval_loss" in trainer.evaluate(class_data(3, seed=2))
