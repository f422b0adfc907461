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
