"""Part 4: speed against its bound, each comparison measured side by side in one process,
interleaved, with p20/p50/p80 (CUDA events on a GPU). The functions take their sizes, so
tests/test_gpu_check.py runs the same code on CPU at toy sizes; the GPU sizes are the
issue's: 124M parameters, 4096 x 1024 x 65536, a 124M GPT at 8 x 1024 tokens per step.

FLOPs per token (MFU): 6*N + 12*L*H*Q*T (fasttrain/profiler/flops.py). AdamW traffic:
28 bytes per fp32 parameter (read p, g, m, v; write p, m, v).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from fasttrain.callbacks import TrainerCallback
from fasttrain.cli.gpu_check.common import (NO_GPU, device, has_gpu, hf_gpt2, seconds_left,
                                            skipped, sync, time_interleaved, token_dataset)

ADAMW_BYTES_PER_PARAM = 28


def gpt2_small_shapes(vocab: int = 50304, width: int = 768, layers: int = 12,
                      context: int = 1024) -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (124M with a 50304 vocabulary, tied head)."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width),
                   (width,)]
    return shapes + [(width,), (width,)]


def _hbm_peak() -> float | None:
    from fasttrain.cli.gpu_check.environment import hbm_peak

    return hbm_peak(torch.cuda.get_device_name(0)) if has_gpu() else None


def adamw_figures(shapes, repeats: int) -> dict:
    """fasttrain FusedAdamW vs torch.optim.AdamW(fused=True), fp32, one step each."""
    from fasttrain.optim.adamw import FusedAdamW

    dev = device()
    gen = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(2):
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dev)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dev) * 1e-3
        sets.append(params)
    ours = FusedAdamW(sets[0], lr=1e-4, weight_decay=0.1)
    theirs = torch.optim.AdamW(sets[1], lr=1e-4, weight_decay=0.1, fused=True)
    n = sum(p.numel() for p in sets[0])
    times = time_interleaved({"fasttrain": ours.step, "torch_fused": theirs.step}, repeats)
    peak = _hbm_peak()
    result = {"params": n, "bytes_per_step": ADAMW_BYTES_PER_PARAM * n, "seconds": times,
              "hbm_bytes_per_s_peak": peak, "bound_seconds": None if peak is None
              else ADAMW_BYTES_PER_PARAM * n / peak}
    for name, t in times.items():
        gbps = ADAMW_BYTES_PER_PARAM * n / t["p50"] / 1e9
        result[f"{name}_GBps_p50"] = gbps
        result[f"{name}_fraction_of_peak"] = None if peak is None else gbps * 1e9 / peak
    result["fasttrain_over_torch_time"] = times["fasttrain"]["p50"] / times["torch_fused"]["p50"]
    return result


def adamw(ctx: dict) -> dict:
    if not has_gpu():
        return skipped(NO_GPU)
    r = adamw_figures(gpt2_small_shapes(), repeats=20)
    frac = r["fasttrain_fraction_of_peak"]
    peak = r["hbm_bytes_per_s_peak"]
    peak_text = "unknown" if peak is None else f"{peak / 1e9:.0f} GB/s"
    frac_text = "n/a" if frac is None else f"{frac:.0%}"
    return {"status": "pass", **r, "summary": (
        f"{r['params'] / 1e6:.0f}M params: fasttrain {r['fasttrain_GBps_p50']:.0f} GB/s, torch "
        f"fused {r['torch_fused_GBps_p50']:.0f} GB/s, HBM peak {peak_text} ({frac_text} of it); "
        f"time ratio {r['fasttrain_over_torch_time']:.2f}x torch")}


def linear_cross_entropy_figures(N: int, H: int, V: int, dtype: torch.dtype, repeats: int) -> dict:
    """fasttrain.kernels.linear_cross_entropy vs matmul + F.cross_entropy: forward + backward
    time, and peak memory above the inputs (CUDA) against the floor: the two gradients."""
    from fasttrain.kernels import linear_cross_entropy

    dev = device()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen).to(dev, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dev, dtype).requires_grad_()
    target = torch.randint(0, V, (N,), generator=gen).to(dev)

    def fused():
        hidden.grad = weight.grad = None
        linear_cross_entropy(hidden, weight, target).backward()

    def unfused():
        hidden.grad = weight.grad = None
        F.cross_entropy((hidden @ weight.t()).float(), target).backward()

    fns = {"fused": fused, "unfused": unfused}
    times = time_interleaved(fns, repeats)
    floor = (V * H + N * H) * hidden.element_size()
    memory = {}
    for name, fn in fns.items():
        hidden.grad = weight.grad = None
        if has_gpu():
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync()
            memory[name] = torch.cuda.max_memory_allocated() - base
        else:
            memory[name] = None  # in-process CPU peaks are not separable; bench/ measures RSS
    return {"shape": {"N": N, "H": H, "V": V, "dtype": str(dtype)}, "seconds": times,
            "peak_bytes_above_inputs": memory, "floor_bytes": floor,
            "fused_over_unfused_time": times["fused"]["p50"] / times["unfused"]["p50"],
            "fused_over_floor_memory": None if memory["fused"] is None else memory["fused"] / floor}


def linear_cross_entropy(ctx: dict) -> dict:
    if not has_gpu():
        return skipped(NO_GPU)
    r = linear_cross_entropy_figures(4096, 1024, 65536, torch.bfloat16, repeats=10)
    mem = r["peak_bytes_above_inputs"]
    return {"status": "pass", **r, "summary": (
        f"4096x1024x65536 bf16 fwd+bwd: fused {r['seconds']['fused']['p50'] * 1e3:.1f} ms vs "
        f"unfused {r['seconds']['unfused']['p50'] * 1e3:.1f} ms "
        f"({r['fused_over_unfused_time']:.2f}x); peak {mem['fused'] / 2**20:.0f} MiB vs "
        f"{mem['unfused'] / 2**20:.0f} MiB, floor {r['floor_bytes'] / 2**20:.0f} MiB "
        f"({r['fused_over_floor_memory']:.2f}x floor)")}


class StepClock(TrainerCallback):
    """Seconds per optimizer step between the end of step `warmup` and the end of the last
    step; two device syncs in all (measurement only), identical for both trainers."""

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last = warmup, last
        self.t0 = self.t1 = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup, self.last):
            sync()
            now = time.perf_counter()
            if state.global_step == self.warmup:
                self.t0 = now
            else:
                self.t1 = now

    def seconds_per_step(self) -> float:
        return (self.t1 - self.t0) / (self.last - self.warmup)


def step_overhead_figures(width: int, steps: int, warmup: int, outdir: str) -> dict:
    """fasttrain Trainer (defaults) vs the hand-written loop (`fasttrain.profiler.hand_loop`:
    forward, backward, clip, fused AdamW, LR schedule, zero_grad) on a small MLP, batch 4:
    seconds per step each."""
    from fasttrain import Trainer, TrainingArguments
    from fasttrain.profiler.hand_loop import HandLoop, Regressor, regression_examples

    dev = device()
    data = regression_examples(4 * steps, width=width, out=width)
    torch.manual_seed(0)
    loop = HandLoop(Regressor(width, out=width, mlp=True).to(dev), lr=1e-3, total_steps=steps)
    batches = [{k: torch.stack([d[k] for d in data[i:i + 4]]).to(dev) for k in ("x", "labels")}
               for i in range(0, 4 * steps, 4)]
    for batch in batches[:warmup]:
        loop.step(batch)
    sync()
    t0 = time.perf_counter()
    for batch in batches[warmup:]:
        loop.step(batch)
    sync()
    hand = (time.perf_counter() - t0) / (steps - warmup)
    torch.manual_seed(0)
    clock = StepClock(warmup, steps)
    args = TrainingArguments(output_dir=outdir, max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=steps, save_strategy="no",
                             report_to="none", disable_tqdm=True)
    Trainer(model=Regressor(width, out=width, mlp=True), args=args, train_dataset=data, callbacks=[clock]).train()
    ours = clock.seconds_per_step()
    return {"width": width, "steps_timed": steps - warmup, "hand_loop_s_per_step": hand,
            "fasttrain_s_per_step": ours, "fasttrain_over_hand_loop": ours / hand}


def step_overhead(ctx: dict) -> dict:
    if not has_gpu():
        return skipped(NO_GPU)
    with tempfile.TemporaryDirectory() as tmp:
        r = step_overhead_figures(256, steps=300, warmup=50, outdir=tmp)
    return {"status": "pass", **r, "summary": (
        f"small MLP, batch 4: Trainer {r['fasttrain_s_per_step'] * 1e3:.2f} ms/step vs hand "
        f"loop {r['hand_loop_s_per_step'] * 1e3:.2f} ms/step ({r['fasttrain_over_hand_loop']:.2f}x)")}


def _mfu(model, tokens_per_s: float, seq_len: int) -> tuple[float | None, str | None]:
    from fasttrain.profiler.flops import flops_per_token_for, peak_flops

    fpt = flops_per_token_for(model, seq_len)
    peak = peak_flops(torch.cuda.get_device_name(0), torch.bfloat16) if has_gpu() else None
    if fpt is None or peak is None:
        return None, fpt.formula if fpt else None
    return tokens_per_s * fpt.value / peak, fpt.formula


def end_to_end_run(trainer_kind: str, model_fn, batch: int, seq: int, steps: int, warmup: int,
                   outdir: str) -> dict:
    """tokens/s and MFU of one short training run, timed by StepClock."""
    data = token_dataset(batch * steps, seq, 50257)
    clock = StepClock(warmup, steps)
    model = model_fn()
    common = dict(output_dir=outdir, max_steps=steps, per_device_train_batch_size=batch,
                  learning_rate=1e-4, logging_steps=steps, save_strategy="no", report_to="none",
                  disable_tqdm=True, bf16=has_gpu(), dataloader_drop_last=True)
    if trainer_kind == "fasttrain":
        from fasttrain import Trainer, TrainingArguments

        args = TrainingArguments(**common, torch_compile=True, optim="fasttrain_adamw")
    else:
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(**common, optim="adamw_torch_fused" if has_gpu() else "adamw_torch",
                                 use_cpu=not has_gpu())
    Trainer(model=model, args=args, train_dataset=data, callbacks=[clock]).train()
    tokens_per_s = batch * seq / clock.seconds_per_step()
    mfu, formula = _mfu(model, tokens_per_s, seq)
    return {"tokens_per_s": tokens_per_s, "s_per_step": clock.seconds_per_step(), "mfu": mfu,
            "flops_formula": formula, "batch": batch, "seq_len": seq, "steps_timed": steps - warmup}


def end_to_end_figures(ctx: dict, size: dict, batch: int, seq: int, steps: int, warmup: int,
                       min_seconds_per_run: float) -> dict:
    """The same HF GPT-2 under fasttrain (compile + bf16 + fused AdamW + fused loss) and under
    the HF Trainer (bf16, torch's fused AdamW, its defaults otherwise). Each finished run is
    written to OUTDIR/speed_end_to_end.partial.json, so a time-out keeps what was measured."""
    runs = {}
    partial = os.path.join(ctx["outdir"], "speed_end_to_end.partial.json")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("fasttrain", "hf_trainer"):
            if seconds_left(ctx) < min_seconds_per_run:
                runs[kind] = {"status": "skipped", "reason": "skipped: out of time"}
                continue
            runs[kind] = end_to_end_run(kind, lambda: hf_gpt2(**size), batch, seq, steps, warmup,
                                        f"{tmp}/{kind}")
            with open(partial, "w") as f:
                json.dump(runs, f)
    ratio = None
    if all("tokens_per_s" in r for r in runs.values()):
        ratio = runs["fasttrain"]["tokens_per_s"] / runs["hf_trainer"]["tokens_per_s"]
    if os.path.exists(partial):
        os.unlink(partial)
    return {"model": size, "runs": runs, "fasttrain_over_hf_tokens_per_s": ratio}


def end_to_end(ctx: dict) -> dict:
    if not has_gpu():
        return skipped(NO_GPU)
    size = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, block=1024)  # GPT-2 small, 124M
    r = end_to_end_figures(ctx, size, batch=8, seq=1024, steps=30, warmup=10,
                           min_seconds_per_run=60)
    runs = r["runs"]

    def line(kind):
        run = runs[kind]
        if "tokens_per_s" not in run:
            return f"{kind} {run.get('reason')}"
        mfu = "n/a" if run["mfu"] is None else f"{run['mfu']:.1%}"
        return f"{kind} {run['tokens_per_s'] / 1e3:.1f}k tok/s MFU {mfu}"

    ratio = r["fasttrain_over_hf_tokens_per_s"]
    return {"status": "pass" if ratio is not None else "fail", **r,
            **({} if ratio is not None else {"reason": "a run did not finish in time"}),
            "summary": f"GPT-2 124M, 8x1024 tok/step: {line('fasttrain')}; {line('hf_trainer')}"
            + ("" if ratio is None else f"; ratio {ratio:.2f}x")}
