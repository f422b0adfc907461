"""apply_compile and CompileMonitor on a tiny local transformer.

Dynamo behaviour (which code compiles, when it recompiles and why) does not depend on the
backend, so most tests use a counting eager backend (Dynamo tracing only), the numerics
tests "aot_eager" (AOTAutograd's forward/backward split, eager kernels) and, in fresh
processes, the real Inductor backend, which also exercises the on-disk cache. Shape letters: B batch,
T sequence length, C width, V vocabulary.
"""
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.compile import (
    CompileConfig,
    CompileMonitor,
    apply_compile,
    compile_from_args,
    compiled_module_names,
    configure_compile_cache,
    find_repeated_blocks,
)

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


# ---- finding blocks ------------------------------------------------------------------
def test_find_repeated_blocks_picks_outermost_stack():
    class Heads(nn.Module):  # a block holding its own repeated list: skipped
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(C, C) for _ in range(2))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleDict({"h": nn.ModuleList(Heads() for _ in range(3))})
            self.mixed = nn.ModuleList([nn.Linear(C, C), nn.LayerNorm(C)])
            self.single = nn.ModuleList([nn.Linear(C, C)])
            self.acts = nn.ModuleList([nn.GELU(), nn.GELU()])  # no parameters

    assert find_repeated_blocks(Model()) == ["stack.h"]
    assert find_repeated_blocks(TinyGPT()) == ["h"]
    assert find_repeated_blocks(nn.Sequential(nn.Linear(2, 2))) == []


# ---- per-block and whole-model compile -----------------------------------------------
def test_per_block_compiles_each_block_and_blocks_share_one_graph():
    model = TinyGPT()
    backend = CountingBackend()
    monitor = CompileMonitor().start()
    assert apply_compile(model, backend=backend) is model
    assert compiled_module_names(model) == [f"h.{i}" for i in range(L)]
    model(*batch(0)).backward()
    assert backend.runs == L  # every block ran through its compiled graph
    assert backend.compiles == 1  # identical blocks reuse one graph: compile cost ~ 1 block
    stats = monitor.stats()
    assert stats["graphs"] == 1 and stats["graph_breaks"] == 0 and stats["recompiles"] == 0
    model(*batch(1)).backward()
    assert backend.runs == 2 * L and backend.compiles == 1
    assert set(model.state_dict()) == set(TinyGPT().state_dict())  # keys keep their names
    monitor.stop()


def test_whole_model_option_compiles_the_root_only():
    model = TinyGPT()
    backend = CountingBackend()
    apply_compile(model, per_block=False, backend=backend)
    assert compiled_module_names(model) == [""]
    model(*batch(0))
    assert backend.compiles == 1 and backend.runs == 1  # one graph for the whole forward


def test_model_without_repeated_blocks_falls_back_to_whole_model(caplog):
    model = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Linear(C, C))
    with caplog.at_level(logging.INFO, logger="fasttrain.compile"):
        apply_compile(model, backend=CountingBackend())
    assert compiled_module_names(model) == [""]
    assert "no repeated blocks" in caplog.text


def _loss_and_grads(model, steps=2):
    losses, grads = [], []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model(*batch(step))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return losses, grads


def _assert_matches(losses, grads, ref_losses, ref_grads, tol):
    assert len(losses) == len(ref_losses)
    for ref_loss, loss, ref_g, g in zip(ref_losses, losses, ref_grads, grads):
        torch.testing.assert_close(loss, ref_loss, **tol)
        assert g.keys() == ref_g.keys()
        for name in ref_g:
            torch.testing.assert_close(g[name], ref_g[name], **tol, msg=name)


@pytest.mark.parametrize("per_block", [True, False], ids=["per_block", "whole_model"])
def test_aot_eager_is_bitwise_equal_to_eager(per_block):
    eager, compiled = tiny_pair()
    apply_compile(compiled, per_block=per_block, backend="aot_eager")
    assert compiled_module_names(compiled) == ([f"h.{i}" for i in range(L)] if per_block
                                               else [""])
    _assert_matches(*_loss_and_grads(compiled), *_loss_and_grads(eager),
                    TOLERANCES["aot_eager"])


