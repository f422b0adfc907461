"""apply_compile on a tiny local transformer and on the built-in GPT.

Which code compiles does not depend on the backend, so most tests use a counting eager
backend (Dynamo tracing only), the numerics tests "aot_eager" (AOTAutograd's forward/backward
split, eager kernels) and, in fresh processes, the real Inductor backend, which also
exercises the on-disk compile cache.
"""
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from _compile_models import (  # noqa: F401  (fresh_dynamo is an autouse fixture)
    C, H, L, T, V, TOLERANCES, CountingBackend, TinyGPT, assert_matches, batch,
    fresh_dynamo, loss_and_grads, tiny_pair,
)
from fasttrain.compile.apply import (
    CompileConfig,
    CompileMonitor,
    apply_compile,
    compile_from_args,
    compiled_module_names,
    configure_compile_cache,
    find_repeated_blocks,
)


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
    with caplog.at_level(logging.INFO, logger="fasttrain.compile.apply"):
        apply_compile(model, backend=CountingBackend())
    assert compiled_module_names(model) == [""]
    assert "no repeated blocks" in caplog.text


@pytest.mark.parametrize("per_block", [True, False], ids=["per_block", "whole_model"])
def test_aot_eager_is_bitwise_equal_to_eager(per_block):
    eager, compiled = tiny_pair()
    apply_compile(compiled, per_block=per_block, backend="aot_eager")
    assert compiled_module_names(compiled) == ([f"h.{i}" for i in range(L)] if per_block
                                               else [""])
    assert_matches(*loss_and_grads(compiled), *loss_and_grads(eager),
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
        assert_matches([loss], [grads], [results[0][0]], [results[0][1]],
                        TOLERANCES["aot_eager"])
    assert monitor.stats()["graph_breaks"] == 0
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
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile.apply"):
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
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile.apply"):
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
    losses, grads = loss_and_grads(model)
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
    ref = loss_and_grads(eager)
    for run in (cold, warm):
        assert run["compiled"] == [f"h.{i}" for i in range(L)]
        assert_matches(run["losses"], run["grads"], *ref, TOLERANCES["inductor"])
    cold, warm = cold["stats"], warm["stats"]
    print(f"\ncold compile {cold['compile_time_s']:.1f} s, warm {warm['compile_time_s']:.1f} s")
    assert cold["compiles"] == warm["compiles"] == 1  # one graph shared by the L blocks
    assert cold["recompiles"] == warm["recompiles"] == 0 and cold["graph_breaks"] == 0
    assert cold["cache_misses"] >= 2 and cold["cache_hits"] == 0  # forward + backward graphs
    assert warm["cache_hits"] >= 2 and warm["cache_misses"] == 0
    assert any((tmp_path / "cache").iterdir())


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])

