"""Fused cross-entropy: loss and gradient of the logits in one kernel.

Shape letters: N rows (tokens), V classes (vocabulary).

Public op: `cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0,
z_loss=0.0, reduction="mean")`, registered as the torch.library custom op
`fasttrain::cross_entropy` so `torch.compile(fullgraph=True)` can call it. CUDA tensors run the
Triton kernel below; CPU tensors run the C++ kernel `fasttrain::ce_rows_`
(csrc/cpu/cross_entropy.cpp: one row at a time in fp32, three passes over a cache-resident
row) when fasttrain's compiled ops are loaded (`import fasttrain` loads them), else
`_ce_rows_cpu_` (chunked torch ops, the reference the C++ kernel is tested against); the
Triton interpreter (TRITON_INTERPRET=1) is for tests only.

Per row, with lse = logsumexp(x), ls the label smoothing and z the z-loss scale:
    loss = lse - (1 - ls) * x[t] - ls * mean(x) + z * lse^2
    dloss/dx_j = softmax(x)_j * (1 + 2 z lse) - ls / V - (1 - ls) * [j == t]
Ignored rows (t == ignore_index) give zero loss and zero gradient. reduction="mean" divides
by the number of valid rows; a batch with no valid row gives 0.0 (torch gives NaN) so an empty
micro-batch cannot poison training.
"""
import torch
import triton
import triton.language as tl

from ._reference import cross_entropy_reference  # noqa: F401  (re-exported for tests/benches)
from ._library import custom_op

