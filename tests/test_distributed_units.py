"""Single-process pieces of fasttrain.distributed: the bucket plan, the sharded sampler, the
launcher's argument handling, the environment checks, and bad inputs."""
import random

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fasttrain.distributed import (
    BucketedDDP,
    ParamSpec,
    ShardedSampler,
    all_reduce_,
    gather_eval_predictions,
    get_world_size,
    init_distributed,
    is_main_process,
    order_from_ready,
    plan_buckets,
)
from fasttrain.distributed.bucketing import mb_to_bytes, reverse_registration_order
from fasttrain.distributed.launch import LaunchConfig, pop_launch_args

F32, BF16 = torch.float32, torch.bfloat16


# ------------------------------------------------------------------ bucket plan
def specs(*numels, dtype=F32):
    return [ParamSpec(n, dtype) for n in numels]


def test_plan_reverse_order_small_first_bucket():
    # 6 params of 100 fp32 (400 B); first cap 400 B, then 1000 B
    plan = plan_buckets(specs(*[100] * 6), reverse_registration_order(6), 1000, 400)
    assert plan == [(5,), (4, 3, 2), (1, 0)]


def test_plan_separates_dtypes_and_isolates_large_params():
    params = [ParamSpec(10, F32), ParamSpec(10, BF16), ParamSpec(10_000, F32), ParamSpec(10, BF16)]
    plan = plan_buckets(params, [3, 2, 1, 0], bucket_cap_bytes=1000, first_bucket_cap_bytes=1000)
    # bf16 3 and 1 share a bucket; fp32 2 (40 kB) closes its bucket alone; fp32 0 is left open
    assert plan == [(3, 1), (2,), (0,)]


def test_plan_follows_given_order():
    plan = plan_buckets(specs(100, 100, 100), [1, 2, 0], 800, 400)
    assert plan == [(1,), (2, 0)]


def test_plan_matches_torch_reducer_assignment():
    """Same buckets as PyTorch's own `_compute_bucket_assignment_by_size`, on random models."""
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 25)
        params = [ParamSpec(rng.choice([1, 7, 100, 1000, 5000, 20000]), rng.choice([F32, BF16])) for _ in range(n)]
        cap, first = rng.choice([(4096, 1024), (100_000, 2000), (40_000, 40_000)])
        order = reverse_registration_order(n)
        tensors = [torch.empty(params[i].numel, dtype=params[i].dtype) for i in order]
        theirs, _ = dist._compute_bucket_assignment_by_size(tensors, [first, cap])
        theirs = sorted((tuple(order[j] for j in b) for b in theirs), key=lambda b: order.index(b[0]))
        assert plan_buckets(params, order, cap, first) == theirs


def test_plan_rejects_bad_order_and_caps():
    with pytest.raises(ValueError, match="permutation"):
        plan_buckets(specs(1, 2), [0, 0], 10, 10)
    with pytest.raises(ValueError, match="positive"):
        plan_buckets(specs(1), [0], 0, 10)
    with pytest.raises(ValueError, match="bucket_cap_mb must be a positive"):
        mb_to_bytes(-1, "bucket_cap_mb")


def test_order_from_ready_appends_unready_in_reverse_registration_order():
    assert order_from_ready([3, 1, 3], 5) == [3, 1, 4, 2, 0]
    with pytest.raises(ValueError, match="out of range"):
        order_from_ready([7], 5)


