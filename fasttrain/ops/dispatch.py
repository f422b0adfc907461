"""The one dispatch point of the optimizer-tail ops: one implementation per op per device.

| op | CUDA | CPU (library built) | CPU (no library) |
|---|---|---|---|
| `adamw_` | Triton `kernels/adamw.py` | C++ `csrc/cpu/adamw.cpp` | `torch._fused_adamw_` |
| `unscale_and_check_` | Triton `kernels/unscale.py` | C++ `csrc/cpu/unscale_and_check.cpp` | `torch._amp_foreach_non_finite_check_and_unscale_` |
| `grad_norm` (`clip_grad_norm_`) | CUDA C++ `csrc/cuda/grad_norm.cu` | C++ `csrc/cpu/grad_norm.cpp` | `torch._foreach_norm` |
| `grad_norm_clip` (the Trainer's clipping) | CUDA C++ `csrc/cuda/grad_norm.cu` | C++ `csrc/cpu/grad_norm.cpp` | `grad_norm` + four torch ops |

The last column is torch's own op, used where the compiled library is not built (a plain
`pip install` builds no C++); a CUDA torch without the library's CUDA kernels also takes
torch's op for `grad_norm`, and one without Triton torch's ops for AdamW and unscale. Which implementation won, and by how much, is measured in
`bench/bench_adamw.py` and `bench/bench_grad_ops.py` (docs/csrc.md). The plain PyTorch fp32
references every implementation is tested against are in `kernels/_reference.py`.

Every function here keeps its tensors on their device and never reads them on the host.
"""
from __future__ import annotations

import functools
import importlib.util
from collections import defaultdict
from typing import Iterable, Optional, Sequence

import torch

from fasttrain.ops import native

# Tests set this (with TRITON_INTERPRET=1) to run the Triton kernels on CPU tensors.
TRITON_ON_CPU = False

Tensors = Sequence[torch.Tensor]


def implementation(op: str, device_type: str) -> str:
    """Which implementation `op` runs on `device_type` now: "triton", "c++" or "torch"."""
    if op in ("adamw_", "unscale_and_check_") and (device_type == "cuda" or TRITON_ON_CPU):
        if _triton_importable():
            return "triton"
        return "torch"  # a CUDA torch without Triton (e.g. on Windows): torch's own op
    if native.has_kernel_on(op, device_type):
        return "c++"
    return "torch"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------- AdamW
@torch.no_grad()
def adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
           master_params: Tensors, state_steps: Tensors, lr: torch.Tensor, beta1: float,
           beta2: float, weight_decay: float, eps: float,
           grad_scale: Optional[torch.Tensor] = None,
           found_inf: Optional[torch.Tensor] = None) -> None:
    """One torch.optim.AdamW step over lists of tensors in place, math in fp32.

    lr: 0-d fp32 tensor on the params' device. master_params: [] or fp32 copies the math
    updates (the params then receive them rounded). exp_avgs/exp_avg_sqs: fp32. Grads are
    divided by grad_scale; a nonzero found_inf changes nothing, the step counters included.
    """
    if not params:
        return
    args = (params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr, beta1,
            beta2, weight_decay, eps, grad_scale, found_inf)
    which = implementation("adamw_", params[0].device.type)
    if which == "triton":
        from fasttrain.kernels.adamw import fused_adamw_ as triton_adamw_
        triton_adamw_(*args)
    elif which == "c++":
        torch.ops.fasttrain.adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                   list(master_params), list(state_steps), lr, float(beta1),
                                   float(beta2), float(weight_decay), float(eps), grad_scale,
                                   found_inf)
    else:
        _torch_adamw_(*args)


