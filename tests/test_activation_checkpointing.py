"""Activation checkpointing: the same gradients as the plain run, and less memory."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fasttrain import TrainingArguments
from fasttrain.models.activation_checkpointing import apply_activation_checkpointing, is_checkpointed
from tests._tiny import tiny_gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRAD_ATOL = 1e-6  # recomputation repeats the same fp32 ops; only the order of frees differs


def grads_of(model, x):
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every, expected", [(1, 4), (2, 2), (3, 2)])
def test_gpt_gradients_equal_the_plain_run(every, expected):
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    plain_model, model = tiny_gpt(seed=4, n_layer=4, dropout=0.1), tiny_gpt(seed=4, n_layer=4, dropout=0.1)
    torch.manual_seed(11)
    plain = grads_of(plain_model, x)
    assert apply_activation_checkpointing(model, list(model.transformer.h), every=every) == expected
    assert [is_checkpointed(b) for b in model.transformer.h][:2] == [True, every == 1]
    torch.manual_seed(11)  # dropout: the recomputation replays the saved RNG state
    checkpointed = grads_of(model, x)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=0, atol=GRAD_ATOL, msg=name)
    assert any(g.abs().max() > 0 for g in plain.values())


def test_hf_model_goes_through_its_own_gradient_checkpointing_enable():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    plain_model = transformers.GPT2LMHeadModel(config)
    model = transformers.GPT2LMHeadModel(config)
    model.load_state_dict(plain_model.state_dict())
    model.train(), plain_model.train()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = grads_of(plain_model, x)
    apply_activation_checkpointing(model, list(model.transformer.h))
    assert model.is_gradient_checkpointing
    for name, g in grads_of(model, x).items():
        torch.testing.assert_close(g, plain[name], rtol=0, atol=GRAD_ATOL, msg=name)


def peak_memory(every: int) -> int:
    env = dict(os.environ, PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "tests._ac_memory_worker", str(every)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_above_start"]


def test_peak_memory_is_lower_and_selective_mode_sits_in_between():
    plain, every_block, every_other = peak_memory(0), peak_memory(1), peak_memory(2)
    figures = f"step peak above start: plain {plain / 2**20:.0f} MiB, every block " \
              f"{every_block / 2**20:.0f} MiB, every 2nd block {every_other / 2**20:.0f} MiB"
    # 8 blocks: checkpointing all keeps block inputs + one block's activations
    assert every_block < 0.5 * plain, figures
    assert every_block < every_other < plain, figures


def test_bad_gradient_checkpointing_kwargs_name_the_field():
    with pytest.raises(ValueError, match="gradient_checkpointing_kwargs.*'every' must be a positive"):
        TrainingArguments(gradient_checkpointing=True, gradient_checkpointing_kwargs={"every": 0})
    with pytest.raises(ValueError, match="gradient_checkpointing_kwargs.*use_reentrant=True"):
        TrainingArguments(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
