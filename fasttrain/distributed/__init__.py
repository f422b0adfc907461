"""Data parallelism for fasttrain: process groups from torchrun, BucketedDDP, collectives.

See docs/distributed.md for the design and the integration calls.
"""
from fasttrain.distributed.bucketing import ParamSpec, order_from_ready, plan_buckets
from fasttrain.distributed.collectives import all_reduce_, gather_eval_predictions
from fasttrain.distributed.ddp import BucketedDDP, CommStats
from fasttrain.distributed.env import (
    DistributedState,
    barrier,
    destroy_distributed,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_local_main_process,
    is_main_process,
)
from fasttrain.distributed.launch import (
    LaunchConfig,
    exec_torchrun,
    pop_launch_args,
    relaunch_with_torchrun,
    torchrun_command,
)
from fasttrain.distributed.sampler import ShardedSampler

__all__ = [
    "BucketedDDP",
    "CommStats",
    "DistributedState",
    "LaunchConfig",
    "ParamSpec",
    "ShardedSampler",
    "all_reduce_",
    "barrier",
    "destroy_distributed",
    "exec_torchrun",
    "gather_eval_predictions",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_local_main_process",
    "is_main_process",
    "order_from_ready",
    "plan_buckets",
    "pop_launch_args",
    "relaunch_with_torchrun",
    "torchrun_command",
]
