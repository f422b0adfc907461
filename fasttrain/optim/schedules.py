"""Learning-rate schedules whose step counter can live on the device.

Each schedule is a multiplier m(step) written with tensor ops only, so it runs on a
device-resident step counter: the LR of an optimizer that accepts a tensor LR is updated
in place every step with no host synchronisation, and a step skipped for overflow (loss
scaling) does not advance the schedule (the counter adds `1 - found_inf`). Optimizers that
only take float LRs get the same multiplier computed on the host.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Multiplier = Callable[[torch.Tensor], torch.Tensor]


def _warmup(step, warmup: int):
    if warmup <= 0:
        return torch.ones_like(step)
    return torch.clamp(step / warmup, max=1.0)


def _progress(step, warmup: int, total: int):
    return torch.clamp((step - warmup) / max(1, total - warmup), 0.0, 1.0)


def get_multiplier(name: str, num_warmup_steps: int, num_training_steps: int,
                   min_lr_rate: float = 0.0, num_decay_steps: Optional[int] = None,
                   num_cycles: float = 0.5) -> Multiplier:
    """The LR multiplier of schedule `name` as a function of a float step tensor."""
    w, n = num_warmup_steps, num_training_steps

    def linear(s):
        return torch.where(s < w, _warmup(s, w), 1.0 - _progress(s, w, n))

    def cosine(s, floor=0.0):
        p = _progress(s, w, n)
        cos = 0.5 * (1.0 + torch.cos(math.pi * 2.0 * num_cycles * p))
        return torch.where(s < w, _warmup(s, w), floor + (1.0 - floor) * cos)

    def constant(s):
        return torch.ones_like(s)

    def constant_with_warmup(s):
        return _warmup(s, w)

    def warmup_stable_decay(s):
        decay = num_decay_steps if num_decay_steps is not None else max(1, int(0.1 * n))
        decay_start = n - decay
        p = torch.clamp((s - decay_start) / max(1, decay), 0.0, 1.0)
        down = min_lr_rate + (1.0 - min_lr_rate) * 0.5 * (1.0 + torch.cos(math.pi * p))
        up = min_lr_rate + (1.0 - min_lr_rate) * _warmup(s, w)  # as HF: warm-up starts at the floor
        return torch.where(s < w, up, torch.where(s < decay_start, torch.ones_like(s), down))

    table = {
        "linear": linear,
        "cosine": cosine,
        "cosine_with_min_lr": lambda s: cosine(s, floor=min_lr_rate),
        "constant": constant,
        "constant_with_warmup": constant_with_warmup,
        "warmup_stable_decay": warmup_stable_decay,
    }
    if name not in table:
        raise ValueError(f"unknown lr_scheduler_type {name!r}; accepted: {', '.join(table)}")
    return table[name]


class LRScheduler:
    """Drives `optimizer.param_groups[i]['lr'] = base_lr[i] * m(position)`, where the
    position is the number of optimizer steps taken that were not skipped.

    The whole schedule is tabulated once (groups x steps, a few KB). Device mode (every
    group's lr is a tensor): the skipped-step counter, the table and the LRs stay on the
    device; a step costs four small ops (count the flag, position = steps - skipped, to an
    index, index_select into the LR in place) and no host read. The counter `skipped` is the
    run's one count of skipped steps (the Trainer logs it). Host mode: python floats, as
    torch's schedulers do. Interface of torch's schedulers: step(), get_last_lr(),
    state_dict(), load_state_dict().
    """

    def __init__(self, optimizer, multiplier: Multiplier, num_training_steps: int):
        self.optimizer = optimizer
        groups = optimizer.param_groups
        self.device_mode = all(isinstance(g["lr"], torch.Tensor) for g in groups)
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in groups]  # sync: once, at build
        for g, base in zip(groups, self.base_lrs):
            g["initial_lr"] = base
        device = groups[0]["lr"].device if self.device_mode else torch.device("cpu")
        steps = torch.arange(num_training_steps + 1, dtype=torch.float64)
        mult = multiplier(steps)
        self.table = torch.stack([mult * base for base in self.base_lrs]).float().to(device)  # (G, S+1)
        self.skipped = torch.zeros(1, dtype=torch.float32, device=device)  # (1,): indexes as is
        self._host_step = 0  # steps taken, skipped ones included
        self._host_skipped = 0  # host mode only
        self._targets = self._lr_targets() if self.device_mode else []
        self._apply()

    def _lr_targets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(table row, (1,) view of the LR tensor) per distinct LR tensor: groups built
        together share one, written once."""
        targets, seen = [], set()
        for i, g in enumerate(self.optimizer.param_groups):
            if id(g["lr"]) not in seen:
                seen.add(id(g["lr"]))
                targets.append((self.table[i], g["lr"].view(1)))
        return targets

    def _apply(self):
        last = self.table.shape[1] - 1
        if self.device_mode:
            # an index built on the device (indexing with a 0-d tensor would read it on the
            # host: aten._local_scalar_dense); the loop never passes num_training_steps
            index = torch.rsub(self.skipped, min(self._host_step, last)).long()
            for row, lr in self._targets:
                torch.index_select(row, 0, index, out=lr)
        else:
            column = self.table[:, min(self._host_step - self._host_skipped, last)].tolist()  # CPU: no sync
            for g, lr in zip(self.optimizer.param_groups, column):
                g["lr"] = lr

    def step(self, skipped: Optional[torch.Tensor] = None):
        """Advance one optimizer step; `skipped` (0-d, 1 = the step was skipped) keeps the
        schedule where it is, without reading the flag on the host in device mode."""
        self._host_step += 1
        if skipped is not None:
            if self.device_mode:
                self.skipped.add_(skipped)
            else:
                self._host_skipped += int(skipped)  # sync: only host-LR optimizers reach here
                self.skipped.fill_(self._host_skipped)
        self._apply()

    @property
    def step_count(self) -> int:
        """Schedule position: steps taken and not skipped (a host read in device mode)."""
        return self._host_step - int(self.skipped.item())  # sync: checkpoint / inspection only

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]  # sync: logging only

    def state_dict(self) -> dict:
        skipped = int(self.skipped.item())  # sync: checkpoint only
        return {"step_count": torch.tensor(float(self._host_step - skipped)), "skipped": skipped,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["base_lrs"]) != self.base_lrs:
            raise ValueError(f"the checkpoint's base learning rates {state['base_lrs']} differ from this "
                             f"run's {self.base_lrs}; resume with the same learning_rate")
        skipped = int(state.get("skipped", 0))  # absent before skipped steps were counted here
        self._host_step = int(state["step_count"]) + skipped
        self._host_skipped = skipped
        self.skipped.fill_(skipped)
        self._apply()
