"""Plain PyTorch references (fp32 math or better) for every op in kernels/ and csrc/: tests and
benchmarks import these, never a copy."""
import torch
import torch.nn.functional as F


def cross_entropy_reference(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                            reduction="mean"):
    """Cross-entropy in fp32 with torch ops; same conventions as `cross_entropy` (a mean over
    zero valid rows is 0.0, not NaN)."""
    x = logits.float().reshape(-1, logits.shape[-1])
    t = target.reshape(-1)
    row = F.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=label_smoothing,
                          reduction="none")
    if z_loss:
        valid = t != ignore_index
        row = row + torch.where(valid, z_loss * torch.logsumexp(x, dim=-1) ** 2, 0.0)
    if reduction == "none":
        return row.view(target.shape)
    if reduction == "sum":
        return row.sum()
    return row.sum() / (t != ignore_index).sum().clamp(min=1)


def linear_cross_entropy_reference(hidden, weight, target, bias=None, **kw):
    """Unfused LM-head loss: materialises the fp32 (N, V) logits."""
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    logits = h @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    out = cross_entropy_reference(logits, target.reshape(-1), **kw)
    return out.view(target.shape) if kw.get("reduction") == "none" else out


@torch.no_grad()
def adamw_reference_(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, lr,
                     beta1, beta2, weight_decay, eps, grad_scale=None, found_inf=None):
    """torch.optim.AdamW's rule one tensor at a time in fp32 whatever the storage dtype
    (fp64 bias corrections), with the fused ops' conventions: optional fp32 masters the math
    updates (the param receives them rounded), grads / grad_scale, nothing changes when
    found_inf is nonzero. Host syncs are fine here: tests and benchmarks only.

        p -= lr*wd*p; m = lerp(m, g, 1-beta1); v = beta2*v + (1-beta2)*g*g
        p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps), t the incremented step
    """
    if found_inf is not None and float(found_inf) != 0.0:
        return
    lr = float(lr)
    for i, p in enumerate(params):
        state_steps[i] += 1
        step = float(state_steps[i])
        g = grads[i].float() / (float(grad_scale) if grad_scale is not None else 1.0)
        w = master_params[i] if master_params else p.float()
        m, v = exp_avgs[i].float(), exp_avg_sqs[i].float()
        w.mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / (1.0 - beta2 ** step) ** 0.5).add_(eps)
        w.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** step))
        for dst, src in ((p, w), (exp_avgs[i], m), (exp_avg_sqs[i], v)):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)


@torch.no_grad()
def unscale_and_check_reference_(grads, inv_scale, found_inf):
    """grads *= inv_scale in fp32 (rounded back to each grad's dtype; inv_scale None: check
    only) and found_inf = 1.0 if any grad held an inf/NaN before scaling (never cleared)."""
    for g in grads:
        x = g.float()
        if not torch.isfinite(x).all():
            found_inf.fill_(1.0)
        if inv_scale is not None:
            g.copy_(x * inv_scale.float())


def grad_norm_reference(tensors, norm_type=2.0):
    """The global norm_type-norm of all tensors, computed in fp64, as a 0-d fp32 tensor."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    return torch.linalg.vector_norm(flat, float(norm_type)).float()


def grad_norm_clip_reference(tensors, max_norm, norm_type=2.0):
    """(norm, divisor, found_inf) of fasttrain::grad_norm_clip, from grad_norm_reference:
    divisor = max((norm + 1e-6) / max_norm, 1) (NaN/inf when the norm is), found_inf = 1.0
    for a NaN/inf norm else 0.0; each a 0-d fp32 tensor."""
    norm = grad_norm_reference(tensors, norm_type)
    value = float(norm)
    finite = value == value and abs(value) != float("inf")
    divisor = max((value + 1e-6) / max_norm, 1.0) if finite else value
    return norm, torch.tensor(divisor, dtype=torch.float32), torch.tensor(0.0 if finite else 1.0)
