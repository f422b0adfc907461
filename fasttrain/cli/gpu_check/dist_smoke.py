"""Part 5: a process group of size 1 (NCCL on a GPU, gloo on CPU) through the Trainer's data
parallel paths, two steps each: BucketedDDP (ddp_backend="fasttrain"), torch DDP
(ddp_backend="torch") and FSDP2 (fsdp="full_shard"). The Trainer is told the group is
enabled (its `_build_distributed` seam), so the wrappers, their collectives and the
all-reduced token counts all run. With one rank every reduction is the identity, so each
run's losses must equal a plain single-process run's."""
from __future__ import annotations

import dataclasses
import datetime
import math
import socket
import tempfile

import torch
import torch.distributed as dist

from fasttrain.cli.gpu_check.common import builtin_gpt, device, has_gpu, token_dataset
from fasttrain.distributed.context import DistContext

STEPS = 2
LOSS_RTOL = 1e-5  # fp32, one rank: the same arithmetic as the plain run up to reduction order
RUNS = {"ddp_fasttrain": {"ddp_backend": "fasttrain"}, "ddp_torch": {"ddp_backend": "torch"},
        "fsdp_full_shard": {"fsdp": "full_shard"}}


class _SizeOneGroup(DistContext):
    """The default process group of one rank, treated as data parallel."""

    @property
    def enabled(self) -> bool:
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(extra: dict, outdir: str, distributed: bool) -> list[float]:
    from fasttrain import Trainer, TrainingArguments

    class SizeOneTrainer(Trainer):
        def _build_distributed(self):
            return _SizeOneGroup(0, 0, 1, device())

    cls = SizeOneTrainer if distributed else Trainer
    args = TrainingArguments(output_dir=outdir, max_steps=STEPS, logging_steps=1,
                             per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no",
                             report_to="none", disable_tqdm=True, **extra)
    model = builtin_gpt(n_layer=2, n_embd=64, n_head=4, vocab=256, block=32)
    trainer = cls(model=model, args=args, train_dataset=token_dataset(32, 32, 256))
    trainer.train()
    return [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]


def run(ctx: dict) -> dict:
    from fasttrain import TrainingArguments

    backend = "nccl" if has_gpu() else "gloo"
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = _losses({}, f"{tmp}/plain", distributed=False)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=60),
                                **({"device_id": device()} if has_gpu() else {}))
        try:
            for name, extra in RUNS.items():
                missing = sorted(set(extra) - fields)
                if missing:
                    runs[name] = {"status": "skipped",
                                  "reason": f"skipped: not available (TrainingArguments has no {missing})"}
                    continue
                try:
                    losses = _losses(extra, f"{tmp}/{name}", distributed=True)
                except Exception as e:  # noqa: BLE001 - the failure is the finding
                    runs[name] = {"status": "fail", "reason": f"{type(e).__name__}: {str(e)[:400]}"}
                    continue
                ok = len(losses) == len(reference) and all(
                    math.isfinite(a) and math.isclose(a, b, rel_tol=LOSS_RTOL)
                    for a, b in zip(losses, reference))
                runs[name] = {"status": "pass" if ok else "fail", "losses": losses}
                if not ok:
                    runs[name]["reason"] = f"losses {losses} differ from the plain run's {reference}"
        finally:
            dist.destroy_process_group()
    failed = [k for k, r in runs.items() if r["status"] == "fail"]
    passed = [k for k, r in runs.items() if r["status"] == "pass"]
    return {"status": "fail" if failed else "pass", "backend": backend,
            "reference_losses": reference, "runs": runs,
            **({"reason": f"failing: {failed}"} if failed else {}),
            "summary": f"{backend} group of 1: {len(passed)}/{len(runs)} paths match the plain run"
            + (f"; failing: {failed}" if failed else "")
            + "".join(f"; {k} {r['reason']}" for k, r in runs.items() if r["status"] == "skipped")}
