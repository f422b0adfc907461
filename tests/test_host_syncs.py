"""Zero host reads per non-logging step, in every configuration the Trainer supports.

A host read is counted where all of them end up, `aten._local_scalar_dense` (Python's
`.item()`, `int()`, `float()`, `bool()` and C++-side reads such as indexing with a 0-d
tensor), over whole `train()` runs of two lengths with one logging step each: their
difference is the per-step figure. The GPU variant runs under
`torch.cuda.set_sync_debug_mode("error")`, where any synchronising call raises.
"""
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

from fasttrain import Trainer, TrainingArguments
from tests._dispatch_count import LOCAL_SCALAR_DENSE, MODEL_READ, OpCounter, per_step
from tests._tiny import tiny_gpt, token_examples

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT, LONG = 4, 8


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"gpt2": _gpt2, "builtin_gpt": lambda: tiny_gpt(n_layer=1)}
CONFIGS = {
    "default": {},
    "bf16": {"bf16": True},
    "fp16_scaler": {"fp16": True},
    "accumulation": {"gradient_accumulation_steps": 2},
    "fasttrain_adamw_fp16": {"fp16": True, "optim": "fasttrain_adamw"},
    "no_clipping": {"max_grad_norm": 0.0},
}


def _args(out, steps, **overrides):
    kw = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
              logging_steps=1000, save_strategy="no", disable_tqdm=True, report_to="none", seed=3)
    kw.update(overrides)
    return TrainingArguments(**kw)


def _ops_per_step(build, overrides):
    def run(steps):
        trainer = Trainer(build(), _args(tempfile.mkdtemp(), steps, **overrides),
                          train_dataset=token_examples(32))
        with OpCounter() as counter:
            trainer.train()
        return counter.ops
    return per_step(run, SHORT, LONG)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("model", list(MODELS))
def test_no_host_read_outside_logging_steps(model, config):
    """fasttrain's own reads are 0. transformers 5.24's GPT-2 reads one value per forward in
    its attention-mask preparation (packed-sequence detection without a mask, `fast_all` of
    the padding mask with one) when the KV cache is off, as it is for training; that read is
    the model's, and the HF Trainer pays it too: counted apart and bounded here."""
    ops = _ops_per_step(MODELS[model], CONFIGS[config])
    model_reads = ops[MODEL_READ]
    assert ops[LOCAL_SCALAR_DENSE] - model_reads == 0, dict(ops)
    micro_batches = CONFIGS[config].get("gradient_accumulation_steps", 1)
    assert model_reads <= (micro_batches if model == "gpt2" else 0), dict(ops)
    assert sum(ops.values()) > 10  # the counter saw the steps


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_optimizers_without_a_device_skip_flag_read_it_once_per_step(optim):
    """Honestly: foreach/for-loop AdamW and SGD cannot skip an update on a device flag, so
    the skip decision costs exactly one host read per step (torch's fused AdamW, the
    default, and fasttrain_adamw cost none). On the CPU torch's foreach AdamW also reads
    each parameter's step counter (its `capturable` mode, which the Trainer uses on a GPU,
    is refused on the CPU)."""
    ops = _ops_per_step(MODELS["builtin_gpt"], {"optim": optim})
    own_reads = len(list(MODELS["builtin_gpt"]().parameters())) if optim == "adamw_torch" else 0
    assert ops[LOCAL_SCALAR_DENSE] == 1 + own_reads, dict(ops)


def test_the_old_sites_are_gone():
    """The three known sites, each on its own: an LR table indexed on the device, labels
    counted on the device, no python float turned into a device tensor."""
    from fasttrain.optim.schedules import LRScheduler, get_multiplier
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=torch.tensor(1.0))
    sched = LRScheduler(opt, get_multiplier("linear", 2, 10), 10)
    with OpCounter() as counter:
        for _ in range(3):
            sched.step(skipped=torch.zeros(()))
    assert counter.ops[LOCAL_SCALAR_DENSE] == 0 and counter.ops["aten.index_select.out"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fasttrain", "torch"])
def test_no_host_read_per_step_under_data_parallelism(tmp_path, backend):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
           "-m", "tests._sync_worker", str(tmp_path), backend]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        reads = float((tmp_path / f"reads_{rank}.txt").read_text())
        assert reads == 0, (rank, reads)


def test_no_blocking_host_to_device_copy_per_step():
    """On a GPU, `torch.tensor(x, device="cuda")` or `.to("cuda")` from pageable memory blocks
    the host. Here the 'device' is the CPU, so count the copies a step would make from the
    host: the per-step difference of copies whose source is a CPU tensor must be only the
    batch itself, moved with non_blocking=True (pinned by the DataLoader on a GPU)."""
    def run(steps):
        trainer = Trainer(tiny_gpt(n_layer=1), _args(tempfile.mkdtemp(), steps),
                          train_dataset=token_examples(32))
        with OpCounter() as counter:
            trainer.train()
        return counter.ops
    ops = per_step(run, SHORT, LONG)
    # a python number turned into a tensor shows as aten.scalar_tensor / lift_fresh
    assert ops["aten.scalar_tensor.default"] == 0 and ops["aten.lift_fresh.default"] == 0, dict(ops)
    from fasttrain.trainer.utils import to_device
    with OpCounter() as counter:
        to_device({"x": torch.ones(2)}, torch.device("meta"))
    assert counter.host_to_device == 0  # the batch copy is non_blocking


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", ["default", "bf16", "fp16_scaler", "accumulation"])
def test_gpu_step_never_synchronises(config):
    """On a GPU: after warm-up, steps run under set_sync_debug_mode('error'), which raises on
    any synchronising call (item, blocking copies, nonzero, ...)."""
    from fasttrain import TrainerCallback

    class StrictBetweenLogs(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.set_sync_debug_mode("error" if 2 <= state.global_step < LONG - 1 else 0)

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.set_sync_debug_mode(0)  # the logging/bookkeeping after a step may sync

    trainer = Trainer(_gpt2(), _args(tempfile.mkdtemp(), LONG, **CONFIGS[config]),
                      train_dataset=token_examples(32), callbacks=[StrictBetweenLogs()])
    try:
        trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
