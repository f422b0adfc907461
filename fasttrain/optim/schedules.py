"""Learning-rate schedules whose step counter can live on the device.

Every HF `lr_scheduler_type` but reduce_lr_on_plateau is a multiplier m(step)
(`lr_multipliers.py`, HF's formulas) tabulated once: the LR of an optimizer that accepts a
tensor LR is updated in place every step with no host synchronisation, and a step skipped
for overflow (loss scaling) does not advance the schedule. Optimizers that only take float
LRs get the same table read on the host. reduce_lr_on_plateau (torch's ReduceLROnPlateau)
and greedy (`greedy.GreedyLR`) step on evaluation metrics instead (`step_on_metrics`), as HF's do.
"""
from __future__ import annotations

import functools
import inspect
import struct
from typing import Optional

import torch

from fasttrain.optim.greedy import GreedyLR
from fasttrain.optim.lr_multipliers import SCHEDULES, Multiplier, get_multiplier
from fasttrain.optim.merged_groups import own_lr_per_group

__all__ = ["LRScheduler", "Multiplier", "get_multiplier", "build_scheduler", "step_scheduler",
           "learning_rate_used", "step_on_metrics", "is_metric_driven", "GreedyLR", "METRIC_DRIVEN",
           "SCHEDULES_ACCEPTED"]


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

    def __init__(self, optimizer, multiplier: Multiplier, num_training_steps: int,
                 learning_rate: Optional[float] = None):
        self.optimizer = optimizer
        groups = optimizer.param_groups
        self.device_mode = all(isinstance(g["lr"], torch.Tensor) for g in groups)
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in groups]  # sync: once, at build
        if learning_rate is not None:  # a float32 LR tensor holding the given LR: the given value
            self.base_lrs = [learning_rate if base == float32_value(learning_rate) else base for base in self.base_lrs]
        for g, base in zip(groups, self.base_lrs):
            g["initial_lr"] = base
        device = groups[0]["lr"].device if self.device_mode else torch.device("cpu")
        steps = torch.arange(num_training_steps + 1, dtype=torch.float64)
        mult = multiplier(steps)
        # the schedule in float64 on the host (what HF's LambdaLR computes): the LRs reported
        # (get_last_lr, the logged learning_rate) and a host-mode optimizer's; the device
        # table the LR tensors are written from is its float32 copy
        self.host_table = [(mult * base).tolist() for base in self.base_lrs]  # sync: none (CPU tensor); (G, S+1) floats
        self.table = torch.tensor(self.host_table, dtype=torch.float32, device=device)  # sync: one copy, at build
        self.skipped = torch.zeros(1, dtype=torch.float32, device=device)  # (1,): indexes as is
        self._host_step = 0  # steps taken, skipped ones included
        self._host_skipped = 0  # host mode only
        self._last_skipped = None  # the last step's skip flag (device mode), for lr_used()
        self._host_last_skipped = 0
        self._steps = None  # device-side step count (count_steps_on_device), (1,)
        self._targets = self._lr_targets() if self.device_mode else []
        self._apply()

    def count_steps_on_device(self) -> None:
        """Keep the step count on the device as well, so the device work of `step()` reads
        no host number (a CUDA graph replays it as captured: `advance_on_device`); the host
        count stays for logging and checkpoints. Costs one op per step (device mode only)."""
        if self.device_mode and self._steps is None:
            self._steps = torch.full((1,), float(self._host_step), dtype=torch.float32,
                                     device=self.skipped.device)

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
            if self._steps is None:
                index = torch.rsub(self.skipped, min(self._host_step, last)).long()
            else:
                index = torch.sub(self._steps, self.skipped).clamp_(max=last).long()
            for row, lr in self._targets:
                torch.index_select(row, 0, index, out=lr)
        else:
            column = self._host_column(self._host_step - self._host_skipped)
            for g, lr in zip(self.optimizer.param_groups, column):
                g["lr"] = lr

    def step(self, skipped: Optional[torch.Tensor] = None):
        """Advance one optimizer step; `skipped` (0-d, 1 = the step was skipped) keeps the
        schedule where it is, without reading the flag on the host in device mode."""
        self.count_step(skipped)
        if self.device_mode:
            self.advance_on_device(skipped)
        else:
            self._apply()

    def count_step(self, skipped: Optional[torch.Tensor] = None) -> None:
        """The host side of `step()`: the step count (and, in host mode, the skip count)."""
        self._host_step += 1
        self._last_skipped, self._host_last_skipped = None, 0
        if skipped is not None:
            if self.device_mode:
                self._last_skipped = skipped  # a reference, no op: read on logging steps only
            else:
                self._host_last_skipped = int(skipped)  # sync: only host-LR optimizers reach here
                self._host_skipped += self._host_last_skipped
                self.skipped.fill_(self._host_skipped)

    def advance_on_device(self, skipped: Optional[torch.Tensor] = None) -> None:
        """The device side of `step()` in device mode: count the flag, write the LRs."""
        if skipped is not None:
            self.skipped.add_(skipped)
        if self._steps is not None:
            self._steps.add_(1)
        self._apply()

    def lr_used(self) -> list[float]:
        """The LRs the last optimizer step ran with (the schedule has moved past them unless
        that step was skipped): what HF logs as `learning_rate`. Before any step: the LRs
        the first step will use."""
        if self._host_step == 0:
            return self._host_column(0)
        if self.device_mode:
            last = int(float(self._last_skipped)) if self._last_skipped is not None else 0  # sync: logging step
            position = self._host_step - int(self.skipped.item())  # sync: logging step
        else:
            last, position = self._host_last_skipped, self._host_step - self._host_skipped
        return self._host_column(max(0, position - (1 - last)))

    @property
    def step_count(self) -> int:
        """Schedule position: steps taken and not skipped (a host read in device mode)."""
        return self._host_step - int(self.skipped.item())  # sync: checkpoint / inspection only

    def get_last_lr(self) -> list[float]:
        """The LRs the next step uses, from the float64 schedule (HF's values exactly; the
        device LR tensors hold their float32 rounding). A host read in device mode."""
        return self._host_column(self.step_count if self.device_mode else self._host_step - self._host_skipped)

    def _host_column(self, position: int) -> list[float]:
        """Every group's LR at schedule `position` (clamped to the last step), from the host table."""
        column = min(position, len(self.host_table[0]) - 1)
        return [row[column] for row in self.host_table]

    def state_dict(self) -> dict:
        skipped = int(self.skipped.item())  # sync: checkpoint only
        return {"step_count": torch.tensor(float(self._host_step - skipped)), "skipped": skipped,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        saved = list(state["base_lrs"])
        # equal up to float32 rounding (earlier versions took the base from a float32 LR tensor)
        if len(saved) != len(self.base_lrs) or any(abs(a - b) > 1e-6 * max(abs(a), abs(b))
                                                   for a, b in zip(saved, self.base_lrs)):
            raise ValueError(f"the checkpoint's base learning rates {state['base_lrs']} differ from this "
                             f"run's {self.base_lrs}; resume with the same learning_rate")
        skipped = int(state.get("skipped", 0))  # absent before skipped steps were counted here
        self._host_step = int(state["step_count"]) + skipped
        self._host_skipped = skipped
        self.skipped.fill_(skipped)
        if self._steps is not None:
            self._steps.fill_(self._host_step)
        self._apply()


def build_scheduler(args, optimizer, num_training_steps: int):
    """The scheduler TrainingArguments ask for: a tabulated LRScheduler, or one stepped on
    evaluation metrics (reduce_lr_on_plateau: torch's ReduceLROnPlateau; greedy: GreedyLR)."""
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if args.lr_scheduler_type in METRIC_DRIVEN:
        own_lr_per_group(optimizer)  # they scale each group's LR in place: never one shared tensor
        return METRIC_DRIVEN[args.lr_scheduler_type](optimizer, **kwargs)
    mult = get_multiplier(args.lr_scheduler_type, args.get_warmup_steps(num_training_steps),
                          num_training_steps, lr_init=args.learning_rate, **kwargs)
    return LRScheduler(optimizer, mult, num_training_steps, learning_rate=args.learning_rate)


def float32_value(x: float) -> float:
    """`x` rounded to float32, as a float32 LR tensor made from it holds it (no tensor made)."""
    return struct.unpack("f", struct.pack("f", x))[0]


METRIC_DRIVEN = {"reduce_lr_on_plateau": torch.optim.lr_scheduler.ReduceLROnPlateau, "greedy": GreedyLR}
SCHEDULES_ACCEPTED = (*SCHEDULES, *METRIC_DRIVEN)  # every lr_scheduler_type build_scheduler builds


def is_metric_driven(scheduler) -> bool:
    """Stepped on evaluation metrics rather than per optimizer step: fasttrain's two, and any
    scheduler whose step() requires an argument (torch's ReduceLROnPlateau and HF's GreedyLR
    handed in through `optimizers=`, or a user's own)."""
    return scheduler is not None and (isinstance(scheduler, tuple(METRIC_DRIVEN.values()))
                                      or _step_takes_a_metric(type(scheduler)))


@functools.lru_cache(maxsize=32)
def _step_takes_a_metric(cls) -> bool:
    try:
        params = list(inspect.signature(cls.step).parameters.values())[1:]  # after self
    except (AttributeError, TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def step_scheduler(scheduler, optimizer, skipped: Optional[torch.Tensor] = None):
    """Advance `scheduler` after an optimizer step. Returns what `learning_rate_used` needs
    for a scheduler fasttrain did not build: the LRs this step used, captured before stepping
    (HF logs those), as floats or device copies (no host sync)."""
    if isinstance(scheduler, LRScheduler):
        scheduler.step(skipped=skipped)
        return None
    if is_metric_driven(scheduler):
        return None  # it steps on evaluation metrics (step_on_metrics)
    used = [g["lr"].detach().clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
            for g in optimizer.param_groups]
    scheduler.step()
    return used


def learning_rate_used(scheduler, optimizer, captured=None) -> float:
    """The LR the last optimizer step used, for logging (a sync: logging steps only)."""
    if isinstance(scheduler, LRScheduler):
        return scheduler.lr_used()[0]
    if captured is not None:
        return float(captured[0])  # sync: logging step
    return float(optimizer.param_groups[0]["lr"])  # sync: logging step (metric-driven: HF reads it so)


def step_on_metrics(scheduler, metrics: dict, metric_for_best_model: str) -> None:
    """reduce_lr_on_plateau and greedy: feed them the evaluation metric (as HF:
    metric_for_best_model, 'eval_'-prefixed)."""
    if not is_metric_driven(scheduler) or not metrics:
        return
    key = metric_for_best_model if metric_for_best_model.startswith("eval_") else f"eval_{metric_for_best_model}"
    if key not in metrics:
        kind = next((repr(name) for name, cls in METRIC_DRIVEN.items() if isinstance(scheduler, cls)),
                    type(scheduler).__name__)
        raise KeyError(f"lr_scheduler_type={kind} watches metric_for_best_model="
                       f"{metric_for_best_model!r}, but evaluation returned only {sorted(metrics)}; "
                       "set metric_for_best_model to one of them")
    scheduler.step(metrics[key])