REDUCTIONS = ("mean", "sum", "none")
_CPU_CHUNK_ELEMS = 1 << 21  # fp32 temporaries of the CPU path stay under 8 MB
# Tests set this (with TRITON_INTERPRET=1) to run the Triton kernel on CPU tensors.
TRITON_ON_CPU = False


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, stride_lm, target_ptr, grad_ptr, stride_gm, loss_ptr, scale_ptr, stride_s,
    V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr,
):
    """One program per row: online logsumexp over V (pass 1), then the gradient (pass 2).

    Bytes per row: read V logits twice, write V gradients (may alias the logits: each element
    is read before it is overwritten by the same program). Memory bound. Algorithm: online
    softmax (Milakov & Gimelshein 2018) as in Liger-Kernel's cross-entropy.
    """
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_lm
    grad_ptr += row * stride_gm
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    # Pass 1: running max m and running sum d of exp(x - m); sum of x for label smoothing.
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.full((), 0.0, tl.float32)
    sum_x = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        sum_x += tl.sum(tl.where(mask, x, 0.0), 0)
        m = m_new
    lse = m + tl.log(d)
    in_range = valid & (target >= 0) & (target < V)
    x_t = tl.load(logits_ptr + target, mask=in_range, other=0.0).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * x_t - label_smoothing * (sum_x / V)
    loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    # Pass 2: gradient, scaled (1/n_valid for mean, the upstream gradient for "none").
    scale = tl.load(scale_ptr + row * stride_s).to(tl.float32)
    scale = tl.where(valid, scale, 0.0)
    coef = 1.0 + 2.0 * z_loss * lse
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - lse) * coef - label_smoothing / V
        g = tl.where(offs == target, g - (1.0 - label_smoothing), g)
        tl.store(grad_ptr + offs, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary size; a fixed small set so COMPILE_SPECS covers it."""
    return (4096, 8) if V >= 4096 else (1024, 4)


_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _compile_specs() -> list[dict]:
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for block_v, num_warps in (launch_config(4096), launch_config(1)):
            specs.append({
                "name": f"cross_entropy {dtype} BLOCK_V={block_v}",
                "kernel": _cross_entropy_kernel,
                "signature": {
                    "logits_ptr": f"*{dtype}", "stride_lm": "i64", "target_ptr": "*i64",
                    "grad_ptr": f"*{dtype}", "stride_gm": "i64", "loss_ptr": "*fp32",
                    "scale_ptr": "*fp32", "stride_s": "i32", "V": "i32",
                    "ignore_index": "i32", "label_smoothing": "fp32", "z_loss": "fp32",
                    "BLOCK_V": "constexpr",
                },
                "constexprs": {"BLOCK_V": block_v},
                "aligned": ["logits_ptr", "stride_lm", "grad_ptr", "stride_gm", "V",
                            "target_ptr", "loss_ptr", "scale_ptr"],
                "num_warps": num_warps,
                "expect_ptx": ["ld.global.v4", "st.global.v4"],
            })
    return specs


COMPILE_SPECS = _compile_specs()


def _ce_rows_triton_(logits, target, grad, loss, scale, ignore_index, label_smoothing, z_loss):
    N, V = logits.shape
    block_v, num_warps = launch_config(V)
    stride_s = scale.stride(0) if scale.dim() == 1 else 0
    _cross_entropy_kernel[(N,)](
        logits, logits.stride(0), target, grad, grad.stride(0), loss, scale, stride_s,
        V, ignore_index, float(label_smoothing), float(z_loss),
        BLOCK_V=block_v, num_warps=num_warps,
    )


def _ce_rows_cpu_(logits, target, grad, loss, scale, ignore_index, label_smoothing, z_loss):
    """Chunked torch version of the kernel; `grad` may alias `logits` (values read first).

    Built on log_softmax (one fused pass) rather than logsumexp (four on this CPU build):
    loss = -(1-ls) logp[t] - ls mean(logp) + z lse^2; grad = exp(logp) * (1 + 2 z lse)...
    """
    N, V = logits.shape
    rows = max(1, _CPU_CHUNK_ELEMS // max(V, 1))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        xf = logits[r0:r1] if logits.dtype == torch.float32 else logits[r0:r1].float()
        t = target[r0:r1]
        valid = t != ignore_index
        t_safe = torch.where(valid, t, 0).unsqueeze(1)
        lse = None
        if z_loss:  # lse = max - logp[argmax]: exact even for extreme rows
            x_max, arg_max = xf.max(dim=1, keepdim=True)
        out = grad[r0:r1] if grad is not None and grad.dtype == torch.float32 else None
        logp = torch.log_softmax(xf, dim=1, out=out) if out is not None else xf.log_softmax(1)
        row_loss = -(1.0 - label_smoothing) * logp.gather(1, t_safe).squeeze(1)
        if label_smoothing:
            row_loss -= label_smoothing * logp.mean(dim=1)
        if z_loss:
            lse = (x_max - logp.gather(1, arg_max)).squeeze(1)
            row_loss += z_loss * lse * lse
        loss[r0:r1] = torch.where(valid, row_loss, 0.0)
        if grad is None:
            continue
        s = scale[r0:r1] if scale.dim() == 1 else scale.expand(r1 - r0)
        row_scale = torch.where(valid, s.float(), 0.0)
        factor = row_scale * (1.0 + 2.0 * z_loss * lse) if z_loss else row_scale
        g = logp.exp_().mul_(factor.unsqueeze(1))
        if label_smoothing:
            g.sub_((label_smoothing / V * row_scale).unsqueeze(1))
        g.scatter_add_(1, t_safe, ((label_smoothing - 1.0) * row_scale).unsqueeze(1))
        if out is None:
            grad[r0:r1].copy_(g)


def ce_rows_(logits, target, grad, loss, scale, ignore_index, label_smoothing, z_loss):
    """Per-row loss into `loss` (N,) fp32 and, unless grad is None, the scaled gradient into
    `grad` (N, V), which may be `logits` itself. `scale` is 0-d or (N,). No host sync."""
    if logits.is_cuda or TRITON_ON_CPU:
        if grad is None:
            grad = torch.empty_like(logits)
        _ce_rows_triton_(logits, target, grad, loss, scale, ignore_index, label_smoothing, z_loss)
        return
    check_target_range(target, ignore_index, logits.shape[1])
    if (cpu_rows_kernel() and logits.is_contiguous() and (grad is None or grad.is_contiguous())
            and loss.is_contiguous()):
        torch.ops.fasttrain.ce_rows_(logits, target.contiguous(), grad, loss, scale.float().contiguous(),
                                     ignore_index, float(label_smoothing), float(z_loss))
    else:
        _ce_rows_cpu_(logits, target, grad, loss, scale, ignore_index, label_smoothing, z_loss)


_cpu_rows_loaded = False


def cpu_rows_kernel() -> bool:
    """Whether the C++ CPU kernel `fasttrain::ce_rows_` is registered (fasttrain's compiled
    ops are loaded by `import fasttrain`; this package cannot import fasttrain itself)."""
    global _cpu_rows_loaded
    if not _cpu_rows_loaded:
        try:
            _cpu_rows_loaded = torch._C._dispatch_has_kernel_for_dispatch_key("fasttrain::ce_rows_", "CPU")
        except RuntimeError:  # the op is not defined: the library is not loaded
            return False
    return _cpu_rows_loaded


def check_target_range(target, ignore_index, n_classes):
    """CPU only (free there); on CUDA it would be a host sync, so out-of-range targets there
    give an undefined loss instead, like torch's release builds."""
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        raise ValueError(f"target holds class indices outside [0, {n_classes}) that are "
                         f"not ignore_index={ignore_index}")


def check_loss_args(target, ignore_index, label_smoothing, z_loss, reduction):
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 (or int32) tensor of class indices, "
                        f"got {target.dtype}; convert it with target.long()")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; use one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if z_loss < 0.0:
        raise ValueError(f"z_loss={z_loss} must be >= 0 (it scales logsumexp^2)")


