"""Per-step overhead of the fasttrain Trainer against a hand-written PyTorch loop.

A tiny model (compute close to zero) is trained for STEPS steps by fasttrain and by a plain
loop doing the same work: the same DataLoader and collation, torch's fused AdamW, gradient
clipping to 1.0, a linear LR schedule, zero_grad(set_to_none). Runs alternate (A, B, A, B,
...) so drift on a noisy machine hits both; reported: steps/s p20/p50/p80 and the ratio of
medians. Goal: fasttrain >= 0.95x the raw loop.

    python3 bench/bench_overhead.py [--steps 300] [--repeats 5]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, fmt, spread  # noqa: E402

from fasttrain import Trainer, TrainingArguments  # noqa: E402
from fasttrain.data.datasets import default_data_collator  # noqa: E402


WIDTH = 16  # --width: 16 is "compute close to zero"; larger widths show how the gap closes


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)])

    def forward(self, x, y):
        return {"loss": F.mse_loss(self.lin(x), y)}


def dataset(n: int):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(WIDTH, generator=g), "y": torch.randn(WIDTH, generator=g)} for _ in range(n)]


def make_optimizer(name: str, params):
    if name == "fasttrain_adamw":
        from fasttrain.optim.adamw import FusedAdamW
        return FusedAdamW(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def run_fasttrain(data, steps: int, out_dir: str, optim: str = "adamw_torch_fused") -> float:
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=out_dir, overwrite_output_dir=True, max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=1e-3, max_grad_norm=1.0,
                             optim=optim, lr_scheduler_type="linear", logging_steps=100,
                             save_strategy="no", disable_tqdm=True, report_to="none",
                             dataloader_pin_memory=False, profile=False)
    trainer = Trainer(Tiny(), args, train_dataset=data)
    t0 = time.perf_counter()
    trainer.train()
    return steps / (time.perf_counter() - t0)


def run_plain(data, steps: int, optim: str = "adamw_torch_fused") -> float:
    torch.manual_seed(0)
    model = Tiny()
    opt = make_optimizer(optim, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=default_data_collator)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        for batch in loader:
            loss = model(**batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done % 100 == 0:
                loss.item()  # the same logging sync fasttrain does every 100 steps
            if done == steps:
                break
    return steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--optim", default="adamw_torch_fused", choices=["adamw_torch_fused", "fasttrain_adamw"],
                   help="the fused AdamW both sides use")
    p.add_argument("--width", type=int, default=16, help="hidden width of the 4-layer MLP")
    p.add_argument("--json", help="also write the result here")
    ns = p.parse_args()
    global WIDTH
    WIDTH = ns.width
    data = dataset(8 * ns.steps)
    with tempfile.TemporaryDirectory() as tmp:
        run_fasttrain(data, 20, tmp, ns.optim)  # warm-up both paths once
        run_plain(data, 20, ns.optim)
        ft, plain = [], []
        for _ in range(ns.repeats):
            ft.append(run_fasttrain(data, ns.steps, tmp, ns.optim))
            plain.append(run_plain(data, ns.steps, ns.optim))
    s_ft, s_plain = spread(ft), spread(plain)
    ratios = spread([a / b for a, b in zip(ft, plain)])
    result = {"env": environment(), "steps": ns.steps, "optim": ns.optim, "width": ns.width, "repeats": ns.repeats,
              "fasttrain_steps_per_s": s_ft, "plain_steps_per_s": s_plain,
              "ratio_fasttrain_over_plain": ratios}
    print(f"env: {result['env']}  optim: {ns.optim}  width: {ns.width}")
    print(f"fasttrain   steps/s {fmt(s_ft)}")
    print(f"plain loop  steps/s {fmt(s_plain)}")
    print(f"ratio (fasttrain / plain, per paired run) {fmt(ratios, 'x')}  goal >= 0.95x")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
