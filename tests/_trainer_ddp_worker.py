"""The Trainer under torchrun, for tests/test_trainer_ddp.py.

    torchrun --nproc-per-node 2 -m tests._trainer_ddp_worker OUT BACKEND
Rank 0 writes OUT/result.pt: final weights, the eval metrics and how many examples
compute_metrics saw.
"""
import os
import signal
import sys

import torch

from fasttrain import Trainer, TrainerCallback, TrainingArguments


class SigtermRank0At(TrainerCallback):
    """A real SIGTERM, delivered to rank 0 only, at the end of `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGTERM)
from tests._tiny import tiny_gpt, token_examples


class Regression(torch.nn.Module):
    """A model without labels in its batch: it returns its own mean loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)}


def main_nolabels(out):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(4, generator=g), "y": torch.randn((), generator=g)} for _ in range(16)]
    args = TrainingArguments(output_dir=os.path.join(out, "run"), max_steps=3,
                             per_device_train_batch_size=4 // world, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             disable_tqdm=True, report_to="none", seed=5)
    trainer = Trainer(Regression(), args, train_dataset=data)
    trainer.train()
    if trainer.dist.rank == 0:
        torch.save({"weights": trainer.model.state_dict(),
                    "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]},
                   os.path.join(out, "result.pt"))
    return 0


def main():
    out, backend = sys.argv[1], sys.argv[2]
    if backend == "nolabels":
        return main_nolabels(out)
    sigterm = len(sys.argv) > 3 and sys.argv[3] == "sigterm"
    torch.set_num_threads(1)
    seen = {}

    def metrics(p):
        seen["n"] = len(p.label_ids)
        seen["first_labels"] = p.label_ids[:, 0].tolist()
        return {"n": len(p.label_ids)}

    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(output_dir=os.path.join(out, "run"), max_steps=4,
                             per_device_train_batch_size=4 // world, gradient_accumulation_steps=2,
                             learning_rate=1e-2, optim="adamw_torch", save_strategy="steps", save_steps=4,
                             logging_steps=1, disable_tqdm=True, report_to="none", ddp_backend=backend,
                             seed=5, per_device_eval_batch_size=3)
    data = token_examples(32, ragged=True, seed=8)
    trainer = Trainer(tiny_gpt(seed=2), args, train_dataset=data, eval_dataset=data[:11],
                      compute_metrics=metrics, callbacks=[SigtermRank0At(1)] if sigterm else None)
    if sigterm:
        trainer.args.logging_steps = 2  # ranks agree on stopping at logging steps
    trainer.train()
    ev = trainer.evaluate()
    full_seen = dict(seen)  # what the full evaluation showed compute_metrics
    one = trainer.evaluate(data[:1])  # fewer examples than ranks: rank 1's shard is empty
    if trainer.dist.rank == 0:
        torch.save({"weights": trainer.model.state_dict(), "eval": ev, "seen": full_seen,
                    "global_step": trainer.state.global_step, "eval_one": one,
                    "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]},
                   os.path.join(out, "result.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