def reduction_scale(target, ignore_index, reduction):
    """Per-row gradient scale as a 0-d fp32 device tensor: 1/n_valid for mean, else 1."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=target.device)
    n_valid = (target != ignore_index).sum().to(torch.float32)
    return 1.0 / n_valid.clamp(min=1.0)


def reduce_loss(row_loss, scale, reduction):
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total * scale if reduction == "mean" else total


# ---- torch.library op --------------------------------------------------------------------

@custom_op("fasttrain::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                      label_smoothing: float, z_loss: float, reduction: str,
                      compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    N = logits.shape[0]
    row_loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    scale = reduction_scale(target, ignore_index, reduction)
    grad = torch.empty_like(logits) if compute_grad else None
    ce_rows_(logits, target, grad, row_loss, scale, ignore_index, label_smoothing, z_loss)
    if grad is None:
        grad = logits.new_empty(0)
    return reduce_loss(row_loss, scale, reduction), grad


@_cross_entropy_op.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss, reduction, compute_grad):
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return logits.new_empty(loss_shape, dtype=torch.float32), grad


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[5]
    ctx.set_materialize_grads(False)  # else the backward gets a zero-filled (N, V) for grad
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad_logits,) = ctx.saved_tensors
    if grad_logits.numel() == 0 and grad_loss.numel():
        raise RuntimeError("cross_entropy was called with compute_grad=False; call it through "
                           "fasttrain.kernels.cross_entropy with grad enabled")
    g = grad_loss.unsqueeze(1) if ctx.reduction == "none" else grad_loss
    if torch.compiler.is_compiling():
        grad_logits = grad_logits * g.to(grad_logits.dtype)
    elif grad_logits.is_cuda or ctx.reduction == "none" or float(g) != 1.0:  # sync: CPU only
        grad_logits.mul_(g.to(grad_logits.dtype))  # eager: in place, no second (N, V) buffer
    return grad_logits, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                  reduction="mean"):
    """Cross-entropy of `logits` (..., V) against class indices `target` (...).

    Returns a 0-d fp32 tensor ("mean", "sum") or fp32 losses of target's shape ("none").
    """
    if logits.dim() < 1 or logits.shape[:-1] != target.shape:
        raise ValueError(f"logits must be (..., V) and target (...): got logits "
                         f"{tuple(logits.shape)} and target {tuple(target.shape)}")
    if logits.dtype not in _TL_DTYPES:
        raise TypeError(f"logits dtype {logits.dtype} unsupported; use fp32, fp16 or bf16")
    if logits.device != target.device:
        raise ValueError(f"logits on {logits.device} but target on {target.device}")
    V = logits.shape[-1]
    check_loss_args(target, ignore_index, label_smoothing, z_loss, reduction)
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _cross_entropy_op(x, target.reshape(-1).long(), int(ignore_index), float(label_smoothing),
                                float(z_loss), reduction, compute_grad)
    return loss.view(target.shape) if reduction == "none" else loss
