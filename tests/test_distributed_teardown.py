"""Exit after a finished run: no gloo worker thread may still hold work when the interpreter
finalizes (it would abort the process: "terminate called without an active exception").
"""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_drain_returns_only_after_gloo_workers_freed_their_finished_work(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
           "-m", "tests._teardown_worker", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    # the worker thread still held the tensor, waiting for the GIL: the state that aborts at
    # exit (without it, this test could not fail)
    assert result["held_before_drain"], result
    assert not result["held_after_drain"], result
