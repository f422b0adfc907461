"""Multi-tensor fused AdamW: one Triton launch updates every parameter of a dtype group.

Math (torch.optim.AdamW, decoupled weight decay, eps outside the sqrt), fp32 whatever the
parameter dtype, with s the step counter (already incremented), g = grad / grad_scale:
    p  <- p * (1 - lr * wd)
    m  <- b1 * m + (1 - b1) * g
    v  <- b2 * v + (1 - b2) * g^2
    p  <- p - lr / (1 - b1^s) * m / (sqrt(v) / sqrt(1 - b2^s) + eps)
With master weights, p is the fp32 master copy and the parameter receives p rounded to its
dtype. Moments are fp32. When found_inf is nonzero nothing is written (no host sync).

Launch layout (apex's multi_tensor_apply, with the tables in device memory rather than in
kernel arguments, so there is no 4 KB limit): a per-tensor table of addresses
(param, grad, exp_avg, exp_avg_sq, master, step, numel), copied host-to-device without a
sync and cached per list of addresses (the same tensors every step cost no copy; a CUDA
graph's capture finds it ready and keeps it alive), and a per-program table of (tensor,
block) cached per list of sizes.
Bytes per element, fp32 params: read p, g, m, v and write p, m, v = 28 B; bf16 params with
fp32 master: read g 2, master 4, m 4, v 4, write master 4, m 4, v 4, p 2 = 28 B.
Memory bound: 124M fp32 params move 3.5 GB, ~1.0 ms at the
H100's 3.35 TB/s. Full blocks take an unmasked path so accesses vectorise to 16 bytes; the
host sends tensors that are not 16-byte aligned to a separate unaligned launch.
"""
import math

import torch
import triton
import triton.language as tl

BLOCK = 2048  # elements per program: 8 per thread at 8 warps
NUM_WARPS = 8
_ALIGN_BYTES = 16
_COLUMNS = 7  # param, grad, exp_avg, exp_avg_sq, master, step, numel
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SIG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _adamw_block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, w_ptrs, mask, lr, grad_scale, beta1, beta2,
                 weight_decay, eps, bc1, bc2_sqrt, HAS_MASTER: tl.constexpr):
    """One block of the update; `w_ptrs` are the master weights when HAS_MASTER."""
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32) / grad_scale
    if HAS_MASTER:
        p = tl.load(w_ptrs, mask=mask, other=0.0)
    else:
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt_rn(v) / bc2_sqrt + eps
    p = p - (lr / bc1) * (m / denom)
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    if HAS_MASTER:
        tl.store(w_ptrs, p, mask=mask)
    tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_kernel(
    table_ptr,  # int64 (T, 7): addresses of param, grad, exp_avg, exp_avg_sq, master, step; numel
    block_table_ptr,  # int32 (P, 2): tensor index, block index within the tensor
    lr_ptr, grad_scale_ptr, found_inf_ptr,  # fp32 scalars on the device
    beta1, beta2, log2_beta1, log2_beta2, weight_decay, eps,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    # grad_scale and found_inf always point somewhere (1.0 and 0.0 when unused): two scalar
    # loads per program instead of twice the compiled variants.
    if tl.load(found_inf_ptr) == 0.0:
        pid = tl.program_id(0)
        t = tl.load(block_table_ptr + 2 * pid).to(tl.int64)
        start = tl.load(block_table_ptr + 2 * pid + 1).to(tl.int64) * BLOCK
        row = table_ptr + t * 7
        p_base = tl.load(row).to(tl.pointer_type(PARAM_DTYPE))
        g_base = tl.load(row + 1).to(tl.pointer_type(GRAD_DTYPE))
        m_base = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        v_base = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        w_base = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        step = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32)))
        numel = tl.load(row + 6)
        if ALIGNED:
            p_base = tl.multiple_of(p_base, 16)
            g_base = tl.multiple_of(g_base, 16)
            m_base = tl.multiple_of(m_base, 16)
            v_base = tl.multiple_of(v_base, 16)
            w_base = tl.multiple_of(w_base, 16)
        lr = tl.load(lr_ptr)
        grad_scale = tl.load(grad_scale_ptr)
        bc1 = 1.0 - tl.exp2(step * log2_beta1)
        bc2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * log2_beta2))
        offs = start + tl.arange(0, BLOCK)
        # Two call sites: on full blocks the mask is a constant, which keeps 16-byte accesses.
        if start + BLOCK <= numel:
            _adamw_block(p_base + offs, g_base + offs, m_base + offs, v_base + offs,
                         w_base + offs, tl.arange(0, BLOCK) < BLOCK, lr, grad_scale, beta1,
                         beta2, weight_decay, eps, bc1, bc2_sqrt, HAS_MASTER)
        else:
            _adamw_block(p_base + offs, g_base + offs, m_base + offs, v_base + offs,
                         w_base + offs, offs < numel, lr, grad_scale, beta1, beta2,
                         weight_decay, eps, bc1, bc2_sqrt, HAS_MASTER)


def _compile_specs() -> list[dict]:
    specs = []
    combos = [(torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, False),
              (torch.float16, torch.float16, False), (torch.bfloat16, torch.bfloat16, True),
              (torch.float16, torch.float16, True)]
    for p_dtype, g_dtype, master in combos:
        for aligned in (True, False):
            specs.append({
                "name": f"adamw p={_SIG[p_dtype]} g={_SIG[g_dtype]} master={master} "
                        f"aligned={aligned}",
                "kernel": _adamw_kernel,
                "signature": {
                    "table_ptr": "*i64", "block_table_ptr": "*i32", "lr_ptr": "*fp32",
                    "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "beta1": "fp32",
                    "beta2": "fp32", "log2_beta1": "fp32", "log2_beta2": "fp32",
                    "weight_decay": "fp32", "eps": "fp32", "PARAM_DTYPE": "constexpr",
                    "GRAD_DTYPE": "constexpr", "HAS_MASTER": "constexpr",
                    "ALIGNED": "constexpr", "BLOCK": "constexpr"},
                "constexprs": {"PARAM_DTYPE": _TL[p_dtype], "GRAD_DTYPE": _TL[g_dtype],
                               "HAS_MASTER": master, "ALIGNED": aligned, "BLOCK": BLOCK},
                "aligned": ["table_ptr", "block_table_ptr"],
                "num_warps": NUM_WARPS,
                "expect_ptx": ["ld.global.v4", "st.global.v4"] if aligned else [],
            })
    return specs


