"""Two gloo ranks, for tests/test_distributed_teardown.py.

    torchrun --nproc-per-node 2 -m tests._teardown_worker OUT

Puts a gloo worker thread of rank 1 into the state that aborted runs at exit: it finished a
collective on a subgroup and now waits for the GIL to free the collective's tensor (a tensor
Python has seen), while the main thread holds the GIL. The switch interval is raised so the
worker cannot take the GIL by asking for it; only a blocking call of the main thread hands it
over. Rank 1 writes OUT/result.json: whether the tensor was still held before
`drain_gloo_workers` and whether it was freed when that returned.
"""
import json
import os
import sys
import time
import weakref

import torch
import torch.distributed as dist

from fasttrain.distributed.context import drain_gloo_workers

HOLD_S = 3.0  # rank 1 keeps the GIL this long: the all-reduce finishes in it and its worker blocks
PEER_DELAY_S = 0.5  # rank 0 joins the all-reduce only once rank 1 holds the GIL again


def hold_gil(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:  # pure Python: never releases the GIL by itself
        pass


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    store = dist.distributed_c10d._get_default_store()
    sub = dist.new_group([0, 1])  # a group monitored_barrier on the world never touches
    if rank == 1:
        sys.setswitchinterval(1000.0)
        tensor = torch.ones(1024)
        work = dist.all_reduce(tensor, group=sub, async_op=True)
        held = weakref.ref(tensor)
        del tensor, work  # from here only gloo's worker thread holds the tensor
        store.set("go", "1")
        hold_gil(HOLD_S)
        before = held() is not None
        drain_gloo_workers()
        after = held() is not None
        sys.setswitchinterval(0.005)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"held_before_drain": before, "held_after_drain": after}, f)
    else:
        store.wait(["go"])
        time.sleep(PEER_DELAY_S)
        dist.all_reduce(torch.ones(1024), group=sub)
        drain_gloo_workers()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
