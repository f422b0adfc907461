"""Param groups whose hyperparameters are all equal, stepped as one group.

HF's Trainer always builds two groups (weight decay on the matrices, none on biases and
norms). With weight_decay=0, the default, the two differ in nothing but their parameters,
yet torch's fused AdamW launches its kernels once per group (step counters, update, the
skip's counter rollback: three launches a group). `merged_param_groups` gives the list to
step instead: equal groups joined, in order of first appearance. The optimizer keeps HF's
groups for everyone who reads them (schedules, checkpoints, callbacks); `step_merged`
swaps the joined list in for the duration of `step` only.

Equal means: the same keys, and every value but "params" the same object or an equal
non-tensor (a tensor LR shared by the groups, as the factory builds it, is one object; two
tensors are never compared, which would read them on the host). A shared LR tensor is only
right while fasttrain's schedule drives it (it writes each LR once, from its table): a
scheduler that updates each group in place from its current value (torch's
ReduceLROnPlateau) would apply its factor once per group to the one tensor, so the Trainer
gives each group its own tensor (`own_lr_per_group`) under any other scheduler. The answer is cached and
checked per step by object identity, which the cache makes safe (it holds the values it
compared, so no id is reused); any change to a group (a new LR float from a host-side
schedule, `capturable` set for a CUDA-graph capture, a param group added) rebuilds it.
"""
from __future__ import annotations

from operator import is_

import torch


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    return a == b


def _equal_hyperparameters(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a if k != "params")


class _Cache:
    __slots__ = ("groups", "values", "sizes", "merged")

    def __init__(self, groups: list, merged: list | None):
        self.groups = groups
        self.values = [tuple(g.values()) for g in groups]  # held: identity checks stay sound
        self.sizes = [len(g["params"]) for g in groups]
        self.merged = merged

    def valid_for(self, groups: list) -> bool:
        return (groups is self.groups and len(groups) == len(self.values)
                and all(len(g) == len(values) and all(map(is_, g.values(), values)) and len(g["params"]) == n
                        for g, values, n in zip(groups, self.values, self.sizes)))


def _merge(groups: list) -> list | None:
    joined: list[dict] = []
    for group in groups:
        for target in joined:
            if _equal_hyperparameters(target, group):
                target["params"] = target["params"] + list(group["params"])
                break
        else:
            joined.append(dict(group))
    return joined if len(joined) < len(groups) else None


def merged_param_groups(optimizer) -> list | None:
    """The groups to step `optimizer` with: equal groups joined, or None when no two are
    equal (step the optimizer's own groups)."""
    groups = optimizer.param_groups
    if len(groups) < 2:
        return None
    cache = optimizer.__dict__.get("_fasttrain_merged_groups")
    if cache is None or not cache.valid_for(groups):
        cache = _Cache(groups, _merge(groups))
        optimizer.__dict__["_fasttrain_merged_groups"] = cache
    return cache.merged


def own_lr_per_group(optimizer) -> None:
    """Each group whose LR is a tensor another group also holds gets its own copy (on the
    device, no host read); the groups then step separately."""
    seen: set[int] = set()
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            if id(lr) in seen:
                group["lr"] = lr = lr.detach().clone()
            seen.add(id(lr))


def step_merged(optimizer, *args, **kwargs):
    """`optimizer.step(*args, **kwargs)` over the merged groups (when any groups merge);
    the optimizer's own list is back afterwards, also on an exception."""
    merged = merged_param_groups(optimizer)
    if merged is None:
        return optimizer.step(*args, **kwargs)
    groups = optimizer.param_groups
    optimizer.param_groups = merged
    try:
        return optimizer.step(*args, **kwargs)
    finally:
        optimizer.param_groups = groups
