"""End to end: tokens/s of the fasttrain Trainer against the HF Trainer on the same HF GPT-2.

The issue's model: GPT2LMHeadModel, 4 layers, 384 wide, 6 heads, vocab 8192, sequence 256,
batch 8, random tokens (labels = inputs). Two configurations, each trainer configured alike:
  defaults      what a user gets: TrainingArguments(output_dir, max_steps, batch) only
  bf16          + bf16 autocast, torch's fused AdamW (HF: use_cpu=True, which bf16 on a CPU
                requires): the eager figure, when a compiled comparison does not fit
  bf16_compile  + torch_compile (the issue's configuration)
Every run is a fresh process (compile caches, allocator and threads start cold alike) that
trains WARMUP + STEPS steps and times the last STEPS with a step-end callback. Runs are
interleaved (fasttrain, HF, fasttrain, HF, ..., the order alternating per repeat) so drift
on a loaded machine hits both; reported: tokens/s p20/p50/p80 and the per-repeat ratio.

    python3 bench/bench_e2e.py [--configs defaults,bf16_compile] [--steps 4] [--warmup 2]
        [--repeats 3] [--profile] [--json out.json]

--profile adds one torch.profiler pass per runner (after warm-up, 2 steps, in a fresh
process): self CPU time per ATen op, the top rows and the copy_/mm/addmm shares.
Goal (issue 12): fasttrain >= 1.25x the HF Trainer's tokens/s on bf16_compile.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import environment, fmt, percentiles, spread  # noqa: E402

MODEL = dict(n_layer=4, n_embd=384, n_head=6, vocab=8192, block=256)
BATCH, SEQ = 8, 256
RUNNERS = ("fasttrain", "hf")
CONFIGS = {
    "defaults": {},
    "bf16": dict(bf16=True, optim="adamw_torch_fused"),
    "bf16_compile": dict(bf16=True, torch_compile=True, optim="adamw_torch_fused"),
}
RESULT = "BENCH_E2E_RESULT "


def _trainer(runner: str, config: str, steps: int, outdir: str, callbacks: list):
    import torch

    from fasttrain.cli.gpu_check.common import hf_gpt2, token_dataset

    model = hf_gpt2(**MODEL)
    data = token_dataset(BATCH * steps, SEQ, MODEL["vocab"])
    kw = dict(output_dir=outdir, max_steps=steps, per_device_train_batch_size=BATCH,
              save_strategy="no", report_to="none", disable_tqdm=True, **CONFIGS[config])
    if runner == "fasttrain":
        from fasttrain import Trainer, TrainingArguments
    else:
        from transformers import Trainer, TrainingArguments
        if kw.get("bf16") and not torch.cuda.is_available():
            kw["use_cpu"] = True
    return Trainer(model=model, args=TrainingArguments(**kw), train_dataset=data,
                   callbacks=callbacks)


def child(runner: str, config: str, steps: int, warmup: int, profile: bool) -> dict:
    """One run in this process: seconds per step over the last `steps` steps."""
    import torch
    from transformers import TrainerCallback as HFCallback

    from fasttrain import TrainerCallback

    marks = {}
    prof = {}

    class Clock(TrainerCallback, HFCallback):  # the same object serves both trainers
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                marks["t0"] = time.perf_counter()
                if profile:
                    prof["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    prof["p"].__enter__()
            if state.global_step == warmup + steps:
                marks["t1"] = time.perf_counter()
                if profile:
                    prof["p"].__exit__(None, None, None)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _trainer(runner, config, warmup + steps, tmp, [Clock()]).train()
    out = {"runner": runner, "config": config, "s_per_step": (marks["t1"] - marks["t0"]) / steps,
           "run_s": time.perf_counter() - t_start, "threads": torch.get_num_threads()}
    out["tokens_per_s"] = BATCH * SEQ / out["s_per_step"]
    if profile:
        rows = sorted(prof["p"].key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in rows)
        out["profile"] = {"total_ms_per_step": total / 1e3 / steps,
                          "ops": [{"op": e.key, "calls_per_step": e.count / steps,
                                   "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                                   "share": e.self_cpu_time_total / total} for e in rows[:12]]}
    return out


def _spawn(runner, config, args, profile=False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", runner, "--config", config,
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (
        ["--threads", str(args.threads)] if args.threads else []) + (["--profile"] if profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {"runner": runner, "config": config, "error": (proc.stderr or proc.stdout)[-2000:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="defaults,bf16_compile")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's); "
                   "1 on a loaded machine keeps oversubscribed thread pools out of the figure")
    p.add_argument("--json")
    p.add_argument("--child", choices=RUNNERS)
    p.add_argument("--config", choices=sorted(CONFIGS))
    args = p.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.child:
        print(RESULT + json.dumps(child(args.child, args.config, args.steps, args.warmup,
                                        args.profile)), flush=True)
        return
    configs = [c.strip() for c in args.configs.split(",")]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"--configs: {bad} not in {sorted(CONFIGS)}")
    env = environment(model=MODEL, batch=BATCH, seq_len=SEQ, steps=args.steps, warmup=args.warmup)
    runs = []
    for rep in range(args.repeats):
        for config in configs:
            order = RUNNERS if rep % 2 == 0 else RUNNERS[::-1]
            for runner in order:
                r = _spawn(runner, config, args)
                r["repeat"] = rep
                runs.append(r)
                print(f"  repeat {rep} {config:13s} {runner:9s} "
                      + (f"{r['tokens_per_s']:8.0f} tok/s ({r['run_s']:.0f} s run)"
                         if "error" not in r else "ERROR " + r["error"][-300:]), flush=True)
    print(f"\nHF GPT-2 {MODEL}, batch {BATCH} x seq {SEQ}; {args.steps} timed steps after "
          f"{args.warmup}; load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"torch {env['torch']}, commit {env['commit']}")
    summary = {}
    for config in configs:
        ok = {rn: {r["repeat"]: r["tokens_per_s"] for r in runs
                   if r["config"] == config and r["runner"] == rn and "error" not in r}
              for rn in RUNNERS}
        ratios = [ok["fasttrain"][k] / ok["hf"][k] for k in ok["fasttrain"] if k in ok["hf"]]
        summary[config] = {rn: spread(list(v.values())) for rn, v in ok.items() if v}
        for rn, s in summary[config].items():
            print(f"  {config:13s} {rn:9s} tokens/s {fmt(s)}")
        if ratios:
            summary[config]["ratio"] = spread(ratios)
            p20, p50, p80 = percentiles(ratios)
            print(f"  {config:13s} fasttrain / HF per repeat: {p50:.2f}x [p20 {p20:.2f}, p80 {p80:.2f}]")
            if p50 and (p80 - p20) / p50 > 0.10:
                print(f"  warning: wide spread ({(p80 - p20) / p50:.0%} of the median): "
                      "a loaded machine; rerun with more repeats before quoting")
    profiles = {}
    if args.profile:
        for config in configs:
            for runner in RUNNERS:
                r = _spawn(runner, config, args, profile=True)
                profiles[f"{config}/{runner}"] = r.get("profile", r.get("error"))
                if "profile" in r:
                    prof = r["profile"]
                    print(f"\nprofile {config} {runner}: {prof['total_ms_per_step']:.0f} ms "
                          "self CPU per step")
                    for row in prof["ops"]:
                        print(f"    {row['op']:40s} {row['calls_per_step']:7.1f} calls "
                              f"{row['ms_per_step']:8.1f} ms {row['share']:6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "runs": runs, "summary": summary,
                       "profiles": profiles}, f, indent=1)


if __name__ == "__main__":
    main()
