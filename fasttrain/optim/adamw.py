"""FusedAdamW: torch.optim.AdamW's update in one fused multi-tensor step per dtype group.

The update runs `fasttrain.ops.dispatch.adamw_`, which picks the one implementation for the
tensors' device (Triton on CUDA, the compiled C++ op on CPU, torch's fused op where the
library is not built).

Math in fp32 whatever the parameter dtype; exp_avg / exp_avg_sq are fp32; with
master_weights=True, fp16/bf16 parameters get an fp32 `master_param` that the math updates
and the parameter receives rounded. `step(grad_scale=..., found_inf=...)` divides gradients
by grad_scale inside the update and skips everything (including the step counter) when
found_inf is nonzero, without a host sync. The LR may be a 0-d fp32 tensor on the device,
updated in place by a schedule; it is read by the kernel, never with .item().

Under FSDP the parameters are DTensors: the update runs on each rank's local shards, and
exp_avg / exp_avg_sq are DTensors sharded like their parameter (torch.optim.AdamW's layout
under FSDP2), so `get_optimizer_state_dict` and DCP save and reshard them as they do torch's.
The step counter is a plain 0-d tensor, the same on every rank.
"""
from __future__ import annotations

import torch

from fasttrain.distributed.fsdp import local_shard
from fasttrain.ops.dispatch import adamw_

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "master_param")


def _check_hparams(lr, betas, eps, weight_decay):
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.dtype != torch.float32:
            raise ValueError(f"a tensor lr must be a 0-d float32 tensor, got shape "
                             f"{tuple(lr.shape)} dtype {lr.dtype}")
    elif not lr >= 0.0:
        raise ValueError(f"lr={lr} must be >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas={betas} must be two values in [0, 1)")
    if not eps >= 0.0:
        raise ValueError(f"eps={eps} must be >= 0")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0")


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's rule and state_dict layout) as one fused update per dtype
    group. See the module docstring for dispatch, master weights and loss-scaling support."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 master_weights=False):
        _check_hparams(lr, betas, eps, weight_decay)
        # torch.optim.AdamW's keys too, so either optimizer loads the other's state_dict
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        master_weights=master_weights, amsgrad=False, maximize=False,
                        foreach=None, capturable=False, differentiable=False, fused=None,
                        decoupled_weight_decay=True)
        super().__init__(params, defaults)
        self._lr_cache: dict = {}

    def _lr_tensor(self, lr, device) -> torch.Tensor:
        if isinstance(lr, torch.Tensor):
            if lr.device != device:
                raise ValueError(f"the tensor lr is on {lr.device} but the params are on "
                                 f"{device}; create it on the params' device")
            return lr.reshape(())
        key = (float(lr), str(device))
        if key not in self._lr_cache:
            if len(self._lr_cache) > 64:
                self._lr_cache.clear()
            self._lr_cache[key] = torch.full((), float(lr), dtype=torch.float32, device=device)
        return self._lr_cache[key]

    def _init_state(self, p, master_weights):
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if master_weights and p.dtype != torch.float32 and "master_param" not in state:
            state["master_param"] = p.detach().float().clone()
        return state

    def _group_lists(self, group):
        """Per-device lists (params, grads, exp_avgs, exp_avg_sqs, masters, steps)."""
        by_device: dict = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("FusedAdamW does not support sparse gradients")
            state = self._init_state(p, group["master_weights"])
            lists = by_device.setdefault(p.device, ([], [], [], [], [], []))
            # FSDP: the kernel steps this rank's shards in place (to_local shares storage);
            # the state stays a DTensor sharded like its parameter, the layout DCP saves
            master = state.get("master_param")
            for lst, t in zip(lists, (local_shard(p.detach()), local_shard(p.grad),
                                      local_shard(state["exp_avg"]), local_shard(state["exp_avg_sq"]),
                                      None if master is None else local_shard(master), state["step"])):
                lst.append(t)
        return by_device

    @torch.no_grad()
    def step(self, closure=None, grad_scale=None, found_inf=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.amp.GradScaler sets these attributes instead of passing arguments
        grad_scale = grad_scale if grad_scale is not None else getattr(self, "grad_scale", None)
        found_inf = found_inf if found_inf is not None else getattr(self, "found_inf", None)
        if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
            raise TypeError(f"grad_scale must be a 0-d float32 tensor on the params' device "
                            f"(the loss scale), got {type(grad_scale).__name__}")
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("FusedAdamW supports neither amsgrad nor maximize; use "
                                 "torch.optim.AdamW for those")
            beta1, beta2 = group["betas"]
            for device, lists in self._group_lists(group).items():
                params, grads, m, v, masters, steps = lists
                lr = self._lr_tensor(group["lr"], device)
                gs = grad_scale.to(device) if grad_scale is not None else None
                fi = found_inf.to(device) if found_inf is not None else None
                with_master = [i for i, w in enumerate(masters) if w is not None]
                without = [i for i, w in enumerate(masters) if w is None]
                for idx, use_master in ((with_master, True), (without, False)):
                    if not idx:
                        continue
                    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
                    adamw_(pick(params), pick(grads), pick(m), pick(v),
                           pick(masters) if use_master else [], pick(steps), lr, beta1, beta2,
                           group["weight_decay"], group["eps"], gs, fi)
        return loss

    def load_state_dict(self, state_dict):
        """Load a FusedAdamW or torch.optim.AdamW state_dict without losing precision:
        moments and master weights come back as fp32 on the params' device, steps as 0-d
        fp32 device tensors, and masters are created for half params that lack one."""
        state_dict = dict(state_dict, param_groups=[dict(g) for g in state_dict["param_groups"]])
        saved = state_dict["state"]
        id_to_param = {old_id: p for old_g, g in zip(state_dict["param_groups"],
                                                     self.param_groups)
                       for old_id, p in zip(old_g["params"], g["params"])}
        for g in state_dict["param_groups"]:
            g.setdefault("master_weights", self.defaults["master_weights"])
        super().load_state_dict(state_dict)  # casts moments to the param dtype: redone below
        for old_id, entry in saved.items():
            p = id_to_param[old_id]
            state = self.state[p]
            for key in _MOMENT_KEYS:
                if key in entry:
                    state[key] = entry[key].to(device=p.device, dtype=torch.float32, copy=True)
            if "step" in entry:
                step = entry["step"]
                step = step if isinstance(step, torch.Tensor) else torch.tensor(float(step))
                state["step"] = step.to(device=p.device, dtype=torch.float32, copy=True)
        for group in self.param_groups:
            if isinstance(group["lr"], torch.Tensor) and group["params"]:
                group["lr"] = group["lr"].to(group["params"][0].device, torch.float32)
            for p in group["params"]:
                if p in self.state and "step" in self.state[p]:
                    self._init_state(p, group["master_weights"])
