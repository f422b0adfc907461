"""FLOPs per token of a transformer and the dense peak FLOP/s of known accelerators.

MFU = achieved model FLOP/s per device / peak dense FLOP/s of that device for the dtype the
matmuls run in. Model FLOPs per token (PaLM, appendix B; the same count nanoGPT and
torchtitan use):

    6*N + 12*L*H*Q*T

N: non-embedding parameters (a tied input/output embedding counts once, as the head),
L layers, H attention heads, Q head dimension, T sequence length. 6N is forward (2N) plus
backward (4N) of every weight matmul; 12*L*H*Q*T is the attention score and value matmuls
(QK^T and AV, forward and backward), counted in full; llm.c counts half of it (causal mask).
Activation recomputation is not counted: this is model FLOPs, not hardware FLOPs.

The peak table holds dense (no 2:4 sparsity) tensor-core figures from NVIDIA's data sheets.
An unknown device (CPU included) has no peak: MFU is reported as None, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TFLOPS = 1e12

# Dense peak TFLOP/s by device and dtype (NVIDIA data sheets; sparsity figures halved).
# "fp32" is plain FP32 (no tensor cores); "tf32" applies when torch allows TF32 matmuls.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "B200": {"fp32": 75.0, "tf32": 1125.0, "bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5},
    # GeForce: FP16/BF16 tensor FLOPs with FP32 accumulation (what training uses).
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2, "fp8": 330.3},
}

# (substring of torch.cuda.get_device_name(), table key), most specific first. A name that
# matches none (H100 NVL, H200 NVL, anything new) is unknown on purpose.
_NAME_RULES: list[tuple[tuple[str, ...], str]] = [
    (("H100", "PCIE"), "H100 PCIe"),
    (("H100", "NVL"), ""),
    (("H100",), "H100 SXM"),  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"
    (("GH200",), ""),
    (("H200", "NVL"), ""),
    (("H200",), "H200"),
    (("B200",), "B200"),
    (("A100",), "A100"),
    (("L40S",), "L40S"),
    (("L40",), ""),
    (("L4",), "L4"),
    (("4090 D",), ""),
    (("4090",), "RTX 4090"),
]

_DTYPE_KEYS = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    "fp32": "fp32", "float32": "fp32", "tf32": "tf32", "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "fp8": "fp8",
}


def dtype_key(dtype: torch.dtype | str) -> str:
    """The peak-table column for a compute dtype: 'fp32', 'tf32', 'bf16', 'fp16' or 'fp8'."""
    key = _DTYPE_KEYS.get(dtype.lower() if isinstance(dtype, str) else dtype)
    if key is None:
        raise ValueError(f"dtype={dtype!r} has no peak-table column; use one of "
                         "fp32, tf32, bf16, fp16, fp8 (or a torch float dtype)")
    if key == "fp32" and torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return key


def device_table_key(device_name: str) -> str | None:
    """Map a device name (e.g. 'NVIDIA H100 80GB HBM3') to a PEAK_TFLOPS key, or None."""
    upper = device_name.upper()
    for needles, key in _NAME_RULES:
        if all(n in upper for n in needles):
            return key or None
    return None


def peak_flops(device_name: str | None, dtype: torch.dtype | str,
               overrides: dict[str, dict[str, float]] | None = None) -> float | None:
    """Dense peak FLOP/s of one device for `dtype`, or None when the device is unknown.

    `overrides` maps a device-name substring (or a table key) to {dtype: TFLOP/s} and wins
    over the built-in table, e.g. {"H100": {"bf16": 900.0}} for a power-capped part.
    """
    if device_name is None:
        return None
    column = dtype_key(dtype)
    for needle, row in (overrides or {}).items():
        if needle.upper() in device_name.upper() and column in row:
            return float(row[column]) * TFLOPS
    key = device_table_key(device_name)
    if key is None or column not in PEAK_TFLOPS[key]:
        return None
    return PEAK_TFLOPS[key][column] * TFLOPS


def device_name_of(device: torch.device | str) -> str | None:
    """The accelerator's marketing name, or None for a CPU (no peak is known for CPUs)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return None


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token, with the terms it was computed from (for printing)."""

    value: float
    formula: str
    non_embedding_params: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    head_dim: int | None = None
    seq_len: int | None = None


def transformer_flops_per_token(non_embedding_params: int, n_layer: int, n_head: int,
                                head_dim: int, seq_len: int) -> FlopsPerToken:
    """6*N + 12*L*H*Q*T (see the module docstring)."""
    for name, v in (("non_embedding_params", non_embedding_params), ("n_layer", n_layer),
                    ("n_head", n_head), ("head_dim", head_dim), ("seq_len", seq_len)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}={v!r}: must be a positive int")
    n, att = 6 * non_embedding_params, 12 * n_layer * n_head * head_dim * seq_len
    formula = (f"6*N + 12*L*H*Q*T = 6*{non_embedding_params} + "
               f"12*{n_layer}*{n_head}*{head_dim}*{seq_len} = {n + att:.4g} FLOPs/token")
    return FlopsPerToken(float(n + att), formula, non_embedding_params, n_layer, n_head,
                         head_dim, seq_len)


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters minus embedding tables; a table tied to an output Linear stays (the head)."""
    params = {id(p): p.numel() for p in model.parameters()}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) not in linear_weights:
            params.pop(id(module.weight), None)
    return sum(params.values())


# Attribute names for (layers, heads, width, context) in the built-in GPT config and in
# HuggingFace configs (GPT-2 style first, then Llama/BERT style).
_CONFIG_FIELDS = {
    "n_layer": ("n_layer", "num_hidden_layers", "num_layers"),
    "n_head": ("n_head", "num_attention_heads", "num_heads"),
    "n_embd": ("n_embd", "hidden_size", "d_model"),
    "seq_len": ("block_size", "n_positions", "max_position_embeddings", "n_ctx"),
}


def _config_field(config, field: str):
    for name in _CONFIG_FIELDS[field]:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def flops_per_token_for(model: torch.nn.Module, seq_len: int | None = None) -> FlopsPerToken | None:
    """6N + 12LHQT for a model whose `.config` names its shape (built-in GPT or HF), else None.

    `seq_len` is the training sequence length; without it the config's context length
    (block_size / max_position_embeddings) is used. Unwraps DDP/compile wrappers.
    """
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    config = getattr(inner, "config", None)
    if config is None:
        return None
    n_layer, n_head = _config_field(config, "n_layer"), _config_field(config, "n_head")
    n_embd = _config_field(config, "n_embd")
    seq_len = seq_len or _config_field(config, "seq_len")
    if None in (n_layer, n_head, n_embd, seq_len):
        return None
    head_dim = getattr(config, "head_dim", None) or n_embd // n_head
    return transformer_flops_per_token(non_embedding_params(inner), n_layer, n_head,
                                       head_dim, seq_len)


def user_flops_per_token(value: float) -> FlopsPerToken:
    """Wrap a user-supplied FLOPs-per-token figure so reports say where it came from."""
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"flops_per_token={value!r}: must be a positive number of FLOPs "
                         "(forward + backward) per training token")
    return FlopsPerToken(float(value), f"user-supplied: {float(value):.4g} FLOPs/token")
