"""fasttrain.ops without the compiled library: how the loader decides (subprocesses, since the
library loads once per process) and that fasttrain.ops.dispatch then runs torch's own ops and
computes the same thing (in process, with the loader forced to the fallback)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fasttrain.kernels._reference import grad_norm_reference
from fasttrain.ops import dispatch, native as _ops

PROBE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s %(message)s")
    import torch
    from fasttrain.ops import dispatch, native as _ops
    print("AVAILABLE", _ops.available())
    print("STEP_OK", dispatch.grad_norm([torch.ones(4)]).item() == 2.0)
    clip = dispatch.grad_norm_clip([torch.ones(4), torch.tensor([float("nan")])], 0.5)
    print("CLIP", dispatch.implementation("grad_norm_clip", "cpu"),
          [round(t.item(), 6) for t in dispatch.grad_norm_clip([torch.ones(4)], 0.5)], clip[2].item())
""")


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    bogus = tmp_path_factory.mktemp("lib") / "libfasttrain_ops.so"
    bogus.write_text("not a shared library")
    cases = {"disabled": {"FASTTRAIN_DISABLE_OPS": "1"},
             "missing": {"FASTTRAIN_OPS_LIB": str(bogus.parent / "absent.so")},
             "broken": {"FASTTRAIN_OPS_LIB": str(bogus)}}
    if _ops.DEFAULT_LIBRARY_PATH.is_file():
        cases["explicit"] = {"FASTTRAIN_OPS_LIB": str(_ops.DEFAULT_LIBRARY_PATH)}
    procs = {}
    for name, extra in cases.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTTRAIN_")}
        env.update(extra, PYTHONPATH=str(_ops.REPO_ROOT))
        procs[name] = subprocess.Popen([sys.executable, "-c", PROBE], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return {name: proc.communicate(timeout=120)[0] for name, proc in procs.items()}


@pytest.mark.parametrize("case,reason", [("disabled", "FASTTRAIN_DISABLE_OPS is set"),
                                         ("missing", "absent.so not found"),
                                         ("broken", "failed")])
def test_loader_falls_back_and_says_why(probes, case, reason):
    out = probes[case]
    assert "AVAILABLE False" in out and "STEP_OK True" in out, out
    # the Trainer's clipping tail from torch ops: norm 2, divisor (2 + 1e-6) / 0.5, flag for NaN
    assert "CLIP torch [2.0, 4.000002, 0.0] 1.0" in out, out
    assert reason in out and "using the PyTorch fallback" in out, out


def test_loader_takes_the_library_from_fasttrain_ops_lib(probes):
    if "explicit" not in probes:
        pytest.fail("build/libfasttrain_ops.so is missing: run bash scripts/build_ops.sh")
    assert "AVAILABLE True" in probes["explicit"], probes["explicit"]
    assert "CLIP c++ [2.0, 4.000002, 0.0] 1.0" in probes["explicit"], probes["explicit"]
    assert f"loaded {_ops.DEFAULT_LIBRARY_PATH}" in probes["explicit"]


# ----------------------------------------------------------------------------- fallback math
@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setattr(_ops, "_loaded", False)
    assert not _ops.available()
    assert {dispatch.implementation(op, "cpu") for op in ("adamw_", "unscale_and_check_",
                                                          "grad_norm")} == {"torch"}


SHAPES = [(67, 13), (1,), (3001,)]


def _state(dtype, master):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    moment = torch.float32 if master else dtype
    return {"params": params, "exp_avgs": [torch.zeros(s, dtype=moment) for s in SHAPES],
            "exp_avg_sqs": [torch.zeros(s, dtype=moment) for s in SHAPES],
            "master_params": [p.float() for p in params] if master else [],
            "state_steps": [torch.zeros(()) for _ in SHAPES]}


def _step(state, grads, **kw):
    dispatch.adamw_(state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"],
                    state["master_params"], state["state_steps"], torch.tensor(1e-2), 0.9, 0.99,
                    0.1, 1e-8, **kw)


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_fallback_adamw_matches_torch(fallback, dtype, master):
    """torch._fused_adamw_ on the params (fp32) or on the fp32 masters (then rounded)."""
    state = _state(dtype, master)
    leaves = [torch.nn.Parameter(p.float()) for p in state["params"]]
    opt = torch.optim.AdamW(leaves, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(10):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.float()
        opt.step()
        _step(state, [g * 8 for g in grads], grad_scale=torch.tensor(8.0),
              found_inf=torch.zeros(1))
    weights = state["master_params"] or state["params"]
    for ours, ref in zip(weights, leaves):
        torch.testing.assert_close(ours, ref.detach(), rtol=2e-5, atol=2e-6)
    if master:
        assert all(torch.equal(p, w.to(dtype)) for p, w in zip(state["params"], weights))


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_fallback_adamw_skips_on_found_inf(fallback, dtype, master):
    state = _state(dtype, master)
    before = {k: [t.clone() for t in v] for k, v in state.items()}
    _step(state, [torch.full(s, float("nan")).to(dtype) for s in SHAPES], found_inf=torch.ones(1))
    for key, tensors in state.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, before[key])), key


def test_fallback_unscale_and_norm_match_torch(fallback):
    grads = [torch.randn(s) for s in SHAPES] + [torch.randn(5).bfloat16()]
    grads[2][100] = float("inf")
    ref = [g.clone() for g in grads]
    found, ref_found = torch.zeros(1), torch.zeros(1)
    dispatch.unscale_and_check_(grads, torch.tensor([0.25]), found)
    torch._amp_foreach_non_finite_check_and_unscale_(ref, ref_found, torch.tensor([0.25]))
    assert found.item() == ref_found.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(grads, ref))
    grads[2][100] = 0.0
    for p in (2.0, float("inf"), 3.0):
        torch.testing.assert_close(dispatch.grad_norm(grads, p), grad_norm_reference(grads, p))
    with pytest.raises(ValueError, match="norm_type=0.0 must be a positive number or inf"):
        dispatch.grad_norm(grads, 0.0)
