"""The Trainer launched by torchrun with two gloo processes equals one process on the
global batch: exact token normalisation across ranks, every eval example seen once."""
import os

import pytest
import torch

from tests._launch import launch

pytestmark = pytest.mark.distributed


def _run(out, nproc, backend, *extra):
    os.makedirs(out, exist_ok=True)
    launch("tests._trainer_ddp_worker", str(out), backend, *extra, nproc=nproc)
    return torch.load(out / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), 1, "fasttrain")


@pytest.mark.parametrize("backend", ["fasttrain", "torch"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, single, backend):
    two = _run(tmp_path, 2, backend)
    for k, v in single["weights"].items():
        torch.testing.assert_close(two["weights"][k], v, rtol=0, atol=1e-5, msg=k)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert two["seen"]["n"] == single["seen"]["n"] == 11  # every eval example exactly once
    assert two["seen"]["first_labels"] == single["seen"]["first_labels"]  # in dataset order
    assert two["eval"]["eval_loss"] == pytest.approx(single["eval"]["eval_loss"], rel=1e-5)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoint-4")).count("rng_state_1.pt") == 1
    # an eval set smaller than the world: the empty shard joins the reductions, no hang
    assert two["eval_one"]["eval_loss"] == pytest.approx(single["eval_one"]["eval_loss"], rel=1e-5)


def test_sigterm_on_one_rank_stops_every_rank_at_the_next_logging_step(tmp_path):
    from fasttrain.checkpoint import storage as ckpt
    result = _run(tmp_path, 2, "fasttrain", "sigterm")  # returncode 0 is asserted in _run
    assert result["global_step"] == 2  # signalled in step 1; both ranks stop at logging step 2
    ckpt.verify(str(tmp_path / "run" / "checkpoint-2"))
    assert not (tmp_path / "run" / "checkpoint-4").exists()


def test_label_free_model_is_averaged_not_summed_over_ranks(tmp_path):
    one = _run(tmp_path / "one", 1, "nolabels")
    two = _run(tmp_path / "two", 2, "nolabels")
    for k, v in one["weights"].items():
        torch.testing.assert_close(two["weights"][k], v, rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-7)
