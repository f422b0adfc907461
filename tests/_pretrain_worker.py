"""Sharded (DCP) checkpoints and streaming through the Trainer, for tests/test_pretrain.py.

    torchrun --nproc-per-node N -m tests._pretrain_worker OUT MODE [RESUME]
MODE:
  fsdp     FSDP run of 6 steps saving at 3 and 6 (RESUME: resume from that checkpoint);
           rank 0 writes OUT/result.pt: per-step losses, the examples each global step
           used, the gathered weights at the end, and the gathered weights and optimizer
           state right after loading
  ddp      the same without FSDP (data parallelism; one process when run alone)
  fsdp_fused  the same as fsdp with optim="fasttrain_adamw"
  fsdp_deeper  the same as fsdp with a 3-layer model (its checkpoints do not fit the others)
  sigterm  like fsdp, logging every 2 steps, with a real SIGTERM delivered to rank 1 alone at
           the end of step 1: every rank should save and stop at logging step 2
  killsave like fsdp, but rank 0 is SIGKILLed inside the step-4 save, after every rank's
           shards are written and before the checkpoint is committed
  export   FSDP training of a tiny HF GPT-2, then save_model(); rank 0 writes the gathered
           weights and logits of a fixed batch
  stream   one process, a stateful iterable dataset, 8 steps saving at 3 and 6
  stream2  2 FSDP ranks x 2 DataLoader workers over a plain IterableDataset of 24 examples
           (6 steps a pass), 12 steps saving at 5 and 10 (RESUME as for fsdp); rank 0 writes
           every rank's per-step examples (recorded by the model's forward, in the main
           process) and the per-step losses
"""
import os
import signal
import sys

import torch
from torch.utils.data import IterableDataset

from fasttrain import Trainer, TrainerCallback, TrainingArguments
from fasttrain.data.datasets import default_data_collator
from tests._tiny import tiny_gpt


def indexed_examples(n: int, seq_len: int = 16, vocab: int = 64, seed: int = 1):
    """Token examples whose first token is the example's index (n <= vocab)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (seq_len,), generator=g)
        ids[0] = i
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class Recorder:
    """A collator that records which examples (first token) each micro-batch holds."""

    def __init__(self):
        self.batches = []

    def __call__(self, features):
        self.batches.append([int(f["input_ids"][0]) for f in features])
        return default_data_collator(features)


def _copied(tree):
    """Unsharded models hand out their live tensors: copy them before training moves them."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _copied(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copied(v) for v in tree)
    return tree


