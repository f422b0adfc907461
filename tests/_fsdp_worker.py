"""The Trainer with FSDP under torchrun, for tests/test_fsdp.py.

    torchrun --nproc-per-node N -m tests._fsdp_worker OUT MODE
MODE: plain (no FSDP; also the one-process reference), fsdp, fsdp_compile, fsdp_bf16,
fsdp_ac, plain_bf16, hybrid (2 replicas x 2 shards at 4 ranks), hybrid_nodes (hybrid_shard
with the replicas taken from the node count), offload (CPU offload),
fsdp_fused (optim=fasttrain_adamw), fsdp_memory (rank 1 alone holds 256 MiB more from
step 1 on: the profiler's per-rank memory must show it), fsdp_fp16 (an inf written into
rank 1's gradient shard at step 2 only), fsdp_fused_fp16 (the same with fasttrain_adamw),
init (untrained weights only). Rank 0 writes OUT/result.pt: per-step losses, the
evaluation loss on 10 examples after training, the full (gathered) weights and every rank's
local state bytes; the fp16 modes add every rank's
scaler state, optimizer step counters and host reads in the scaler, and the weights after
every step.
"""
import os
import sys

import torch

from fasttrain import Trainer, TrainerCallback, TrainingArguments
from tests._tiny import LoggedRecords, tiny_gpt, token_examples


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


class WeightsPerStep(TrainerCallback):
    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, **kw):
        self.weights[state.global_step] = gathered_weights(self.trainer.model)  # a collective


def inject_inf_on_rank_1_at_step_2():
    """Rank 1 writes an inf into its local shard of one gradient before the scaler checks
    them at step 2; rank 0's shards stay finite."""
    from fasttrain.precision.mixed import DynamicLossScaler
    unscale, calls = DynamicLossScaler.unscale_, []

    def unscale_(self, optimizer):
        calls.append(1)
        if len(calls) == 2 and int(os.environ.get("RANK", "0")) == 1:
            grad = optimizer.param_groups[0]["params"][0].grad
            grad.to_local().view(-1)[0] = float("inf")
        return unscale(self, optimizer)
    DynamicLossScaler.unscale_ = unscale_


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts host reads of device values (every .item(), bool(t), ... reaches this op)."""
    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            HostReads.count += 1
        return func(*args, **(kwargs or {}))


def count_host_reads_in_the_scaler():
    """The scaler's unscale_ (with the agreement over shards), step (the optimizer's) and
    update run under HostReads."""
    from fasttrain.precision.mixed import DynamicLossScaler
    for name in ("unscale_", "step", "update"):
        method = getattr(DynamicLossScaler, name)

        def counted(self, *a, _method=method, **kw):
            with HostReads():
                return _method(self, *a, **kw)
        setattr(DynamicLossScaler, name, counted)


class Rank1Ballast(TrainerCallback):
    """Rank 1 allocates and touches 256 MiB at the end of step 1 and keeps it."""

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1 and int(os.environ.get("RANK", "0")) == 1:
            self.ballast = torch.ones(64 * 2**20)


def offload_policy(model):
    """The offload policy FSDP applied to the root's parameters (None without FSDP)."""
    state = getattr(model, "_get_fsdp_state", None)
    group = state()._fsdp_param_group if state is not None else None
    return type(group.offload_policy).__name__ if group is not None else None


def main():
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = {"hybrid": "hybrid_shard", "hybrid_nodes": "hybrid_shard",
            "offload": "full_shard offload"}.get(mode, "full_shard" if mode.startswith("fsdp") else "")
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=3, per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
        max_grad_norm=0.0 if mode.endswith("fp16") else 0.5,  # fp16: no global norm to agree through
        save_strategy="no", disable_tqdm=True, report_to="none", seed=5, fsdp=fsdp,
        bf16=mode.endswith("bf16"), fp16=mode.endswith("fp16"), use_cpu=True, torch_compile=mode.endswith("compile"),
        torch_compile_backend="aot_eager", gradient_checkpointing=mode.endswith("_ac"),
        fsdp_config={"num_replicas": 2} if mode == "hybrid" else None,
        optim="fasttrain_adamw" if "fused" in mode else "adamw_torch_fused")
    data = token_examples(32, seed=8)
    if mode == "init":  # the untrained weights, to show training moved them
        torch.save({"weights": tiny_gpt(seed=2, n_layer=4).state_dict()}, os.path.join(out, "result.pt"))
        return 0
    probe, per_step, logged = StateBytes(), WeightsPerStep(), LoggedRecords()
    overflow_test = mode.startswith("fsdp") and mode.endswith("fp16")
    if overflow_test:
        inject_inf_on_rank_1_at_step_2()
        count_host_reads_in_the_scaler()
    trainer = Trainer(tiny_gpt(seed=2, n_layer=4), args, train_dataset=data,
                      callbacks=[probe, logged] + ([per_step] if overflow_test else [])
                      + ([Rank1Ballast()] if mode == "fsdp_memory" else []))
    probe.trainer = per_step.trainer = trainer
    trainer.train()
    eval_loss = trainer.evaluate(data[:10])["eval_loss"]  # 10 rows: not a multiple of the ranks
    state_bytes = trainer.dist.all_gather_object(probe.bytes)
    weights = gathered_weights(trainer.model)
    extra = {}
    if trainer.scaler is not None:
        counters = sorted({float(s["step"]) for s in trainer.optimizer.state.values()})
        extra = trainer.dist.all_gather_object({"scaler": trainer.scaler.state_dict(), "steps": counters,
                                               "host_reads": HostReads.count})
        extra = {"per_rank": extra, "per_step_weights": per_step.weights}
    if trainer.dist.rank == 0:
        from fasttrain.compile.apply import compiled_module_names
        torch.save({"weights": weights, "state_bytes": state_bytes,
                    "compiled_blocks": len(compiled_module_names(trainer.model)),
                    "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
                    "eval_loss": eval_loss, "log": logged.records,
                    "mesh_shape": tuple(getattr(next(trainer.model.parameters()), "device_mesh", torch.empty(0)).shape), "optimizer": type(trainer.optimizer).__name__,
                    "offload_policy": offload_policy(trainer.model),
                    "state_types": sorted({type(v).__name__ for state in trainer.optimizer.state.values()
                                           for v in state.values()}), **extra},
                   os.path.join(out, "result.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
