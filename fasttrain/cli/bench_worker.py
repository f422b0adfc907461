"""One `fasttrain bench` configuration, run in a fresh process (under torchrun when DDP > 1).

Trains the built-in GPT with the real fasttrain Trainer for `warmup + steps` optimizer steps
on random tokens and times the last `steps` with a callback: the device is synchronised
twice, at the end of warm-up and at the end of the run (benchmark only: `# sync:` below),
never in between. Rank 0 prints one line `FASTTRAIN_BENCH_RESULT {json}` that bench.py
parses. Usage: python -m fasttrain.cli.bench_worker '<json config>'.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

RESULT_PREFIX = "FASTTRAIN_BENCH_RESULT "
GIB = 1024 ** 3


class RandomTokens(torch.utils.data.Dataset):
    """Fixed-length windows of random byte tokens (labels = input_ids, HF causal-LM style)."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab_size, (n, seq_len), generator=gen)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: benchmark window boundary only


def make_timer_callback(warmup: int, steps: int, device: torch.device):
    from fasttrain import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t_begin = self.t_warm = self.t_end = None
            self.step_ends: list[float] = []
            self.compile_time_s = None  # the Trainer's compile monitor, from the logged records

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "compile_time_s" in logs:
                self.compile_time_s = logs["compile_time_s"]

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step == warmup or step == warmup + steps:
                _sync(device)
            now = time.perf_counter()
            if step == warmup:
                self.t_warm = now
            if step > warmup:
                self.step_ends.append(now)
            if step == warmup + steps:
                self.t_end = now

    return StepTimer()


def _dynamo_graphs() -> int:
    """Graphs Dynamo compiled in this process (0 when torch.compile never ran)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _training_args(cfg: dict, output_dir: str):
    from fasttrain import TrainingArguments

    fused = cfg["fused"]
    kwargs = dict(
        output_dir=output_dir, max_steps=cfg["warmup"] + cfg["steps"],
        per_device_train_batch_size=cfg["batch"], learning_rate=3e-4, lr_scheduler_type="constant",
        logging_steps=cfg["warmup"] + cfg["steps"],  # one record, at the last step save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, dataloader_drop_last=True,
        bf16=cfg["precision"] == "bf16", fp16=cfg["precision"] == "fp16",
        torch_compile=cfg["compile"], fused_loss=fused,
        optim="fasttrain_adamw" if fused else "adamw_torch", profile=False)
    known = TrainingArguments.__dataclass_fields__
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in known})


def run(cfg: dict) -> dict | None:
    """Train one configuration; returns the result dict on rank 0, None elsewhere."""
    from fasttrain import Trainer
    from fasttrain.models import GPT, MODEL_SIZES, GPTConfig

    if cfg["model"] not in MODEL_SIZES:
        raise ValueError(f"model={cfg['model']!r}: known sizes are {sorted(MODEL_SIZES)}")
    torch.manual_seed(0)
    size = dict(MODEL_SIZES[cfg["model"]])
    size["block_size"] = max(size.get("block_size", 0), cfg["seq_len"])
    model = GPT(GPTConfig(**size))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = cfg["warmup"] + cfg["steps"]
    dataset = RandomTokens(total * cfg["batch"] * world, cfg["seq_len"], model.config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, _training_args(cfg, tmp), train_dataset=dataset)
        device = trainer.device
        timer = make_timer_callback(cfg["warmup"], cfg["steps"], device)
        trainer.add_callback(timer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        output = trainer.train()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if timer.t_end is None:
        raise RuntimeError(f"only {trainer.state.global_step} of {total} steps ran: the dataset "
                           "ran out; this is a bug in the bench worker")
    return summarize(cfg, trainer, timer, model, world, output.training_loss)


def summarize(cfg: dict, trainer, timer, model, world: int, training_loss) -> dict:
    """Throughput, MFU, memory and compile time of one finished configuration."""
    from fasttrain.profiler.flops import device_name_of, flops_per_token_for, peak_flops
    from fasttrain.profiler.sampler import peak_rss_bytes

    device = trainer.device
    elapsed = timer.t_end - timer.t_warm
    step_times = [b - a for a, b in zip([timer.t_warm] + timer.step_ends[:-1], timer.step_ends)]
    tokens_per_rank = cfg["steps"] * cfg["batch"] * cfg["seq_len"]
    tps_device = tokens_per_rank / elapsed
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["precision"]]
    peak = peak_flops(device_name_of(device), dtype)
    fpt = flops_per_token_for(model, cfg["seq_len"])
    warmup_s = timer.t_warm - timer.t_begin
    p50 = _percentile(step_times, 0.5)
    graphs = _dynamo_graphs()
    note = None
    if cfg["compile"] and not graphs:
        note = "torch_compile=True but Dynamo compiled no graph: the Trainer did not compile"
    compile_s = timer.compile_time_s
    compile_source = "trainer" if compile_s is not None else None
    if compile_s is None and cfg["compile"]:  # estimate: warm-up time beyond steady state
        compile_s, compile_source = max(0.0, warmup_s - cfg["warmup"] * p50), "estimate"
    if device.type == "cuda":
        mem, mem_source = torch.cuda.max_memory_allocated(device) / GIB, "cuda max allocated"
    else:
        mem, mem_source = peak_rss_bytes() / GIB, "host peak RSS"
    return {
        "tokens_per_second": tps_device * world, "tokens_per_second_per_device": tps_device,
        "step_time_p20": _percentile(step_times, 0.2), "step_time_p50": p50,
        "step_time_p80": _percentile(step_times, 0.8),
        "mfu": None if peak is None else fpt.value * tps_device / peak,
        "flops_per_token": fpt.value, "peak_memory_gib": mem, "peak_memory_source": mem_source,
        "warmup_time_s": warmup_s, "compile_time_s": compile_s,
        "compile_time_source": compile_source, "compiled_graphs": graphs, "note": note,
        "world_size": world,
        "device": device_name_of(device) or device.type,
        "final_loss": None if training_loss is None else float(training_loss),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fasttrain.cli.bench_worker '<json config>'", file=sys.stderr)
        return 2
    result = run(json.loads(argv[0]))
    if result is not None:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
