"""One forward+backward of an 8-layer GPT in a fresh process; prints the step's peak
resident memory above the pre-step level, in bytes (for tests/test_activation_checkpointing.py).

    python -m tests._ac_memory_worker EVERY   (0 = no activation checkpointing)
MALLOC_MMAP_THRESHOLD_ is set by the caller so every large tensor is its own mapping,
returned to the OS when freed: resident memory then follows the live tensors.
"""
import json
import resource
import sys

import torch

from fasttrain.models.activation_checkpointing import apply_activation_checkpointing
from fasttrain.models.gpt import GPT, GPTConfig


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    """Reset the kernel's resident high-water mark (VmHWM), so a peak reached while importing
    (which varies with the environment) cannot stand in for the step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main():
    every = int(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=256, n_layer=8, n_head=4, n_embd=256))
    if every:
        apply_activation_checkpointing(model, list(model.transformer.h), every=every)
    x = torch.randint(0, 256, (8, 256))
    before = rss_bytes()
    reset_peak()
    model(input_ids=x, labels=x).loss.backward()
    peak = peak_bytes()
    print(json.dumps({"peak_above_start": peak - before}))


if __name__ == "__main__":
    main()
