"""Worker processes for the distributed tests (not collected by pytest).

    python tests/_ddp_workers.py SUITE OUT_DIR [INIT_METHOD]

Each rank runs every check of SUITE in one process group and writes
OUT_DIR/rank{RANK}.json: {check name: metrics dict, or {"error": message}}. The pytest
side asserts on the metrics, so a failing check shows its numbers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as TorchDDP

from fasttrain.distributed import (
    BucketedDDP,
    ShardedSampler,
    all_reduce_,
    barrier,
    destroy_distributed,
    gather_eval_predictions,
    init_distributed,
)

D_IN, D = 8, 16
CAPS = dict(bucket_cap_mb=0.004, first_bucket_cap_mb=0.001)  # ~1 bucket per block
# aot_eager builds the same compiled autograd nodes as inductor without a C++ build per run;
# set FASTTRAIN_TEST_COMPILE_BACKEND=inductor to run the overlap checks on inductor.
COMPILE_BACKEND = os.environ.get("FASTTRAIN_TEST_COMPILE_BACKEND", "aot_eager")


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Net(nn.Module):
    """inp -> blocks -> head; optional never-used and data-dependent (branch) parameters."""

    def __init__(self, depth: int = 3, unused: bool = False, branch: bool = False, width: int = D):
        super().__init__()
        self.inp = nn.Linear(D_IN, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)
        self.unused = nn.Linear(width, width) if unused else None
        self.branch = nn.Linear(D_IN, 1) if branch else None

    def forward(self, x, branch_mask=None):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        out = self.head(h)
        if self.branch is not None and branch_mask is not None and bool(branch_mask.any()):
            out = out + self.branch(x) * branch_mask
        return out


def make_net(seed: int, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def data(n: int = 8, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, 1, generator=g)


def make_opt(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def rank_slice(n: int, rank: int, world: int) -> slice:
    per = -(-n // world)
    return slice(rank * per, min(n, (rank + 1) * per))


def sum_loss(model, x, y, mask=None):
    pred = model(x) if mask is None else model(x, mask)
    return ((pred - y) ** 2).sum()


def train_reference(opt_name, steps, sizes=(8,), **net_kwargs):
    """One process, global batch: the ground truth."""
    model = make_net(0, **net_kwargs)
    opt = make_opt(opt_name, model.parameters())
    for step in range(steps):
        x, y = data(sizes[min(step, len(sizes) - 1)], seed=step)
        opt.zero_grad(set_to_none=True)
        mask = branch_mask_for(x.shape[0], None) if net_kwargs.get("branch") else None
        (sum_loss(model, x, y, mask) / x.shape[0]).backward()
        opt.step()
    return flat_params(model)


def branch_mask_for(n: int, rank: int | None) -> torch.Tensor:
    """The branch applies to the first half of the global batch: rank 0's rows only."""
    mask = torch.zeros(n, 1)
    mask[: n // 2] = 1.0
    if rank is None:
        return mask
    return mask[rank_slice(n, rank, dist.get_world_size())]


def train_parallel(wrapper_kind, opt_name, steps, sizes=(8,), accum=1, ddp_kwargs=None, **net_kwargs):
    """Each rank trains on its slice; loss = local sum * world / global count (exact)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_net(rank, **net_kwargs)  # different init per rank: the wrap broadcast fixes it
    kwargs = dict(CAPS, **(ddp_kwargs or {}))
    if wrapper_kind == "fasttrain":
        ddp = BucketedDDP(model, **kwargs)
    else:
        kwargs.pop("first_bucket_cap_mb")
        ddp = TorchDDP(model, **kwargs)
    opt = make_opt(opt_name, model.parameters())
    for step in range(steps):
        n_global = sizes[min(step, len(sizes) - 1)]
        x, y = data(n_global, seed=step)
        part = rank_slice(n_global, rank, world)
        x, y = x[part], y[part]
        mask = branch_mask_for(n_global, rank) if net_kwargs.get("branch") else None
        count = all_reduce_(torch.tensor(float(x.shape[0])))
        ddp.zero_grad() if wrapper_kind == "fasttrain" else opt.zero_grad(set_to_none=True)
        micro = torch.arange(x.shape[0]).chunk(accum)
        for m, rows in enumerate(micro):
            sync = m == len(micro) - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                mm = None if mask is None else mask[rows]
                loss = sum_loss(ddp, x[rows], y[rows], mm) * world / count
            loss.backward()
        opt.step()
    return flat_params(model), ddp


def compare(opt_name, steps=5, sizes=(8,), accum=1, ddp_kwargs=None, with_torch=True, **net_kwargs):
    ref = train_reference(opt_name, steps, sizes, **net_kwargs)
    ours, ddp = train_parallel("fasttrain", opt_name, steps, sizes, accum, ddp_kwargs, **net_kwargs)
    out = {"vs_reference": (ours - ref).abs().max().item(), "digest": digest(ours),
           "moved": (ref - flat_params(make_net(0, **net_kwargs))).abs().max().item(),
           "buckets": len(ddp.bucket_indices)}
    if with_torch:
        torch_kwargs = {k: v for k, v in (ddp_kwargs or {}).items() if k == "find_unused_parameters"}
        theirs, _ = train_parallel("torch", opt_name, steps, sizes, accum, torch_kwargs, **net_kwargs)
        out["vs_torch_ddp"] = (ours - theirs).abs().max().item()
    return out


# --------------------------------------------------------------------------- checks
def check_sgd():
    return compare("sgd")


def check_adamw():
    from fasttrain.distributed import wrap_checks

    wrap_checks._BROADCAST_CHUNK_BYTES = 1024  # the wrap-time broadcast in many small chunks
    try:
        return compare("adamw")
    finally:
        wrap_checks._BROADCAST_CHUNK_BYTES = 256 * 2**20


def check_no_sync():
    return compare("adamw", steps=3, accum=2, with_torch=True)


def check_uneven_last_batch():
    return compare("sgd", steps=3, sizes=(8, 8, 7))


def check_unused_find():
    return compare("adamw", steps=3, ddp_kwargs={"find_unused_parameters": True}, unused=True, branch=True)


def _error_of(fn) -> str:
    try:
        fn()
    except RuntimeError as error:
        return str(error)
    return ""


def check_unused_error():
    globally = _error_of(lambda: train_parallel("fasttrain", "sgd", 1, unused=True))
    one_rank = _error_of(lambda: train_parallel("fasttrain", "sgd", 1, branch=True))
    barrier()  # the group survived: every rank issued the same collectives
    return {"globally_unused": globally, "unused_on_one_rank": one_rank}


def check_shape_mismatch():
    width = D + dist.get_rank()  # rank 1 builds a wider model
    message = _error_of(lambda: BucketedDDP(make_net(0, width=width), **CAPS))
    barrier()
    return {"error": message}


def check_bf16():
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        grads = {}
        for comm in (None, dtype):
            model = make_net(0)
            ddp = BucketedDDP(model, comm_dtype=comm, **CAPS)
            x, y = data(8, seed=0)
            part = rank_slice(8, dist.get_rank(), dist.get_world_size())
            (sum_loss(ddp, x[part], y[part]) * 2 / 8).backward()
            grads[comm] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            out[f"{name}_grad_dtype"] = str(model.head.weight.grad.dtype)
        diff = (grads[dtype] - grads[None]).norm() / grads[None].norm()
        out[f"{name}_rel_err"] = diff.item()
    return out


class Marked(nn.Module):
    """Runs `inner` and calls `on_grad` when the gradient of its output is computed."""

    def __init__(self, inner: nn.Module, on_grad):
        super().__init__()
        self.inner, self.on_grad = inner, on_grad

    def forward(self, x):
        out = self.inner(x)
        if out.requires_grad:
            out.register_hook(lambda grad: self.on_grad())
        return out


def _overlap_run(compile_mode: str):
    """Buckets launched before block 0's backward starts, and launch order, per step."""
    model = make_net(0, depth=4)
    if compile_mode == "per_block":
        for block in model.blocks:
            block.compile(backend=COMPILE_BACKEND)
    ddp = BucketedDDP(model, **CAPS)
    seen = {"launched": -1}
    if compile_mode == "whole":
        model.compile(backend=COMPILE_BACKEND)
    else:
        model.blocks[0] = Marked(model.blocks[0], lambda: seen.update(launched=len(ddp.stats.launch_order)))
    results = []
    for step in range(3):  # step 0 plans in registration order, later steps after the rebuild
        ddp.zero_grad()
        x, y = data(8, seed=step)
        part = rank_slice(8, dist.get_rank(), dist.get_world_size())
        (sum_loss(ddp, x[part], y[part]) * 2 / 8).backward()
        results.append({
            "launched_before_block0_backward": seen["launched"],
            "launch_order": list(ddp.stats.launch_order),
            "num_buckets": len(ddp.bucket_indices),
            "fraction_early": ddp.stats.fraction_bytes_launched_early,
            "ready_order": list(ddp.stats.ready_order),
            "first_bucket_has_head": len(ddp.parameter_names) - 1 in ddp.bucket_indices[0],
        })
    return results


def check_overlap_eager():
    return {"steps": _overlap_run("eager")}


def check_overlap_compiled():
    return {"steps": _overlap_run("per_block"), "whole": _overlap_run("whole")}


class Scrambled(nn.Module):
    """Registration order differs from execution order: head is registered first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(D, 1)
        self.mid = nn.Linear(4 * D, D)
        self.inp = nn.Linear(D_IN, 4 * D)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def check_rebuild():
    model = Scrambled()
    ref = Scrambled()
    ddp = BucketedDDP(model, bucket_cap_mb=0.002, first_bucket_cap_mb=0.0001)
    before = ddp.bucket_indices
    opt, ref_opt = make_opt("sgd", model.parameters()), make_opt("sgd", ref.parameters())
    plans, orders = [], []
    for step in range(3):
        x, y = data(8, seed=step)
        part = rank_slice(8, dist.get_rank(), dist.get_world_size())
        ddp.zero_grad()
        (sum_loss(ddp, x[part], y[part]) * 2 / 8).backward()
        opt.step()
        plans.append(ddp.bucket_indices)
        orders.append({"ready": list(ddp.stats.ready_order), "launched": list(ddp.stats.launch_order)})
        ref_opt.zero_grad()
        (sum_loss(ref, x, y) / 8).backward()
        ref_opt.step()
    names = ddp.parameter_names
    return {"before": [[names[i] for i in b] for b in before],
            "after": [[names[i] for i in b] for b in plans[0]],
            "stable": plans[0] == plans[1] == plans[2], "orders": orders,
            "vs_reference": (flat_params(model) - flat_params(ref)).abs().max().item()}


def check_collectives():
    rank, world = dist.get_rank(), dist.get_world_size()
    total = all_reduce_(torch.tensor(rank + 1.0)).item()
    n = 7
    mine = list(ShardedSampler(n, rank, world, shuffle=False))
    length = 3 + rank  # ranks produce different sequence lengths
    preds = torch.tensor(mine, dtype=torch.float32)[:, None].repeat(1, length)
    labels = torch.tensor(mine)
    gathered = gather_eval_predictions({"preds": preds, "labels": labels}, num_samples=n)
    shuffled = ShardedSampler(n, rank, world, shuffle=True, seed=3)
    idx = torch.tensor(list(shuffled))
    by_index = gather_eval_predictions(idx.float() * 10, num_samples=n, sample_indices=idx)
    return {"sum": total, "labels": gathered["labels"].tolist(),
            "preds_col0": gathered["preds"][:, 0].tolist(), "preds_shape": list(gathered["preds"].shape),
            "pad_value": gathered["preds"][0, -1].item(), "by_index": by_index.tolist()}


CHECKS = {name[len("check_"):]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}


def run_checks(out_dir: str, init_method: str) -> None:
    state = init_distributed(timeout_s=60, init_method=init_method)
    torch.set_num_threads(1)
    results = {}
    for name, fn in CHECKS.items():
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:  # recorded, asserted by the test that owns the check
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
    _write(out_dir, state.rank, results)
    barrier()  # tear down together
    destroy_distributed()


def run_dead_rank(out_dir: str, init_method: str, how: str) -> None:
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) at step 2; rank 0 must raise, not hang."""
    state = init_distributed(timeout_s=5, init_method=init_method)
    model = make_net(0)
    ddp = BucketedDDP(model, **CAPS)
    x, y = data(8)
    start = time.perf_counter()
    try:
        for step in range(4):
            if step == 2 and state.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            if step == 2:
                start = time.perf_counter()
            ddp.zero_grad()
            sum_loss(ddp, x, y).backward()
        result = {"error": ""}
    except RuntimeError as error:
        result = {"error": str(error)}
    result["seconds_to_error"] = time.perf_counter() - start
    _write(out_dir, state.rank, result)
    os._exit(0)  # skip process-group teardown: the peer is gone


def run_two_node(out_dir: str) -> None:
    """Under torchrun (env:// rendezvous): parity with the one-process reference."""
    state = init_distributed(timeout_s=60)
    torch.set_num_threads(1)
    result = compare("sgd", steps=3, with_torch=False)
    result.update(world_size=state.world_size, rank=state.rank, group_rank=os.environ.get("GROUP_RANK"))
    _write(out_dir, state.rank, result)
    destroy_distributed()


def spawn(suite: str, out_dir: str, world: int = 2, timeout_s: float = 150) -> list[tuple[int, str]]:
    """Run SUITE on `world` local ranks (file:// rendezvous); returns (exit code, output) per rank.

    A rank still running at the deadline (or once rank 0 is done, for the dead-rank suites,
    where rank 1 is stopped on purpose) is killed and reported with exit code None.
    """
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([repo, env.get("PYTHONPATH", "")]))
    init = f"file://{os.path.join(out_dir, 'rendezvous')}"
    procs = []
    for rank in range(world):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), suite, out_dir, init],
                                      env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout_s
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            results.append((None, out))
        if suite in ("kill", "stop"):
            deadline = min(deadline, time.monotonic() + 2.0)  # rank 1 is dead or stopped
    return results


def read_results(out_dir: str, world: int = 2) -> list[dict]:
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]


def _write(out_dir: str, rank: int, results: dict) -> None:
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    suite, out = sys.argv[1], sys.argv[2]
    if suite == "checks":
        run_checks(out, sys.argv[3])
    elif suite in ("kill", "stop"):
        run_dead_rank(out, sys.argv[3], suite)
    elif suite == "two_node":
        run_two_node(out)
    else:
        raise SystemExit(f"unknown suite {suite!r}")
