"""The Trainer with an HF causal LM under torchrun, for tests/test_fused_loss_parallel.py.

    torchrun --nproc-per-node N -m tests._fused_ddp_worker OUT BACKEND   (fasttrain|torch|fsdp)
Each rank writes OUT/rank<r>.pt: the final weights (full tensors), the logged losses, the
largest tensor any op produced during training and inside the fused loss (numel) and how often the fused path ran.
"""
import os
import sys
import tempfile

import torch

from fasttrain import Trainer, TrainingArguments
from tests._dispatch_count import OpCounter

VOCAB, SEQ, GLOBAL_BATCH = 1024, 32, 4


def gpt2():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=SEQ,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def examples(n=16):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class LargestOutput(OpCounter):
    def __init__(self):
        super().__init__()
        self.largest = 0
        self.in_loss = False
        self.largest_in_loss = 0  # inside the fused loss call (its gradients are made there)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if self.in_loss:
                    self.largest_in_loss = max(self.largest_in_loss, t.numel())
        return out


def main():
    out, backend = sys.argv[1], sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    world_for_batch = 2 if backend == "half" else world  # "half": one process, one rank's batch
    rank = int(os.environ.get("RANK", "0"))
    from fasttrain.ops import loss as fused
    calls = {"n": 0}
    original = fused.fused_causal_lm_loss  # both paths end here: direct, or through the wrapper

    def counted(*a, **k):
        calls["n"] += 1
        probe.in_loss = True
        try:
            return original(*a, **k)
        finally:
            probe.in_loss = False

    fused.fused_causal_lm_loss = counted
    probe = LargestOutput()
    extra = {"fsdp": "full_shard"} if backend == "fsdp" else {"ddp_backend": backend}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=3, learning_rate=1e-2,
                             per_device_train_batch_size=GLOBAL_BATCH // world_for_batch, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, report_to="none", seed=5,
                             **(extra if world > 1 else {}))
    trainer = Trainer(gpt2(), args, train_dataset=examples())
    with probe:
        trainer.train()
    weights = {}
    for name, value in trainer.model.state_dict().items():
        weights[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
    torch.save({"weights": weights, "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
                "largest": probe.largest, "largest_in_loss": probe.largest_in_loss, "fused_calls": calls["n"],
                "logits_numel": (GLOBAL_BATCH // world_for_batch) * SEQ * VOCAB},
               os.path.join(out, f"rank{rank}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
