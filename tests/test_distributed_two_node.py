"""Two torchrun agents on this machine acting as two nodes (c10d rendezvous), started with
the command line fasttrain's launcher builds; each worker trains with BucketedDDP and must
match one-process training on the global batch."""
import os
import socket
import subprocess
import sys
import time

import pytest

import _ddp_workers as workers
from fasttrain.distributed.launch import LaunchConfig, torchrun_command

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_with_c10d_rendezvous(tmp_path):
    config = LaunchConfig(nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          rdzv_id=f"test-{os.getpid()}")
    cmd = torchrun_command(config, ["two_node", str(tmp_path)], module="_ddp_workers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    deadline = time.monotonic() + 150
    outputs = []
    for agent in agents:
        try:
            outputs.append(agent.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for other in agents:
                other.kill()
            pytest.fail("torchrun agents did not finish: " + agent.communicate()[0][-3000:])
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-3000:]
    rank0, rank1 = workers.read_results(str(tmp_path))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert {rank0["group_rank"], rank1["group_rank"]} == {"0", "1"}, "expected two distinct nodes"
    assert rank0["digest"] == rank1["digest"]
    assert rank0["vs_reference"] <= 1e-6 < rank0["moved"]


def test_launcher_command_line():
    config = LaunchConfig(nproc_per_node=4)
    cmd = torchrun_command(config, ["train", "--config", "x.yaml"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=1",
                   "--max-restarts=0", "--standalone", "-m", "fasttrain", "train", "--config", "x.yaml"]
    assert sys.executable  # the default interpreter is the running one
