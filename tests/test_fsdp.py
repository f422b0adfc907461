"""FSDP2 through the Trainer (torchrun, gloo) equals one process on the global batch.

Reference: the same tiny GPT trained by the Trainer in one process, without FSDP, on the
global batch (4 rows = 4 ranks x 1 or 2 ranks x 2), accumulation 2, clipping at 0.5.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

LOSS_RTOL = 1e-5  # fp32: only the summation order of the reduce-scatter differs
WEIGHT_ATOL = 1e-5
BF16_LOSS_RTOL = 1e-4  # bf16 gathered weights: per-step losses agree to bf16's ~3 digits of a mean


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(out, nproc, mode, module="tests._fsdp_worker", *extra):
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", module, str(out), mode, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", module,
               str(out), mode, *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(os.path.join(out, "result.pt"), weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("single"), 1, "plain")


def max_weight_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_four_ranks_equal_one_process_and_hold_a_quarter_of_the_state(tmp_path, single):
    four = run_worker(tmp_path, 4, "fsdp")
    torch.testing.assert_close(torch.tensor(four["losses"]), torch.tensor(single["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    # evaluation runs the sharded model on every rank's share of the 10 rows, each row once
    assert four["eval_loss"] == pytest.approx(single["eval_loss"], rel=LOSS_RTOL)
    moved = max_weight_diff(single["weights"], run_worker(tmp_path / "init", 1, "init")["weights"])
    assert moved > 100 * WEIGHT_ATOL, "training barely moved the weights: the test could not fail"
    assert max_weight_diff(four["weights"], single["weights"]) <= WEIGHT_ATOL
    unsharded = single["state_bytes"][0]
    assert unsharded["grads"] > 0 and unsharded["optimizer"] > 0, "measured outside a step"
    for rank, local in enumerate(four["state_bytes"]):
        assert local["total"] <= unsharded["total"] / 4 * 1.10, (rank, local, unsharded)


def test_two_ranks_with_per_block_compile_equal_one_process(tmp_path, single):
    two = run_worker(tmp_path, 2, "fsdp_compile")
    assert two["compiled_blocks"] == 4
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    assert max_weight_diff(two["weights"], single["weights"]) <= WEIGHT_ATOL


def test_bf16_fsdp_error_is_that_of_bf16_autocast_in_one_process(tmp_path, single):
    two = run_worker(tmp_path / "fsdp", 2, "fsdp_bf16")
    one = run_worker(tmp_path / "one", 1, "plain_bf16")
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single["losses"]),
                               rtol=BF16_LOSS_RTOL, atol=0)
    # compare errors, not values: bf16 gathered weights (FSDP's MixedPrecisionPolicy) vs
    # bf16 autocast on fp32 weights, both against the fp32 run
    fsdp_err = max_weight_diff(two["weights"], single["weights"])
    autocast_err = max_weight_diff(one["weights"], single["weights"])
    assert 0 < fsdp_err <= 2 * autocast_err, (fsdp_err, autocast_err)


def test_hybrid_shard_two_replicas_of_two_shards_equals_one_process(tmp_path, single):
    four = run_worker(tmp_path, 4, "hybrid")  # fsdp_config num_replicas=2: a (2, 2) mesh
    torch.testing.assert_close(torch.tensor(four["losses"]), torch.tensor(single["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    assert max_weight_diff(four["weights"], single["weights"]) <= WEIGHT_ATOL
    unsharded = single["state_bytes"][0]["total"]
    for local in four["state_bytes"]:  # sharded over 2 ranks, replicated twice
        assert local["total"] <= unsharded / 2 * 1.10, (local, unsharded)


def test_cpu_offload_training_equals_one_process(tmp_path, single):
    # on a CPU mesh the host copies are no-ops (nothing pinned), but FSDP's offload path runs:
    # parameters, gradients and AdamW state on host shards, the optimizer stepping them there
    two = run_worker(tmp_path, 2, "offload")
    assert two["offload_policy"] == "CPUOffloadPolicy"
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    assert max_weight_diff(two["weights"], single["weights"]) <= WEIGHT_ATOL
    unsharded = single["state_bytes"][0]["total"]
    for local in two["state_bytes"]:
        assert local["total"] <= unsharded / 2 * 1.10, (local, unsharded)


FP16_LOSS_RTOL = 1e-3  # fp16 gathered weights and activations: 2^-11 relative rounding per op


@pytest.mark.parametrize("mode", ["fsdp_fp16", "fsdp_fused_fp16"])  # torch's fused AdamW, fasttrain_adamw
def test_fp16_overflow_in_one_rank_shard_skips_the_step_on_every_rank(tmp_path, single, mode):
    # rank 1 alone finds an inf in its gradient shard at step 2; clipping is off, so the
    # scaler's agreement over the shard group is the only way rank 0 can learn of it
    two = run_worker(tmp_path, 2, mode)
    for rank, local in enumerate(two["per_rank"]):
        assert local["scaler"]["_skipped_steps"] == 1, (rank, local)
        assert local["scaler"]["scale"] == 2.0**15, (rank, local)  # backed off once from 2^16
        assert local["steps"] == [2.0], (rank, local)  # 3 steps, the second skipped everywhere
        assert local["host_reads"] == 0, (rank, local)  # the agreement is a device all-reduce
    after = two["per_step_weights"]
    for name, value in after[1].items():
        torch.testing.assert_close(after[2][name], value, rtol=0, atol=0, msg=name)
    assert max_weight_diff(after[3], after[2]) > 10 * WEIGHT_ATOL, "the step after the skip trained"
    assert [r["skipped_steps"] for r in two["log"] if "loss" in r] == [0, 1, 1]
    # the step before the overflow is fp16 training of the same model
    assert two["losses"][0] == pytest.approx(single["losses"][0], rel=FP16_LOSS_RTOL)


def test_fasttrain_adamw_on_local_shards_equals_torch_adamw_in_one_process(tmp_path, single):
    two = run_worker(tmp_path, 2, "fsdp_fused")
    assert two["optimizer"] == "FusedAdamW" and "DTensor" in two["state_types"]  # sharded state
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    assert max_weight_diff(two["weights"], single["weights"]) <= WEIGHT_ATOL


def test_profiler_reports_every_ranks_memory(tmp_path):
    import json
    two = run_worker(tmp_path, 2, "fsdp_memory")  # rank 1 alone holds 256 MiB more from step 1
    per_rank = json.loads((tmp_path / "run" / "profile.json").read_text())["memory_per_rank"]
    assert [r["rank"] for r in per_rank] == [0, 1]
    extra = per_rank[1]["host_rss_peak_gib"] - per_rank[0]["host_rss_peak_gib"]
    assert 0.2 < extra < 0.4, per_rank  # 0.25 GiB, give or take the two processes' own noise
    last = [r for r in two["log"] if "loss" in r][-1]
    assert last["host_rss_peak_gib_max_over_ranks"] == per_rank[1]["host_rss_peak_gib"]
    assert last["host_rss_peak_gib"] == per_rank[0]["host_rss_peak_gib"]  # rank 0's own, as before


def test_hybrid_shard_over_two_nodes_shards_within_each_node(tmp_path, single):
    # two torchrun agents as two nodes of 2 ranks (c10d rendezvous, fasttrain's launcher
    # command line): hybrid_shard replicates across the nodes and shards within each
    from fasttrain.distributed.launch import LaunchConfig, torchrun_command
    config = LaunchConfig(nproc_per_node=2, nnodes=2, rdzv_endpoint=f"127.0.0.1:{_free_port()}",
                          rdzv_id=f"fsdp-{os.getpid()}")
    cmd = torchrun_command(config, [str(tmp_path), "hybrid_nodes"], module="tests._fsdp_worker")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=400)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-3000:]
    nodes = torch.load(os.path.join(tmp_path, "result.pt"), weights_only=False)
    assert nodes["mesh_shape"] == (2, 2)  # (replicate = nodes, shard = ranks of a node)
    torch.testing.assert_close(torch.tensor(nodes["losses"]), torch.tensor(single["losses"]),
                               rtol=LOSS_RTOL, atol=0)
    assert max_weight_diff(nodes["weights"], single["weights"]) <= WEIGHT_ATOL
