"""Fused linear cross-entropy: the LM head and the loss without the full (N, V) logits.

Shape letters: N tokens, H hidden size, V vocabulary.

`linear_cross_entropy(hidden (..., H), weight (V, H), target (...), bias=None, ...)` equals
`cross_entropy(hidden @ weight.T + bias, target, ...)`. The tokens are processed in chunks of
`chunk_rows(N, H, V)` rows; per chunk: logits = h_c @ W.T into one reused (rows, V) buffer,
the cross-entropy kernel writes dloss/dlogits over that buffer in place, then
grad_h_c = g_c @ W and grad_W += g_c.T @ h_c (grad_b += sum g_c). For "mean" and "sum" the
gradients are computed in the forward and scaled by the upstream gradient in the backward
(three matmuls in all, like the unfused loss); for "none" the backward recomputes the logits
(four matmuls). Peak extra memory: grad_W + grad_h (the floor) + one logits chunk (half
inputs on the CPU: + grad_W in fp32 and one half (V, H) product, and without the compiled
ops the chunk in fp32; see `_flce_chunks`).
The loop is the same on CPU and CUDA; only the per-chunk cross-entropy differs (Triton kernel
on CUDA, the C++ rows kernel or chunked torch ops on CPU), see `cross_entropy.ce_rows_`. Algorithm: Liger-Kernel's
FusedLinearCrossEntropy (chunking over tokens, gradients in the forward).
"""
import torch

from .cross_entropy import ce_rows_, check_loss_args, cpu_rows_kernel, reduce_loss, reduction_scale
from ._library import custom_op
from ._reference import linear_cross_entropy_reference  # noqa: F401  (re-exported)

_HALF = (torch.float16, torch.bfloat16)
# Rows per chunk at least, for half inputs on the CPU: there grad_W is a half GEMM per chunk
# (K = rows) added into an fp32 accumulator, and short K runs it far below the GEMM's speed
# (N=2048, H=384, V=8192 bf16, one thread, fused vs unfused forward+backward: 1.33x at 128
# rows, 1.54x at 512, 1.38x at 1024).
CPU_HALF_MIN_ROWS = 512


