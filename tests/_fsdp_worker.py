"""The Trainer with FSDP under torchrun, for tests/test_fsdp.py.

    torchrun --nproc-per-node N -m tests._fsdp_worker OUT MODE
MODE: plain (no FSDP; also the one-process reference), fsdp, fsdp_compile, fsdp_bf16,
fsdp_ac, plain_bf16, hybrid (2 replicas x 2 shards at 4 ranks), offload (CPU offload),
init (untrained weights only). Rank 0 writes OUT/result.pt: per-step losses, the full (gathered)
weights and every rank's local state bytes.
"""
import os
import sys

import torch

from fasttrain import Trainer, TrainerCallback, TrainingArguments
from tests._tiny import tiny_gpt, token_examples


class StateBytes(TrainerCallback):
    """Local parameter + gradient + optimizer bytes just before the last optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, **kw):
        from fasttrain.distributed.fsdp import local_state_bytes
        self.bytes = local_state_bytes(self.trainer.model, self.trainer.optimizer)


def gathered_weights(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from fasttrain.distributed.fsdp import is_fsdp
    if not is_fsdp(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main():
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = {"hybrid": "hybrid_shard", "offload": "full_shard offload"}.get(mode, "full_shard" if mode.startswith("fsdp") else "")
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=3, per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=2, learning_rate=1e-3, max_grad_norm=0.5, logging_steps=1,
        save_strategy="no", disable_tqdm=True, report_to="none", seed=5, fsdp=fsdp,
        bf16=mode.endswith("bf16"), use_cpu=True, torch_compile=mode.endswith("compile"),
        torch_compile_backend="aot_eager", gradient_checkpointing=mode.endswith("_ac"),
        fsdp_config={"num_replicas": 2} if mode == "hybrid" else None)
    data = token_examples(32, seed=8)
    if mode == "init":  # the untrained weights, to show training moved them
        torch.save({"weights": tiny_gpt(seed=2, n_layer=4).state_dict()}, os.path.join(out, "result.pt"))
        return 0
    probe = StateBytes()
    trainer = Trainer(tiny_gpt(seed=2, n_layer=4), args, train_dataset=data, callbacks=[probe])
    probe.trainer = trainer
    trainer.train()
    state_bytes = trainer.dist.all_gather_object(probe.bytes)
    weights = gathered_weights(trainer.model)
    if trainer.dist.rank == 0:
        from fasttrain.compile.apply import compiled_module_names
        torch.save({"weights": weights, "state_bytes": state_bytes,
                    "compiled_blocks": len(compiled_module_names(trainer.model)),
                    "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]},
                   os.path.join(out, "result.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
