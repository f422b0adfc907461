"""Mixed precision: the autocast policy, fasttrain's dynamic loss scaler, bf16 parameters.

- `autocast_context(device_type, bf16, fp16)`: the forward's autocast; the loss is computed
  in fp32 outside it (see docs/precision.md).
- `DynamicLossScaler`: torch.amp.GradScaler's interface and, with hysteresis=1 and no clamp
  reached, its exact scale sequence; plus hysteresis, min/max clamps, a skipped-step count and
  divergence detection. All state lives on the device; nothing syncs on a training step when
  the optimizer skips on a device flag (FusedAdamW, torch's fused Adam/AdamW).
- Unscaling is one fused pass over all gradients, `fasttrain.ops.dispatch.unscale_and_check_`
  (Triton on CUDA, the compiled op on CPU). Sharded gradients (FSDP's DTensors) are unscaled
  on their local shards and the overflow flag is MAX-all-reduced over the shard group on the
  device, so an overflow in any rank's shard skips the step on every rank.
- `cast_floating_params_`: bf16 weights for FusedAdamW(master_weights=True).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Iterable, Optional

import torch

from fasttrain.distributed.collectives import all_reduce_
from fasttrain.distributed.fsdp import local_shard, shard_groups
from fasttrain.ops.dispatch import unscale_and_check_
from fasttrain.optim.skip import flag_interface, step_skipping

_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"
# The scaler's device state; the names are also its state_dict keys (GradScaler's first two).
_STATE_DTYPES = {"scale": torch.float32, "_growth_tracker": torch.int32,
                 "_hysteresis_tracker": torch.int32, "_skipped_steps": torch.int64,
                 "_overflows_at_min_scale": torch.int32}


class TrainingDivergedError(RuntimeError):
    """The fp16 loss scale sits at its floor and gradients still overflow."""


# ----------------------------------------------------------------------------- policy
def needs_loss_scaler(bf16: bool, fp16: bool) -> bool:
    """True for fp16 only: bf16 has fp32's exponent range, so its gradients do not underflow."""
    _check_precision_flags(bf16, fp16)
    return bool(fp16)


def _check_precision_flags(bf16: bool, fp16: bool) -> None:
    if bf16 and fp16:
        raise ValueError("bf16=True and fp16=True are both set; choose one: bf16 (no loss "
                         "scaling needed, preferred on Ampere/Hopper) or fp16 (with loss scaling)")


_FP32 = contextlib.nullcontext()  # stateless and reentrant


def autocast_context(device_type, bf16: bool, fp16: bool) -> contextlib.AbstractContextManager:
    """Autocast for the forward pass: bf16 or fp16 compute, or a no-op for fp32.

    device_type: "cuda" or "cpu" (a torch.device is accepted). Compute the loss outside
    this context, in fp32 (docs/precision.md).
    """
    if not (bf16 or fp16):
        return _FP32  # the per-micro-batch call in fp32: nothing to check or build
    _check_precision_flags(bf16, fp16)
    device_type = getattr(device_type, "type", device_type)
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"autocast_context: device_type={device_type!r} is not supported; "
                         "use 'cuda' or 'cpu'")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if bf16 else torch.float16)