COMPILE_SPECS = _compile_specs()

_block_tables: dict[tuple, torch.Tensor] = {}
_row_tables: dict[tuple, torch.Tensor] = {}
_kept_for_graphs: list[torch.Tensor] = []  # tables a captured CUDA graph reads: never freed


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned + non_blocking: a pageable copy would synchronise
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached_table(cache: dict, key: tuple, build, device: torch.device) -> torch.Tensor:
    """The device table for `key` (its contents), copied to the device once: the same
    tensors every step (a CUDA graph's, or any loop that keeps its gradients) cost no copy.
    Under CUDA graph capture the table must already exist (a copy captured now would be
    replayed from host memory freed after the capture) and is kept alive for the graph."""
    table = cache.get(key)
    if table is None:
        if _capturing(device):
            raise RuntimeError("fused_adamw_: new parameter or gradient tensors during CUDA graph capture; "
                               "run an eager step with the same tensors before capturing")
        table = build()
        if len(cache) >= 16:
            cache.clear()
        cache[key] = table
    if _capturing(device):
        _kept_for_graphs.append(table)
    return table


def _block_table(numels: tuple, device) -> torch.Tensor:
    def build():
        rows = [(t, b) for t, n in enumerate(numels) for b in range(triton.cdiv(n, BLOCK))]
        return _to_device(torch.tensor(rows, dtype=torch.int32).view(-1, 2), device)
    return _cached_table(_block_tables, (numels, str(device)), build, device)


def _launch(group, lr, beta1, beta2, weight_decay, eps, grad_scale, found_inf, aligned):
    p0, g0, _, _, w0, _ = group[0]
    device = p0.device
    rows = tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                  w.data_ptr() if w is not None else 0, s.data_ptr(), p.numel())
                 for p, g, m, v, w, s in group)
    table = _cached_table(_row_tables, (rows, str(device)),  # (T, 7)
                          lambda: _to_device(torch.tensor(rows, dtype=torch.int64), device), device)
    blocks = _block_table(tuple(r[6] for r in rows), device)
    _adamw_kernel[(blocks.shape[0],)](
        table, blocks, lr, grad_scale, found_inf,
        beta1, beta2, math.log2(beta1) if beta1 > 0 else -math.inf,
        math.log2(beta2) if beta2 > 0 else -math.inf, weight_decay, eps,
        PARAM_DTYPE=_TL[p0.dtype], GRAD_DTYPE=_TL[g0.dtype], HAS_MASTER=w0 is not None,
        ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )


_constant_cache: dict[str, tuple] = {}


def _constants(device) -> tuple:
    """(1.0, 0.0) fp32 device scalars standing in for an absent grad_scale / found_inf."""
    key = str(device)
    if key not in _constant_cache:
        _constant_cache[key] = (torch.ones((), device=device), torch.zeros((), device=device))
    return _constant_cache[key]


def _check(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr):
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs and state_steps must be lists "
                         "of the same length")
    if master_params and len(master_params) != n:
        raise ValueError("master_params must be empty or hold one fp32 tensor per param")
    if not isinstance(lr, torch.Tensor) or lr.dtype != torch.float32 or lr.numel() != 1:
        raise TypeError("lr must be a one-element float32 tensor on the params' device")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype not in _TL or g.dtype not in _TL:
            raise TypeError(f"params[{i}] / grads[{i}] dtype {p.dtype} / {g.dtype}: "
                            f"fp32, fp16 or bf16 only")
        if p.shape != g.shape or not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError(f"params[{i}] and grads[{i}] must be contiguous with equal shapes")


def fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr,
                 beta1: float, beta2: float, weight_decay: float, eps: float,
                 grad_scale=None, found_inf=None) -> None:
    """AdamW step over lists of tensors (see the module docstring); steps += 1 unless
    found_inf. One launch per (param dtype, grad dtype, master, 16-byte aligned) group."""
    _check(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr)
    if not params:
        return
    if found_inf is not None:  # sync: none; the skip is decided on the device
        torch._foreach_add_(state_steps, 1.0 - found_inf.reshape(()))
    else:
        torch._foreach_add_(state_steps, 1.0)
    masters = master_params or [None] * len(params)
    groups: dict[tuple, list] = {}
    for entry in zip(params, grads, exp_avgs, exp_avg_sqs, masters, state_steps):
        if entry[0].numel() == 0:
            continue
        aligned = all(t.data_ptr() % _ALIGN_BYTES == 0 for t in entry[:5] if t is not None)
        key = (entry[0].dtype, entry[1].dtype, entry[4] is not None, aligned)
        groups.setdefault(key, []).append(entry)
    lr = lr.reshape(())
    one_zero = _constants(params[0].device)
    grad_scale = one_zero[0] if grad_scale is None else grad_scale.reshape(())
    found_inf = one_zero[1] if found_inf is None else found_inf.reshape(())
    for (_, _, _, aligned), group in groups.items():
        _launch(group, lr, beta1, beta2, weight_decay, eps, grad_scale, found_inf, aligned)
