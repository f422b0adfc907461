"""`fasttrain train --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT]` -> torchrun.

The CLI pops the launch flags from its arguments with `pop_launch_args` and, when they ask
for more than one process and we are not already a torchrun worker, replaces itself with
`python -m torch.distributed.run ... -m fasttrain train <the same train arguments>`.
One node uses torchrun's `--standalone` (a free local port); several nodes use c10d
rendezvous at `--rdzv-endpoint` (any node's reachable address; start the same command on
every node).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn, Sequence

_FLAGS = {
    "--nproc-per-node": "nproc_per_node",
    "--nproc_per_node": "nproc_per_node",
    "--nnodes": "nnodes",
    "--node-rank": "node_rank",
    "--node_rank": "node_rank",
    "--rdzv-endpoint": "rdzv_endpoint",
    "--rdzv_endpoint": "rdzv_endpoint",
    "--rdzv-id": "rdzv_id",
    "--rdzv_id": "rdzv_id",
    "--max-restarts": "max_restarts",
    "--max_restarts": "max_restarts",
}
_INT_FIELDS = ("nproc_per_node", "nnodes", "node_rank", "max_restarts")


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None  # None: c10d rendezvous assigns it
    rdzv_endpoint: str | None = None
    rdzv_id: str = "fasttrain"
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be >= 1, got {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (an address of one of "
                "the nodes that all nodes can reach); run the same command on every node"
            )
        if self.rdzv_endpoint is not None and ":" not in self.rdzv_endpoint:
            raise ValueError(f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def needs_launch(self) -> bool:
        """True when torchrun must be started: several processes, and we are not a worker."""
        inside_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
        return self.world_size > 1 and not inside_torchrun


def pop_launch_args(argv: Sequence[str]) -> tuple[LaunchConfig | None, list[str]]:
    """Split launch flags from the rest; (None, argv) when no launch flag is present."""
    values: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, has_value, inline = arg.partition("=")
        if flag in _FLAGS:
            if has_value:
                values[_FLAGS[flag]] = inline
            elif i + 1 < len(argv):
                values[_FLAGS[flag]] = argv[i + 1]
                i += 1
            else:
                raise ValueError(f"{flag} needs a value")
        else:
            rest.append(arg)
        i += 1
    if not values:
        return None, rest
    kwargs: dict[str, object] = {}
    for name, value in values.items():
        if name in _INT_FIELDS:
            try:
                kwargs[name] = int(value)
            except ValueError:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer, got {value!r}") from None
        else:
            kwargs[name] = value
    return LaunchConfig(**kwargs), rest  # type: ignore[arg-type]


def torchrun_command(
    config: LaunchConfig,
    train_argv: Sequence[str],
    module: str = "fasttrain",
    python: str = sys.executable,
) -> list[str]:
    """The torchrun command line that runs `python -m <module> <train_argv>` per worker."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={config.nproc_per_node}",
           f"--nnodes={config.nnodes}", f"--max-restarts={config.max_restarts}"]
    if config.rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={config.rdzv_endpoint}", f"--rdzv-id={config.rdzv_id}"]
    if config.node_rank is not None:
        cmd.append(f"--node-rank={config.node_rank}")
    return [*cmd, "-m", module, *train_argv]


def exec_torchrun(config: LaunchConfig, train_argv: Sequence[str], module: str = "fasttrain") -> NoReturn:
    """Replace this process with torchrun running `module` with `train_argv` on every worker."""
    cmd = torchrun_command(config, train_argv, module)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def relaunch_with_torchrun(
    nproc_per_node: int,
    nnodes: int | str,
    rdzv_endpoint: str | None,
    argv: Sequence[str],
    module: str = "fasttrain",
) -> NoReturn:
    """The CLI's entry: replace this process with torchrun running `python -m fasttrain <argv>`.

    `argv` may keep the launch flags: workers see LOCAL_RANK and never relaunch.
    """
    try:
        nodes = int(nnodes)
    except ValueError:
        raise ValueError(f"--nnodes must be a number of nodes, got {nnodes!r} (elastic MIN:MAX ranges "
                         "are not supported)") from None
    config = LaunchConfig(nproc_per_node=nproc_per_node, nnodes=nodes, rdzv_endpoint=rdzv_endpoint)
    exec_torchrun(config, argv, module)