def chunk_rows(N: int, H: int, V: int) -> int:
    """Rows per chunk: the logits chunk holds about max(N*H, V*H/6, 2^20) elements, in a
    multiple of 16 rows.

    N*H is Liger's rule (a chunk about the size of the input). The V*H/6 floor bounds the
    cost of small matmuls: grad_W += g_c.T @ h_c reads and writes all of grad_W once per
    chunk, and on CPU (V=65536, H=1024) 128-row chunks ran that matmul ~15% slower than
    512-row ones; at V*H/6 the chunk is ~1/6 of grad_W, inside the 20%-over-floor memory
    goal. 2^20 keeps tiny-H problems from running thousands of one-row chunks.
    """
    target = max(N * H, (V * H) // 6, 1 << 20)
    rows = max(1, target // max(V, 1))
    if rows >= 32:
        rows -= rows % 16
    return min(N, rows)


def _flce_chunks(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                 scale, row_loss, want_grads):
    """Fills row_loss (N,) and returns (grad_h, grad_w, grad_b) scaled by `scale` or Nones.

    Per chunk, dtypes: logits x = h_c @ W.T in the input dtype. fp32 inputs, and half ones on
    CUDA (the kernel reads half and does its math in fp32), take dloss/dlogits in place of x;
    grad_W accumulates in fp32 through addmm's fp32 output. Half inputs on the CPU, which has
    no half matmul with an fp32 output: the C++ rows kernel (fasttrain::ce_rows_) converts
    each row to fp32 in a cache-resident buffer and writes dloss/dlogits back over x in half
    (without the compiled ops: into an fp32 chunk, copied back into x once), and
    grad_h = x @ W and the grad_W product x.T @ h_c run as half GEMMs (about twice fp32's
    speed on a CPU with bf16 instructions), the product into one reused (V, H) buffer added
    into the fp32 accumulator: one (V, H) add per chunk, so chunks are at least
    CPU_HALF_MIN_ROWS rows.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    out_w_dtype, out_b_dtype = weight.dtype, None if bias is None else bias.dtype
    if weight.dtype != hidden.dtype:  # an fp32 (master) weight with half hidden states: the
        weight = weight.to(hidden.dtype)  # GEMMs run in half, grad_W comes back in fp32 unrounded
        bias = bias.to(hidden.dtype) if bias is not None else None
    half = weight.dtype in _HALF
    cpu_half = half and not weight.is_cuda and want_grads
    # the C++ CPU rows kernel reads the half chunk and writes its gradient over it in place
    score_in_fp32 = cpu_half and not cpu_rows_kernel()
    grad_h = torch.empty_like(hidden) if want_grads else None
    grad_w = torch.empty((V, H), dtype=torch.float32 if half else weight.dtype,
                         device=weight.device) if want_grads else None
    grad_b = None
    if want_grads and bias is not None:
        grad_b = torch.zeros(V, dtype=torch.float32, device=bias.device)
    rows = chunk_rows(N, H, V)
    if cpu_half:
        rows = max(rows, min(N, CPU_HALF_MIN_ROWS))
    buf = torch.empty((rows, V), dtype=hidden.dtype, device=hidden.device)  # (rows, V)
    buf32 = torch.empty((rows, V), dtype=torch.float32, device=hidden.device) if score_in_fp32 else None
    w_t = weight.t()
    prod = None
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h_c, x = hidden[r0:r1], buf[: r1 - r0]
        if bias is None:
            torch.mm(h_c, w_t, out=x)
        else:
            torch.addmm(bias, h_c, w_t, out=x)
        s = scale[r0:r1] if scale.dim() == 1 else scale
        g = buf32[: r1 - r0] if score_in_fp32 else x if (want_grads or x.is_cuda) else None
        ce_rows_(x, target[r0:r1], g, row_loss[r0:r1], s, ignore_index, label_smoothing, z_loss)
        if not want_grads:
            continue
        if score_in_fp32:
            x.copy_(g)
        if cpu_half:
            if prod is None:
                prod = torch.empty((V, H), dtype=weight.dtype, device=weight.device)
            torch.mm(x.t(), h_c, out=prod)
            grad_w.copy_(prod) if r0 == 0 else grad_w.add_(prod)
        else:
            _accumulate_(grad_w, x.t(), h_c, first=r0 == 0)
        torch.mm(x, weight, out=grad_h[r0:r1])
        if grad_b is not None:
            grad_b += g.sum(dim=0, dtype=torch.float32)
    if not want_grads:
        return None, None, None
    if grad_w.dtype != out_w_dtype:
        grad_w = grad_w.to(out_w_dtype)
    if grad_b is not None:
        grad_b = grad_b.to(out_b_dtype)
    return grad_h, grad_w, grad_b


def _accumulate_(acc, a, b, first):
    """acc (+)= a @ b; acc is fp32 while a, b are half on CUDA (addmm's fp32 output)."""
    if acc.dtype == a.dtype:
        torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, beta=0 if first else 1, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):  # a build without it: a temporary
        prod = torch.mm(a, b)
        acc.copy_(prod) if first else acc.add_(prod)


def _empty(t):
    return t.new_empty(0)


@custom_op("fasttrain::linear_cross_entropy", mutates_args=())
def _flce_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
             bias: torch.Tensor | None, ignore_index: int, label_smoothing: float,
             z_loss: float, reduction: str, compute_grad: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    row_loss = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    scale = reduction_scale(target, ignore_index, reduction)
    want = compute_grad and reduction != "none"  # "none" recomputes in the backward
    gh, gw, gb = _flce_chunks(hidden, weight, bias, target, ignore_index, label_smoothing,
                              z_loss, scale, row_loss, want)
    loss = reduce_loss(row_loss, scale, reduction)
    gh = gh if gh is not None else _empty(hidden)
    gw = gw if gw is not None else _empty(weight)
    gb = gb if gb is not None else _empty(hidden)
    return loss, gh, gw, gb


@_flce_op.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, reduction,
      compute_grad):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (),
                            dtype=torch.float32)
    if not compute_grad or reduction == "none":
        return loss, _empty(hidden), _empty(weight), _empty(hidden)
    gb = torch.empty_like(bias) if bias is not None else _empty(hidden)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), gb


