"""Evaluation under torchrun, for tests/test_eval_metrics_options.py.

    torchrun --nproc-per-node 2 -m tests._eval_gather_worker OUT
Every rank records what compute_metrics saw (and its length-grouped train order); rank 0
writes OUT/result.pt ({rank: record}).
"""
import os
import sys

import torch
import torch.distributed as dist

from fasttrain import TrainingArguments
from tests.test_eval_metrics_options import Tagger, WordTrainer, _batch_recorder, tag_data


def _args(out, **kw):
    return TrainingArguments(output_dir=out, per_device_eval_batch_size=3, report_to="none",
                             disable_tqdm=True, save_strategy="no", **kw)


def main(out):
    record = {}
    got = []
    WordTrainer(Tagger(), _args(out, eval_use_gather_object=True, include_for_metrics=["inputs"]),
                eval_dataset=tag_data(), compute_metrics=lambda p: got.append(p) or {}).evaluate()
    record["words"], record["inputs"] = got[0].predictions, got[0].inputs
    got.clear()
    WordTrainer(Tagger(), _args(out, eval_use_gather_object=True, eval_do_concat_batches=False),
                eval_dataset=tag_data(), compute_metrics=lambda p: got.append(p) or {}).evaluate()
    record["word_batches"] = got[0].predictions
    calls = []
    from fasttrain import Trainer
    metrics = Trainer(Tagger(), _args(out, batch_eval_metrics=True), eval_dataset=tag_data(),
                      compute_metrics=_batch_recorder(calls)).evaluate()
    record["batch_calls"] = [(c[1], c[3]) for c in calls]
    record["batch_accuracy"] = metrics["eval_accuracy"]
    # group_by_length on two ranks: the Trainer's train sampler, epoch 0
    grouped = Trainer(Tagger(), _args(out, train_sampling_strategy="group_by_length", per_device_train_batch_size=2,
                                      gradient_accumulation_steps=2, seed=4, remove_unused_columns=False),
                      train_dataset=[{"input_ids": list(range(1 + (i * 7) % 11))} for i in range(23)],
                      data_collator=lambda f: f)
    record["grouped_order"] = list(grouped.get_train_dataloader().sampler)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if int(os.environ["RANK"]) == 0:
        torch.save(dict(enumerate(records)), os.path.join(out, "result.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
