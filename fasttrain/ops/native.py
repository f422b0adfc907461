"""Loader and Python entry points for the compiled ops in `csrc/` (`torch.ops.fasttrain.*`).

The shared library is built by `bash scripts/build_ops.sh` into `build/` at the repository
root. `available()` loads it once, from `$FASTTRAIN_OPS_LIB` when set, else from `build/`;
`FASTTRAIN_DISABLE_OPS=1` forces the pure-PyTorch path. Which path is taken, and why, is
logged at debug level (`logging.getLogger("fasttrain.ops")`).

Every wrapper works without the library: it then runs the fp32 PyTorch reference defined
here (or `torch._fused_adamw_` where that computes the same thing), so callers never branch.
The references are also what the tests and `bench/bench_adamw.py` compare against.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger("fasttrain.ops")

LIBRARY_NAME = "libfasttrain_ops.so"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIBRARY_PATH = REPO_ROOT / "build" / LIBRARY_NAME

_loaded: Optional[bool] = None
_loaded_path: Optional[str] = None

Tensors = Sequence[torch.Tensor]


# ----------------------------------------------------------------------------- loading
def _load() -> bool:
    global _loaded_path
    if os.environ.get("FASTTRAIN_DISABLE_OPS", "0") not in ("", "0"):
        log.debug("fasttrain ops: FASTTRAIN_DISABLE_OPS is set; using the PyTorch fallback")
        return False
    override = os.environ.get("FASTTRAIN_OPS_LIB")
    path = Path(override) if override else DEFAULT_LIBRARY_PATH
    if not path.is_file():
        log.debug("fasttrain ops: %s not found (build it with `bash scripts/build_ops.sh`); "
                  "using the PyTorch fallback", path)
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:
        log.debug("fasttrain ops: loading %s failed (%s); using the PyTorch fallback", path, err)
        return False
    _loaded_path = str(path)
    log.debug("fasttrain ops: loaded %s", path)
    return True


def available() -> bool:
    """True when the compiled library is loaded (loads it on the first call)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@functools.lru_cache(maxsize=None)
def _has_kernel(op_name: str, device_type: str) -> bool:
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fasttrain::{op_name}", key)


def has_kernel(op_name: str, tensors: Tensors) -> bool:
    """True when the library is loaded and `op_name` has a kernel for the tensors' device
    (a CPU-only build has no CUDA kernels: its CUDA callers take the fallback)."""
    if not available() or len(tensors) == 0:
        return False
    return _has_kernel(op_name, tensors[0].device.type)


def library_path() -> Optional[str]:
    """The path the library was loaded from, or None on the fallback path."""
    return _loaded_path if available() else None


def build_info() -> dict:
    """What the loaded library was built from (source dir, torch version, CUDA); {} if absent."""
    if not available():
        return {}
    pairs = (item.split("=", 1) for item in torch.ops.fasttrain.build_info().split(";"))
    return {key: value for key, value in pairs}


# ----------------------------------------------------------------------------- references
def _as_float(x) -> float:
    return float(x)  # sync: reads a 0-d tensor on the host (free on CPU)


@torch.no_grad()
def reference_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                     master_params: Tensors, state_steps: Tensors, lr, beta1: float,
                     beta2: float, weight_decay: float, eps: float,
                     grad_scale: Optional[torch.Tensor] = None,
                     found_inf: Optional[torch.Tensor] = None) -> None:
    """torch.optim.AdamW's rule, one tensor at a time, in fp32 whatever the storage dtype.

    p -= lr*wd*p; m = lerp(m, g, 1-beta1); v = beta2*v + (1-beta2)*g*g;
    p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps), with t the incremented step
    and g = grad/grad_scale. With master_params the math runs on the fp32 master and the
    param receives it rounded to nearest. A nonzero found_inf skips everything.
    """
    if found_inf is not None and _as_float(found_inf) != 0.0:
        return
    lr = _as_float(lr)
    for i, param in enumerate(params):
        state_steps[i].add_(1)
        step = _as_float(state_steps[i])
        grad = grads[i].float()
        if grad_scale is not None:
            grad = grad / grad_scale.float()
        weights = master_params[i] if master_params else param.float()
        exp_avg, exp_avg_sq = exp_avgs[i].float(), exp_avg_sqs[i].float()
        weights.mul_(1.0 - lr * weight_decay)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        weights.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1 ** step))
        for dst, src in ((param, weights), (exp_avgs[i], exp_avg), (exp_avg_sqs[i], exp_avg_sq)):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)


