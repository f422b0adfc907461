"""Build the optimizer named by `TrainingArguments.optim`: fasttrain's FusedAdamW or one of
HF's torch-native names (adamw_torch, adamw_torch_fused, adafactor, sgd, adagrad, rmsprop);
TrainingArguments refuses HF's library-backed names, naming the missing library.

Parameter groups follow HF: weight decay on every parameter of 2 or more dimensions, none
on biases and norm weights; with weight_decay=0 that split changes nothing, so there is one
group (half the optimizer launches per step). Optimizers that accept a tensor LR get one on the parameters'
device, so the LR schedule updates it in place with no host synchronisation.
"""
from __future__ import annotations

import inspect

import torch

from fasttrain.training_args import parse_optim_args


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


# optim name -> (torch class, its keyword arguments from the TrainingArguments)
def _adam_kwargs(args, device) -> dict:
    kwargs = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if args.optim == "adamw_torch_fused":
        kwargs["fused"] = True
    elif device.type == "cuda":
        # capturable keeps its step counters on the GPU (the default reads each on the host);
        # torch allows it on accelerators only, so on the CPU it reads one per parameter
        kwargs["capturable"] = True
    return kwargs


_TORCH_OPTIMIZERS = {
    "adamw_torch": (torch.optim.AdamW, _adam_kwargs),
    "adamw_torch_fused": (torch.optim.AdamW, _adam_kwargs),
    # HF uses its own Adafactor with scale_parameter=False, relative_step=False (the LR as
    # given); torch's implements the same paper, not bit-identically (README)
    "adafactor": (getattr(torch.optim, "Adafactor", None), lambda args, device: {}),
    "sgd": (torch.optim.SGD, lambda args, device: {}),
    "adagrad": (torch.optim.Adagrad, lambda args, device: {}),
    "rmsprop": (torch.optim.RMSprop, lambda args, device: {}),
}


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer `args.optim` names over HF's weight-decay groups; `optim_args`
    ("key=value,...") become extra constructor arguments, checked against the constructor."""
    groups = param_groups(model, args.weight_decay)
    device = groups[0]["params"][0].device
    # sync: one host-to-device copy when the optimizer is built, never per step
    lr_tensor = torch.tensor(args.learning_rate, dtype=torch.float32, device=device)
    extra = parse_optim_args(args.optim_args)
    if args.optim == "fasttrain_adamw":
        from fasttrain.optim.adamw import FusedAdamW
        if extra:
            raise ValueError(f"TrainingArguments.optim_args={args.optim_args!r}: fasttrain_adamw takes its "
                             "settings from adam_beta1/adam_beta2/adam_epsilon/weight_decay; remove optim_args")
        return FusedAdamW(groups, lr=lr_tensor, betas=(args.adam_beta1, args.adam_beta2),
                          eps=args.adam_epsilon, master_weights=args.master_weights)
    if args.optim not in _TORCH_OPTIMIZERS:
        raise ValueError(f"TrainingArguments.optim={args.optim!r} is not an optimizer fasttrain builds; "
                         f"accepted: fasttrain_adamw, {', '.join(_TORCH_OPTIMIZERS)}")
    cls, base_kwargs = _TORCH_OPTIMIZERS[args.optim]
    if cls is None:
        raise ValueError(f"TrainingArguments.optim={args.optim!r} needs torch.optim.Adafactor "
                         f"(torch >= 2.5); this is torch {torch.__version__}")
    kwargs = {**base_kwargs(args, device), **extra}
    accepted = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr"})
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"TrainingArguments.optim_args={args.optim_args!r}: {unknown} is not an argument "
                         f"of {cls.__name__} (optim={args.optim!r}); it takes {accepted}")
    # a tensor LR (updated in place by the schedule, no host sync) where torch allows one
    tensor_lr = kwargs.get("fused") or kwargs.get("capturable")
    return cls(groups, lr=lr_tensor if tensor_lr else args.learning_rate, **kwargs)