def _torch_adamw_(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr,
                  beta1, beta2, weight_decay, eps, grad_scale=None, found_inf=None):
    """torch._fused_adamw_ on fp32 weights (the params, the masters, or fp32 copies of half
    params), then the rounded weights back into half params."""
    if found_inf is not None:
        found_inf = found_inf.reshape(())
    torch._foreach_add_(state_steps, 1.0)
    if found_inf is not None:  # the List overload: a 0-d tensor operand would be read on the host
        torch._foreach_sub_(state_steps, [found_inf] * len(state_steps))
    weights = list(master_params) or [p if p.dtype == torch.float32 else p.float()
                                      for p in params]
    grads32 = [g if g.dtype == torch.float32 else g.float() for g in grads]
    torch._fused_adamw_(weights, grads32, list(exp_avgs), list(exp_avg_sqs), [],
                        list(state_steps), lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
                        grad_scale=None if grad_scale is None else grad_scale.reshape(()),
                        found_inf=found_inf)
    half = [(p, w) for p, w in zip(params, weights) if p.data_ptr() != w.data_ptr()]
    if half:  # a skipped step left the weights as they were: copying back is harmless
        torch._foreach_copy_([p for p, _ in half], [w for _, w in half])


# ----------------------------------------------------------------------------- unscale
@torch.no_grad()
def unscale_and_check_(grads: Tensors, inv_scale: Optional[torch.Tensor],
                       found_inf: torch.Tensor) -> None:
    """grads *= inv_scale in place (inv_scale None: check only) and found_inf = 1.0 if any
    gradient holds an inf/NaN; never clears found_inf. All tensors on found_inf's device.

    Non-contiguous gradients (rare: the fused kernels need flat storage) take torch's op.
    """
    contiguous = [g for g in grads if g.is_contiguous() and g.numel() > 0]
    strided = [g for g in grads if not g.is_contiguous()]
    which = implementation("unscale_and_check_", found_inf.device.type)
    if contiguous and which == "triton":
        from fasttrain.kernels.unscale import unscale_and_check_ as triton_unscale_
        triton_unscale_(contiguous, inv_scale, found_inf)
    elif contiguous and which == "c++":
        torch.ops.fasttrain.unscale_and_check_(contiguous, _or_one(inv_scale, found_inf),
                                               found_inf)
    else:
        strided += contiguous
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for g in strided:
        by_dtype[g.dtype].append(g)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf,
                                                         _or_one(inv_scale, found_inf))


def _or_one(inv_scale, like):
    # Check only: the Triton kernel skips the writes; the other ops multiply by one.
    return torch.ones_like(like) if inv_scale is None else inv_scale


