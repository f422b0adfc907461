"""What the Trainer needs from data parallelism, behind one small object.

Single process: every method is the identity. Under torchrun (WORLD_SIZE > 1) the process
group comes from `fasttrain.distributed` and the model is wrapped in BucketedDDP (or
torch's DDP with ddp_backend="torch").
"""
from __future__ import annotations

import atexit
import contextlib
import os
import time
from typing import Optional

import torch

from fasttrain.distributed import BucketedDDP, all_reduce_, barrier


_crashed = False
_generation = 0  # train() calls in this process: heartbeat keys of one call never mix with another's

_PEER_FAILURE_SIGNS = ("Connection reset", "Connection closed", "Broken pipe", "Timed out",
                       "timed out", "gloo", "NCCL", "ProcessGroup")


class PeerLostError(RuntimeError):
    """A collective failed because another rank exited or stopped responding."""


def _is_peer_failure(error: BaseException) -> bool:
    import torch.distributed as dist
    while error is not None:
        if isinstance(error, getattr(dist, "DistError", ())) or any(
                sign in str(error) for sign in _PEER_FAILURE_SIGNS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _gloo_groups() -> list:
    """This rank's live process groups with a gloo backend, in creation order (the same on
    every rank, so waiting on each in turn cannot deadlock)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d
    groups = []
    for group in list(distributed_c10d._world.pg_map):  # torch lists its groups nowhere public
        try:
            backend = str(dist.get_backend(group))
        except (RuntimeError, ValueError):
            continue
        if "gloo" in backend:
            groups.append(group)
    return groups


def drain_gloo_workers(settle_s: float = 0.2) -> None:
    """Return only once gloo's worker threads have freed every finished collective of this
    process. Collectives on every gloo group: call it on all ranks.

    Why: a gloo worker thread frees each finished collective's tensors itself, after the
    caller's wait() has already returned, and freeing a tensor that Python has seen takes the
    GIL (torch releases the tensor's Python object). If the interpreter has begun to finalize
    by then, Python 3.11 ends the thread inside that C++ destructor and the process aborts:
    "terminate called without an active exception" (SIGABRT) after a finished run. With
    FSDP/DTensor the groups outlive destroy_process_group (DeviceMeshes keep them), so the
    threads are still there at exit.

    Queueing a collective takes the group's work lock, which a worker holds while it frees a
    collective, and the call releases the GIL while it waits: a worker stuck on the GIL
    finishes first. Round 1: a barrier per group, which runs only after all earlier work of
    the group has finished. Round 2: another one, whose queueing waits for a worker still
    freeing work that finished during round 1. The barriers' own tensors never had a Python
    object. (monitored_barrier goes around the queue, so it guarantees none of this.)
    Left open by the rounds alone: a worker descheduled between finishing a collective and
    taking the lock for the whole of both rounds (seen once in ~60 suite runs' worth of exits,
    on a 2-core machine whose other processes had a higher priority). So the call then sleeps
    `settle_s` with the GIL released: a worker that is merely runnable gets the CPU and the
    GIL, and frees its work, before the interpreter finalizes. A cost of `settle_s` once per
    process, at exit."""
    import time

    import torch.distributed as dist
    groups = _gloo_groups()
    for _ in range(2):
        for group in groups:
            dist.barrier(group=group)
    if groups:
        time.sleep(settle_s)


def _install_teardown(destroy) -> None:
    """Tear the process group down when the program ends. After a clean run the ranks first
    meet at a barrier, so no rank closes its connections while a peer is still inside a
    collective (gloo aborts the peer otherwise), and wait until gloo's worker threads hold
    no finished work (`drain_gloo_workers`); after a crash they do not wait."""
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
                if dist.get_backend() == "gloo":  # bounded, and names a rank that never came
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                else:
                    dist.barrier()
                drain_gloo_workers()
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
        self.watchdog = None

    # ---- failures of peers
    def start_watchdog(self, timeout_s: float) -> None:
        """Heartbeats between ranks for the length of a train() call (distributed/watchdog.py)."""
        global _generation
        _generation += 1
        if not self.enabled or not timeout_s:
            return
        from fasttrain.distributed.watchdog import PeerWatchdog
        self.watchdog = PeerWatchdog(self.rank, self.world_size, _generation, timeout_s)
        self.watchdog.start()

    def stop_watchdog(self, clean: bool = True) -> None:
        if self.watchdog is not None:
            self.watchdog.stop(clean)
            self.watchdog = None

    def peer_lost(self, error: BaseException, what: str) -> Optional[PeerLostError]:
        """fasttrain's error for a collective that failed because a peer is gone, or None
        when `error` is something else. Names the silent rank when the watchdog saw one."""
        if not self.enabled or isinstance(error, PeerLostError) or not _is_peer_failure(error):
            return None
        who = "another rank"
        if self.watchdog is not None:
            deadline = time.monotonic() + 3 * self.watchdog.interval_s
            silent = self.watchdog.silent_peers(2 * self.watchdog.interval_s)
            while not silent and time.monotonic() < deadline:  # a dead peer misses its next beats
                time.sleep(self.watchdog.interval_s / 2)
                silent = self.watchdog.silent_peers(2 * self.watchdog.interval_s)
            if silent:
                who = "rank " + ", ".join(str(r) for r in silent)
        return PeerLostError(
            f"rank {self.rank} of {self.world_size}: {what} failed because {who} exited or "
            "stopped responding; see that rank's log for its own error. This rank stops too. "
            "Resume every rank from the last checkpoint (resume_from_checkpoint=True).")

    def _collective(self, what: str):
        ctx = self

        class _Translate(contextlib.AbstractContextManager):
            def __exit__(self, kind, error, tb):
                lost = ctx.peer_lost(error, what) if error is not None else None
                if lost is not None:
                    raise lost from None
                return False

        return _Translate()

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
        if not self.enabled:
            return tensor
        with self._collective("an all-reduce"):
            return all_reduce_(tensor)

    def barrier(self) -> None:
        with self._collective("a barrier"):
            barrier()  # a no-op without a process group

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        with self._collective("an all-gather"):
            dist.all_gather_object(out, obj)
        return out

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (a collective: call on all ranks)."""
        if not self.enabled:
            return flag
        with self._collective("agreeing on a stop flag"):
            t = all_reduce_(torch.tensor(float(flag), device=self.device), op="max")
            return bool(t.item() > 0)  # sync: only where the caller needs a global decision