def cast_floating_params_(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
    """Cast every floating-point parameter of `model` to `dtype` in place; returns `model`.

    Call before building the optimizer: FusedAdamW(master_weights=True) then keeps an fp32
    master copy of each one. Buffers (e.g. rotary tables) keep their dtype.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"cast_floating_params_: dtype={dtype} is not a training dtype; "
                         "use torch.bfloat16, torch.float16 or torch.float32")
    for name, param in model.named_parameters():
        if param.grad is not None:
            raise ValueError(f"cast_floating_params_: parameter {name!r} already has a gradient; "
                             "cast the model before the first backward and before building "
                             "the optimizer")
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    return model


# ----------------------------------------------------------------------------- the scaler
class DynamicLossScaler:
    """Dynamic loss scaling for fp16, a drop-in for `torch.amp.GradScaler`.

    Per `update()`: an overflow (inf/NaN gradient) skips the step, resets the growth tracker
    and spends one unit of the hysteresis budget; once the budget is spent the scale is
    multiplied by `backoff_factor` (floored at `min_scale`). After `growth_interval`
    consecutive clean steps the scale is multiplied by `growth_factor` (capped at
    `max_scale`, kept if not finite) and the hysteresis budget refilled (Megatron's rule).
    Divergence: `max_overflows_at_min_scale` overflows while the scale already sits at
    `min_scale`, with no growth in between; `check_divergence()` then raises.

    State (scale, trackers, skipped-step count, found_inf) is device tensors, created on the
    device of the first `scale()`d tensor. Nothing syncs except `get_scale()`,
    `check_divergence()`, `state_dict()` and `step()` with an optimizer that cannot skip on
    a device flag.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, hysteresis: int = 1,
                 min_scale: float = 1.0, max_scale: float = 2.0**24, enabled: bool = True, *,
                 max_overflows_at_min_scale: int = 5):
        self._enabled = bool(enabled)
        self._config = {"growth_factor": float(growth_factor),
                        "backoff_factor": float(backoff_factor),
                        "growth_interval": int(growth_interval), "hysteresis": int(hysteresis),
                        "min_scale": float(min_scale), "max_scale": float(max_scale),
                        "max_overflows_at_min_scale": int(max_overflows_at_min_scale)}
        self._validate(self._config, float(init_scale))
        # Host copy of the state until the first scale() picks the device.
        self._host_state = {"scale": float(init_scale), "_growth_tracker": 0,
                            "_hysteresis_tracker": int(hysteresis), "_skipped_steps": 0,
                            "_overflows_at_min_scale": 0}
        self._state: Optional[dict[str, torch.Tensor]] = None
        self._per_optimizer: dict[int, dict[str, Any]] = {}
        self._last_found_inf: Optional[torch.Tensor] = None

    @staticmethod
    def _validate(cfg: dict, scale: float) -> None:
        checks = [
            ("growth_factor", cfg["growth_factor"] > 1.0, "must be > 1.0, e.g. 2.0"),
            ("backoff_factor", 0.0 < cfg["backoff_factor"] < 1.0, "must be in (0, 1), e.g. 0.5"),
            ("growth_interval", cfg["growth_interval"] >= 1, "must be >= 1, e.g. 2000"),
            ("hysteresis", cfg["hysteresis"] >= 1, "must be >= 1 (1 = back off on every overflow)"),
            ("min_scale", 0.0 < cfg["min_scale"] <= cfg["max_scale"],
             "must be > 0 and <= max_scale, e.g. 1.0"),
            ("max_overflows_at_min_scale", cfg["max_overflows_at_min_scale"] >= 1, "must be >= 1"),
            ("init_scale", cfg["min_scale"] <= scale <= cfg["max_scale"],
             f"must lie in [min_scale, max_scale] = [{cfg['min_scale']}, {cfg['max_scale']}]"),
        ]
        for name, ok, hint in checks:
            if not ok:
                value = scale if name == "init_scale" else cfg[name]
                raise ValueError(f"DynamicLossScaler: {name}={value!r} {hint}")

    # ------------------------------------------------------------------ state
    def _lazy_init(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = {k: torch.full((), self._host_state[k], dtype=dtype, device=device)
                           for k, dtype in _STATE_DTYPES.items()}
        return self._state

    def _require_state(self, method: str) -> dict[str, torch.Tensor]:
        if self._state is None:
            raise RuntimeError(f"DynamicLossScaler.{method}() called before scale(): call "
                               "scaler.scale(loss).backward() first in each iteration")
        return self._state

    def _opt_state(self, optimizer) -> dict[str, Any]:
        return self._per_optimizer.setdefault(id(optimizer), {"stage": _READY, "found_inf": None})

    # ------------------------------------------------------------------ GradScaler API
    def is_enabled(self) -> bool:
        return self._enabled

    def scale(self, outputs):
        """outputs * scale (a tensor, or a list/tuple/iterable of tensors)."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            scale = self._lazy_init(outputs.device)["scale"]
            return outputs * scale.to(outputs.device, non_blocking=True)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if isinstance(outputs, Iterable):
            return map(self.scale, outputs)
        raise ValueError(f"scale() takes a tensor or an iterable of tensors, got {type(outputs)}")

    def unscale_(self, optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place (one fused pass) and record
        whether any is inf/NaN. Call at most once per optimizer between updates."""
        if not self._enabled:
            return
        state = self._require_state("unscale_")
        opt = self._opt_state(optimizer)
        if opt["stage"] == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the "
                               "last update()")
        if opt["stage"] == _STEPPED:
            raise RuntimeError("unscale_() is being called after step(); call it before step()")
        # Reciprocal in fp64 as GradScaler does: exact for every power-of-two scale.
        inv_scale = state["scale"].double().reciprocal().float()
        opt["found_inf"] = self._check_grads(optimizer, inv_scale)
        opt["stage"] = _UNSCALED

    def _check_grads(self, optimizer, inv_scale: Optional[torch.Tensor]) -> torch.Tensor:
        scale = self._require_state("unscale_")["scale"]
        per_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        sharded = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    if param.grad.is_sparse:
                        param.grad = param.grad.coalesce()
                        per_device[param.grad.device].append(param.grad._values())
                    elif hasattr(param.grad, "to_local"):  # FSDP: this rank's shard, in place
                        sharded.append(param.grad)
                        local = local_shard(param.grad)
                        per_device[local.device].append(local)
                    else:
                        per_device[param.grad.device].append(param.grad)
            found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
            for device, grads in per_device.items():
                local = found_inf if device == scale.device else torch.zeros_like(found_inf,
                                                                                   device=device)
                inv = None if inv_scale is None else inv_scale.to(device, non_blocking=True)
                unscale_and_check_(grads, inv, local)
                if local is not found_inf:  # model parallel: gradients on several devices
                    found_inf = torch.maximum(found_inf, local.to(scale.device, non_blocking=True))
            # An overflow lands in the shard of whichever rank owns that element: agree on the
            # device (MAX over the shard group) so every rank skips the step, or none does.
            for process_group in shard_groups(sharded):
                all_reduce_(found_inf, "max", process_group)
        return found_inf

    def step(self, optimizer, *args, found_inf: Optional[torch.Tensor] = None, **kwargs):
        """Unscale (unless `unscale_` ran) and step, skipped when any gradient is inf/NaN.

        found_inf: an extra device flag (e.g. a non-finite loss) that also skips the step and
        counts as an overflow. Optimizers with `_step_supports_amp_scaling` get the flag (and
        the scale, when the gradients are still scaled) and skip on the device; any other
        optimizer costs one host sync. Other args go to `optimizer.step`.
        """
        if "closure" in kwargs:
            raise RuntimeError("closures are not supported with loss scaling; compute the "
                               "loss and backward before scaler.step(optimizer)")
        if not self._enabled:
            return self._optimizer_step(optimizer, None, found_inf, args, kwargs)
        state = self._require_state("step")
        opt = self._opt_state(optimizer)
        if opt["stage"] == _STEPPED:
            raise RuntimeError("step() has already been called since the last update()")
        grad_scale = None
        if opt["stage"] == _READY:
            if "grad_scale" in self._amp_interface(optimizer):
                # The optimizer divides by the scale itself: only check, write nothing.
                opt["found_inf"] = self._check_grads(optimizer, None)
                grad_scale = state["scale"]
            else:
                self.unscale_(optimizer)
        if found_inf is not None:
            extra = found_inf.detach().reshape(()).float().to(state["scale"].device)
            opt["found_inf"] = torch.maximum(opt["found_inf"], (extra != 0).float())
        retval = self._optimizer_step(optimizer, grad_scale, opt["found_inf"], args, kwargs)
        opt["stage"] = _STEPPED
        return retval

    @staticmethod
    def _amp_interface(optimizer) -> frozenset:
        return flag_interface(optimizer)

    def _optimizer_step(self, optimizer, grad_scale, found_inf, args, kwargs):
        return step_skipping(optimizer, found_inf, grad_scale, *args, **kwargs)

    def update(self, new_scale=None) -> None:
        """Advance the scale from this iteration's overflow flags, on the device, no sync.

        new_scale (float or 1-element tensor): set the scale instead (trackers unchanged).
        """
        if not self._enabled:
            return
        state = self._require_state("update")
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError("update(new_scale): a tensor must have one element and "
                                     "requires_grad=False")
                state["scale"].copy_(new_scale.detach().reshape(()))
            else:
                state["scale"].fill_(float(new_scale))
        else:
            found_inf = self._combined_found_inf()
            if found_inf is None:
                raise RuntimeError("update() found no overflow check: call scaler.step("
                                   "optimizer) (or unscale_) before update()")
            self._update_scale(state, found_inf)
            self._last_found_inf = found_inf
        self._per_optimizer = {}

    def _combined_found_inf(self) -> Optional[torch.Tensor]:
        found_inf = None
        for opt in self._per_optimizer.values():
            if opt["found_inf"] is not None:
                found_inf = opt["found_inf"] if found_inf is None else torch.maximum(
                    found_inf, opt["found_inf"])
        return found_inf

    def _update_scale(self, state: dict[str, torch.Tensor], found_inf: torch.Tensor) -> None:
        cfg, scale = self._config, state["scale"]
        tracker, hysteresis = state["_growth_tracker"], state["_hysteresis_tracker"]
        found, was_at_min = found_inf > 0, scale <= cfg["min_scale"]
        if cfg["hysteresis"] == 1:
            # torch's one-kernel update, then the clamps: min(s*g, max) and max(s*b, min).
            torch._amp_update_scale_(scale, tracker, found_inf, cfg["growth_factor"],
                                     cfg["backoff_factor"], cfg["growth_interval"])
            scale.clamp_(cfg["min_scale"], cfg["max_scale"])
            grow = (tracker == 0) & ~found
            hysteresis.copy_(torch.where(found, 0, torch.where(grow, 1, hysteresis)))
        else:
            grow = self._update_with_hysteresis(state, found)
        at_min = state["_overflows_at_min_scale"]
        at_min.copy_(torch.where(grow, 0, at_min + (found & was_at_min).int()))
        state["_skipped_steps"].add_(found.long())

    def _update_with_hysteresis(self, state: dict[str, torch.Tensor], found: torch.Tensor):
        cfg, scale = self._config, state["scale"]
        tracker, hysteresis = state["_growth_tracker"], state["_hysteresis_tracker"]
        hyst_left = torch.where(found, hysteresis - 1, hysteresis)
        backoff = found & (hyst_left <= 0)
        clean_run = torch.where(found, torch.zeros_like(tracker), tracker + 1)
        grow = clean_run >= cfg["growth_interval"]
        # fp64 products rounded to fp32, as torch._amp_update_scale_ computes them.
        grown = (scale.double() * cfg["growth_factor"]).float()
        grown = torch.where(torch.isfinite(grown), grown.clamp(max=cfg["max_scale"]), scale)
        shrunk = (scale.double() * cfg["backoff_factor"]).float().clamp(min=cfg["min_scale"])
        hysteresis.copy_(torch.where(grow, cfg["hysteresis"], hyst_left.clamp(min=0)))
        tracker.copy_(torch.where(grow, 0, clean_run))
        scale.copy_(torch.where(backoff, shrunk, torch.where(grow, grown, scale)))
        return grow

    def get_scale(self) -> float:
        """The current scale as a Python float (1.0 when disabled)."""
        if not self._enabled:
            return 1.0
        if self._state is None:
            return self._host_state["scale"]
        return float(self._state["scale"].item())  # sync: logging / checkpoint only

    # ------------------------------------------------------------------ device-side readouts
    def found_inf_flag(self) -> Optional[torch.Tensor]:
        """0-d fp32 device tensor, 1.0 when this iteration's step is (or was) skipped.

        Between unscale_/step and update(): the flags recorded so far; after update(): the
        flag update() consumed. None before the first check or when disabled. The trainer
        advances its device-side LR-schedule counter by `1 - found_inf_flag()`.
        """
        found_inf = self._combined_found_inf()
        return self._last_found_inf if found_inf is None else found_inf

    def log_state(self) -> dict[str, torch.Tensor]:
        """Device tensors for logging steps: {"loss_scale", "skipped_steps"}; read them
        (a sync) only when logging. Empty when disabled or before the first scale()."""
        if not self._enabled or self._state is None:
            return {}
        return {"loss_scale": self._state["scale"],
                "skipped_steps": self._state["_skipped_steps"]}

    def diverged(self) -> Optional[torch.Tensor]:
        """0-d bool device tensor: the divergence condition of check_divergence()."""
        if not self._enabled or self._state is None:
            return None
        return self._state["_overflows_at_min_scale"] >= self._config["max_overflows_at_min_scale"]

    def check_divergence(self) -> None:
        """Raise TrainingDivergedError if gradients keep overflowing at min_scale.

        One host sync: call it on logging steps and before saving a checkpoint. Overflowing
        steps were all skipped, so the weights are those of the last clean step.
        """
        flag = self.diverged()
        if flag is None or not bool(flag.item()):  # sync: logging / checkpoint steps only
            return
        cfg = self._config
        raise TrainingDivergedError(
            f"training diverged: the fp16 loss scale is at its floor min_scale={cfg['min_scale']} "
            f"and gradients still contained inf/NaN on {cfg['max_overflows_at_min_scale']} "
            "steps with no recovery in between (those steps were skipped; the weights are from "
            "the last clean step). Lower the learning rate, enable gradient clipping, check "
            "the data for bad values, or train in bf16 instead of fp16.")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Python scalars: GradScaler's five keys plus fasttrain's. Syncs once."""
        if not self._enabled:
            return {}
        values = dict(self._host_state)
        if self._state is not None:
            # sync: checkpoint only
            packed = torch.stack([t.double() for t in self._state.values()]).tolist()
            values = {k: (v if k == "scale" else int(v)) for k, v in zip(self._state, packed)}
        return {**values, **self._config}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from `state_dict()`, or from a torch.amp.GradScaler state dict (the
        fasttrain-only entries then keep this scaler's settings and fresh trackers)."""
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError("the scaler state dict is empty: it was saved from a disabled "
                               "scaler (fp16=False); resume with the same precision setting")
        missing = [k for k in ("scale", "growth_factor", "backoff_factor", "growth_interval",
                               "_growth_tracker") if k not in state_dict]
        if missing:
            raise KeyError(f"scaler state dict lacks {missing}: not a DynamicLossScaler or "
                           "GradScaler state dict")
        cfg = {k: type(v)(state_dict.get(k, v)) for k, v in self._config.items()}
        self._validate(cfg, float(state_dict["scale"]))
        self._config = cfg
        fresh = {"_hysteresis_tracker": cfg["hysteresis"], "_skipped_steps": 0,
                 "_overflows_at_min_scale": 0}  # absent from a GradScaler state dict
        self._host_state = {k: (float if k == "scale" else int)(state_dict.get(k, fresh.get(k)))
                            for k in _STATE_DTYPES}
        if self._state is not None:  # in place: tensors handed out by log_state() stay live
            for key, tensor in self._state.items():
                tensor.fill_(self._host_state[key])
