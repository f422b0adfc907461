"""Streaming datasets: every example exactly once across ranks x workers, exact resume."""
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from fasttrain.data.streaming import StreamShard, resume_plan


class Numbers(IterableDataset):
    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


def read_all(shard, batch_size, workers):
    return [b.tolist() for b in DataLoader(shard, batch_size=batch_size, num_workers=workers)]


@pytest.mark.parametrize("n", [103, 8, 3])  # uneven, exactly one batch per shard, fewer than shards
def test_two_ranks_two_workers_see_every_example_exactly_once(n):
    seen = []
    for rank in range(2):
        for batch in read_all(StreamShard(Numbers(n), rank, 2), batch_size=4, workers=2):
            seen += batch
    assert sorted(seen) == list(range(n))


def test_hf_iterable_dataset_two_ranks_every_example_once():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"x": list(range(37))}).to_iterable_dataset(num_shards=4)
    seen = []
    for rank in range(2):
        for batch in DataLoader(StreamShard(ds, rank, 2), batch_size=5, num_workers=2):
            seen += batch["x"].tolist()
    assert sorted(seen) == list(range(37))


@pytest.mark.parametrize("workers, consumed", [(2, 5), (2, 4), (0, 7), (3, 7)])
def test_skip_resume_continues_the_uninterrupted_batch_order(workers, consumed, caplog):
    full = read_all(StreamShard(Numbers(300), 1, 2), batch_size=3, workers=workers)
    saved = {"world_size": 2, "per_device_train_batch_size": 3, "micro_batches_done": consumed,
             "num_workers": workers}
    plan = resume_plan(saved, world_size=2, batch_size=3, num_workers=workers)
    resumed = read_all(StreamShard(Numbers(300), 1, 2, resume=plan), batch_size=3, workers=workers)
    assert resumed == full[consumed:]
    if workers == 0:
        assert "read and dropped" in caplog.text  # the cost of skipping is logged


def test_world_size_change_skips_the_global_count():
    # 4 ranks x 1 consumed 6 batches of 2 each: 48 examples; 2 ranks continue with the rest
    saved = {"world_size": 4, "per_device_train_batch_size": 2, "micro_batches_done": 6, "num_workers": 0}
    plan = resume_plan(saved, world_size=2, batch_size=4, num_workers=0)
    assert plan == {"skip_global": 48}
    seen = sorted(x for rank in range(2)
                  for b in read_all(StreamShard(Numbers(100), rank, 2, resume=plan), 4, 0) for x in b)
    assert seen == list(range(48, 100))


class Counter(IterableDataset):
    """A stateful stream: its state is the index of the next example."""

    def __init__(self, n):
        self.n, self.next = n, 0

    def __iter__(self):
        while self.next < self.n:
            self.next += 1
            yield self.next - 1

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, state):
        self.next = state["next"]


@pytest.mark.parametrize("world", [1, 2])
def test_stateful_dataset_resumes_from_its_state_without_rereading(world):
    shard = StreamShard(Counter(50), 0, world)
    it = iter(DataLoader(shard, batch_size=4))
    first = [next(it).tolist() for _ in range(3)]
    state = shard.state_dict()
    # rank 0 of `world` took every world-th example; the stream stopped right after the last
    assert first[-1] == [world * k for k in range(8, 12)]
    assert state == {"dataset": {"next": 11 * world + 1}, "index": 11 * world + 1}
    rest = [b.tolist() for b in it]
    saved = {"world_size": world, "per_device_train_batch_size": 4, "micro_batches_done": 3, "num_workers": 0}
    plan = resume_plan(saved, world, 4, 0, stateful_state=state)
    assert plan == {"state": state}
    resumed = [b.tolist() for b in DataLoader(StreamShard(Counter(50), 0, world, resume=plan), batch_size=4)]
    assert resumed == rest and len(rest) > 1


def test_a_resume_plan_applies_to_the_resumed_pass_only_with_workers():
    # the workers read the plan from their copies of the shard: the main process must drop it
    # when the next pass starts, or every later pass skips again
    full = read_all(StreamShard(Numbers(40), 0, 2), batch_size=2, workers=2)
    saved = {"world_size": 2, "per_device_train_batch_size": 2, "micro_batches_done": 3, "num_workers": 2}
    shard = StreamShard(Numbers(40), 0, 2, resume=resume_plan(saved, 2, 2, 2))
    shard.set_epoch(0)
    assert read_all(shard, 2, 2) == full[3:]
    shard.set_epoch(1)
    assert read_all(shard, 2, 2) == full