def test_builtin_gpt_compiles_fullgraph_with_its_fused_loss():
    from fasttrain.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=H, n_embd=C)
    torch.manual_seed(0)
    eager = GPT(cfg)
    per_block, whole = GPT(cfg), GPT(cfg)
    per_block.load_state_dict(eager.state_dict())
    whole.load_state_dict(eager.state_dict())
    apply_compile(per_block, fullgraph=True, backend=CountingBackend())
    assert compiled_module_names(per_block) == ["transformer.h.0", "transformer.h.1"]
    monitor = CompileMonitor().start()
    # fullgraph=True: the linear cross-entropy custom op must trace without a graph break.
    apply_compile(whole, per_block=False, fullgraph=True, backend="aot_eager")
    idx = batch(0)[0]
    results = []
    for model in (eager, per_block, whole):
        loss = model(idx, labels=idx).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        _assert_matches([loss], [grads], [results[0][0]], [results[0][1]],
                        TOLERANCES["aot_eager"])
    assert monitor.stats()["graph_breaks"] == 0
    monitor.stop()


# ---- recompiles ----------------------------------------------------------------------
def _compiled_run(lr_in_tensor=False):
    torch.manual_seed(0)
    model = apply_compile(TinyGPT(), backend=CountingBackend())
    if lr_in_tensor:  # as fasttrain's device-side schedule: a tensor LR updated in place
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), fused=True)
        sched = TensorLRDecay(opt)
    else:  # torch's schedulers: a Python float LR, used only by the (eager) optimizer
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return model, opt, sched


@pytest.mark.parametrize("lr_in_tensor", [False, True], ids=["float_lr", "tensor_lr"])
def test_no_recompiles_after_warmup_with_changing_lr(caplog, lr_in_tensor):
    model, opt, sched = _compiled_run(lr_in_tensor)
    monitor = CompileMonitor().start()
    train_steps(model, opt, sched, steps=1)
    monitor.end_warmup()
    lrs = []
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile"):
        for step in range(1, 6):
            lrs.append(float(opt.param_groups[0]["lr"]))
            train_steps(model, opt, sched, steps=1, seed0=step)
    assert len(set(lrs)) == 5  # the LR really changed every step
    stats = monitor.stats()
    assert stats["compiles"] == 1 and stats["compiles_after_warmup"] == 0
    assert stats["recompiles"] == 0 and stats["recompiles_after_warmup"] == 0
    assert monitor.warnings == [] and caplog.records == []
    monitor.stop()


def test_shape_change_after_warmup_warns_naming_the_guard(caplog):
    model, opt, sched = _compiled_run()
    monitor = CompileMonitor().start()
    train_steps(model, opt, sched, steps=2)
    monitor.end_warmup()
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile"):
        train_steps(model, opt, sched, steps=1, t=T - 4)  # a short last batch
    stats = monitor.stats()
    assert stats["recompiles"] == 1 and stats["recompiles_after_warmup"] == 1
    assert len(monitor.warnings) == 1
    message = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.WARNING
    assert "recompiled after warm-up" in message
    assert f"size mismatch at index 1. expected {T}, actual {T - 4}" in message
    assert "forward" in message and "test_compile.py" in message  # which code recompiled
    monitor.stop()


def test_python_float_lr_in_compiled_code_recompiles_tensor_lr_does_not():
    # Why the LR must stay out of compiled code: a float is baked into the graph as a
    # constant and guarded on, so every new value is a recompile. A tensor LR is an input.
    @torch.compile(backend=CountingBackend(), dynamic=False)
    def sgd_update(param, grad, lr):
        return param - lr * grad

    param, grad = torch.randn(8), torch.randn(8)
    monitor = CompileMonitor().start()
    sgd_update(param, grad, 0.1)
    monitor.end_warmup()
    sgd_update(param, grad, 0.05)
    assert monitor.recompiles_after_warmup == 1
    assert "lr == 0.1" in monitor.warnings[0]
    monitor.stop()

    torch._dynamo.reset()
    lr = torch.tensor(0.1)
    monitor = CompileMonitor().start()
    sgd_update(param, grad, lr)
    monitor.end_warmup()
    for value in (0.05, 0.02, 0.01):
        lr.fill_(value)
        out = sgd_update(param, grad, lr)
    torch.testing.assert_close(out, param - 0.01 * grad)
    assert monitor.stats()["compiles"] == 1 and monitor.warnings == []
    monitor.stop()


