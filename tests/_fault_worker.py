"""One rank of a 2-process gloo Trainer run, for the hung/dead-peer tests in test_faults.py.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests._fault_worker OUT HEARTBEAT_S
Rank 0 hosts the rendezvous store (no torchrun agent), so stopping rank 0 also stops the
store. Each rank touches OUT/ready-<rank> at step 3 and trains on (many steps), so the
parent can stop or kill one rank while both are inside the loop's collectives.
"""
import os
import sys

import torch

from fasttrain import Trainer, TrainerCallback, TrainingArguments
from tests._tiny import tiny_gpt, token_examples


class Ready(TrainerCallback):
    def __init__(self, out):
        self.out = out

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            open(os.path.join(self.out, f"ready-{os.environ['RANK']}"), "w").close()


def main():
    out, heartbeat = sys.argv[1], float(sys.argv[2])
    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=os.path.join(out, "run"), max_steps=100_000,
                             per_device_train_batch_size=2, logging_steps=5, save_strategy="no",
                             disable_tqdm=True, report_to="none", ddp_heartbeat_timeout=heartbeat,
                             profile=False, learning_rate=1e-3)
    trainer = Trainer(tiny_gpt(), args, train_dataset=token_examples(64), callbacks=[Ready(out)])
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
