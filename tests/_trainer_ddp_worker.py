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


def main():
    out, backend = sys.argv[1], sys.argv[2]
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
    if trainer.dist.rank == 0:
        torch.save({"weights": trainer.model.state_dict(), "eval": ev, "seen": seen,
                    "global_step": trainer.state.global_step,
                    "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]},
                   os.path.join(out, "result.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
