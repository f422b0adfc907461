"""Plain PyTorch references (fp32 math) for every kernel; tests and benchmarks import these."""
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
    """torch.optim.AdamW's rule one tensor at a time in fp32 (fp64 bias corrections), with
    the fused op's conventions: fp32 moments, optional fp32 masters, grads / grad_scale,
    nothing changes when found_inf is nonzero. Host syncs are fine here: tests only."""
    if found_inf is not None and float(found_inf) != 0.0:
        return
    lr = float(lr)
    for i, p in enumerate(params):
        state_steps[i] += 1
        step = float(state_steps[i])
        g = grads[i].float() / (float(grad_scale) if grad_scale is not None else 1.0)
        w = master_params[i] if master_params else p.float()
        w.mul_(1.0 - lr * weight_decay)
        exp_avgs[i].lerp_(g, 1.0 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (exp_avg_sqs[i].sqrt() / (1.0 - beta2 ** step) ** 0.5).add_(eps)
        w.addcdiv_(exp_avgs[i], denom, value=-lr / (1.0 - beta1 ** step))
        p.copy_(w)