def gathered(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return _copied(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def gathered_optimizer(model, optimizer):
    """The whole optimizer state keyed by parameter name (DCP's layout), on rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return _copied(get_optimizer_state_dict(model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


class SigtermRank1At(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step and int(os.environ.get("RANK", "0")) == 1:
            os.kill(os.getpid(), signal.SIGTERM)


class WeightsAfterLoad(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        self.weights = gathered(self.trainer.model)
        self.optimizer = None
        if state.global_step:  # resumed (a fresh optimizer has no state to show yet)
            self.optimizer = gathered_optimizer(self.trainer.model, self.trainer.optimizer)


def run_fsdp(out, mode, resume):
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "killsave":
        from fasttrain.checkpoint import storage
        commit = storage.CheckpointWriter.commit

        def dying_commit(self, step):
            if step == 4:
                os.kill(os.getpid(), signal.SIGKILL)  # every rank's shards are on disk by now
            return commit(self, step)
        storage.CheckpointWriter.commit = dying_commit
    recorder, probe = Recorder(), WeightsAfterLoad()
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=6, per_device_train_batch_size=8 // world,
        learning_rate=1e-3, logging_steps=2 if mode == "sigterm" else 1, save_strategy="steps",
        save_steps=2 if mode == "killsave" else 3,
        disable_tqdm=True, report_to="none", seed=5, fsdp="" if mode == "ddp" else "full_shard", use_cpu=True,
        dataloader_drop_last=True, optim="fasttrain_adamw" if mode == "fsdp_fused" else "adamw_torch_fused")
    model = tiny_gpt(seed=2, n_layer=3 if mode == "fsdp_deeper" else 2)
    trainer = Trainer(model, args, train_dataset=indexed_examples(48, seed=8),
                      data_collator=recorder, callbacks=[probe] + ([SigtermRank1At(1)] if mode == "sigterm" else []))
    probe.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    batches = trainer.dist.all_gather_object(recorder.batches)
    steps = trainer.dist.all_gather_object(trainer.state.global_step)
    weights = gathered(trainer.model)
    if trainer.dist.rank == 0:
        torch.save({"losses": {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r},
                    "batches": batches, "weights": weights, "after_load": probe.weights,
                    "optimizer_after_load": probe.optimizer, "global_steps": steps},
                   os.path.join(out, "result.pt"))


def run_export(out):
    import transformers
    torch.set_num_threads(1)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    args = TrainingArguments(output_dir=os.path.join(out, "run"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, save_strategy="no", disable_tqdm=True, report_to="none",
                             fsdp="full_shard", use_cpu=True)
    trainer = Trainer(model, args, train_dataset=indexed_examples(16))
    trainer.train()
    trainer.save_model(os.path.join(out, "export"))
    x = torch.arange(16).reshape(1, 16)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=x).logits
    weights = gathered(trainer.model)
    if trainer.dist.rank == 0:
        torch.save({"logits": logits.full_tensor() if hasattr(logits, "full_tensor") else logits,
                    "weights": weights}, os.path.join(out, "result.pt"))


class CountingStream(IterableDataset):
    """A stateful stream of token examples: its state is the index of the next one."""

    def __init__(self, n: int = 200):
        self.examples, self.next = indexed_examples(60, seed=3), 0
        self.n = n

    def __iter__(self):
        while self.next < self.n:
            i, self.next = self.next, self.next + 1
            yield self.examples[i % len(self.examples)]

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, state):
        self.next = state["next"]


class PauseAt(TrainerCallback):
    def __init__(self, step, marker):
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            self.trainer.checkpointer.wait()  # the step-6 checkpoint is committed before the kill
            open(self.marker, "w").close()
            import time
            time.sleep(120)  # the parent SIGKILLs us here


def run_stream(out, resume, pause):
    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=os.path.join(out, "run"), max_steps=8, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1,
                             save_strategy="steps", save_steps=3, disable_tqdm=True, report_to="none",
                             seed=5, use_cpu=True)
    callbacks = [PauseAt(pause, os.path.join(out, "paused"))] if pause else None
    trainer = Trainer(tiny_gpt(seed=2, dropout=0.1), args, train_dataset=CountingStream(),
                      callbacks=callbacks)
    for callback in callbacks or []:
        callback.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    torch.save({"losses": {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}},
               os.path.join(out, "result.pt"))


class Examples(IterableDataset):
    """A plain (stateless) stream: `indexed_examples(n)` in order."""

    def __init__(self, n):
        self.examples = indexed_examples(n, seed=4)

    def __iter__(self):
        return iter(self.examples)


def recording_gpt(seen: list):
    """tiny_gpt() whose forward appends the examples (first tokens) of every batch to `seen`."""
    import functools
    model = tiny_gpt(seed=2, n_layer=2)
    forward = model.forward

    @functools.wraps(forward)  # the Trainer reads forward's parameter names to pick batch keys
    def recorded(*a, **kw):
        if model.training:
            seen.append(kw["input_ids"][:, 0].tolist())
        return forward(*a, **kw)
    model.forward = recorded
    return model


def run_stream_ranks(out, resume):
    torch.set_num_threads(1)
    seen = []
    args = TrainingArguments(output_dir=os.path.join(out, "run"), max_steps=12, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=5,
                             disable_tqdm=True, report_to="none", seed=5, use_cpu=True, fsdp="full_shard",
                             dataloader_num_workers=2)
    trainer = Trainer(recording_gpt(seen), args, train_dataset=Examples(24))
    trainer.train(resume_from_checkpoint=resume)
    seen = trainer.dist.all_gather_object(seen)
    if trainer.dist.rank == 0:
        torch.save({"losses": {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r},
                    "batches": seen}, os.path.join(out, "result.pt"))


def main():
    out, mode = sys.argv[1], sys.argv[2]
    extra = sys.argv[3] if len(sys.argv) > 3 else None
    if mode in ("fsdp", "killsave", "ddp", "fsdp_fused", "sigterm", "fsdp_deeper"):
        run_fsdp(out, mode, resume={"latest": True}.get(extra, extra))
    elif mode == "stream2":
        run_stream_ranks(out, resume={"latest": True}.get(extra, extra))
    elif mode == "export":
        run_export(out)
    elif mode == "stream":
        run_stream(out, resume=True if extra == "resume" else None,
                   pause=int(extra[6:]) if extra and extra.startswith("pause=") else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
