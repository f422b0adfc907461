"""fasttrain.ops.dispatch: one implementation per op per device, each against its reference,
and the clipping the Trainer runs against torch.nn.utils.clip_grad_norm_."""
import pytest
import torch

from fasttrain.kernels._reference import grad_norm_reference
from fasttrain.ops import dispatch, native
from tests._dispatch_count import LOCAL_SCALAR_DENSE, counting

SHAPES = [(257, 131), (1,), (70001,), (3, 5, 7)]


@pytest.fixture(params=["c++", "torch"])
def impl(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(native, "_loaded", False)  # as if the library were not built
    elif not native.available():
        pytest.skip("the C++ ops library is not built (bash scripts/build_ops.sh)")
    assert dispatch.implementation("grad_norm", "cpu") == request.param
    return request.param


def _params(dtypes, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, dtype in zip(SHAPES, dtypes):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * scale).to(dtype)
        params.append(p)
    return params


def test_each_device_has_one_implementation_per_op(monkeypatch):
    monkeypatch.setattr(native, "_loaded", True)
    monkeypatch.setattr(native, "_registered", lambda op, device: device == "cpu" or op == "grad_norm")
    assert dispatch.implementation("adamw_", "cuda") == "triton"
    assert dispatch.implementation("unscale_and_check_", "cuda") == "triton"
    assert dispatch.implementation("grad_norm", "cuda") == "c++"
    assert {dispatch.implementation(op, "cpu") for op in ("adamw_", "unscale_and_check_",
                                                          "grad_norm")} == {"c++"}
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)  # CUDA torch, no Triton
    assert dispatch.implementation("adamw_", "cuda") == "torch"
    assert dispatch.implementation("unscale_and_check_", "cuda") == "torch"


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipped, and left alone (coefficient 1)
def test_clip_matches_torch_fp32(impl, max_norm):
    ours, ref = _params([torch.float32] * 4), _params([torch.float32] * 4)
    norm = dispatch.clip_grad_norm_(ours, max_norm)
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert norm.dtype == torch.float32 and norm.shape == ()
    # summation order differs (chunked fp32 partials vs torch's per-tensor norms): a few ulp
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-6, atol=1e-12)


def test_clip_mixed_dtypes_uses_an_fp32_norm(impl):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    params = _params(dtypes)
    grads = [p.grad.clone() for p in params]
    norm = dispatch.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(norm, grad_norm_reference(grads), rtol=1e-6, atol=0)
    coef = 1.0 / (norm.item() + 1e-6)
    for p, g in zip(params, grads):  # the multiply in fp32, rounded once to the grad's dtype
        assert p.grad.dtype == g.dtype
        assert torch.equal(p.grad, (g.float() * torch.tensor(coef, dtype=torch.float32)).to(g.dtype))


def test_clip_with_a_non_finite_grad_returns_a_non_finite_norm(impl):
    params = _params([torch.float32] * 4)
    params[2].grad[12345] = float("inf")
    assert dispatch.clip_grad_norm_(params, 1.0).item() == float("inf")
    params[0].grad[3, 4] = float("nan")
    assert dispatch.clip_grad_norm_(params, 1.0).isnan()


def test_clip_skips_params_without_grads_and_handles_none_at_all(impl):
    params = _params([torch.float32] * 4)
    params[1].grad = None
    grads = [p.grad.clone() for p in params if p.grad is not None]
    torch.testing.assert_close(dispatch.clip_grad_norm_(params, 1.0), grad_norm_reference(grads),
                               rtol=1e-6, atol=0)
    assert dispatch.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0).item() == 0.0


def test_clip_dispatches_fewer_ops_than_torch_and_never_reads_on_the_host():
    if not native.available():
        pytest.skip("the C++ ops library is not built (bash scripts/build_ops.sh)")
    params = _params([torch.float32] * 4)
    dispatch.clip_grad_norm_(params, 1.0)  # creates the per-device scratch flag once
    counts = {}
    for name, clip in (("ours", dispatch.clip_grad_norm_),
                       ("torch", torch.nn.utils.clip_grad_norm_)):
        with counting() as counter:
            clip(params, 1.0)
        counts[name] = counter.ops
    assert LOCAL_SCALAR_DENSE not in counts["ours"]
    # the norm is one op (fasttrain::grad_norm), the multiply one (fasttrain::unscale_and_check_)
    ours_native = sum(n for op, n in counts["ours"].items() if op.startswith("fasttrain."))
    assert ours_native == 2, counts["ours"]
    assert sum(counts["ours"].values()) < sum(counts["torch"].values()), counts


def test_grad_norm_rejects_a_bad_norm_type_and_several_devices():
    with pytest.raises(ValueError, match="norm_type=-1.0 must be a positive number or inf"):
        dispatch.grad_norm([torch.ones(3)], -1.0)
    meta = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match="several devices"):
        dispatch.grad_norm([torch.ones(3), meta])
