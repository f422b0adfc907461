"""DDP vs FSDP vs FSDP + activation checkpointing: per-rank peak memory and step time.

    python bench/bench_fsdp.py [--worlds 2 4 --layers 12 --width 768 --vocab 16384
                                --seq 64 --batch 1 --steps 4 --rounds 1]

A ~100M-parameter GPT (12 x 768, vocab 16384: 98M) is trained with AdamW on CPU gloo
process groups of each world size, as
  ddp      fasttrain's BucketedDDP on a full replica per rank
  fsdp     fully_shard per block + root (FSDP2), full_shard
  fsdp_ac  the same, every block activation-checkpointed
The FSDP variants build the model on the meta device and materialise only their shards
(as a real large run must), so no rank ever holds the full model. Each (variant, world)
runs in fresh processes, so every peak belongs to one variant; rounds repeat the sweep with
the variants rotated. Reported per variant and world: step time p20/p50/p80 over the
timed steps of every round and rank, the ratio of medians against ddp, and the per-rank
peak resident memory above the post-import level (max over ranks; sampled every 2 ms with
MALLOC_MMAP_THRESHOLD_ set so freed tensors leave the resident set). Results (machine,
versions, commit, load) go to bench/results/bench_fsdp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by spawned ranks

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from _common import environment, fmt, spread  # noqa: E402

VARIANTS = ("ddp", "fsdp", "fsdp_ac")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    def __init__(self, every_s: float = 0.002):
        self.peak, self.every_s, self._stop = rss_bytes(), every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build(variant: str, a, world: int):
    from fasttrain.compile.apply import find_repeated_blocks
    from fasttrain.distributed import BucketedDDP
    from fasttrain.distributed.fsdp import FSDPConfig, apply_fsdp, build_mesh
    from fasttrain.models import GPT, GPTConfig
    from fasttrain.models.activation_checkpointing import apply_activation_checkpointing
    cfg = GPTConfig(vocab_size=a.vocab, block_size=a.seq, n_layer=a.layers, n_head=a.width // 64,
                    n_embd=a.width)
    torch.manual_seed(0)
    if variant == "ddp":
        model = GPT(cfg)
        wrapped = BucketedDDP(model)
    else:
        with torch.device("meta"):
            model = GPT(cfg)
        blocks = [b for name in find_repeated_blocks(model) for b in model.get_submodule(name)]
        if variant == "fsdp_ac":
            apply_activation_checkpointing(model, blocks)
        config = FSDPConfig()
        apply_fsdp(model, blocks, config, build_mesh(config, "cpu", world))
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.apply(model._init_weights)  # DTensor-aware init of the local shards
        wrapped = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return model, wrapped, optimizer


def rank_main(rank: int, world: int, port: int, variant: str, a, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fasttrain.distributed.fsdp, fasttrain.models.activation_checkpointing  # noqa: F401,E401
    from fasttrain.distributed import BucketedDDP  # noqa: F401 - imports are not the variant's memory
    base = rss_bytes()
    times = []
    with PeakSampler() as sampler:
        model, wrapped, optimizer = build(variant, a, world)
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
        for step in range(a.steps + 1):  # the first step is warm-up (allocations, plans)
            dist.barrier()
            t0 = time.perf_counter()
            wrapped(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(wrapped, "zero_grad") and variant == "ddp":
                wrapped.zero_grad()
            dist.barrier()
            if step:
                times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out, f"{variant}_{world}_{rank}.json"), "w") as f:
        json.dump({"times": times, "peak_above_start": sampler.peak - base, "params": params}, f)
    from fasttrain.distributed.context import drain_gloo_workers
    drain_gloo_workers()  # the FSDP mesh keeps the group past destroy: see its docstring
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "bench_fsdp.json"))
    a = p.parse_args()
    import tempfile
    scratch = tempfile.mkdtemp(prefix="bench_fsdp_")
    results = {}
    for rnd in range(a.rounds):
        for world in a.worlds:
            order = VARIANTS[rnd % 3:] + VARIANTS[:rnd % 3]
            for variant in order:
                mp.spawn(rank_main, args=(world, free_port(), variant, a, scratch), nprocs=world)
                for rank in range(world):
                    with open(os.path.join(scratch, f"{variant}_{world}_{rank}.json")) as f:
                        r = json.load(f)
                    entry = results.setdefault((variant, world), {"times": [], "peaks": [], "params": r["params"]})
                    entry["times"] += r["times"]
                    entry["peaks"].append(r["peak_above_start"])
    rows = []
    print(f"\nbench_fsdp: GPT {a.layers}x{a.width}, vocab {a.vocab}, seq {a.seq}, batch {a.batch}/rank, "
          f"{a.steps} timed steps x {a.rounds} round(s), CPU gloo, 1 thread per rank")
    for world in a.worlds:
        base = spread(results[("ddp", world)]["times"])["p50"]
        for variant in VARIANTS:
            e = results[(variant, world)]
            s = spread(e["times"])
            peak = max(e["peaks"])
            row = {"variant": variant, "world": world, "params": e["params"], "step_s": s,
                   "ratio_vs_ddp": s["p50"] / base, "peak_rss_above_start_mib_max_rank": peak / 2**20,
                   "peak_rss_per_rank_mib": [x / 2**20 for x in e["peaks"]]}
            rows.append(row)
            print(f"  world {world} {variant:8s} step {fmt(s, ' s')}  x{row['ratio_vs_ddp']:.2f} of ddp  "
                  f"peak/rank {peak / 2**20:8.0f} MiB")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"environment": environment(note="measured while other engineers used the 2 cores"),
                   "config": vars(a), "rows": rows}, f, indent=2)
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
