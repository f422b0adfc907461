"""FLOPs per token (6N + 12LHQT), non-embedding parameter counts, and the peak table."""
import pytest
import torch
from torch import nn

from fasttrain.profiler.flops import (PEAK_TFLOPS, device_table_key, dtype_key, flops_per_token_for,
                             non_embedding_params, peak_flops, transformer_flops_per_token,
                             user_flops_per_token)
from fasttrain.models import GPT, GPTConfig


def test_formula_by_hand():
    f = transformer_flops_per_token(1000, n_layer=2, n_head=3, head_dim=4, seq_len=5)
    assert f.value == 6 * 1000 + 12 * 2 * 3 * 4 * 5 == 7440
    assert f.formula == "6*N + 12*L*H*Q*T = 6*1000 + 12*2*3*4*5 = 7440 FLOPs/token"


@pytest.mark.parametrize("tie", [True, False])
def test_builtin_gpt_counts_match_its_own_non_embedding_count(tie):
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16,
                    tie_word_embeddings=tie)
    model = GPT(cfg)
    n = model.num_parameters(exclude_embeddings=True)
    assert non_embedding_params(model) == n
    f = flops_per_token_for(model, seq_len=24)
    assert f.value == 6 * n + 12 * 2 * 2 * 8 * 24
    assert (f.n_layer, f.n_head, f.head_dim, f.seq_len) == (2, 2, 8, 24)
    assert flops_per_token_for(model).seq_len == 32  # falls back to block_size


def test_tied_embedding_counted_once_as_head():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, pos=nn.Embedding(7, 4), head=head, mid=nn.Linear(4, 4)))
    assert non_embedding_params(model) == 40 + 20  # head (tied) + mid; pos dropped


def test_hf_gpt2_config_recognised():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=100)
    model = transformers.GPT2LMHeadModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    f = flops_per_token_for(model, seq_len=16)
    assert f.non_embedding_params == total - 64 * 32  # wpe dropped, wte tied to lm_head
    assert f.value == 6 * (total - 64 * 32) + 12 * 2 * 4 * 8 * 16


def test_unknown_model_gives_none_and_wrappers_unwrap():
    assert flops_per_token_for(nn.Linear(3, 3)) is None
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8)
    wrapper = nn.Module()
    wrapper.module = GPT(cfg)  # the shape DDP gives
    assert flops_per_token_for(wrapper).value == flops_per_token_for(wrapper.module).value


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "fp8", 1978.9),
    ("NVIDIA B200", torch.float16, 2250.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA A100 80GB PCIe", "fp16", 312.0),
    ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
])
def test_peak_table(name, dtype, tflops):
    assert peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA H100 NVL", "NVIDIA L40", "NVIDIA GeForce RTX 4090 D",
                                  "NVIDIA GH200 480GB", "Tesla V100-SXM2-16GB", "cpu", None])
def test_unknown_devices_have_no_peak(name):
    assert peak_flops(name, "bf16") is None


def test_overrides_win_and_missing_dtype_column_is_none():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", {"H100": {"bf16": 700}}) == 700e12
    assert peak_flops("Some New GPU", "bf16", {"new gpu": {"bf16": 1.5}}) == 1.5e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp8") is None  # A100 has no FP8
    assert device_table_key("NVIDIA H100 SXM5 80GB") == "H100 SXM"
    assert set(PEAK_TFLOPS) == {"A100", "H100 SXM", "H100 PCIe", "H200", "B200", "L40S", "L4",
                                "RTX 4090"}


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        dtype_key(torch.int8)
    with pytest.raises(ValueError, match="n_head=0"):
        transformer_flops_per_token(10, 1, 0, 4, 8)
    with pytest.raises(ValueError, match="flops_per_token=-1"):
        user_flops_per_token(-1)
    assert user_flops_per_token(2e9).formula == "user-supplied: 2e+09 FLOPs/token"