def test_expected_compiles_are_counted_without_warning(caplog):
    model, opt, sched = _compiled_run()
    monitor = CompileMonitor().start()
    train_steps(model, opt, sched, steps=1)
    monitor.end_warmup()
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile"):
        model.eval()
        with monitor.expect_compiles("first evaluation"), torch.no_grad():
            model(*batch(9))  # eval mode and no_grad are guarded: one recompile
        model.train()
        train_steps(model, opt, sched, steps=2, seed0=10)  # back to the cached train graph
    assert monitor.recompiles_after_warmup == 1 and monitor.warnings == []
    assert caplog.records == []
    monitor.stop()


def test_graph_breaks_are_counted():
    class BreakingBlock(Block):
        def forward(self, x):
            x = super().forward(x)
            torch._dynamo.graph_break()
            return x * 2

    model = TinyGPT()
    model.h = nn.ModuleList(BreakingBlock() for _ in range(2))
    monitor = CompileMonitor().start()
    apply_compile(model, backend=CountingBackend())
    model(*batch(0))
    assert monitor.stats()["graph_breaks"] >= 1
    monitor.stop()
    strict = TinyGPT()
    strict.h = nn.ModuleList(BreakingBlock() for _ in range(2))
    apply_compile(strict, fullgraph=True, backend=CountingBackend())
    with pytest.raises(torch._dynamo.exc.Unsupported):  # fullgraph=True refuses to break
        strict(*batch(0))


def test_compile_time_is_counted_in_the_step_that_compiles():
    import time

    model, opt, sched = _compiled_run()
    monitor = CompileMonitor().start()
    start = time.perf_counter()
    train_steps(model, opt, sched, steps=1)
    first_step = time.perf_counter() - start
    monitor.end_warmup()
    warm = monitor.stats()
    assert 0 < warm["compile_time_s"] <= first_step  # compiling happened inside the step
    assert warm["warmup_compile_time_s"] == warm["compile_time_s"]
    train_steps(model, opt, sched, steps=2, seed0=1)
    assert monitor.stats()["compile_time_s"] == warm["compile_time_s"]  # no compile, no time
    train_steps(model, opt, sched, steps=1, t=T // 2)  # recompile: time after warm-up
    after = monitor.stats()
    assert after["compile_time_s"] > warm["compile_time_s"]
    assert after["warmup_compile_time_s"] == warm["warmup_compile_time_s"]
    monitor.stop()
    assert monitor.stats() == after  # frozen after stop()


def test_monitor_survives_dynamo_reset():
    monitor = CompileMonitor().start()
    torch._dynamo.reset()  # drops Dynamo's callbacks
    monitor.end_warmup()  # re-registers
    model = apply_compile(TinyGPT(), backend=CountingBackend())
    model(*batch(0))
    assert monitor.stats()["compiles_after_warmup"] == 1 and len(monitor.warnings) == 1
    monitor.stop()


# ---- bad input -----------------------------------------------------------------------
def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="mode='fast'"):
        apply_compile(TinyGPT(), mode="fast")
    with pytest.raises(ValueError, match="dynamic='yes'"):
        apply_compile(TinyGPT(), dynamic="yes")
    with pytest.raises(TypeError, match="per_block"):
        CompileConfig(per_block="no")
    with pytest.raises(TypeError, match="nn.Module"):
        apply_compile(lambda x: x)
    model = apply_compile(TinyGPT(), backend=CountingBackend())
    with pytest.raises(ValueError, match="already compiled"):
        apply_compile(model)
    with pytest.raises(ValueError, match="already compiled"):
        apply_compile(torch.compile(TinyGPT()))
    with pytest.raises(RuntimeError, match="before start"):
        CompileMonitor().end_warmup()
    monitor = CompileMonitor().start()
    with pytest.raises(RuntimeError, match="twice"):
        monitor.start()
    monitor.stop()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="compile cache directory"):
        configure_compile_cache(blocker / "cache")


