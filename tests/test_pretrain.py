"""Large-model pretraining paths through the Trainer: sharded DCP checkpoints (resume on
another world size, crash mid-save, corruption, unsafe metadata), the consolidated export,
and a streaming dataset killed and resumed. Real gloo process groups under torchrun."""
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fasttrain.checkpoint import storage
from tests.test_fsdp import ROOT, _free_port, run_worker

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]
LOSS_RTOL = 1e-5   # fp32; 4 vs 2 ranks only changes the reduction order
WEIGHT_ATOL = 1e-5


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def worker(out, nproc, mode, *extra):
    return run_worker(out, nproc, mode, "tests._pretrain_worker", *extra)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("four")
    return out, worker(out, 4, "fsdp")


def global_steps(per_rank_batches):
    """{step: sorted examples of the global batch} from every rank's micro-batches (ga=1)."""
    steps = {}
    for batches in per_rank_batches:
        for i, batch in enumerate(batches):
            steps.setdefault(i, []).extend(batch)
    return {i: sorted(v) for i, v in steps.items()}


def test_four_ranks_resume_on_two_with_the_same_data_order_and_weights(tmp_path, four_ranks):
    out4, full = four_ranks
    shutil.copytree(out4 / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    two = worker(tmp_path, 2, "fsdp", "latest")
    # the weights right after loading are the checkpoint's (read here, in one process, by DCP)
    from fasttrain.checkpoint import sharded
    from tests._tiny import tiny_gpt
    reference = tiny_gpt(seed=99, n_layer=2)
    sharded.load(str(tmp_path / "run" / "checkpoint-3"), reference, None)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(two["after_load"][name], value, rtol=0, atol=0, msg=name)
    # the next global batches are the uninterrupted run's (steps 4-6)
    assert global_steps(two["batches"]) == {i - 3: v for i, v in global_steps(full["batches"]).items() if i >= 3}
    assert sorted(two["losses"]) == [1, 2, 3, 4, 5, 6]  # 1-3 restored with the TrainerState
    for step in (4, 5, 6):
        assert two["losses"][step] == pytest.approx(full["losses"][step], rel=LOSS_RTOL)
    for name, value in full["weights"].items():
        torch.testing.assert_close(two["weights"][name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)
    # each rank wrote its own shard file, and the manifest covers them
    manifest = storage.read_json(str(out4 / "run" / "checkpoint-3"), "manifest.json")["files"]
    assert {f"shards/__{r}_0.distcp" for r in range(4)} | {"shards/.metadata"} <= set(manifest)
    assert not os.path.exists(out4 / "run" / "checkpoint-3" / "model.safetensors")  # no gather to rank 0


def test_a_corrupted_shard_is_named(tmp_path, four_ranks):
    path = tmp_path / "checkpoint-3"
    shutil.copytree(four_ranks[0] / "run" / "checkpoint-3", path)
    shard = path / "shards" / "__2_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(storage.CheckpointError, match=r"shards/__2_0\.distcp fails its checksum"):
        storage.verify(str(path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path, four_ranks):
    from fasttrain.checkpoint import sharded
    from tests._tiny import tiny_gpt
    path = tmp_path / "checkpoint-3"
    shutil.copytree(four_ranks[0] / "run" / "checkpoint-3", path)
    with open(path / "shards" / ".metadata", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(storage.CheckpointError, match="refusing to load.*posix.system|refusing to load.*os.system"):
        sharded.load(str(path), tiny_gpt(n_layer=2), None)


def test_sigkill_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    from tests.test_fsdp import _free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "tests._pretrain_worker", str(tmp_path), "killsave"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode != 0, "rank 0 should have been killed inside the step-4 save"
    run = tmp_path / "run"
    assert [os.path.basename(p) for p in storage.list_checkpoints(str(run))] == ["checkpoint-2"]
    assert any(n.startswith(".tmp-") for n in os.listdir(run))  # the interrupted save's leftovers
    storage.verify(str(run / "checkpoint-2"))
    resumed = worker(tmp_path, 2, "fsdp", "latest")  # the only valid checkpoint is 2
    assert [os.path.basename(p) for p in storage.list_checkpoints(str(run))] == \
        ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    storage.verify(str(run / "checkpoint-4"))  # the resumed run's own step-4 save
    assert sorted(resumed["losses"]) == [1, 2, 3, 4, 5, 6]


def test_consolidated_export_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    result = worker(tmp_path, 2, "export")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(16).reshape(1, 16)).logits
    torch.testing.assert_close(logits, result["logits"], rtol=0, atol=1e-6)
    for name, value in result["weights"].items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_stream_killed_and_resumed_gives_the_uninterrupted_losses(tmp_path):
    full = worker(tmp_path / "full", 1, "stream")
    out = tmp_path / "killed"
    os.makedirs(out)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "tests._pretrain_worker", str(out), "stream", "pause=7"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "paused").exists():
        assert proc.poll() is None and time.time() < deadline, "the run never reached step 7"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.basename(storage.find_resumable(str(out / "run"))) == "checkpoint-6"
    resumed = worker(out, 1, "stream", "resume")
    assert sorted(resumed["losses"]) == list(range(1, 9))  # 1-6 restored with the TrainerState
    for step in (7, 8):  # dropout on: the RNG and the stream position are both restored
        assert resumed["losses"][step] == full["losses"][step]


# ---------------------------------------------------------------- DDP <-> FSDP, fasttrain_adamw
def dcp_content(checkpoint, tmp_path) -> dict:
    """What a sharded checkpoint holds, whole: DCP's own converter to one torch.save file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(checkpoint / "shards"), str(tmp_path / "whole.pt"))
    return torch.load(tmp_path / "whole.pt", weights_only=False)


def full_checkpoint_optimizer(checkpoint) -> dict:
    """optimizer.pt of a DDP/single-process checkpoint keyed by parameter name: loaded into an
    optimizer over an unsharded model, then named by torch's get_optimizer_state_dict."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from fasttrain import TrainingArguments
    from fasttrain.checkpoint import hf_layout
    from fasttrain.optim.factory import build_optimizer
    from tests._tiny import tiny_gpt
    model = tiny_gpt(seed=99, n_layer=2)
    storage.load_model_weights(model, str(checkpoint))
    optimizer = build_optimizer(TrainingArguments(output_dir=str(checkpoint), use_cpu=True, report_to="none"), model)
    optimizer.load_state_dict(hf_layout.fit_optimizer_state(storage.read_torch(str(checkpoint), "optimizer.pt"), optimizer))
    return get_optimizer_state_dict(model, optimizer)


def assert_same_optimizer_state(actual: dict, expected: dict):
    assert sorted(actual["state"]) == sorted(expected["state"])
    for name, state in expected["state"].items():
        assert sorted(actual["state"][name]) == sorted(state), name
        for key, value in state.items():
            torch.testing.assert_close(actual["state"][name][key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    assert [g["params"] for g in actual["param_groups"]] == [g["params"] for g in expected["param_groups"]]


def assert_continues(resumed, full, first_step=4, rtol=LOSS_RTOL):
    """The resumed run took the uninterrupted run's global batches from `first_step` on, with
    its losses, and ended at its weights."""
    skip = first_step - 1
    assert global_steps(resumed["batches"]) == {i - skip: v for i, v in global_steps(full["batches"]).items() if i >= skip}
    assert sorted(resumed["losses"]) == [1, 2, 3, 4, 5, 6]
    for step in range(first_step, 7):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=rtol)
    for name, value in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)


def resume_copy(run_dir, tmp_path):
    """A copy of `run_dir` without its last checkpoint: resuming it resumes checkpoint-3."""
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    return tmp_path / "run" / "checkpoint-3"


def test_a_ddp_checkpoint_resumes_under_fsdp(tmp_path):
    full = worker(tmp_path / "ddp", 2, "ddp")
    checkpoint = resume_copy(tmp_path / "ddp" / "run", tmp_path / "fsdp")
    assert os.path.isfile(checkpoint / "model.safetensors") and not os.path.isdir(checkpoint / "shards")
    resumed = worker(tmp_path / "fsdp", 2, "fsdp", "latest")
    weights = storage.read_model_state(str(checkpoint))
    assert sorted(resumed["after_load"]) == sorted(weights)
    for name, value in weights.items():
        torch.testing.assert_close(resumed["after_load"][name], value, rtol=0, atol=0, msg=name)
    assert_same_optimizer_state(resumed["optimizer_after_load"], full_checkpoint_optimizer(checkpoint))
    assert_continues(resumed, full)
    assert os.path.isdir(checkpoint.parent / "checkpoint-6" / "shards")  # the run saves in its own format
    # rank 0 alone reads the files: a checkpoint of another model fails on every rank, by name
    shutil.rmtree(tmp_path / "deeper", ignore_errors=True)
    resume_copy(tmp_path / "ddp" / "run", tmp_path / "deeper")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                        f"--master-port={_free_port()}", "-m", "tests._pretrain_worker", str(tmp_path / "deeper"),
                        "fsdp_deeper", "latest"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    for rank in (0, 1):
        assert re.search(rf"\[rank{rank}\].*CheckpointError: checkpoint .*checkpoint-3' does not match the model: "
                         r"missing \['transformer\.h\.2\.", r.stdout + r.stderr), (r.stdout + r.stderr)[-3000:]


def test_an_fsdp_checkpoint_resumes_in_one_process(tmp_path, four_ranks):
    out4, full = four_ranks
    checkpoint = resume_copy(out4 / "run", tmp_path)
    resumed = worker(tmp_path, 1, "ddp", "latest")  # no FSDP: one process on the global batch
    saved = dcp_content(checkpoint, tmp_path)
    assert sorted(resumed["after_load"]) == sorted(saved["model"])
    for name, value in saved["model"].items():
        torch.testing.assert_close(resumed["after_load"][name], value, rtol=0, atol=0, msg=name)
    assert_same_optimizer_state(resumed["optimizer_after_load"], saved["optim"])
    assert_continues(resumed, full)
    assert os.path.isfile(checkpoint.parent / "checkpoint-6" / "model.safetensors")


def test_fasttrain_adamw_sharded_checkpoint_resumes_exactly(tmp_path):
    full = worker(tmp_path / "full", 2, "fsdp_fused")
    checkpoint = resume_copy(tmp_path / "full" / "run", tmp_path / "resumed")
    resumed = worker(tmp_path / "resumed", 2, "fsdp_fused", "latest")
    saved = dcp_content(checkpoint, tmp_path)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(next(iter(saved["optim"]["state"].values())))
    assert_same_optimizer_state(resumed["optimizer_after_load"], saved["optim"])
    assert_continues(resumed, full, rtol=0)  # same world size: bit for bit


def test_sigterm_on_one_fsdp_rank_saves_on_every_rank_and_stops(tmp_path):
    # rank 1 alone is signalled during step 1; the ranks agree at logging step 2, write one
    # sharded checkpoint together (a collective) and stop; the process group exits cleanly
    result = worker(tmp_path, 2, "sigterm")
    assert result["global_steps"] == [2, 2]
    run = tmp_path / "run"
    assert [os.path.basename(p) for p in storage.list_checkpoints(str(run))] == ["checkpoint-2"]
    storage.verify(str(run / "checkpoint-2"))
    manifest = storage.read_json(str(run / "checkpoint-2"), "manifest.json")["files"]
    assert {"shards/__0_0.distcp", "shards/__1_0.distcp"} <= set(manifest)  # both ranks saved
    saved = dcp_content(run / "checkpoint-2", tmp_path)["model"]
    for name, value in result["weights"].items():  # the state it stopped with
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0, msg=name)


def test_stream_over_two_ranks_and_two_workers_each_example_once_per_pass_and_resume(tmp_path):
    full = worker(tmp_path / "full", 2, "stream2")  # 24 examples, 4 a step: a pass is 6 steps
    per_step = [sorted(x for rank in full["batches"] for x in rank[step]) for step in range(12)]
    for first in (0, 6):  # each pass: every example exactly once across ranks and workers
        assert sorted(x for step in per_step[first:first + 6] for x in step) == list(range(24))
    # resume mid-pass from checkpoint-5: the consumed examples are skipped (a stateless stream
    # read by workers), and each rank sees the batches the uninterrupted run saw from step 6
    shutil.copytree(tmp_path / "full" / "run", tmp_path / "resumed" / "run")
    for later in ("checkpoint-10", "checkpoint-12"):  # 12: the save at the last step
        shutil.rmtree(tmp_path / "resumed" / "run" / later)
    resumed = worker(tmp_path / "resumed", 2, "stream2", "latest")
    assert resumed["batches"] == [rank[5:] for rank in full["batches"]]
    assert sorted(resumed["losses"]) == list(range(1, 13))
    for step in range(6, 13):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=LOSS_RTOL)
