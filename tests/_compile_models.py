"""A tiny transformer and helpers shared by the compile tests (not a test module).

Shape letters: B batch, T sequence length, C width, V vocabulary, H heads, L blocks.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

B, T, C, V, H, L = 2, 16, 32, 64, 2, 2

# Tolerances for compiled-vs-eager, fp32. Inductor fuses and reorders reductions
# (layernorm, softmax, matmul epilogues), so results differ from eager by rounding only.
TOLERANCES = {
    "inductor": dict(rtol=1e-5, atol=1e-6),  # fp32 reordering: a few ulps on O(1) values
    "aot_eager": dict(rtol=0, atol=0),  # the same aten ops in the same order: bitwise equal
}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.out = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):  # (B, T, C)
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (z.view(b, t, H, C // H).transpose(1, 2) for z in (q, k, v))  # (B, H, T, Q)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, n_layer=L):
        super().__init__()
        self.emb = nn.Embedding(V, C)
        self.h = nn.ModuleList(Block() for _ in range(n_layer))
        self.head = nn.Linear(C, V)

    def forward(self, idx, targets):  # (B, T), (B, T)
        x = self.emb(idx)
        for block in self.h:
            x = block(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    eager = TinyGPT()
    compiled = TinyGPT()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def batch(seed, t=T):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, t + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


class CountingBackend:
    """A Dynamo backend that runs the captured graph eagerly and counts compiles and runs."""

    def __init__(self):
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


@pytest.fixture(autouse=True)
def fresh_dynamo(tmp_path_factory, monkeypatch):
    # Each test starts from an empty Dynamo cache; the on-disk Inductor cache is shared by
    # the in-process tests (a test-session directory) and restored afterwards.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ind"))
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    yield
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = limit


class TensorLRDecay:
    """lr = base / (1 + step), written in place into the optimizer's tensor LR."""

    def __init__(self, opt):
        self.lr, self.base, self.step_count = opt.param_groups[0]["lr"], 1e-3, 0

    def step(self):
        self.step_count += 1
        self.lr.fill_(self.base / (1 + self.step_count))


def train_steps(model, opt, sched, steps, seed0=0, t=T):
    for step in range(steps):
        loss = model(*batch(seed0 + step, t))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return loss


def loss_and_grads(model, steps=2):
    losses, grads = [], []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model(*batch(step))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return losses, grads


def assert_matches(losses, grads, ref_losses, ref_grads, tol):
    assert len(losses) == len(ref_losses)
    for ref_loss, loss, ref_g, g in zip(ref_losses, losses, ref_grads, grads):
        torch.testing.assert_close(loss, ref_loss, **tol)
        assert g.keys() == ref_g.keys()
        for name in ref_g:
            torch.testing.assert_close(g[name], ref_g[name], **tol, msg=name)