def test_hf_style_kv_cache_config_warns(caplog):
    model = TinyGPT()
    model.config = SimpleNamespace(use_cache=True)
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile"):
        apply_compile(model, backend=CountingBackend())
    assert "use_cache = False" in caplog.text


def test_compile_from_args_follows_the_trainer_arguments(caplog):
    off = SimpleNamespace(torch_compile=False)
    model = TinyGPT()
    assert compile_from_args(model, off) is None and compiled_module_names(model) == []
    backend = CountingBackend()
    args = SimpleNamespace(torch_compile=True, torch_compile_mode=None, dataloader_drop_last=False,
                           torch_compile_per_block=False, torch_compile_backend=backend)
    model.config = SimpleNamespace(use_cache=True)
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile"):
        monitor = compile_from_args(model, args)
    assert "dataloader_drop_last=True" in caplog.text and "use_cache" not in caplog.text
    assert model.config.use_cache is False and compiled_module_names(model) == [""]
    model(*batch(0))
    assert monitor.stats()["compiles"] == 1 and backend.runs == 1
    monitor.stop()


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("FASTTRAIN_CACHE_DIR", str(tmp_path / "ft"))
    assert configure_compile_cache() == str(tmp_path / "ft" / "inductor")
    monkeypatch.delenv("FASTTRAIN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert configure_compile_cache() == str(tmp_path / "xdg" / "fasttrain" / "inductor")
    # A directory the user already chose wins over the default.
    assert configure_compile_cache() == str(tmp_path / "xdg" / "fasttrain" / "inductor")
    assert configure_compile_cache(tmp_path / "mine") == str(tmp_path / "mine")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


# ---- Inductor: numerics and the on-disk cache, in fresh processes ---------------------
def _child(cache_dir, out_path):
    """One fresh process: per-block Inductor compile of the tiny model, two steps, saved."""
    torch.manual_seed(0)
    model = TinyGPT()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = CompileMonitor().start()
    apply_compile(model, cache_dir=cache_dir)
    losses, grads = _loss_and_grads(model)
    torch.save({"state": state, "losses": losses, "grads": grads, "stats": monitor.stats(),
                "compiled": compiled_module_names(model)}, out_path)


def _run_child(tmp_path, name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = tmp_path / f"{name}.pt"
    subprocess.run([sys.executable, __file__, str(tmp_path / "cache"), str(out)], env=env,
                   timeout=300, check=True)
    return torch.load(out)


@pytest.mark.slow
def test_inductor_per_block_matches_eager_and_second_process_hits_the_cache(tmp_path):
    cold = _run_child(tmp_path, "cold")
    warm = _run_child(tmp_path, "warm")  # same cache directory, fresh process
    eager = TinyGPT()
    eager.load_state_dict(cold["state"])
    ref = _loss_and_grads(eager)
    for run in (cold, warm):
        assert run["compiled"] == [f"h.{i}" for i in range(L)]
        _assert_matches(run["losses"], run["grads"], *ref, TOLERANCES["inductor"])
    cold, warm = cold["stats"], warm["stats"]
    print(f"\ncold compile {cold['compile_time_s']:.1f} s, warm {warm['compile_time_s']:.1f} s")
    assert cold["compiles"] == warm["compiles"] == 1  # one graph shared by the L blocks
    assert cold["recompiles"] == warm["recompiles"] == 0 and cold["graph_breaks"] == 0
    assert cold["cache_misses"] >= 2 and cold["cache_hits"] == 0  # forward + backward graphs
    assert warm["cache_hits"] >= 2 and warm["cache_misses"] == 0
    assert any((tmp_path / "cache").iterdir())


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
