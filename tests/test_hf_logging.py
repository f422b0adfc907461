"""HF's logging_nan_inf_filter, with transformers' Trainer running the same lines as the oracle:
on, no logged training loss is NaN/inf (not even a window whose every step was non-finite);
off, the non-finite losses reach the log."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402


class GoesNonFinite(torch.nn.Module):
    """A regression whose loss is NaN from the third forward on (steps 3.. of a run)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.forwards = 0

    def forward(self, x, labels=None):
        pred = self.linear(x).squeeze(-1)
        if labels is None:
            return {"logits": pred}
        self.forwards += self.training
        loss = ((pred - labels) ** 2).mean()
        if self.forwards > 2:
            loss = loss * float("nan")
        return {"loss": loss, "logits": pred}


def data(n=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "labels": x[i].sum()} for i in range(n)]


def run(lib, out, nan_inf_filter):
    torch.manual_seed(0)
    args = lib.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, logging_steps=2,
                                 logging_nan_inf_filter=nan_inf_filter, learning_rate=0.01,
                                 report_to="none", disable_tqdm=True, save_strategy="no")
    trainer = lib.Trainer(GoesNonFinite(), args, train_dataset=data())
    result = trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], result.training_loss


def _finite(values):
    return all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("nan_inf_filter", [True, False])
def test_logged_losses_are_finite_exactly_when_hf_s_are(tmp_path, nan_inf_filter):
    hf_losses, hf_train_loss = run(transformers, tmp_path / "hf", nan_inf_filter)
    ft_losses, ft_train_loss = run(fasttrain, tmp_path / "ft", nan_inf_filter)
    assert len(ft_losses) == len(hf_losses) == 3  # windows: steps 1-2, 3-4 (all NaN), 5-6 (all NaN)
    assert _finite(ft_losses) == _finite(hf_losses) == nan_inf_filter
    assert math.isfinite(ft_train_loss) == math.isfinite(hf_train_loss) == nan_inf_filter
    # steps 1-2 were finite in both: the same first record
    assert ft_losses[0] == pytest.approx(hf_losses[0], rel=1e-5)


def test_an_all_non_finite_window_logs_the_mean_of_the_earlier_ones(tmp_path):
    losses, train_loss = run(fasttrain, tmp_path, nan_inf_filter=True)
    # HF substitutes, per non-finite step, the average of the losses before it; fasttrain keeps
    # the window's finite steps and, when there is none, the mean logged so far
    assert losses[1] == losses[0] and losses[2] == pytest.approx(losses[0])
    assert train_loss == pytest.approx(losses[0])


class SeesLogs(fasttrain.TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _regression(out, resume=None, seen=None):
    torch.manual_seed(0)
    args = fasttrain.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=6,
                                       logging_steps=2, save_steps=2, learning_rate=0.01, disable_tqdm=True)
    model = GoesNonFinite()
    model.forwards = -100  # finite throughout: the loss turns NaN only after 100 more forwards
    trainer = fasttrain.Trainer(model, args, train_dataset=data(), callbacks=[seen] if seen else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _jsonl(out):
    import json
    with open(out / "log_history.jsonl") as f:
        return [json.loads(line) for line in f]


def test_measurements_reach_callbacks_and_log_file_but_not_log_history(tmp_path):
    """HF's log_history holds HF's keys only, so a resumed run's history equals the
    uninterrupted one's key for key (HF's test_can_resume_training, minus its four end-of-run
    keys); the timings still reach on_log and log_history.jsonl, also across the resume."""
    seen = SeesLogs()
    full = _regression(tmp_path / "full", seen=seen)
    training = [r for r in full.state.log_history if "loss" in r]
    assert len(training) == 3
    assert not any("tokens_per_second" in r or "step_time_p50" in r for r in full.state.log_history)
    assert all("tokens_per_second" in logs for logs in seen.logs if "loss" in logs)
    assert sum("loss" in logs for logs in seen.logs) == 3

    # interrupted at step 4 (its checkpoint-4 and log file as a crash leaves them), then resumed
    import shutil
    partial = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", partial)
    shutil.rmtree(partial / "checkpoint-6")
    resumed = _regression(partial, resume=str(partial / "checkpoint-4"))
    end_keys = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
    strip = lambda history: [{k: v for k, v in r.items() if k not in end_keys} for r in history]
    assert strip(resumed.state.log_history) == strip(full.state.log_history)

    lines = _jsonl(partial)
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6]
    assert all("tokens_per_second" in r for r in lines if "loss" in r)  # kept before the checkpoint too
    before = [r for r in _jsonl(tmp_path / "full") if "loss" in r][:2]
    assert [r for r in lines if "loss" in r][:2] == before  # the file's own records, not re-derived
