"""Per-step overhead of the fasttrain Trainer, on its DEFAULTS, against a hand-written loop,
the HF Trainer and Lightning (when installed). The model, examples and hand-written step
are `fasttrain.profiler.hand_loop`'s (shared with tests/test_step_ops.py and gpu-check).

The issue's configuration: Linear(16, 1), batch 4, MSE, labels in the batch. fasttrain
runs its defaults (profiler on, clipping 1.0, torch's fused AdamW, linear schedule,
skip-on-overflow, exact token accounting); the hand-written loop does the same work
(forward, backward, clip_grad_norm_, AdamW(fused=True), LambdaLR on the host, zero_grad,
a loss read every `logging_steps`); the HF Trainer is configured alike. Every run trains
WARMUP + STEPS steps and times only the last STEPS (a callback marks the boundary). Runs
are interleaved (A, B, C, A, B, C, ...) so drift on a noisy machine hits all; reported:
steps/s p20/p50/p80, the per-repeat ratio to the loop, and ATen ops per step (counted with
a TorchDispatchMode over two run lengths: deterministic, the launches on a GPU).

    python3 bench/bench_overhead.py [--steps 300] [--repeats 5] [--json out.json]
Also reported: steps per second of main-thread CPU time (time.thread_time), the ratio that
stays readable on a shared machine where other processes take time slices.
Goal: fasttrain >= 0.95x the loop's steps/s and <= 1.10x its ops per step.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import OpCount, environment, fmt, spread  # noqa: E402

from fasttrain import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from fasttrain.data.datasets import default_data_collator  # noqa: E402
from fasttrain.profiler.hand_loop import HandLoop, Regressor, regression_examples  # noqa: E402

BATCH, LR, LOGGING_STEPS = 4, 5e-5, 100


class _Clock:
    """Time from the end of step `start` to the end of training (host clock; CPU runs), on
    the wall clock and on the main thread's CPU clock. Every runner trains on the main
    thread, so the CPU clock counts its work per step without the time slices other
    processes take on a shared machine (and without the profiler's sampler thread)."""

    def __init__(self, start: int):
        self.start, self.t0, self.t1, self.c0, self.c1 = start, None, None, None, None

    def step_end(self, step: int):
        if step == self.start:
            self.t0, self.c0 = time.perf_counter(), time.thread_time()
        self.t1, self.c1 = time.perf_counter(), time.thread_time()

    def rate(self, steps: int) -> tuple[float, float]:
        """(steps per wall second, steps per main-thread CPU second)."""
        return steps / (self.t1 - self.t0), steps / (self.c1 - self.c0)


class _FasttrainClock(TrainerCallback):
    def __init__(self, clock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kw):
        self.clock.step_end(state.global_step)


def run_fasttrain(data, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    clock = _Clock(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=BATCH,
                                 learning_rate=LR, logging_steps=LOGGING_STEPS, save_strategy="no",
                                 disable_tqdm=True, report_to="none", dataloader_pin_memory=False)
        Trainer(Regressor(), args, train_dataset=data, callbacks=[_FasttrainClock(clock)]).train()
    return clock.rate(steps)


def run_loop(data, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    clock = _Clock(warmup)
    total = warmup + steps
    loop = HandLoop(Regressor(), lr=LR, total_steps=total)
    done = 0
    while done < total:
        for batch in DataLoader(data, batch_size=BATCH, shuffle=True, collate_fn=default_data_collator):
            loss = loop.step(batch)
            done += 1
            if done % LOGGING_STEPS == 0:
                loss.item()  # sync: the logging read every trainer does
            clock.step_end(done)
            if done == total:
                break
    return clock.rate(steps)


def run_hf(data, warmup: int, steps: int) -> float:
    import transformers
    torch.manual_seed(0)
    clock = _Clock(warmup)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end(state.global_step)

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=BATCH, learning_rate=LR,
            logging_steps=LOGGING_STEPS, save_strategy="no", report_to="none", disable_tqdm=True,
            optim="adamw_torch_fused", use_cpu=True, dataloader_pin_memory=False)
        transformers.Trainer(model=Regressor(), args=args, train_dataset=data,
                             data_collator=default_data_collator, callbacks=[Clock()]).train()
    return clock.rate(steps)


def run_lightning(data, warmup: int, steps: int) -> float:
    import lightning as L
    torch.manual_seed(0)
    clock = _Clock(warmup)
    total = warmup + steps

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Regressor()

        def training_step(self, batch, i):
            return self.net(**batch)["loss"]

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=LR, fused=True)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
            return [opt], [{"scheduler": sched, "interval": "step"}]

        def on_train_batch_end(self, outputs, batch, i):
            clock.step_end(self.global_step)

    trainer = L.Trainer(max_steps=total, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        log_every_n_steps=LOGGING_STEPS)
    trainer.fit(Module(), DataLoader(data, batch_size=BATCH, shuffle=True, collate_fn=default_data_collator))
    return clock.rate(steps)


def ops_per_step(run, data) -> float:
    """ATen ops per step: the difference of two run lengths (set-up cancels)."""
    counts = []
    for steps in (10, 20):
        with OpCount() as mode:
            run(data, 1, steps - 1)
        counts.append(mode.n)
    return (counts[1] - counts[0]) / 10


def _available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps at the start of every run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the result here")
    ns = p.parse_args()
    data = regression_examples(BATCH * (ns.warmup + ns.steps + 1))
    runners = {"loop": run_loop, "fasttrain": run_fasttrain}
    if _available("transformers"):
        runners["hf_trainer"] = run_hf
    if _available("lightning"):
        runners["lightning"] = run_lightning
    rates = {name: [] for name in runners}
    cpu_rates = {name: [] for name in runners}
    for _ in range(ns.repeats):
        for name, run in runners.items():  # interleaved: drift hits every runner alike
            wall, cpu = run(data, ns.warmup, ns.steps)
            rates[name].append(wall)
            cpu_rates[name].append(cpu)
    ops = {name: ops_per_step(run, data) for name, run in runners.items()}
    result = {"env": environment(), "config": {"model": "Linear(16,1)", "batch": BATCH, "loss": "mse",
                                               "steps": ns.steps, "warmup": ns.warmup, "repeats": ns.repeats},
              "runners": {}}
    print(f"env: {result['env']}")
    print(f"{'runner':<12} {'steps/s p50 [p20, p80]':<34} {'vs loop (per repeat)':<30} ops/step (vs loop)")
    for name in runners:
        ratio = spread([a / b for a, b in zip(rates[name], rates["loop"])])
        cpu_ratio = spread([a / b for a, b in zip(cpu_rates[name], cpu_rates["loop"])])
        row = {"steps_per_s": spread(rates[name]), "ratio_to_loop": ratio, "ops_per_step": ops[name],
               "ops_ratio_to_loop": ops[name] / ops["loop"],
               "steps_per_cpu_s": spread(cpu_rates[name]), "cpu_ratio_to_loop": cpu_ratio}
        result["runners"][name] = row
        print(f"{name:<12} {fmt(row['steps_per_s']):<34} {fmt(ratio, 'x'):<30} "
              f"{ops[name]:.0f} ({row['ops_ratio_to_loop']:.2f}x)")
    print("main-thread CPU time (what the step costs the host, whatever else runs):")
    for name in runners:
        row = result["runners"][name]
        print(f"{name:<12} {fmt(row['steps_per_cpu_s']):<34} {fmt(row['cpu_ratio_to_loop'], 'x')}")
    if not _available("lightning"):
        print("lightning: not installed, not measured")
    print("goal: fasttrain >= 0.95x the loop's steps/s, <= 1.10x its ops/step")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
