"""The causal-LM loss of a HuggingFace model without materialising its logits.

`fused_causal_lm_loss(model, inputs)` runs the model's base (decoder) to the final hidden
states, then `fasttrain.kernels.linear_cross_entropy` with the output embedding's weight
(and bias), with transformers' label shift (labels padded with ignore_index on the right and
shifted left by one; or `shift_labels` from the batch when given). It returns the summed
loss over valid tokens and their count, the two numbers the Trainer's token-normalised
accumulation needs; the model's own mean loss equals sum / count.

Under data parallelism `fused_loss_through(wrapper, model, inputs)` runs it as the forward
of the wrapper (DDP, BucketedDDP, or FSDP's fully_shard'ed model itself), so the wrapper's
gradient reduction and parameter gathering work as for the model's own forward.

It returns None, and the Trainer falls back to the model's own forward, whenever it cannot
reproduce the model's loss exactly: no labels, no nn.Linear output embedding, a loss other
than ForCausalLMLoss, logit soft-capping or scaling in the config or the forward, a
mixture-of-experts auxiliary loss, or `logits_to_keep` in the batch.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from fasttrain.kernels import linear_cross_entropy

# Config fields that change the logits between the hidden states and the loss.
_LOGIT_CONFIG_FIELDS = ("final_logit_softcapping", "logit_softcapping", "logit_scale",
                        "logits_scaling", "output_multiplier_scale", "output_logits_scale")
# Words in a forward's source showing it post-processes the logits or adds to the loss.
_FORWARD_RED_FLAGS = ("softcap", "logit_scale", "logits_scaling", "output_multiplier",
                      "aux_loss", "router_logits", "logits_processor")
_NOT_MODEL_INPUTS = ("labels", "shift_labels", "num_items_in_batch")
_FUSED_FORWARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=None)
def _forward_is_plain(model_cls: type) -> bool:
    try:
        src = inspect.getsource(model_cls.forward)
    except (OSError, TypeError):
        return False
    return "self.loss_function(" in src and not any(w in src for w in _FORWARD_RED_FLAGS)


def model_reason(model) -> Optional[str]:
    """The reason the fused loss can never apply to this model, or None (depends on the
    model alone: callers check it once)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return "the model has no nn.Linear output embedding"
    if getattr(getattr(model, "loss_function", None), "__name__", "") != "ForCausalLMLoss":
        return "the model's loss is not transformers' ForCausalLMLoss"
    config = getattr(model, "config", None)
    for field in _LOGIT_CONFIG_FIELDS:
        value = getattr(config, field, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            return f"config.{field}={value} changes the logits"
    if getattr(config, "output_router_logits", False):
        return "a mixture-of-experts auxiliary loss is added to the LM loss"
    if not _forward_is_plain(type(model)):
        return "the model's forward post-processes logits or adds to the loss"
    if _base_model(model) is None:
        return "the base model (model.base_model_prefix) was not found"
    return None


def batch_reason(inputs) -> Optional[str]:
    """The reason the fused loss does not apply to this batch, or None."""
    if inputs.get("labels") is None and inputs.get("shift_labels") is None:
        return "the batch has no labels"
    if inputs.get("logits_to_keep", 0) not in (0, None):
        return "logits_to_keep slices the hidden states"
    return None


def _why_not(model, inputs) -> Optional[str]:
    """The reason the fused loss does not apply, or None when it does."""
    return batch_reason(inputs) or model_reason(model)


def _base_model(model):
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return base if isinstance(base, torch.nn.Module) and base is not model else None


def _shifted_labels(inputs, ignore_index):
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    labels = F.pad(inputs["labels"], (0, 1), value=ignore_index)
    return labels[..., 1:]


def fused_causal_lm_loss(model, inputs: dict, ignore_index: int = -100, checked: bool = False
                         ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(summed fp32 loss over valid tokens, count of valid tokens) as 0-d tensors, or None
    when the fused path cannot reproduce `model(**inputs).loss` (see the module docstring).
    checked=True: the caller has already found `_why_not(model, inputs)` to be None.
    """
    if not checked and _why_not(model, inputs) is not None:
        return None
    model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    outputs = _base_model(model)(**model_inputs, return_dict=True)
    hidden = outputs.last_hidden_state  # (B, T, H)
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the head's matmul would run in this dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden = hidden.to(dtype)
        if weight.dtype != torch.float32:
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        # an fp32 weight goes in as it is: the kernel casts it once and returns its gradient
        # in fp32 (no half copy here, no half gradient rounded and cast back by autograd)
    else:
        hidden = hidden.to(weight.dtype)
    target = _shifted_labels(inputs, ignore_index).to(hidden.device)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                target.reshape(-1), bias, ignore_index=ignore_index,
                                reduction="sum")
    count = (target != ignore_index).sum()
    return loss, count


def fused_loss_through(wrapper: torch.nn.Module, model: torch.nn.Module, inputs: dict,
                       ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_causal_lm_loss(model, inputs)` run as the forward of `wrapper`, the module
    that wraps `model` for data parallelism (DDP, BucketedDDP) or is `model` itself
    (FSDP's fully_shard, no wrapper). The wrapper's forward machinery runs exactly as for
    `wrapper(**inputs)`: DDP prepares its gradient reduction, FSDP gathers the root's
    parameters (the output embedding among them) around the call. Only the inner forward
    changes, for the call's duration: hidden states -> fused linear cross-entropy, so the
    (tokens x vocab) logits never exist. The caller has checked eligibility."""
    fused_forward = _FUSED_FORWARDS.get(model)
    if fused_forward is None:  # one function per model: a compiled caller guards on it
        model_ref = weakref.ref(model)  # the cache must not keep the model alive

        def fused_forward(**kwargs):
            return fused_causal_lm_loss(model_ref(), kwargs, ignore_index, checked=True)
        _FUSED_FORWARDS[model] = fused_forward
    model.forward = fused_forward  # an instance attribute shadows the class's forward
    try:
        out = wrapper(**inputs)
    finally:
        del model.forward
    return out[0], out[1]


def fused_loss_unavailable_reason(model, inputs: dict) -> Optional[str]:
    """Why `fused_causal_lm_loss` would return None for this model and batch (for logs)."""
    return _why_not(model, inputs)
