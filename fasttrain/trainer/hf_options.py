"""TrainingArguments options that HF scripts set and that act outside the training step:
data loader knobs, determinism, log levels, the model's KV cache, emptying the allocator cache.

Each function takes the arguments and does one thing, so the Trainer calls it in one line.
"""
from __future__ import annotations

import logging
import os

import torch

from fasttrain.trainer.utils import set_seed


def loader_options(args) -> dict:
    """DataLoader keyword arguments from the dataloader_* fields (worker-only ones only with
    workers, as torch requires)."""
    options = {"in_order": args.dataloader_in_order}
    if args.dataloader_num_workers > 0:
        options["persistent_workers"] = args.dataloader_persistent_workers
        options["multiprocessing_context"] = args.dataloader_multiprocessing_context
        if args.dataloader_prefetch_factor is not None:
            options["prefetch_factor"] = args.dataloader_prefetch_factor
    return options


def seed_everything(args) -> None:
    """set_seed, and with full_determinism=True deterministic kernels everywhere (slower):
    torch.use_deterministic_algorithms, cuDNN without autotuning, cuBLAS's fixed workspace."""
    set_seed(args.seed)
    if args.full_determinism:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
        os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def apply_log_level(args) -> None:
    """log_level on the processes that log, log_level_replica on the others ('passive':
    leave the level as the script set it)."""
    logging.getLogger("fasttrain").setLevel(args.get_process_log_level())


def apply_model_options(model, args) -> None:
    """use_cache: HF models keep a KV cache only when asked (it costs memory in training)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = args.use_cache


def maybe_empty_cache(args, step: int, device: torch.device) -> None:
    """torch_empty_cache_steps: return cached allocator blocks every N steps (lower peak
    reserved memory, at some speed)."""
    every = args.torch_empty_cache_steps
    if every and step % every == 0 and device.type == "cuda":
        torch.cuda.empty_cache()
