"""Host reads per step of the Trainer under torchrun, for tests/test_host_syncs.py.

    torchrun --nproc-per-node 2 -m tests._sync_worker OUT BACKEND
Each rank writes OUT/reads_<rank>.txt: aten._local_scalar_dense per step (two run lengths).
"""
import os
import sys
import tempfile

from fasttrain import Trainer, TrainingArguments
from tests._dispatch_count import LOCAL_SCALAR_DENSE, OpCounter, per_step
from tests._tiny import tiny_gpt, token_examples


def main():
    out, backend = sys.argv[1], sys.argv[2]

    def run(steps):
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=2,
                                 logging_steps=1000, save_strategy="no", disable_tqdm=True,
                                 report_to="none", ddp_backend=backend, seed=3)
        trainer = Trainer(tiny_gpt(n_layer=1), args, train_dataset=token_examples(32))
        with OpCounter() as counter:
            trainer.train()
        return counter.ops

    ops = per_step(run, 4, 8)
    with open(os.path.join(out, f"reads_{os.environ['RANK']}.txt"), "w") as f:
        f.write(str(ops[LOCAL_SCALAR_DENSE]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
