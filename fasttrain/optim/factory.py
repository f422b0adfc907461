"""Build the optimizer named by `TrainingArguments.optim`.

Parameter groups follow HF: weight decay on every parameter of 2 or more dimensions, none
on biases and norm weights; with weight_decay=0 that split changes nothing, so there is one
group (half the optimizer launches per step). Optimizers that accept a tensor LR get one on the parameters'
device, so the LR schedule updates it in place with no host synchronisation.
"""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every requires_grad is False); "
                         "unfreeze at least one parameter")
    if weight_decay == 0.0:  # one group: every per-group launch of the optimizer happens once
        return [{"params": decay + no_decay, "weight_decay": 0.0}]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, args.weight_decay)
    device = groups[0]["params"][0].device
    betas = (args.adam_beta1, args.adam_beta2)
    lr_tensor = torch.tensor(args.learning_rate, dtype=torch.float32, device=device)
    if args.optim == "fasttrain_adamw":
        from fasttrain.optim.adamw import FusedAdamW
        return FusedAdamW(groups, lr=lr_tensor, betas=betas, eps=args.adam_epsilon,
                          master_weights=args.master_weights)
    if args.optim == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=lr_tensor, betas=betas, eps=args.adam_epsilon, fused=True)
    if args.optim == "adamw_torch":
        # capturable keeps its step counters on the GPU (the default reads each on the host);
        # torch allows it on accelerators only, so on the CPU it reads one per parameter
        capturable = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=lr_tensor if capturable else args.learning_rate, betas=betas,
                                 eps=args.adam_epsilon, capturable=capturable)
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate)
    raise ValueError(f"unknown optim {args.optim!r}")
