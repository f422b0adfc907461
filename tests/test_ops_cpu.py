"""The compiled CPU ops (csrc/cpu) against PyTorch: torch.optim.AdamW over many steps, the
AMP unscale op, torch.linalg.vector_norm; opcheck on every op; bad inputs; the build itself.

The library comes from CI's `scripts/build_ops.sh` (via `scripts/setup.sh test`); if it is
missing the module builds it once. The `kernel_cases` run on the GPU too
(FASTTRAIN_TEST_DEVICE=cuda, tests/_devices.py): there they exercise the CUDA kernels.
"""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fasttrain.kernels._reference import adamw_reference_, grad_norm_clip_reference
from fasttrain.ops import dispatch, native as _ops
from tests._devices import DEVICE

ops = torch.ops.fasttrain
# Odd sizes, a 0-d-like scalar, and tensors spanning several 32768-element chunks with tails.
SHAPES = [(257, 131), (1,), (70001,), (3, 5, 7), (33, 2049)]
# torch's own fp16/bf16 CPU conversions are slow here: smaller set, still crossing chunks.
LOW_SHAPES = [(67, 131), (1,), (40001,), (3, 5, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BETAS, EPS = (0.9, 0.95), 1e-8
ADAMW_CASES = pytest.mark.kernel_cases("fasttrain::adamw_")


@pytest.fixture(scope="module", autouse=True)
def built_library():
    if os.environ.get("FASTTRAIN_DISABLE_OPS", "0") not in ("", "0"):
        pytest.skip("FASTTRAIN_DISABLE_OPS is set: the compiled ops are switched off")
    if not _ops.DEFAULT_LIBRARY_PATH.is_file() and "FASTTRAIN_OPS_LIB" not in os.environ:
        subprocess.run(["bash", str(_ops.REPO_ROOT / "scripts" / "build_ops.sh")], check=True)
        _ops._loaded = None
    assert _ops.available(), "the ops library did not load; see the fasttrain.ops debug log"


@pytest.fixture(autouse=True)
def _kernel_on_device(request):
    """A case of an op that has no kernel on DEVICE is skipped, naming what runs there instead
    (on CUDA, AdamW and unscale are the Triton kernels: docs/csrc.md)."""
    for mark in request.node.iter_markers("kernel_cases"):
        for name in mark.args:
            op = name.removeprefix("fasttrain::")
            if name != op and not _ops.has_kernel_on(op, DEVICE.type):
                pytest.skip(f"{name} has no {DEVICE.type} kernel; there "
                            f"fasttrain.ops.dispatch runs {dispatch.implementation(op, DEVICE.type)}")


def test_library_is_built_from_this_tree():
    info = _ops.build_info()
    assert Path(info["source_dir"]).resolve() == _ops.REPO_ROOT
    assert info["torch"] == torch.__version__
    lib_time = Path(_ops.library_path()).stat().st_mtime
    csrc = _ops.REPO_ROOT / "csrc"
    built = [p for p in csrc.rglob("*") if p.is_file()
             and (info["cuda"] == "ON" or csrc / "cuda" not in p.parents)]
    newest = max(p.stat().st_mtime for p in built)
    assert lib_time >= newest, "library older than its sources: rerun bash scripts/build_ops.sh"
    # The CUDA kernel (grad_norm) exists exactly when the build says so; AdamW and unscale
    # have CPU kernels only (Triton runs them on CUDA)
    assert _ops._registered("grad_norm", "cuda") == (info["cuda"] == "ON")
    assert not _ops._registered("adamw_", "cuda") and not _ops._registered("unscale_and_check_", "cuda")
    assert _ops.has_kernel("adamw_", [torch.ones(1)]) and not _ops.has_kernel("adamw_", [])


# ----------------------------------------------------------------------------- AdamW
def make_state(shapes, dtype, master: bool, moment_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]
    moment_dtype = moment_dtype or (torch.float32 if master else dtype)
    return {
        "params": params,
        "exp_avgs": [torch.zeros(s, dtype=moment_dtype, device=DEVICE) for s in shapes],
        "exp_avg_sqs": [torch.zeros(s, dtype=moment_dtype, device=DEVICE) for s in shapes],
        "master_params": [p.float() for p in params] if master else [],
        "state_steps": [torch.zeros((), device=DEVICE) for _ in shapes],
    }


def fused_step(state, grads, lr, wd, grad_scale=None, found_inf=None):
    ops.adamw_(state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"],
               state["master_params"], state["state_steps"], torch.tensor(lr, device=DEVICE), *BETAS, wd, EPS,
               grad_scale, found_inf)


def torch_adamw(params, wd, **impl):
    leaves = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return leaves, torch.optim.AdamW(leaves, lr=1.0, betas=BETAS, eps=EPS, weight_decay=wd, **impl)


def grads_for(shapes, step, dtype):
    gen = torch.Generator().manual_seed(1000 + step)
    # mixed magnitudes so v spans orders of magnitude, and a few exact zeros
    return [(torch.randn(s, generator=gen) * 10.0 ** (i % 3 - 2)).clamp_(-3, 3).to(DEVICE, dtype)
            for i, s in enumerate(shapes)]


@ADAMW_CASES
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_fp32_matches_torch_over_many_steps(wd):
    state = make_state(SHAPES, torch.float32, master=False)
    leaves, opt = torch_adamw(state["params"], wd, foreach=False)
    for step in range(25):
        lr = 1e-2 * (0.97 ** step)  # a schedule: lr changes every step
        grads = grads_for(SHAPES, step, torch.float32)
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        fused_step(state, grads, lr, wd)
    for ours, ref in zip(state["params"], leaves):
        # fp32 op order (FMA contraction) differs from torch's: a few ulp per step, 25 steps
        torch.testing.assert_close(ours, ref.detach(), rtol=2e-5, atol=2e-6)
    for ours, ref in zip(state["exp_avg_sqs"], leaves):
        torch.testing.assert_close(ours, opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    assert all(s.item() == 25.0 for s in state["state_steps"])


@ADAMW_CASES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_master_weights_track_fp32_adamw(dtype, wd):
    """Low-precision params + fp32 masters: the master follows fp32 AdamW fed the same
    (low-precision) grads, and every param is exactly its master rounded to nearest."""
    state = make_state(LOW_SHAPES, dtype, master=True)
    leaves, opt = torch_adamw(state["master_params"], wd, foreach=False)
    for step in range(20):
        grads = grads_for(LOW_SHAPES, step, dtype)
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.float()
        opt.param_groups[0]["lr"] = 1e-3
        opt.step()
        fused_step(state, grads, 1e-3, wd)
    for param, master, ref in zip(state["params"], state["master_params"], leaves):
        torch.testing.assert_close(master, ref.detach(), rtol=2e-5, atol=2e-6)
        assert param.dtype == dtype
        assert torch.equal(param, master.to(dtype)), "param must be the master rounded to nearest"


@ADAMW_CASES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adamw_low_precision_without_master_no_worse_than_torch(dtype):
    """No masters: fp32 math, rounded to the storage dtype every step. Compare errors, not
    values: against an fp32 trajectory, ours may drift at most as far as torch's fused AdamW
    (which also does fp32 math on low-precision storage), plus a rounding step."""
    state = make_state(LOW_SHAPES, dtype, master=False)
    gold, gold_opt = torch_adamw([p.float() for p in state["params"]], 0.1, foreach=False)
    peer, peer_opt = torch_adamw(state["params"], 0.1, fused=True)
    for step in range(15):
        grads = grads_for(LOW_SHAPES, step, dtype)
        for leaves, o in ((gold, gold_opt), (peer, peer_opt)):
            for leaf, g in zip(leaves, grads):
                leaf.grad = g.to(leaf.dtype)
            o.param_groups[0]["lr"] = 1e-3
            o.step()
        fused_step(state, grads, 1e-3, 0.1)
    for ours, theirs, ref in zip(state["params"], peer, gold):
        ulp = torch.finfo(dtype).eps * ref.detach().abs().max()
        our_err = (ours.float() - ref.detach()).abs().max()
        peer_err = (theirs.detach().float() - ref.detach()).abs().max()
        assert our_err <= peer_err + ulp, (our_err, peer_err)


@ADAMW_CASES
def test_adamw_grad_scale_divides_and_leaves_grads_alone():
    plain, scaled = make_state(SHAPES, torch.float32, False), make_state(SHAPES, torch.float32, False)
    for step in range(5):
        grads = grads_for(SHAPES, step, torch.float32)
        big = [g * 1024.0 for g in grads]  # exact: power of two
        before = [g.clone() for g in big]
        fused_step(plain, grads, 1e-2, 0.1)
        fused_step(scaled, big, 1e-2, 0.1, grad_scale=torch.tensor([1024.0], device=DEVICE))
        assert all(torch.equal(a, b) for a, b in zip(big, before)), "grads were modified"
    for a, b in zip(plain["params"], scaled["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@ADAMW_CASES
@pytest.mark.parametrize("master", [False, True])
def test_adamw_found_inf_skips_everything(master):
    state = make_state(LOW_SHAPES, torch.bfloat16 if master else torch.float32, master)
    fused_step(state, grads_for(LOW_SHAPES, 0, state["params"][0].dtype), 1e-2, 0.1)
    snapshot = {k: [t.clone() for t in v] for k, v in state.items()}
    bad = grads_for(LOW_SHAPES, 1, state["params"][0].dtype)
    bad[2][7] = float("inf")
    fused_step(state, bad, 1e-2, 0.1, grad_scale=torch.tensor(4.0, device=DEVICE),
               found_inf=torch.ones(1, device=DEVICE))
    for key, tensors in state.items():
        for now, then in zip(tensors, snapshot[key]):
            assert torch.equal(now, then), f"{key} changed on a skipped step"
    fused_step(state, bad, 1e-2, 0.1, found_inf=torch.zeros(1, device=DEVICE))  # a normal step
    assert all(s.item() == 2.0 for s in state["state_steps"])


def test_adamw_wrapper_matches_reference_with_mixed_dtypes():
    """The dispatch point against the exported fp32 reference, bf16 grads into fp32 params,
    fp32 moments: the combination the FusedAdamW bf16-autocast path produces."""
    ours = make_state(LOW_SHAPES, torch.float32, False)
    ref = make_state(LOW_SHAPES, torch.float32, False)
    for step in range(10):
        grads = grads_for(LOW_SHAPES, step, torch.bfloat16)
        for state, update in ((ours, dispatch.adamw_), (ref, adamw_reference_)):
            update(state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"], [],
                   state["state_steps"], torch.tensor(3e-3), *BETAS, 0.05, EPS)
    for a, b in zip(ours["params"], ref["params"]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


# ----------------------------------------------------------------------------- unscale + norm
def grad_list(dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(DEVICE, d) for s, d in zip(SHAPES, dtypes)]


@pytest.mark.kernel_cases("fasttrain::unscale_and_check_")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", [None, float("inf"), float("-inf"), float("nan")])
def test_unscale_and_check_matches_torch_amp(dtype, poison):
    ours = grad_list([dtype] * len(SHAPES))
    if poison is not None:
        ours[2][65540] = poison  # in the third chunk of a multi-chunk tensor
    ref = [g.clone() for g in ours]
    found, ref_found = torch.zeros(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    inv_scale = torch.tensor([1.0 / 3000.0], device=DEVICE)  # not a power of two: rounding is exercised
    ops.unscale_and_check_(ours, inv_scale, found)
    torch._amp_foreach_non_finite_check_and_unscale_(ref, ref_found, inv_scale)
    assert found.item() == ref_found.item() == (0.0 if poison is None else 1.0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.kernel_cases("fasttrain::unscale_and_check_")
def test_unscale_never_clears_found_inf():
    found = torch.ones(1, device=DEVICE)
    ops.unscale_and_check_(grad_list([torch.float32] * len(SHAPES)), torch.tensor(0.5, device=DEVICE),
                           found)
    assert found.item() == 1.0


@pytest.mark.kernel_cases("fasttrain::grad_norm")
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0, 3.0])
def test_grad_norm_matches_vector_norm_over_mixed_dtypes(norm_type):
    tensors = grad_list([torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16])
    ours = ops.grad_norm(tensors, norm_type)
    flat = torch.cat([t.float().flatten() for t in tensors]).double()
    ref = torch.linalg.vector_norm(flat, norm_type).float()
    assert ours.shape == () and ours.dtype == torch.float32
    # fp32 accumulation of ~170k terms: a few ulp of relative error (pow adds a little for p=3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


def test_grad_norm_propagates_non_finite_and_is_thread_count_independent():
    tensors = grad_list([torch.float32] * len(SHAPES))
    torch.set_num_threads(1)
    one = ops.grad_norm(tensors, 2.0)
    torch.set_num_threads(2)
    assert torch.equal(one, ops.grad_norm(tensors, 2.0)), "norm depends on the thread count"
    tensors[2][40000] = float("inf")
    assert ops.grad_norm(tensors, 2.0).item() == float("inf")
    assert ops.grad_norm(tensors, float("inf")).item() == float("inf")
    tensors[4][0, 5] = float("nan")
    assert ops.grad_norm(tensors, 2.0).isnan() and ops.grad_norm(tensors, float("inf")).isnan()
    assert dispatch.grad_norm([]).item() == 0.0


@pytest.mark.kernel_cases("fasttrain::grad_norm_clip")
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize("max_norm", [1.0, 1e6, 0.37])  # clipping, no clipping (divisor 1), odd
def test_grad_norm_clip_matches_reference_over_mixed_dtypes(norm_type, max_norm):
    tensors = grad_list([torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16])
    norm, divisor, found_inf = ops.grad_norm_clip(tensors, norm_type, max_norm)
    ref = grad_norm_clip_reference([t.cpu() for t in tensors], max_norm, norm_type)
    for got in (norm, divisor, found_inf):
        assert got.shape == () and got.dtype == torch.float32 and got.device == tensors[0].device
    assert torch.equal(norm, ops.grad_norm(tensors, norm_type)), "the norm differs from grad_norm's"
    torch.testing.assert_close(norm.cpu(), ref[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(divisor.cpu(), ref[1], rtol=1e-5, atol=0)
    assert found_inf.item() == 0.0
    if max_norm == 1e6:
        assert divisor.item() == 1.0  # under the threshold: nothing is clipped


@pytest.mark.kernel_cases("fasttrain::grad_norm_clip")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_grad_norm_clip_flags_a_non_finite_gradient_anywhere(poison, norm_type, dtype):
    tensors = grad_list([torch.float32, torch.float32, dtype, torch.float32, torch.float32])
    tensors[2][70000] = poison  # the tail of the third chunk of a multi-chunk tensor
    norm, divisor, found_inf = ops.grad_norm_clip(tensors, norm_type, 1.0)
    ref = grad_norm_clip_reference([t.cpu() for t in tensors], 1.0, norm_type)
    assert found_inf.item() == ref[2].item() == 1.0
    assert not torch.isfinite(norm) and not torch.isfinite(divisor)  # the update is skipped anyway
    # NaN anywhere makes both NaN; +-inf alone gives +inf for both
    torch.testing.assert_close(norm.cpu(), ref[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(divisor.cpu(), ref[1], rtol=0, atol=0, equal_nan=True)
    tensors[2][70000] = 0.0
    assert ops.grad_norm_clip(tensors, norm_type, 1.0)[2].item() == 0.0


def test_grad_norm_clip_meta_gives_three_fp32_scalars_on_the_device():
    tensors = [torch.empty(70001, device="meta", dtype=torch.bfloat16), torch.empty(3, 5, device="meta")]
    outs = ops.grad_norm_clip(tensors, 2.0, 1.0)
    assert [(o.shape, o.dtype, o.device.type) for o in outs] == [((), torch.float32, "meta")] * 3
    with pytest.raises(RuntimeError, match=r"grad_norm_clip: max_norm must be > 0.*got 0"):
        ops.grad_norm_clip(tensors, 2.0, 0.0)


def test_grad_norm_clip_fallback_gives_the_op_s_values():
    """Without the library (a plain pip install) the same three values come from torch ops."""
    tensors = grad_list([torch.float32, torch.bfloat16, torch.float32])
    ours = ops.grad_norm_clip(tensors, 2.0, 0.5)
    original = dispatch.implementation
    try:
        dispatch.implementation = lambda op, device_type: "torch"
        fallback = dispatch.grad_norm_clip(tensors, 0.5)
        tensors[0][0] = float("nan")
        assert dispatch.grad_norm_clip(tensors, 0.5)[2].item() == 1.0
    finally:
        dispatch.implementation = original
    for a, b in zip(ours, fallback):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="max_norm=0 must be > 0"):
        dispatch.grad_norm_clip(tensors, 0)


def test_grad_norm_clip_for_a_run_is_the_op_and_takes_torch_for_a_strided_grad():
    """The Trainer's per-run function: the op itself each step; a non-contiguous gradient (the
    op refuses it) gets the same three values from the torch ops instead of an error."""
    tensors = grad_list([torch.float32, torch.bfloat16, torch.float32])
    clip = dispatch.grad_norm_clip_for("cpu", 0.5)
    for a, b in zip(clip(tensors), ops.grad_norm_clip(tensors, 2.0, 0.5)):
        assert torch.equal(a, b)
    strided = [tensors[0].t(), tensors[1], tensors[2]]
    assert not strided[0].is_contiguous()
    with pytest.raises(RuntimeError, match="not contiguous"):
        ops.grad_norm_clip(strided, 2.0, 0.5)
    for a, b in zip(clip(strided), ops.grad_norm_clip(tensors, 2.0, 0.5)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="tensors\\[1\\] has dtype Long"):  # other errors still raise
        clip([tensors[0], torch.ones(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="max_norm=-1.0 must be > 0"):
        dispatch.grad_norm_clip_for("cpu", -1.0)
    assert [t.item() for t in dispatch.grad_norm_clip([], 1.0)] == [0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- contracts
def adamw_args(shapes=((5, 3), (7,)), master=False):
    s = make_state(shapes, torch.bfloat16 if master else torch.float32, master)
    grads = [torch.randn(sh) for sh in shapes]
    return [s["params"], grads, s["exp_avgs"], s["exp_avg_sqs"], s["master_params"],
            s["state_steps"], torch.tensor(1e-3), 0.9, 0.999, 0.01, 1e-8]


@pytest.mark.parametrize("master,extras", [(False, (None, None)),
                                           (True, (torch.tensor(8.0), torch.zeros(1)))])
def test_opcheck_adamw(master, extras):
    torch.library.opcheck(ops.adamw_.default, (*adamw_args(master=master), *extras))


def test_opcheck_unscale_and_grad_norm():
    grads = grad_list([torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32])
    torch.library.opcheck(ops.unscale_and_check_.default, ([g.clone() for g in grads],
                                                           torch.tensor(0.25), torch.zeros(1)))
    for norm_type in (2.0, float("inf")):
        torch.library.opcheck(ops.grad_norm.default, (grads, norm_type))
        torch.library.opcheck(ops.grad_norm_clip.default, (grads, norm_type, 1.0))


def test_ops_trace_under_torch_compile_fullgraph():
    def step(params, grads, exp_avgs, exp_avg_sqs, steps, lr):
        norm = ops.grad_norm(grads, 2.0)
        ops.adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr, 0.9, 0.999, 0.0, 1e-8,
                   None, None)
        return norm

    eager, compiled = adamw_args(), adamw_args()
    compiled_step = torch.compile(step, backend="aot_eager", fullgraph=True)
    for args in (eager, compiled):
        args[1] = [g.clone() for g in eager[1]]
    norm_eager = step(*eager[:4], eager[5], eager[6])
    norm_compiled = compiled_step(*compiled[:4], compiled[5], compiled[6])
    torch.testing.assert_close(norm_compiled, norm_eager, rtol=0, atol=0)
    for a, b in zip(eager[0], compiled[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _mutated(index, fn):
    args = adamw_args()
    args[index] = fn(args[index])
    return args


BAD_ADAMW = {
    "grads has 1 tensors but params has 2": lambda: _mutated(1, lambda g: g[:1]),
    r"exp_avgs\[1\] has shape \[8\] but params\[1\] has shape \[7\]":
        lambda: _mutated(2, lambda m: [m[0], torch.zeros(8)]),
    r"grads\[0\] has dtype Double": lambda: _mutated(1, lambda g: [g[0].double(), g[1]]),
    r"params\[0\] has dtype Int": lambda: _mutated(0, lambda p: [p[0].int(), p[1]]),
    r"exp_avg_sqs\[0\] is not contiguous":
        lambda: _mutated(3, lambda v: [torch.zeros(3, 5).t(), v[1]]),
    r"master_params\[0\] has dtype BFloat16":
        lambda: _mutated(4, lambda _: [torch.zeros(5, 3).bfloat16(), torch.zeros(7).bfloat16()]),
    "master_params has 1 tensors": lambda: _mutated(4, lambda _: [torch.zeros(5, 3)]),
    r"state_steps\[1\] must be a one-element float32":
        lambda: _mutated(5, lambda s: [s[0], torch.zeros((), dtype=torch.int64)]),
    "lr must be a one-element float32": lambda: _mutated(6, lambda _: torch.tensor([1e-3, 1.0])),
    r"betas must lie in \[0, 1\)": lambda: _mutated(8, lambda _: 1.5),
}


@pytest.mark.parametrize("message", list(BAD_ADAMW))
def test_adamw_bad_inputs_are_named(message):
    with pytest.raises(RuntimeError, match=message):
        ops.adamw_(*BAD_ADAMW[message](), None, None)


def test_grad_ops_bad_inputs_are_named():
    with pytest.raises(RuntimeError, match=r"norm_type must be a positive number or inf"):
        ops.grad_norm([torch.ones(3)], 0.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Long"):
        ops.grad_norm([torch.ones(3), torch.ones(3, dtype=torch.long)], 2.0)
    with pytest.raises(RuntimeError, match=r"max_norm must be > 0"):
        ops.grad_norm_clip([torch.ones(3)], 2.0, -1.0)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is not contiguous"):
        ops.unscale_and_check_([torch.ones(4, 3).t()], torch.tensor(1.0), torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"found_inf must be a one-element float32"):
        ops.unscale_and_check_([torch.ones(3)], torch.tensor(1.0), torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"adamw_: grad_scale must be a one-element float32"):
        ops.adamw_(*adamw_args(), torch.tensor(2.0, dtype=torch.float64), None)
