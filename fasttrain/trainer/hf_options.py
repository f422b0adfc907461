"""TrainingArguments options that HF scripts set and that act around the training step:
data loader knobs, determinism, log levels, the model's KV cache, emptying the allocator
cache, NEFTune noise, counting input tokens.

Each function takes the arguments and does one thing, so the Trainer calls it in one line.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

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
    """use_cache=True turns an HF model's KV cache on, as HF. False (the default) leaves the
    model's own setting, unlike HF, which turns it off: without a cache and without an
    attention_mask, transformers 5.24 checks the position ids for packed sequences with a
    host sync in every forward; the cache costs only references to keys/values that
    backward keeps anyway."""
    config = getattr(model, "config", None)
    if args.use_cache and config is not None and hasattr(config, "use_cache"):
        config.use_cache = True


def maybe_empty_cache(args, step: int, device: torch.device) -> None:
    """torch_empty_cache_steps: return cached allocator blocks every N steps (lower peak
    reserved memory, at some speed)."""
    every = args.torch_empty_cache_steps
    if every and step % every == 0 and device.type == "cuda":
        torch.cuda.empty_cache()


def _input_embeddings(model):
    base = getattr(model, "module", model)  # a data-parallel wrapper
    if hasattr(base, "base_model") and hasattr(base.base_model, "model"):  # a PEFT model
        base = base.base_model.model
    get = getattr(base, "get_input_embeddings", None)
    return get() if get is not None else None


def activate_neftune(model, alpha: Optional[float]):
    """neftune_noise_alpha (NEFTune, arXiv 2310.05914): in training mode the input embeddings
    get uniform noise in +-alpha/sqrt(seq_len * width). Returns the hook handle (None when off)."""
    if alpha is None:
        return None
    embeddings = _input_embeddings(model)
    if embeddings is None:
        raise ValueError(f"TrainingArguments.neftune_noise_alpha={alpha} needs a model with "
                         f"get_input_embeddings() (an HF model); {type(model).__name__} has none")

    def add_noise(module, inputs, output):
        if not module.training:
            return output
        # HF's bound, computed as HF does (fp32 on the host), so a seeded run draws the same noise
        bound = float(alpha / torch.sqrt(torch.tensor(output.size(1) * output.size(2))))
        return output + torch.zeros_like(output).uniform_(-bound, bound)

    return embeddings.register_forward_hook(add_noise)


def tokens_seen(batches: list, args) -> int:
    """Input tokens of a step's host batches for include_num_input_tokens_seen: every
    position ('all', and fasttrain's own count when 'no'), or the attended ones
    ('non_padding', from attention_mask)."""
    total = 0
    for batch in batches:
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        if args.include_num_input_tokens_seen == "non_padding" and isinstance(mask, torch.Tensor):
            total += int(mask.sum())  # host data (batches are collated on the CPU)
        elif isinstance(ids, torch.Tensor):
            total += ids.numel()
    return total


def cast_for_full_eval(model, args, in_train: bool) -> None:
    """bf16_full_eval / fp16_full_eval: outside training, evaluate the model cast to that
    dtype (as HF, the cast stays: it saves memory, at some accuracy)."""
    dtype = torch.bfloat16 if args.bf16_full_eval else torch.float16 if args.fp16_full_eval else None
    if dtype is not None and not in_train:
        model.to(dtype=dtype)
