"""fused_causal_lm_loss against the HuggingFace model's own loss (value and gradients), for
GPT-2 and Llama built from tiny configs (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttrain.ops.loss import fused_causal_lm_loss, fused_loss_unavailable_reason  # noqa: E402

B, T = 2, 13


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                   max_position_embeddings=32, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (B, T), generator=gen)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -4:] = 0  # right padding in the second row
    labels = input_ids.clone()
    labels[1, -4:] = -100  # padding is ignored
    labels[0, :3] = -100  # and a masked prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_matches_model_loss_and_gradients(build):
    torch.manual_seed(0)
    model = build().eval()  # eval: no dropout, so both passes see the same network
    batch = _batch(model.config.vocab_size)
    out = fused_causal_lm_loss(model, batch)
    assert out is not None, fused_loss_unavailable_reason(model, batch)
    loss_sum, count = out
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0 and count.dim() == 0
    # the model's label shift: the last position of each row and the -100s do not count
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    loss_sum.backward()
    ours = _grads(model)
    model.zero_grad()
    ref = model(**batch).loss
    (ref * count).backward()
    torch.testing.assert_close(loss_sum / count, ref, rtol=1e-5, atol=1e-6)
    theirs = _grads(model)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shift_labels_and_custom_ignore_index():
    torch.manual_seed(0)
    model = _llama().eval()
    batch = _batch(model.config.vocab_size)
    batch["labels"][batch["labels"] == -100] = -1
    loss_sum, count = fused_causal_lm_loss(model, batch, ignore_index=-1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-1)[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(),
                                            ignore_index=-1, reduction="sum")
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=1e-5)
    given = dict(batch, shift_labels=shifted)
    del given["labels"]
    torch.testing.assert_close(fused_causal_lm_loss(model, given, ignore_index=-1)[0], ref,
                               rtol=1e-5, atol=1e-5)


def test_returns_none_where_it_cannot_reproduce_the_loss():
    model = _gpt2()
    batch = _batch(model.config.vocab_size)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert fused_causal_lm_loss(model, no_labels) is None
    assert "labels" in fused_loss_unavailable_reason(model, no_labels)
    assert fused_causal_lm_loss(model.transformer, batch) is None  # no output embeddings
    assert fused_causal_lm_loss(model, dict(batch, logits_to_keep=1)) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fused_loss_unavailable_reason(model, batch)


def test_gemma2_soft_capping_is_detected():
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    vocab_size=64, max_position_embeddings=32)
    model = transformers.Gemma2ForCausalLM(cfg)
    assert fused_causal_lm_loss(model, _batch(64)) is None


def test_trainer_logs_once_why_the_fused_loss_is_off(tmp_path, caplog):
    import logging

    from fasttrain import Trainer, TrainingArguments

    class OwnHead(torch.nn.Module):  # labels, but no output embedding to fuse with
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.out = torch.nn.Parameter(torch.randn(16, 8))

        def forward(self, input_ids, labels):
            logits = self.emb(input_ids) @ self.out.t()
            return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}

    data = [{"input_ids": torch.arange(4) % 16, "labels": torch.arange(4) % 16} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             save_strategy="no", disable_tqdm=True, report_to="none")
    with caplog.at_level(logging.INFO, logger="fasttrain"):
        Trainer(OwnHead(), args, train_dataset=data).train()
    lines = [r.getMessage() for r in caplog.records if "fused loss off" in r.getMessage()]
    assert lines == ["fused loss off, the model's own loss runs (full logits): "
                     "the model has no nn.Linear output embedding"]
