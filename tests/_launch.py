"""Launching subprocesses from tests: a worker module (`python -m tests._x_worker ...`) as one
plain process or `nproc` processes under torchrun on a free local port (gloo on the CPU, one
thread each, the Triton interpreter off: they run no Triton kernel), and the `fasttrain`
command line."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, *args: str, nproc: int = 1, timeout: int = 300) -> None:
    """Run `module` with `args` (1 process, or `nproc` under torchrun); fails the test with
    the end of its output when it exits non-zero."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", module, *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def run_cli(args: list, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m fasttrain ARGS` in `cwd` with this tree importable; the result, unchecked."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "fasttrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