# ----------------------------------------------------------------------------- norm, clip
@torch.no_grad()
def grad_norm(tensors: Tensors, norm_type: float = 2.0) -> torch.Tensor:
    """Global `norm_type`-norm (2.0, inf, or any p > 0) of all tensors, accumulated in fp32,
    as a 0-d fp32 tensor on their device (a NaN/inf element gives a NaN/inf norm)."""
    norm_type = float(norm_type)
    if not norm_type > 0.0:
        raise ValueError(f"grad_norm: norm_type={norm_type} must be a positive number or inf "
                         "(2.0 for gradient clipping)")
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError("grad_norm: the tensors are on several devices "
                         f"({sorted({str(t.device) for t in tensors})}); call it per device")
    contiguous = all(t.is_contiguous() for t in tensors)
    if contiguous and implementation("grad_norm", device.type) == "c++":
        return torch.ops.fasttrain.grad_norm(tensors, norm_type)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    norms = [n for group in by_dtype.values()
             for n in torch._foreach_norm(group, norm_type, dtype=torch.float32)]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def grad_norm_clip(tensors: Tensors, max_norm: float,
                   norm_type: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipping tail of a step as three 0-d fp32 tensors on the tensors' device: the
    global norm (as `grad_norm`), the divisor max((norm + 1e-6) / max_norm, 1) a fused
    optimizer divides the gradients by (clip_grad_norm_'s factor, inverted; NaN/inf when the
    norm is), and the skip flag found_inf (1.0 when the norm is NaN or inf, else 0.0).

    One op where the library has it (instead of five: the norm, two for the divisor, two for
    the flag). A caller that runs it every step (the Trainer) takes `grad_norm_clip_for`, which
    makes these checks once per run. Gradients do not require grad: no autograd here."""
    tensors = [t for t in tensors if t.numel() > 0]
    if tensors and any(t.device != tensors[0].device for t in tensors):
        raise ValueError("grad_norm_clip: the tensors are on several devices "
                         f"({sorted({str(t.device) for t in tensors})}); call it per device")
    if not tensors:  # no gradient at all: norm 0, divisor 1, no skip
        _check_max_norm(max_norm)
        return _torch_grad_norm_clip(tensors, max_norm=float(max_norm), norm_type=float(norm_type))
    return grad_norm_clip_for(tensors[0].device.type, max_norm, norm_type)(tensors)


def grad_norm_clip_for(device_type: str, max_norm: float, norm_type: float = 2.0):
    """`grad_norm_clip` as a function of the gradients alone, with what a run fixes decided
    here once: max_norm's check, the implementation on `device_type`, the float arguments.
    The per-step call is then the op in a `try` (GradClipper.clip on a Linear(16, 1): about
    4.4 us of host time on CPU, the op alone 3.3, where the checked wrapper took 6.5): its
    gradients must be non-empty and on one device, which the caller checks once
    (GradClipper). A non-contiguous gradient (autograd gives none for contiguous parameters;
    a callback could assign one) takes the torch ops."""
    _check_max_norm(max_norm)
    norm_type, max_norm = float(norm_type), float(max_norm)
    if implementation("grad_norm_clip", device_type) != "c++":
        return functools.partial(_torch_grad_norm_clip, max_norm=max_norm, norm_type=norm_type)
    op = torch.ops.fasttrain.grad_norm_clip.default

    def clip(tensors: Tensors):
        try:
            return op(tensors, norm_type, max_norm)
        except RuntimeError:  # free when nothing is raised: no per-step contiguity scan
            if all(t.is_contiguous() for t in tensors):
                raise
            return _torch_grad_norm_clip(tensors, max_norm=max_norm, norm_type=norm_type)
    return clip


def _check_max_norm(max_norm: float) -> None:
    if not max_norm > 0:
        raise ValueError(f"grad_norm_clip: max_norm={max_norm} must be > 0 (the total norm to clip to)")


def _torch_grad_norm_clip(tensors: Tensors, *, max_norm: float, norm_type: float):
    norm = grad_norm(tensors, norm_type)
    # (norm + 1e-6) / max_norm in one op with a constant made once per device and max_norm
    divisor = torch.add(_clip_offset(norm.device, max_norm), norm, alpha=1.0 / max_norm).clamp_(min=1.0)
    return norm, divisor, nonfinite_flag(norm)


def nonfinite_flag(value: torch.Tensor) -> torch.Tensor:
    """0-d fp32 flag on the device, 1.0 when `value` is inf or NaN (x * 0 is NaN exactly
    then), in two ops and no host read."""
    value = value if value.dtype == torch.float32 else value.float()
    return torch.nan_to_num(value * 0, nan=1.0)


_clip_offsets: dict[tuple, torch.Tensor] = {}


def _clip_offset(device: torch.device, max_norm: float) -> torch.Tensor:
    key = (device, float(max_norm))
    offset = _clip_offsets.get(key)
    if offset is None:
        offset = _clip_offsets[key] = torch.full((), 1e-6 / max_norm, device=device)
    return offset


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float,
                    norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s rule on `grad_norm`: grads *= min(1, max_norm /
    (norm + 1e-6)); returns the norm before clipping (0-d fp32, on the grads' device).

    A non-finite norm makes every gradient non-finite, as torch's does by default
    (error_if_nonfinite=False); the Trainer then skips the step on its device flag.
    Sharded gradients (FSDP's DTensors) go to torch's, which reduces the norm over ranks.
    """
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:  # on the params' device, so callers can combine it with device flags
        device = parameters[0].device if parameters else None
        return torch.zeros((), dtype=torch.float32, device=device)
    if any(_is_dtensor(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)
    total = grad_norm(grads, norm_type)
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    # grads *= coef is the unscale op's multiply (one fused pass over all gradients); its
    # non-finite flag is not needed here: a non-finite gradient already made `total` so.
    unscale_and_check_(grads, coef, _scratch_flag(total.device))
    return total


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


_scratch_flags: dict[torch.device, torch.Tensor] = {}


def _scratch_flag(device: torch.device) -> torch.Tensor:
    """A 0-d fp32 flag per device that the unscale op may set and nobody reads."""
    flag = _scratch_flags.get(device)
    if flag is None:
        flag = _scratch_flags[device] = torch.zeros((), dtype=torch.float32, device=device)
    return flag