@custom_op("fasttrain::linear_cross_entropy_backward", mutates_args=())
def _flce_backward_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                      bias: torch.Tensor | None, grad_loss: torch.Tensor, ignore_index: int,
                      label_smoothing: float, z_loss: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of reduction="none": recompute the logits, scale each row by grad_loss."""
    row_loss = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    gh, gw, gb = _flce_chunks(hidden, weight, bias, target, ignore_index, label_smoothing,
                              z_loss, grad_loss.float().contiguous(), row_loss, True)
    return gh, gw, gb if gb is not None else _empty(hidden)


@_flce_backward_op.register_fake
def _(hidden, weight, target, bias, grad_loss, ignore_index, label_smoothing, z_loss):
    gb = torch.empty_like(bias) if bias is not None else _empty(hidden)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, ls, z, reduction, _ = inputs
    # The gradient outputs get no gradient of their own: without this autograd would hand the
    # backward a zero-filled (V, H) and (N, H) for them, doubling the peak memory.
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.options = reduction, (ignore_index, ls, z)
    ctx.has_bias = bias is not None
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_grads_of_grads):
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        gh, gw, gb = _flce_backward_op(hidden, weight, target, bias, grad_loss, *ctx.options)
    else:
        gh, gw, gb = ctx.saved_tensors
        if gw.numel() == 0:
            raise RuntimeError("linear_cross_entropy ran without gradients (compute_grad="
                               "False); call fasttrain.kernels.linear_cross_entropy with grad on")
        if torch.compiler.is_compiling():
            gh, gw, gb = gh * grad_loss, gw * grad_loss, gb * grad_loss
        else:  # eager: scale the saved gradients in place, no second (V, H) buffer
            gh.mul_(grad_loss)
            gw.mul_(grad_loss)
            gb.mul_(grad_loss)
    return gh, gw, None, gb if ctx.has_bias else None, None, None, None, None, None


_flce_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100,
                         label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """cross_entropy(hidden @ weight.T + bias, target) without materialising the logits.

    hidden (..., H), weight (V, H), bias (V,) or None, target (...) int64. Returns a 0-d fp32
    tensor ("mean", "sum") or fp32 losses of target's shape ("none"). The weight (and bias)
    may be float32 with bf16/fp16 hidden states, as under autocast with fp32 master weights:
    the matmuls then run in the hidden states' dtype (the weight cast once inside) and the
    weight's gradient comes back in float32 from its fp32 accumulator, not rounded to half
    and cast back.
    """
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"need hidden (..., H) and weight (V, H): got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"target must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    mixed = weight.dtype == torch.float32 and hidden.dtype in _HALF
    if (hidden.dtype != weight.dtype and not mixed) or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias ({getattr(bias, 'dtype', None)}) "
                        "must share a dtype, or the weight and bias be float32 with half hidden states; "
                        "cast them (autocast does this for a plain matmul)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if len({hidden.device, weight.device, target.device}) != 1:
        raise ValueError("hidden, weight and target must be on the same device")
    if target.numel() == 0:
        raise ValueError(f"linear_cross_entropy got no rows to score (hidden {tuple(hidden.shape)}, "
                         f"target {tuple(target.shape)}): an empty batch, or sequences of one "
                         "token after the causal shift; skip the loss for such a batch or "
                         "give each sequence at least two tokens")
    check_loss_args(target, ignore_index, label_smoothing, z_loss, reduction)
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    needs = [t.requires_grad for t in (hidden, weight, bias) if t is not None]
    compute_grad = torch.is_grad_enabled() and any(needs)
    loss = _flce_op(h, weight.contiguous(), target.reshape(-1).long(), bias, int(ignore_index),
                    float(label_smoothing), float(z_loss), reduction, compute_grad)[0]
    return loss.view(target.shape) if reduction == "none" else loss
