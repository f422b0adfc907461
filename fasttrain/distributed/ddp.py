"""BucketedDDP: data parallelism with bucketed gradient all-reduce overlapped with backward.

How a synchronising backward runs (PyTorch's Reducer design, `reducer.cpp`, rewritten):
1. Every trainable parameter's `.grad` is a view into a flat bucket buffer that the wrapper
   owns; autograd accumulates into it in place, so there is no copy into a bucket.
2. A post-accumulate-grad hook marks the parameter ready. When all parameters of a bucket
   are ready, the bucket is divided by the world size (fused with the cast into the
   communication buffer when `comm_dtype` compresses) and its all-reduce is launched
   asynchronously, while backward continues on earlier layers.
3. Buckets are launched strictly in bucket order: a bucket that becomes ready early waits
   for its predecessors, so every rank issues the same collectives in the same order even
   when a compiled backward fires hooks out of order.
4. A callback queued on the autograd engine runs once at the end of backward: it waits for
   all outstanding all-reduces at once, restores fp32 gradients from compressed buffers,
   handles unused parameters, and after the first iteration rebuilds the buckets once in
   the observed gradient-ready order (rank 0's order, broadcast).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from fasttrain.distributed.bucketing import (
    ParamSpec,
    mb_to_bytes,
    order_from_ready,
    plan_buckets,
    reverse_registration_order,
)
from fasttrain.distributed.wrap_checks import broadcast_from_rank0, check_same_params, unreachable_params

_COMM_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _Bucket:
    indices: tuple[int, ...]
    flat: torch.Tensor  # (numel,) the gradients, param dtype
    comm: torch.Tensor | None  # (numel,) comm_dtype copy when compressing
    views: list[torch.Tensor]

    @property
    def comm_nbytes(self) -> int:
        tensor = self.flat if self.comm is None else self.comm
        return tensor.numel() * tensor.element_size()


@dataclass
class CommStats:
    """What the last synchronising backward communicated (for tests and benchmarks).

    A launch is "early" when at least one gradient of the backward was still to come: the
    all-reduce then overlaps the remaining gradient computation.
    """

    launch_order: list[int] = field(default_factory=list)  # bucket indices, as launched
    launch_bytes: list[int] = field(default_factory=list)
    launch_times: list[float] = field(default_factory=list)  # time.perf_counter()
    launch_grads_seen: list[int] = field(default_factory=list)  # gradients ready at launch
    ready_order: list[int] = field(default_factory=list)  # buckets, as they became complete
    grads_seen: int = 0  # gradients that became ready in this backward
    backward_end_time: float = 0.0

    def reset(self) -> None:
        for values in (self.launch_order, self.launch_bytes, self.launch_times,
                       self.launch_grads_seen, self.ready_order):
            values.clear()
        self.grads_seen = 0

    @property
    def fraction_bytes_launched_early(self) -> float:
        total = sum(self.launch_bytes)
        early = sum(b for b, seen in zip(self.launch_bytes, self.launch_grads_seen) if seen < self.grads_seen)
        return early / total if total else 0.0

    def fraction_bytes_launched_before_end(self, margin_s: float) -> float:
        """Share of bytes launched at least `margin_s` seconds before backward ended."""
        total = sum(self.launch_bytes)
        cutoff = self.backward_end_time - margin_s
        early = sum(b for b, t in zip(self.launch_bytes, self.launch_times) if t <= cutoff)
        return early / total if total else 0.0


class BucketedDDP(nn.Module):
    """Wrap `module` for data-parallel training; see the module docstring for the design.

    Use `zero_grad()` of the wrapper (it zeroes the bucket buffers and keeps gradients as
    views into them) instead of `optimizer.zero_grad(set_to_none=True)`; `no_sync()` for
    gradient-accumulation micro-steps; save `wrapper.module.state_dict()`.
    """

    def __init__(
        self,
        module: nn.Module,
        bucket_cap_mb: float = 25,
        first_bucket_cap_mb: float = 1,
        comm_dtype: torch.dtype | None = None,
        find_unused_parameters: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "BucketedDDP needs a process group: call fasttrain.distributed.init_distributed() "
                "first (under torchrun), or do not wrap in a single process"
            )
        if comm_dtype not in _COMM_DTYPES:
            raise ValueError(f"comm_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {comm_dtype!r}")
        self.module = module
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.comm_dtype = comm_dtype
        self.find_unused_parameters = find_unused_parameters
        self._bucket_cap = mb_to_bytes(bucket_cap_mb, "bucket_cap_mb")
        self._first_bucket_cap = mb_to_bytes(first_bucket_cap_mb, "first_bucket_cap_mb")
        self._names, self._params = _trainable_parameters(module)
        check_same_params(self._names, self._params, process_group)
        broadcast_from_rank0([*self._params, *module.buffers()], process_group)
        self.stats = CommStats()
        self._sync_enabled = True
        self._sync_this_backward = True
        self._first_ready: list[int] | None = []  # ready order of the first backward
        self._recording = True
        self._rebuilt = False
        self._build_buckets(reverse_registration_order(len(self._params)))
        self._reset_backward_state()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self._params)
        ]

    # ----------------------------------------------------------------- public surface
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._backward_started and self._sync_this_backward:
            pending = [self._names[i] for i, ready in enumerate(self._ready) if not ready][:10]
            raise RuntimeError(
                "BucketedDDP: the previous backward did not finish synchronising gradients "
                f"(still waiting for {pending}). Causes: an exception inside backward, or "
                "parameters without gradient under reentrant checkpointing; use "
                "torch.utils.checkpoint(..., use_reentrant=False) or find_unused_parameters=True"
            )
        self._reset_backward_state()
        self._sync_this_backward = self._sync_enabled
        output = self.module(*args, **kwargs)
        if self.find_unused_parameters and self._sync_enabled and torch.is_grad_enabled():
            self._unused_from_graph = unreachable_params(output, self._params)
        return output

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally: backward passes of forwards run inside skip the all-reduce."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the flat gradient buffers; every `.grad` becomes (again) a view into them."""
        if set_to_none:
            raise ValueError(
                "BucketedDDP keeps gradients as views into its buffers; set_to_none=True would "
                "break that. Call zero_grad() (it zeroes in place) instead"
            )
        for bucket in self._buckets:
            bucket.flat.zero_()
        for param, view in zip(self._params, self._views):
            if param.grad is not view:
                param.grad = view

    @property
    def bucket_indices(self) -> list[tuple[int, ...]]:
        """The current plan: parameter indices (registration order) per bucket, in launch order."""
        return [b.indices for b in self._buckets]

    @property
    def parameter_names(self) -> list[str]:
        return list(self._names)

    # ----------------------------------------------------------------- buckets
    def _build_buckets(self, order: list[int]) -> None:
        specs = [ParamSpec(p.numel(), p.dtype, str(p.device)) for p in self._params]
        plan = plan_buckets(specs, order, self._bucket_cap, self._first_bucket_cap)
        self._buckets: list[_Bucket] = []
        self._views: list[torch.Tensor] = [None] * len(self._params)  # type: ignore[list-item]
        self._bucket_of = [0] * len(self._params)
        for b, indices in enumerate(plan):
            first = self._params[indices[0]]
            flat = torch.zeros(sum(specs[i].numel for i in indices), dtype=first.dtype, device=first.device)
            compress = self.comm_dtype is not None and self.comm_dtype != first.dtype
            comm = torch.empty_like(flat, dtype=self.comm_dtype) if compress else None
            views, offset = [], 0
            for i in indices:
                param = self._params[i]
                view = flat[offset : offset + param.numel()].view(param.shape)
                offset += param.numel()
                if param.grad is not None:  # keep values (a rebuild); None stays None
                    view.copy_(param.grad)
                    param.grad = view
                views.append(view)
                self._views[i] = view
                self._bucket_of[i] = b
            self._buckets.append(_Bucket(indices, flat, comm, views))

    def _maybe_rebuild(self) -> None:
        """Once, after the first synchronising backward: re-plan in observed ready order."""
        if self._rebuilt:
            return
        self._rebuilt = True
        order = torch.tensor(order_from_ready(self._first_ready, len(self._params)), dtype=torch.int64)
        order = order.to(self._buckets[0].flat.device)
        src = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        dist.broadcast(order, src=src, group=self.process_group)
        order_list = order.tolist()  # sync: once per run, after the first iteration
        self._first_ready = None
        specs = [ParamSpec(p.numel(), p.dtype, str(p.device)) for p in self._params]
        if plan_buckets(specs, order_list, self._bucket_cap, self._first_bucket_cap) != self.bucket_indices:
            self._build_buckets(order_list)

    # ----------------------------------------------------------------- backward
    def _reset_backward_state(self) -> None:
        self._pending = [len(b.indices) for b in self._buckets]
        self._ready = [False] * len(self._params)
        self._next_launch = 0
        self._works: list[tuple[int, Any]] = []
        self._finalizer_queued = False
        self._backward_started = False
        self._unused_from_graph: list[int] = []
        if not hasattr(self, "_used"):
            self._used = [False] * len(self._params)

    def _make_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self._on_grad_ready(index, param)

        return hook

    def _on_grad_ready(self, index: int, param: torch.Tensor) -> None:
        if not self._finalizer_queued:
            self._finalizer_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize_backward)
        if not self._backward_started:
            self._backward_started = True
            if self._sync_this_backward:
                self.stats.reset()
                for unused in self._unused_from_graph:
                    self._mark_ready(unused)
        if self._recording:
            self._first_ready.append(index)
        self._used[index] = True
        self.stats.grads_seen += 1
        if not self._sync_this_backward:
            return
        if self._ready[index]:
            raise RuntimeError(
                f"BucketedDDP: parameter '{self._names[index]}' received a gradient twice in one "
                "synchronising backward (or after its bucket was sent): run one backward per "
                "forward of the wrapper (no retain_graph re-use), and call the wrapper, not "
                "wrapper.module, for the forward"
            )
        view = self._views[index]
        if param.grad is not view:  # someone replaced .grad (e.g. set_to_none): adopt it
            view.copy_(param.grad)
            param.grad = view
        self._mark_ready(index)

    def _mark_ready(self, index: int) -> None:
        self._ready[index] = True
        bucket = self._bucket_of[index]
        self._pending[bucket] -= 1
        if self._pending[bucket] == 0:
            self.stats.ready_order.append(bucket)
        while self._next_launch < len(self._buckets) and self._pending[self._next_launch] == 0:
            self._launch(self._next_launch)
            self._next_launch += 1

    def _launch(self, b: int) -> None:
        bucket = self._buckets[b]
        scale = 1.0 / self.world_size
        if bucket.comm is not None:
            torch.mul(bucket.flat, scale, out=bucket.comm)  # divide and cast in one pass
            tensor = bucket.comm
        else:
            tensor = bucket.flat.mul_(scale)
        try:
            work = dist.all_reduce(tensor, group=self.process_group, async_op=True)
        except RuntimeError as error:
            raise self._comm_error(b, error) from error
        self._works.append((b, work))
        self.stats.launch_order.append(b)
        self.stats.launch_bytes.append(bucket.comm_nbytes)
        self.stats.launch_times.append(time.perf_counter())
        self.stats.launch_grads_seen.append(self.stats.grads_seen)

    def _comm_error(self, b: int, error: Exception) -> RuntimeError:
        return RuntimeError(
            f"BucketedDDP: all-reduce of gradient bucket {b} failed on rank {self.rank} of "
            f"{self.world_size}: a peer rank has probably exited or stopped responding (the "
            f"collective timeout is set by init_distributed(timeout_s=...)). Check the other "
            f"ranks' logs. Cause: {error}"
        )

    def _wait_all(self) -> None:
        works, self._works = self._works, []
        for b, work in works:
            try:
                work.wait()
            except RuntimeError as error:
                raise self._comm_error(b, error) from error
        for bucket in self._buckets:
            if bucket.comm is not None:
                bucket.flat.copy_(bucket.comm)

    def _finalize_backward(self) -> None:
        if _inside_reentrant_backward() and not (self._sync_this_backward and all(self._ready)):
            # The end of a nested backward (torch.utils.checkpoint with use_reentrant=True):
            # the outer backward may still produce gradients. The next hook queues us again.
            self._finalizer_queued = False
            return
        try:
            self._recording = False
            if self._sync_this_backward:
                error = self._finish_sync()
                self._maybe_rebuild()  # before raising: every rank must issue its broadcast
                if error:
                    raise RuntimeError(error)
        finally:
            self._reset_backward_state()

    def _finish_sync(self) -> str:
        """Launch what is left, wait for everything; returns an error message or ""."""
        self.stats.backward_end_time = time.perf_counter()
        missing = [i for i, ready in enumerate(self._ready) if not ready]
        for index in missing:  # their local gradient is whatever the buffer holds (0 if unused)
            self._mark_ready(index)
        used_work = used = None
        if self.find_unused_parameters:
            used = torch.tensor(self._used, dtype=torch.int32, device=self._buckets[0].flat.device)
            used_work = dist.all_reduce(used, group=self.process_group, async_op=True)
        self._wait_all()
        self._used = [False] * len(self._params)
        if missing and not self.find_unused_parameters:  # reported after the wait: peers never hang
            names = ", ".join(self._names[i] for i in missing[:20])
            return (
                f"BucketedDDP: rank {self.rank}: parameters received no gradient in this backward: "
                f"{names}{' ...' if len(missing) > 20 else ''}. Pass find_unused_parameters=True "
                "if they are unused on purpose, or set requires_grad=False on them"
            )
        if used_work is not None:
            used_work.wait()
            for index in (used == 0).nonzero().flatten().tolist():  # sync: find_unused_parameters only
                self._params[index].grad = None  # unused on every rank: no update, as in torch DDP
        return ""


def _inside_reentrant_backward() -> bool:
    """True while a backward runs nested inside another one's node (reentrant checkpointing)."""
    current_node = getattr(torch._C, "_current_autograd_node", None)
    return current_node is not None and current_node() is not None


def _trainable_parameters(module: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    names, params, seen = [], [], set()
    for name, param in module.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            names.append(name)
            params.append(param)
    if not params:
        raise ValueError("BucketedDDP: the module has no parameters with requires_grad=True")
    return names, params
