"""Checkpoint save/load time and bytes for the built-in GPT, against torch.save/torch.load
of the same state dicts and against writing the same number of raw bytes.

Side by side in one run, alternating, REPEATS times per size:
  stall           = what a training step waits for: the snapshot into host memory (the
                    write above then runs on a background thread)
  fasttrain save  = safetensors weights + torch.save optimizer, sha256 manifest, fsync, rename
  torch.save      = one torch.save of {model, optimizer} (+ fsync, for the same durability)
  raw write       = os.write of as many bytes + fsync: the floor for any durable save
  fasttrain load  = verify checksums + load weights + optimizer (weights_only)
  torch.load      = torch.load of the torch.save file (weights_only)
The stall ratio (fasttrain save / raw write) says whether saving stalls training for longer
than writing the bytes takes.

    python3 bench/bench_checkpoint.py [--sizes tiny,small,gpt2] [--repeats 3]
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, fmt, spread  # noqa: E402

from fasttrain.checkpoint import storage as ckpt  # noqa: E402
from fasttrain.models import GPT, GPTConfig, MODEL_SIZES  # noqa: E402


def build(size: str):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**MODEL_SIZES[size], "block_size": 256}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return model, opt


def fasttrain_save(model, opt, out: str) -> float:
    t0 = time.perf_counter()
    w = ckpt.CheckpointWriter(out, 1)
    w.write_model(model.state_dict())
    w.write_torch("optimizer.pt", opt.state_dict())
    path = w.commit(1)
    dt = time.perf_counter() - t0
    return dt, sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def snapshot_stall(model, opt) -> float:
    """What the training step waits for with background saving: a host copy of the state."""
    t0 = time.perf_counter()
    weights, _ = ckpt.dedupe_shared(model.state_dict())
    ckpt.snapshot({"w": weights, "o": opt.state_dict()})
    return time.perf_counter() - t0


def fasttrain_load(model, opt, out: str) -> float:
    path = os.path.join(out, "checkpoint-1")
    t0 = time.perf_counter()
    ckpt.verify(path)
    ckpt.load_model_weights(model, path)
    opt.load_state_dict(ckpt.read_torch(path, "optimizer.pt"))
    return time.perf_counter() - t0


def torch_save(model, opt, path: str) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0, os.path.getsize(path)


def torch_load(path: str) -> float:
    t0 = time.perf_counter()
    torch.load(path, weights_only=True)
    return time.perf_counter() - t0


def raw_write(nbytes: int, path: str) -> float:
    data = os.urandom(1 << 20) * (nbytes >> 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small,gpt2")
    p.add_argument("--repeats", type=int, default=3)
    ns = p.parse_args()
    print(f"env: {environment()}")
    for size in ns.sizes.split(","):
        model, opt = build(size)
        rows = {k: [] for k in ("ft_save", "torch_save", "raw", "ft_load", "torch_load", "stall")}
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
            for r in range(ns.repeats):
                dt, ft_bytes = fasttrain_save(model, opt, os.path.join(tmp, f"ft{r}"))
                rows["ft_save"].append(dt)
                dt, t_bytes = torch_save(model, opt, os.path.join(tmp, f"t{r}.pt"))
                rows["torch_save"].append(dt)
                rows["raw"].append(raw_write(ft_bytes, os.path.join(tmp, f"raw{r}")))
                rows["ft_load"].append(fasttrain_load(model, opt, os.path.join(tmp, f"ft{r}")))
                rows["torch_load"].append(torch_load(os.path.join(tmp, f"t{r}.pt")))
                rows["stall"].append(snapshot_stall(model, opt))
        s = {k: spread(v) for k, v in rows.items()}
        n = sum(p.numel() for p in model.parameters())
        print(f"\n[{size}] {n / 1e6:.1f}M params; fasttrain {ft_bytes / 2**20:.1f} MiB, torch.save "
              f"{t_bytes / 2**20:.1f} MiB")
        print(f"  save   fasttrain {fmt(s['ft_save'], ' s')}  torch.save {fmt(s['torch_save'], ' s')}  "
              f"raw write {fmt(s['raw'], ' s')}")
        print(f"  load   fasttrain (verify+load) {fmt(s['ft_load'], ' s')}  torch.load {fmt(s['torch_load'], ' s')}")
        print(f"  training stall with background saving (snapshot) {fmt(s['stall'], ' s')}")
        ratio = lambda a, b: spread([x / y for x, y in zip(rows[a], rows[b])])  # noqa: E731
        print(f"  ratios save fasttrain/torch {fmt(ratio('ft_save', 'torch_save'), 'x')}, "
              f"save fasttrain/raw write {fmt(ratio('ft_save', 'raw'), 'x')}, "
              f"load fasttrain/torch {fmt(ratio('ft_load', 'torch_load'), 'x')}, "
              f"stall/raw write {fmt(ratio('stall', 'raw'), 'x')}")


if __name__ == "__main__":
    main()
