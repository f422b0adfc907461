"""A training run in a child process, for kill/signal/resume tests.

    python -m tests._ckpt_worker OUTPUT_DIR MAX_STEPS [--resume] [--pause-at STEP]

With --pause-at, the run touches OUTPUT_DIR/../paused-<STEP> at the end of that step and
then sleeps, so the parent can deliver a real SIGKILL or SIGTERM at a known point.
Shuffling, dropout and gradient accumulation are all on, so any state the checkpoint
failed to restore would change the losses.
"""
import argparse
import os
import sys
import time

import torch

from fasttrain import Trainer, TrainerCallback, TrainingArguments
from tests._tiny import tiny_gpt, token_examples


class PauseAt(TrainerCallback):
    def __init__(self, step: int, marker_dir: str):
        self.step, self.marker_dir = step, marker_dir

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            open(os.path.join(self.marker_dir, f"paused-{self.step}"), "w").close()
            deadline = time.time() + 60  # the parent signals us well before this
            release = os.path.join(self.marker_dir, "sigterm-sent")
            while time.time() < deadline and not os.path.exists(release):
                time.sleep(0.05)


def build_trainer(output_dir: str, max_steps: int, extra=None, eval_dataset=None) -> Trainer:
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler_type="cosine",
        disable_tqdm=True, report_to="jsonl", seed=7, max_grad_norm=1.0,
        **{"warmup_steps": 2, "logging_steps": 1, "save_strategy": "steps", "save_steps": 3, **(extra or {})})
    return Trainer(tiny_gpt(seed=3, dropout=0.2), args, train_dataset=token_examples(24, seed=5),
                   eval_dataset=eval_dataset)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("max_steps", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--pause-at", type=int)
    ns = p.parse_args()
    torch.set_num_threads(1)
    trainer = build_trainer(ns.output_dir, ns.max_steps)
    if ns.pause_at:
        trainer.add_callback(PauseAt(ns.pause_at, os.path.dirname(os.path.abspath(ns.output_dir))))
    trainer.train(resume_from_checkpoint=True if ns.resume else None)
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()},
               os.path.join(ns.output_dir, "final_weights.pt"))
    print(f"finished at step {trainer.state.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
