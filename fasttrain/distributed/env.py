"""Process-group set-up and teardown from the torchrun environment, and rank helpers.

torchrun (`python -m torch.distributed.run`) exports RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT to every worker. `init_distributed` reads
them, picks NCCL when CUDA is available (one GPU per LOCAL_RANK) and gloo otherwise, and
returns a `DistributedState`. Without those variables (a plain `python train.py`) it
returns a single-process state and creates no process group, so every helper here is
safe to call in both cases.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_REQUIRED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistributedState:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RuntimeError(
            f"environment variable {name}={value!r} is not an integer; launch with torchrun "
            "(`fasttrain train --nproc-per-node N ...`) or unset WORLD_SIZE"
        ) from None


def _pick_backend(backend: str | None, use_cuda: bool | None) -> str:
    if backend is None:
        cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
        backend = "nccl" if cuda else "gloo"
    elif use_cuda is not None and use_cuda != (backend == "nccl"):
        raise ValueError(f"backend={backend!r} contradicts use_cuda={use_cuda}; pass only one of them")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (automatic), got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend='nccl' needs CUDA, which is not available; use 'gloo'")
    return backend


def _device_for(backend: str, local_rank: int) -> torch.device:
    if backend != "nccl":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this node has {count} CUDA device(s); "
            f"pass --nproc-per-node {count} or fewer"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(
    timeout_s: float = 1800.0,
    backend: str | None = None,
    init_method: str = "env://",
    use_cuda: bool | None = None,
) -> DistributedState:
    """Create the default process group from the torchrun environment.

    backend: "nccl", "gloo", or None to choose from `use_cuda` (None: CUDA if available);
    NCCL binds this process to GPU LOCAL_RANK.

    `timeout_s` bounds every collective: if a peer dies or hangs, the others raise after
    at most this long instead of waiting forever (NCCL: the watchdog aborts the process).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive seconds, got {timeout_s!r}")
    world_size = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    backend = _pick_backend(backend, use_cuda) if world_size > 1 else backend
    if world_size <= 1:
        cuda = torch.cuda.is_available() and use_cuda is not False
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return DistributedState(0, 0, 1, 1, device, None)
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; start the job with "
            "torchrun (`fasttrain train --nproc-per-node N ...`)"
        )
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    local_world_size = _env_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world_size
    if init_method == "env://":
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"{name} is not set; torchrun sets it, or export it yourself")
    device = _device_for(backend, local_rank)
    if dist.is_initialized():
        raise RuntimeError("a default process group already exists; call destroy_distributed() first")
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    return DistributedState(rank, local_rank, world_size, local_world_size, device, backend)


def destroy_distributed() -> None:
    """Tear down the default process group; a no-op when none exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0 of the whole job: the one that logs and writes checkpoints."""
    return get_rank() == 0


def is_local_main_process() -> bool:
    """Local rank 0 of this node: the one that prepares node-local files (caches)."""
    return get_local_rank() == 0


def barrier() -> None:
    """Block until every rank arrives; a no-op in a single process."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
