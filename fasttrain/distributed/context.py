"""What the Trainer needs from data parallelism, behind one small object.

Single process: every method is the identity. Under torchrun (WORLD_SIZE > 1) the process
group comes from `fasttrain.distributed` and the model is wrapped in BucketedDDP (or
torch's DDP with ddp_backend="torch").
"""
from __future__ import annotations

import atexit
import contextlib
import os

import torch

from fasttrain.distributed import BucketedDDP, all_reduce_, barrier


_crashed = False


def _install_teardown(destroy) -> None:
    """Tear the process group down when the program ends. After a clean run the ranks first
    meet at a barrier, so no rank closes its connections while a peer is still inside a
    collective (gloo aborts the peer otherwise); after a crash they do not wait."""
    import datetime
    import sys

    import torch.distributed as dist
    previous_hook = sys.excepthook

    def hook(*exc):
        global _crashed
        _crashed = True
        previous_hook(*exc)

    def teardown():
        if not _crashed and dist.is_initialized():
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                else:
                    dist.barrier()
            except Exception:  # noqa: BLE001 - a peer is gone: nothing left to protect
                pass
        destroy()

    sys.excepthook = hook
    atexit.register(teardown)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    """Accumulate unreduced gradients (no reduce-scatter) for the micro-batches inside."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class DistContext:
    def __init__(self, rank: int = 0, local_rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu")):
        self.rank, self.local_rank, self.world_size, self.device = rank, local_rank, world_size, device

    @classmethod
    def from_args(cls, args) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available() and not args.use_cpu
        if world > 1:
            import torch.distributed as dist
            from fasttrain.distributed import destroy_distributed, init_distributed
            if dist.is_initialized():  # the user (or a previous Trainer) set it up: reuse it
                rank = dist.get_rank()
                local = int(os.environ.get("LOCAL_RANK", "0"))
                device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
                return cls(rank, local, dist.get_world_size(), device)
            backend = args.ddp_backend if args.ddp_backend in ("nccl", "gloo") else None
            info = init_distributed(timeout_s=args.ddp_timeout, backend=backend, use_cuda=use_cuda)
            _install_teardown(destroy_distributed)
            return cls(info.rank, info.local_rank, info.world_size, info.device)
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return cls(0, 0, 1, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model, args):
        from fasttrain.distributed.fsdp import is_fsdp
        if not self.enabled or is_fsdp(model):  # fully_shard'ed in place: already distributed
            return model
        if args.ddp_backend == "torch":
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            options = {k: v for k, v in (("broadcast_buffers", args.ddp_broadcast_buffers),
                                         ("static_graph", args.ddp_static_graph)) if v is not None}
            return DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=args.ddp_bucket_cap_mb,
                                           find_unused_parameters=bool(args.ddp_find_unused_parameters),
                                           **options)
        return BucketedDDP(model, bucket_cap_mb=args.ddp_bucket_cap_mb,
                           find_unused_parameters=bool(args.ddp_find_unused_parameters))

    def no_sync(self, model, enabled: bool):
        if enabled and self.enabled and hasattr(model, "no_sync"):
            return model.no_sync()
        if enabled and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(model)
        return contextlib.nullcontext()

    def zero_grad(self, model, optimizer) -> None:
        if isinstance(model, BucketedDDP):
            model.zero_grad()  # it owns flat gradient buffers: zero them, keep the .grad views
            return
        # optimizer.zero_grad(set_to_none=True) without its profiler record (two dispatched
        # ops per step): dropping the references is all it does
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_(tensor) if self.enabled else tensor

    def barrier(self) -> None:
        barrier()  # a no-op without a process group

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (a collective: call on all ranks)."""
        if not self.enabled:
            return flag
        t = all_reduce_(torch.tensor(float(flag), device=self.device), op="max")
        return bool(t.item() > 0)  # sync: only where the caller needs a global decision
