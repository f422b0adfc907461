"""The fused linear cross-entropy of an HF causal LM under data parallelism: it runs through
each wrapper (fasttrain's BucketedDDP, torch's DDP, FSDP's fully_shard) with the wrapper's
gradient sync intact (two gloo ranks equal one process on the global batch), the
(tokens x vocab) logits never exist on any rank, and a rank's largest tensor under 2-rank
data parallelism equals one process's at the same per-rank batch."""
import os

import pytest
import torch

from tests._launch import launch

pytest.importorskip("transformers")
pytestmark = pytest.mark.distributed


def _run(out, nproc, backend):
    os.makedirs(out, exist_ok=True)
    launch("tests._fused_ddp_worker", str(out), backend, nproc=nproc)
    return [torch.load(os.path.join(out, f"rank{i}.pt"), weights_only=False) for i in range(nproc)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), 1, "fasttrain")[0]


@pytest.mark.parametrize("backend", ["fasttrain", "torch", "fsdp"])
def test_fused_loss_under_data_parallelism(tmp_path, single, backend):
    ranks = _run(tmp_path, 2, backend)
    assert single["fused_calls"] == 3
    for r in ranks:
        assert r["fused_calls"] == 3, backend  # every step took the fused path
        assert r["largest"] < r["logits_numel"], (backend, r["largest"])  # no full logits
    # gradient sync intact: two ranks on half batches = one process on the global batch
    for name, value in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=0, atol=2e-5, msg=name)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single["losses"]),
                               rtol=1e-5, atol=1e-6)


def test_memory_of_one_rank_under_data_parallelism_equals_one_process(tmp_path):
    """Same per-rank batch (2 sequences): the largest tensor the fused loss makes on a rank
    of a 2-rank run equals one process's (nothing in it grows with the world), and neither
    run ever holds a tensor of the logits' size. (The run's overall largest differs by
    design: BucketedDDP's flat gradient bucket, which the gradients are views of.)"""
    one = _run(tmp_path / "one", 1, "half")[0]
    two = _run(tmp_path / "two", 2, "fasttrain")
    assert one["fused_calls"] == 3 and all(r["fused_calls"] == 3 for r in two)
    assert two[0]["largest_in_loss"] == two[1]["largest_in_loss"] == one["largest_in_loss"] > 0
    assert max(r["largest"] for r in two + [one]) < one["logits_numel"]