@torch.no_grad()
def reference_unscale_and_check_(grads: Tensors, inv_scale: torch.Tensor,
                                 found_inf: torch.Tensor) -> None:
    """grads *= inv_scale; found_inf = 1.0 if any grad held an inf/NaN (never cleared)."""
    for grad in grads:
        if not torch.isfinite(grad).all():  # sync: fallback path only
            found_inf.fill_(1.0)
        grad.mul_(inv_scale)


def reference_grad_norm(tensors: Tensors, norm_type: float = 2.0) -> torch.Tensor:
    """Global norm over all tensors, accumulated in fp32, returned as a 0-d fp32 tensor."""
    norm_type = float(norm_type)
    if not (norm_type > 0.0):
        # RuntimeError like the compiled op's TORCH_CHECK, so callers see one error type
        raise RuntimeError("fasttrain::grad_norm: norm_type must be a positive number or inf "
                           f"(2.0 for clipping), got {norm_type}")
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.float32)
    norms = [torch.linalg.vector_norm(t.detach(), norm_type, dtype=torch.float32)
             for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


# ----------------------------------------------------------------------------- wrappers
def _lr_tensor(lr) -> torch.Tensor:
    if isinstance(lr, torch.Tensor):
        return lr
    return torch.tensor(float(lr), dtype=torch.float32)


def _torch_fused_can_run(params: Tensors, grads: Tensors, master_params: Tensors) -> bool:
    # torch._fused_adamw_ matches the reference when there is no master copy and each
    # param/grad/moment set shares one floating dtype on one device.
    if master_params or not params:
        return False
    dtype, device = params[0].dtype, params[0].device
    return all(t.dtype == dtype and t.device == device for t in (*params, *grads))


@torch.no_grad()
def fused_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                 master_params: Tensors, state_steps: Tensors, lr, beta1: float,
                 beta2: float, weight_decay: float, eps: float,
                 grad_scale: Optional[torch.Tensor] = None,
                 found_inf: Optional[torch.Tensor] = None) -> None:
    """One AdamW step over many tensors in place; see `reference_adamw_` for the math.

    lr: float or 0-d fp32 tensor. master_params: [] or fp32 copies of params (same shapes).
    state_steps: 0-d fp32 tensors, incremented unless found_inf is nonzero.
    """
    lr = _lr_tensor(lr)
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(master_params),
            list(state_steps))
    if has_kernel("adamw_", args[0]):
        torch.ops.fasttrain.adamw_(*args, lr, float(beta1), float(beta2), float(weight_decay),
                                   float(eps), grad_scale, found_inf)
        return
    if _torch_fused_can_run(args[0], args[1], args[4]):
        if found_inf is not None and _as_float(found_inf) != 0.0:
            return
        torch._foreach_add_(args[5], 1)
        torch._fused_adamw_(args[0], args[1], args[2], args[3], [], args[5], lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                            amsgrad=False, maximize=False, grad_scale=grad_scale)
        return
    reference_adamw_(*args, lr, beta1, beta2, weight_decay, eps, grad_scale, found_inf)


@torch.no_grad()
def unscale_and_check_(grads: Tensors, inv_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
    """grads *= inv_scale in place; found_inf (1-element fp32) set to 1.0 on any inf/NaN."""
    grads = list(grads)
    if has_kernel("unscale_and_check_", grads):
        torch.ops.fasttrain.unscale_and_check_(grads, inv_scale, found_inf)
    elif grads:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)


@torch.no_grad()
def grad_norm(tensors: Tensors, norm_type: float = 2.0) -> torch.Tensor:
    """Global `norm_type`-norm (2.0, inf, or any p > 0) over all tensors as a 0-d fp32 tensor."""
    tensors = list(tensors)
    if has_kernel("grad_norm", tensors):  # [] has no device: the fallback returns 0
        return torch.ops.fasttrain.grad_norm(tensors, float(norm_type))
    return reference_grad_norm(tensors, norm_type)