# ------------------------------------------------------------------ sampler
def test_sampler_shards_are_disjoint_and_cover_with_padding():
    shards = [list(ShardedSampler(10, r, 3, shuffle=True, seed=1)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    flat = [i for s in shards for i in s]
    assert sorted(set(flat)) == list(range(10)) and len(flat) == 12  # 2 padding repeats
    dropped = [list(ShardedSampler(10, r, 3, shuffle=False, drop_last=True)) for r in range(3)]
    assert dropped == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_sampler_epochs_reshuffle_deterministically():
    a, b = ShardedSampler(50, 0, 2, seed=3), ShardedSampler(50, 0, 2, seed=3)
    a.set_epoch(1), b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)


def test_sampler_resumes_exactly_from_a_checkpoint():
    full = ShardedSampler(40, 1, 2, seed=7)
    full.set_epoch(3)
    expected = list(full)
    state = full.state_dict(consumed=6)
    resumed = ShardedSampler(40, 1, 2, seed=7)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[6:] and len(resumed) == len(expected) - 6
    with pytest.raises(ValueError, match="world_size=2"):
        ShardedSampler(40, 0, 4, seed=7).load_state_dict(state)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(10, 2, 2)
    with pytest.raises(ValueError, match="skip"):
        ShardedSampler(10, 0, 2).set_epoch(0, skip=6)


# ------------------------------------------------------------------ launcher
def test_pop_launch_args_splits_flags_from_train_arguments():
    config, rest = pop_launch_args(["--config", "a.yaml", "--nproc-per-node", "2", "--nnodes=2",
                                    "--rdzv-endpoint", "10.0.0.1:29400", "--lr", "3"])
    assert rest == ["--config", "a.yaml", "--lr", "3"]
    assert (config.nproc_per_node, config.nnodes, config.rdzv_endpoint) == (2, 2, "10.0.0.1:29400")
    assert config.world_size == 4
    assert pop_launch_args(["--lr", "3"]) == (None, ["--lr", "3"])


def test_launch_config_errors_name_the_flag(monkeypatch):
    with pytest.raises(ValueError, match="--rdzv-endpoint HOST:PORT"):
        LaunchConfig(nproc_per_node=2, nnodes=2)
    with pytest.raises(ValueError, match="--nproc-per-node must be an integer"):
        pop_launch_args(["--nproc-per-node", "two"])
    with pytest.raises(ValueError, match="needs a value"):
        pop_launch_args(["--nnodes"])
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a torchrun worker: never relaunch
    assert not LaunchConfig(nproc_per_node=2).needs_launch()


# ------------------------------------------------------------------ environment
def test_single_process_without_torchrun_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    state = init_distributed()
    assert (state.rank, state.world_size, state.backend) == (0, 1, None)
    assert is_main_process() and get_world_size() == 1
    count = torch.tensor(5.0)
    assert all_reduce_(count) is count and count.item() == 5.0
    assert gather_eval_predictions(torch.arange(6), num_samples=4).tolist() == [0, 1, 2, 3]


def test_init_errors_are_actionable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK.*not set.*torchrun"):
        init_distributed()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(RuntimeError, match="RANK='x' is not an integer"):
        init_distributed()
    with pytest.raises(ValueError, match="timeout_s"):
        init_distributed(timeout_s=0)


def test_wrapping_without_process_group_is_an_error():
    with pytest.raises(RuntimeError, match="init_distributed"):
        BucketedDDP(nn.Linear(2, 2))


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bad_wrapper_arguments(world_of_one):
    with pytest.raises(ValueError, match="comm_dtype"):
        BucketedDDP(nn.Linear(2, 2), comm_dtype=torch.int8)
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        BucketedDDP(nn.Linear(2, 2), bucket_cap_mb=0)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        BucketedDDP(nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ValueError, match="set_to_none"):
        BucketedDDP(nn.Linear(2, 2)).zero_grad(set_to_none=True)


def test_grads_are_views_into_owned_buffers_and_survive_set_to_none(world_of_one):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    ref = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    ref.load_state_dict(model.state_dict())
    ddp = BucketedDDP(model, bucket_cap_mb=1e-4, first_bucket_cap_mb=1e-5)
    x = torch.randn(3, 4)
    for step in range(3):
        if step == 1:
            for p in model.parameters():  # a user's optimizer.zero_grad(set_to_none=True)
                p.grad = None
        else:
            ddp.zero_grad()
        ref.zero_grad()
        ddp(x).sum().backward()
        ref(x).sum().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
    flats = {b.flat.data_ptr(): b.flat for b in ddp._buckets}
    for p in model.parameters():  # every grad lives inside one of the bucket buffers
        assert any(f.data_ptr() <= p.grad.data_ptr() < f.data_ptr() + f.numel() * 4 for f in flats.values())


def test_no_sync_is_decided_at_forward_time(world_of_one):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    ddp = BucketedDDP(model, bucket_cap_mb=1e-5, first_bucket_cap_mb=1e-5)
    x = torch.randn(2, 4)
    ddp.zero_grad()
    with ddp.no_sync():
        loss = ddp(x).sum()
    loss.backward()  # outside the context, but its forward ran inside: no communication
    assert ddp.stats.launch_order == []
    ddp(x).sum().backward()
    assert ddp.stats.launch_order == list(range(len(ddp.bucket_indices)))
    expected = torch.autograd.grad(2 * model(x).sum(), model[1].weight)[0]
    assert torch.allclose(model[1].weight.grad, expected)  # both backwards accumulated


def test_find_unused_marks_unreachable_params_ready_at_backward_start(world_of_one):
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 1)
            self.unused = nn.Linear(4, 1)  # registered last: in the first bucket

        def forward(self, x):
            return self.used(x)

    model = WithUnused()
    ddp = BucketedDDP(model, bucket_cap_mb=1e-5, first_bucket_cap_mb=1e-5, find_unused_parameters=True)
    first_bucket = [ddp.parameter_names[i] for i in ddp.bucket_indices[0]]
    assert first_bucket[0].startswith("unused.")
    ddp.zero_grad()
    ddp(torch.randn(2, 4)).sum().backward()
    assert ddp.stats.launch_grads_seen[0] == 0  # launched before any gradient was ready
    assert model.unused.weight.grad is None and model.used.weight.grad is not None


def test_relaunch_rejects_elastic_node_ranges_and_use_cuda_conflicts(monkeypatch):
    from fasttrain.distributed.launch import relaunch_with_torchrun

    with pytest.raises(ValueError, match="elastic MIN:MAX"):
        relaunch_with_torchrun(2, "1:2", None, ["train"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="contradicts use_cuda"):
        init_distributed(backend="gloo", use_cuda=True)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_including_the_first_ready_layer(world_of_one, use_reentrant):
    """With reentrant checkpointing the first gradients arrive inside a nested backward; the
    end-of-backward step must wait for the outer one, not finish at the nested one's end."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:  # every layer, the last one included, is checkpointed
                x = checkpoint(layer, torch.tanh(x), use_reentrant=use_reentrant)
            return x

    torch.manual_seed(0)
    model, ref = Net(), Net()
    ref.load_state_dict(model.state_dict())
    ddp = BucketedDDP(model, bucket_cap_mb=1e-5, first_bucket_cap_mb=1e-5)
    x = torch.randn(2, 4, requires_grad=True)
    for _ in range(2):
        ddp.zero_grad()
        ddp(x).sum().backward()
    ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad)
    assert ddp.stats.launch_order == list(range(len(ddp.bucket_indices)))
