"""Build the optimizer named by `TrainingArguments.optim`: fasttrain's FusedAdamW or one of
HF's torch-native names (adamw_torch, adamw_torch_fused, adafactor, sgd, adagrad, rmsprop);
TrainingArguments refuses HF's library-backed names, naming the missing library.

Parameter groups are HF's two: no weight decay inside nn.LayerNorm or on names with a
bias or a norm, decay on the rest; with weight_decay=0 the Trainer steps them as one group
(optim.merged_groups: half the optimizer launches per step). Optimizers that accept a tensor LR get one on the parameters'
device, so the LR schedule updates it in place with no host synchronisation.
"""
from __future__ import annotations

import inspect
import re

import torch

from fasttrain.training_args import parse_optim_args


# HF's rule for what weight decay skips: parameters inside an nn.LayerNorm, and names
# (lower-cased, dotted) that mention a bias or a norm
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters weight decay applies to, by HF's rule (what HF's
    Trainer.get_decay_parameter_names returns): not inside an nn.LayerNorm, and no bias or
    norm in the dotted name. A tied parameter is listed under each of its names."""
    names: list[str] = []

    def visit(module: torch.nn.Module, prefix: str, in_norm: bool) -> None:
        for name in module._parameters:
            full = prefix + name
            if not in_norm and not _NO_DECAY_NAMES.search(full.lower()):
                names.append(full)
        for name, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}{name}.", in_norm or isinstance(child, torch.nn.LayerNorm))
    visit(model, "", False)
    return names


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """HF's two groups, as HF's Trainer builds them (decay on `decay_parameter_names`, none
    on the rest; trainable parameters only, each once; a group may be empty). With
    weight_decay=0 the two are equal but for their parameters, and the Trainer steps them as
    one (optim.merged_groups): HF's groups at the launches of one."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (every requires_grad is False); "
                         "unfreeze at least one parameter")
    decay = set(decay_parameter_names(model))
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


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


def build_optimizer(args, model: torch.nn.Module, cls_and_kwargs: tuple | None = None) -> torch.optim.Optimizer:
    """The optimizer `args.optim` names (or `cls_and_kwargs`, the Trainer's
    optimizer_cls_and_kwargs) over HF's weight-decay groups; `optim_args` ("key=value,...")
    become extra constructor arguments, checked against the constructor."""
    groups = param_groups(model, args.weight_decay)
    if cls_and_kwargs is not None:
        cls, kwargs = cls_and_kwargs
        return cls(groups, **kwargs)
    cls, kwargs = optimizer_cls_and_kwargs(args, next(p for g in groups for p in g["params"]).device)
    optimizer = cls(groups, **kwargs)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        # the groups step with the device LR; what HF's helpers and torch's schedulers read as
        # the base is the float given: defaults["lr"] (HF's polynomial schedule checks lr_end
        # against it) and each group's initial_lr (a scheduler's base_lrs; get_learning_rates)
        optimizer.defaults["lr"] = float(args.learning_rate)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", float(args.learning_rate))
    return optimizer


def optimizer_cls_and_kwargs(args, device: torch.device | None) -> tuple[type, dict]:
    """(class, keyword arguments with "lr") of the optimizer `args.optim` names, as HF's
    Trainer.get_optimizer_cls_and_kwargs: `cls(param_groups, **kwargs)` builds it. Given the
    parameters' device, the LR is a tensor there where the optimizer takes one (the schedule
    then updates it in place, no host sync); without it a float."""
    extra = parse_optim_args(args.optim_args)
    lr_tensor = None if device is None else torch.tensor(  # sync: one host-to-device copy, at build
        args.learning_rate, dtype=torch.float32, device=device)
    if args.optim == "fasttrain_adamw":
        from fasttrain.optim.adamw import FusedAdamW
        if extra:
            raise ValueError(f"TrainingArguments.optim_args={args.optim_args!r}: fasttrain_adamw takes its "
                             "settings from adam_beta1/adam_beta2/adam_epsilon/weight_decay; remove optim_args")
        return FusedAdamW, {"lr": args.learning_rate if lr_tensor is None else lr_tensor,
                            "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                            "master_weights": args.master_weights}
    if args.optim not in _TORCH_OPTIMIZERS:
        raise ValueError(f"TrainingArguments.optim={args.optim!r} is not an optimizer fasttrain builds; "
                         f"accepted: fasttrain_adamw, {', '.join(_TORCH_OPTIMIZERS)}")
    cls, base_kwargs = _TORCH_OPTIMIZERS[args.optim]
    if cls is None:
        raise ValueError(f"TrainingArguments.optim={args.optim!r} needs torch.optim.Adafactor "
                         f"(torch >= 2.5); this is torch {torch.__version__}")
    kwargs = {**base_kwargs(args, device if device is not None else torch.device("cpu")), **extra}
    accepted = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr"})
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"TrainingArguments.optim_args={args.optim_args!r}: {unknown} is not an argument "
                         f"of {cls.__name__} (optim={args.optim!r}); it takes {accepted}")
    # a tensor LR (updated in place by the schedule, no host sync) where torch allows one
    tensor_lr = lr_tensor is not None and (kwargs.get("fused") or kwargs.get("capturable"))
    return cls, {"lr": lr_tensor if tensor_lr else args.learning_rate, **kwargs}
