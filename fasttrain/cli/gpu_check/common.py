"""Helpers the parts share: the device, skip results, timing with spread, tiny data."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def has_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The current CUDA device with its index (DDP's device_ids and NCCL's device_id need
    one), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if has_gpu() else torch.device("cpu")


def skipped(reason: str, **extra) -> dict:
    return {"status": "skipped", "reason": reason, **extra}


NO_GPU = "skipped: no GPU (torch.cuda.is_available() is False)"


def seconds_left(ctx: dict, reserve: float = 0.0) -> float:
    """Seconds until the part's deadline (set by the worker from the runner's limit)."""
    return max(1.0, ctx["deadline"] - time.time() - reserve)


def sync() -> None:
    if has_gpu():
        torch.cuda.synchronize()  # sync: measurement boundary


def _percentile(sorted_values: list[float], q: float) -> float:
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def spread(values: list[float]) -> dict:
    """p20/p50/p80 (linear interpolation) of a list of timings, in the unit given."""
    s = sorted(values)
    return {"p20": _percentile(s, 0.2), "p50": statistics.median(s), "p80": _percentile(s, 0.8),
            "n": len(s)}


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict:
    """Seconds per call of each function, measured in interleaved rounds (a, b, a, b, ...)
    so drift in clocks or load hits all alike. CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if has_gpu():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()  # sync: measurement
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: spread(values) for name, values in times.items()}


def token_dataset(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """n examples of random tokens: {'input_ids', 'labels'} (labels = inputs; models shift)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def builtin_gpt(n_layer: int, n_embd: int, n_head: int, vocab: int, block: int, seed: int = 0):
    from fasttrain.models import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd))


def hf_gpt2(n_layer: int, n_embd: int, n_head: int, vocab: int, block: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=block, n_layer=n_layer,
                                      n_embd=n_embd, n_head=n_head, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))
