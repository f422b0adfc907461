"""Fused non-finite check + unscale over every gradient of a model, in one launch.

Math, per gradient element g (any of fp32/bf16/fp16, upcast to fp32 first):
    found_inf = 1.0 if any g is NaN or +-inf (over all gradients)
    g <- g * inv_scale                                   (skipped when inv_scale is None)
The same contract as ``torch._amp_foreach_non_finite_check_and_unscale_``: gradients are
unscaled even when a non-finite value is found (the step is skipped anyway), and found_inf
is only ever set to 1, never cleared, so several calls can share one flag.

One launch covers all gradients of one dtype (apex's multi_tensor_apply idea, with the
tables in device memory instead of kernel arguments): a per-tensor table of (address,
numel) and a per-program table of (tensor index, block index). The program table depends
only on the gradient sizes and is cached on the device; the address table (T x 16 bytes)
is copied host-to-device without a sync each call.

Bytes moved: unscale reads and writes every gradient once (2 x itemsize per element);
check-only (inv_scale None, used when a fused optimizer divides by the scale itself)
reads once. Memory bound: on an H100 (3.35 TB/s) 124M fp32 gradients take ~0.3 ms.
Full blocks take an unmasked path so loads and stores vectorise to 16 bytes; the host
guarantees the 16-byte alignment that path assumes (misaligned views get their own launch).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program: 16 KiB of fp32, 32 elements per thread at 4 warps
NUM_WARPS = 4
_ALIGN_BYTES = 16
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_SIG_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _check_unscale_block(grad_ptrs, mask, inv_scale, UNSCALE: tl.constexpr):
    """Unscale one block in place; return its count of non-finite elements."""
    x = tl.load(grad_ptrs, mask=mask, other=0.0).to(tl.float32)
    if UNSCALE:
        tl.store(grad_ptrs, (x * inv_scale).to(grad_ptrs.dtype.element_ty), mask=mask)
    # NaN fails every comparison, so this is false exactly for NaN and +-inf.
    finite = tl.abs(x) <= _FLT_MAX
    return tl.sum((finite == 0).to(tl.int32), axis=0)


@triton.jit
def _unscale_kernel(
    tensor_table_ptr,  # int64 (T, 2): address, numel
    block_table_ptr,  # int32 (P, 2): tensor index, block index within the tensor
    inv_scale_ptr,  # fp32 scalar (ignored when UNSCALE is false)
    found_inf_ptr,  # fp32 scalar, set to 1.0 on any non-finite element
    GRAD_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    UNSCALE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_table_ptr + 2 * pid)
    start = tl.load(block_table_ptr + 2 * pid + 1).to(tl.int64) * BLOCK
    addr = tl.load(tensor_table_ptr + 2 * t)
    numel = tl.load(tensor_table_ptr + 2 * t + 1)
    base = addr.to(tl.pointer_type(GRAD_DTYPE))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    grad_ptrs = base + start + tl.arange(0, BLOCK)
    inv_scale = 1.0
    if UNSCALE:
        inv_scale = tl.load(inv_scale_ptr)
    offs = tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        # Full block: a mask against a constant folds away and keeps 16-byte accesses.
        n_bad = _check_unscale_block(grad_ptrs, offs < BLOCK, inv_scale, UNSCALE)
    else:
        n_bad = _check_unscale_block(grad_ptrs, offs < numel - start, inv_scale, UNSCALE)
    if n_bad > 0:
        tl.store(found_inf_ptr, 1.0)  # benign race: every writer stores the same 1.0


# Ahead-of-time compile cases for tests/test_kernel_compile.py (docs/kernels.md): every grad
# dtype, unscale and check-only, on the aligned path the host takes for allocator-made grads.
COMPILE_SPECS = [
    {
        "kernel": _unscale_kernel,
        "name": f"unscale {_SIG_DTYPES[dtype]} {'unscale' if unscale else 'check-only'}",
        "signature": {"tensor_table_ptr": "*i64", "block_table_ptr": "*i32",
                      "inv_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
                      "GRAD_DTYPE": "constexpr", "BLOCK": "constexpr", "UNSCALE": "constexpr",
                      "ALIGNED": "constexpr"},
        "constexprs": {"GRAD_DTYPE": _TL_DTYPES[dtype], "BLOCK": BLOCK, "UNSCALE": unscale,
                       "ALIGNED": True},
        "aligned": ["tensor_table_ptr", "block_table_ptr"],
        "num_warps": NUM_WARPS,
        # Full blocks must move 16 bytes per access (4 x fp32 or 8 x 16-bit values).
        "expect_ptx": ["ld.global.v4.b32"] + (["st.global.v4.b32"] if unscale else []),
    }
    for dtype in _TL_DTYPES
    for unscale in (True, False)
]


_block_table_cache: dict[tuple, torch.Tensor] = {}


def _block_table(numels: list[int], device: torch.device) -> torch.Tensor:
    """(P, 2) int32 map program -> (tensor index, block index); cached per size list."""
    key = (tuple(numels), device)
    table = _block_table_cache.get(key)
    if table is None:
        counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
        tensor_idx = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first_block = torch.cumsum(counts, 0) - counts
        block_idx = torch.arange(int(counts.sum())) - first_block[tensor_idx]
        table = _to_device(torch.stack([tensor_idx, block_idx], 1).to(torch.int32), device)
        if len(_block_table_cache) >= 16:
            _block_table_cache.clear()
        _block_table_cache[key] = table
    return table


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned + non_blocking: a pageable host-to-device copy would synchronise.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _launch(grads: list[torch.Tensor], inv_scale, found_inf, aligned: bool) -> None:
    device = grads[0].device
    numels = [g.numel() for g in grads]
    tensor_table = torch.tensor([[g.data_ptr(), n] for g, n in zip(grads, numels)],
                                dtype=torch.int64)
    tensor_table = _to_device(tensor_table, device)
    block_table = _block_table(numels, device)
    unscale = inv_scale is not None
    # Triton launches on the current CUDA device: make it the gradients' one.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _unscale_kernel[(block_table.shape[0],)](
            tensor_table, block_table, inv_scale if unscale else found_inf, found_inf,
            GRAD_DTYPE=_TL_DTYPES[grads[0].dtype], BLOCK=BLOCK, UNSCALE=unscale,
            ALIGNED=aligned, num_warps=NUM_WARPS,
        )


def _check_args(grads, inv_scale, found_inf) -> torch.device:
    if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1 \
            or found_inf.dtype != torch.float32:
        raise ValueError("found_inf must be a one-element float32 tensor on the gradients' "
                         "device, e.g. torch.zeros((), device=grad.device)")
    device = found_inf.device
    if inv_scale is not None and (not isinstance(inv_scale, torch.Tensor) or inv_scale.numel() != 1
                                  or inv_scale.dtype != torch.float32
                                  or inv_scale.device != device):
        raise ValueError("inv_scale must be None (check only) or a one-element float32 tensor "
                         f"on {device}, e.g. scale.double().reciprocal().float()")
    for i, g in enumerate(grads):
        if g.device != device:
            raise ValueError(f"grads[{i}] is on {g.device} but found_inf is on {device}: "
                             "call once per device")
        if g.dtype not in _TL_DTYPES:
            raise ValueError(f"grads[{i}] has dtype {g.dtype}; supported: fp32, bf16, fp16")
        if not g.is_contiguous():
            raise ValueError(f"grads[{i}] is not contiguous; pass contiguous gradients or use "
                             "torch._amp_foreach_non_finite_check_and_unscale_ for it")
    return device


def unscale_and_check_(grads: list[torch.Tensor], inv_scale: torch.Tensor | None,
                       found_inf: torch.Tensor) -> None:
    """Multiply every gradient in place by `inv_scale` and set `found_inf` to 1.0 if any
    gradient holds a NaN or inf; with `inv_scale=None` only check. No host sync.

    One launch per (dtype, 16-byte aligned or not) group present: one in practice.
    """
    grads = [g for g in grads if g.numel() > 0]
    _check_args(grads, inv_scale, found_inf)
    if inv_scale is not None:
        inv_scale = inv_scale.reshape(())
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        aligned = g.data_ptr() % _ALIGN_BYTES == 0
        groups.setdefault((g.dtype, aligned), []).append(g)
    for (_, aligned), group in groups.items():
        _launch(group, inv_scale, found_inf, aligned)
