"""Built-in models. They know nothing of parallelism, compilation or precision."""
from fasttrain.models.gpt import GPT, GPTConfig, GPTOutput

MODEL_SIZES = {
    # name: GPTConfig overrides; "tiny" is the default job's model (a few minutes on 2 CPU cores)
    "tiny": dict(n_layer=4, n_head=6, n_embd=192),
    "small": dict(n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024),
}

__all__ = ["GPT", "GPTConfig", "GPTOutput", "MODEL_SIZES"]
