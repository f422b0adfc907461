"""cross_entropy against the fp32 PyTorch reference, on the CPU path and on the Triton kernel
(run by the interpreter: conftest sets TRITON_INTERPRET=1 before kernels are imported).
The `kernel_cases` run on the GPU too (FASTTRAIN_TEST_DEVICE=cuda, tests/_devices.py)."""
import importlib

import pytest
import torch

from fasttrain.kernels import cross_entropy
from fasttrain.kernels._reference import cross_entropy_reference
from tests._allocations import Allocations
from tests._devices import DEVICE

# The package re-exports the function under the module's name, so fetch the module itself.
ce_mod = importlib.import_module("fasttrain.kernels.cross_entropy")

# (loss rtol, loss atol, grad atol): why
TOL = {
    torch.float32: (1e-5, 1e-5, 1e-6),  # fp32 reassociation of the row sums only
    torch.float16: (1e-3, 1e-3, 1e-3),  # gradient stored in fp16: ~2^-11 relative rounding
}


@pytest.fixture(params=["cpp", "torch", "triton"])
def backend(request, monkeypatch):
    """The CPU rows: the C++ kernel (fasttrain::ce_rows_), the chunked torch ops it replaces
    where the ops library is not built, or the Triton kernel under the interpreter."""
    if DEVICE.type == "cuda" and request.param != "triton":
        pytest.skip("CUDA tensors always take the Triton kernel")
    if request.param == "cpp" and not ce_mod.cpu_rows_kernel():
        pytest.skip("the ops library is not built here (bash scripts/build_ops.sh); CI builds it")
    monkeypatch.setattr(ce_mod, "TRITON_ON_CPU", request.param == "triton")
    monkeypatch.setattr(ce_mod, "cpu_rows_kernel", lambda: request.param == "cpp")
    return request.param


KERNEL_CASES = pytest.mark.kernel_cases("fasttrain::cross_entropy",
                                        "cross_entropy._cross_entropy_kernel")


def _case(shape, V, dtype, ignore_every=0, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=gen) * scale).to(dtype).requires_grad_()
    target = torch.randint(0, V, shape, generator=gen)
    if ignore_every:
        target.view(-1)[::ignore_every] = -100
    return logits.detach().to(DEVICE).requires_grad_(), target.to(DEVICE)


def _check(logits, target, tol, **kw):
    rtol, atol, gatol = tol
    out = cross_entropy(logits, target, **kw)
    ref_in = logits.detach().float().requires_grad_()
    ref = cross_entropy_reference(ref_in, target, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (grad,) = torch.autograd.grad((out * w).sum(), logits)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), ref_in)
    assert grad.dtype == logits.dtype
    torch.testing.assert_close(grad.float(), grad_ref, rtol=0, atol=gatol)


@KERNEL_CASES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_odd_shapes(backend, reduction, dtype):
    logits, target = _case((3, 7), 4999, dtype, ignore_every=4)
    _check(logits, target, TOL[dtype], reduction=reduction, label_smoothing=0.1, z_loss=1e-3)


@KERNEL_CASES
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.25, 0.0), (0.0, 1e-2),
                                                    (1.0, 0.0)])
def test_smoothing_and_z_loss(backend, label_smoothing, z_loss):
    logits, target = _case((19,), 781, torch.float32, ignore_every=5)
    _check(logits, target, TOL[torch.float32], label_smoothing=label_smoothing, z_loss=z_loss)


@KERNEL_CASES
@pytest.mark.parametrize("V", [1, 2, 1025])
def test_tiny_and_block_edge_vocab(backend, V):
    logits, target = _case((5,), V, torch.float32)
    _check(logits, target, TOL[torch.float32], reduction="none")


@KERNEL_CASES
def test_extreme_logits(backend):
    logits, target = _case((6,), 1823, torch.float32)
    with torch.no_grad():
        logits[0, :] = 1e4
        logits[1, :] = -1e4
        logits[2, target[2]] = 1e4  # confident and right: loss 0
        logits[3, (target[3] + 1) % 1823] = 1e4  # confident and wrong: loss ~2e4
    out = cross_entropy(logits, target, reduction="none")
    assert torch.isfinite(out).all()
    # lse - x[t] cancels two ~1e4 numbers: fp32 spacing there is ~1e-3, in both implementations
    _check(logits, target, (1e-5, 2e-3, 1e-6), reduction="none")
    _check(logits, target, (1e-5, 2e-3, 1e-6), reduction="mean", z_loss=1e-4)


@KERNEL_CASES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grad(backend, reduction):
    logits, target = _case((4,), 33, torch.float32)
    target[:] = -100
    out = cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    assert torch.equal(out, torch.zeros_like(out))  # torch's mean would be NaN here
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@KERNEL_CASES
def test_custom_ignore_index_and_int32_target(backend):
    logits, target = _case((11,), 97, torch.float32)
    target[3] = 5
    out = cross_entropy(logits, target.int(), ignore_index=5)
    ref = cross_entropy_reference(logits, target, ignore_index=5)
    torch.testing.assert_close(out, ref)


@KERNEL_CASES
def test_bf16_through_fp32_upcast(backend):
    """bf16 logits: the kernel upcasts on load, so its loss matches the fp32 reference on the
    same bf16 values; the bf16 gradient's error may be at most 2x torch's own bf16 rounding."""
    logits, target = _case((9,), 517, torch.bfloat16, ignore_every=3)
    out = cross_entropy(logits, target)
    ref_in = logits.detach().float().requires_grad_()
    ref = cross_entropy_reference(ref_in, target)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.backward()
    ref.backward()
    kernel_err = (logits.grad.float() - ref_in.grad).abs().max()
    torch_err = (ref_in.grad.bfloat16().float() - ref_in.grad).abs().max()
    assert kernel_err <= 2 * torch_err + 1e-9


def test_torch_compile_fullgraph():
    logits, target = _case((4, 5), 301, torch.float32, ignore_every=3)
    fn = torch.compile(lambda x, t: cross_entropy(x, t, label_smoothing=0.1), fullgraph=True)
    out = fn(logits, target)
    out.backward()
    ref_in = logits.detach().clone().requires_grad_()
    ref = cross_entropy_reference(ref_in, target, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(logits.grad, ref_in.grad)


def test_backward_allocates_no_logits_sized_buffer():
    """The backward scales the gradient the forward wrote: no second (N, V) buffer (autograd
    must not hand it a zero-filled gradient for the op's gradient output)."""
    logits = torch.randn(64, 512, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 512, (64,), device=DEVICE)
    loss = cross_entropy(logits, target)
    with Allocations() as allocs:
        loss.backward()
    assert [n for n in allocs.sizes if n >= logits.numel()] == [], allocs.sizes


def test_no_grad_runs_without_gradient_buffers():
    logits, target = _case((4,), 31, torch.float32)
    with torch.no_grad():
        out = cross_entropy(logits, target, reduction="sum")
    torch.testing.assert_close(out, cross_entropy_reference(logits, target, reduction="sum"))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(target=torch.zeros(4)), TypeError, "int64"),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(target=torch.tensor([0, 1, 31, 2])), ValueError, "outside"),
    (dict(logits=torch.zeros(4, 31, dtype=torch.float64)), TypeError, "dtype"),
])
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    args = dict(logits=torch.zeros(4, 31), target=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        cross_entropy(**args)


@pytest.mark.kernel_cases("fasttrain::ce_rows_")
def test_cpu_default_runs_the_cpp_rows_kernel_in_place():
    """With the ops library loaded (as `import fasttrain` does, and CI builds it) the CPU rows
    are one C++ op that writes the gradient over the logits: no fp32 copy of the chunk, no
    log_softmax/exp/scatter chain."""
    if not ce_mod.cpu_rows_kernel():
        pytest.skip("the ops library is not built here (bash scripts/build_ops.sh); CI builds it")
    from tests._dispatch_count import OpCounter
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 300, generator=gen).bfloat16()
    target = torch.randint(0, 300, (24,), generator=gen)
    target[::5] = -100
    expected = torch.empty(24, 300)
    expected_loss = torch.empty(24)
    ce_mod._ce_rows_cpu_(logits, target, expected, expected_loss, torch.tensor(0.5), -100, 0.1, 1e-3)
    loss = torch.empty(24)
    with OpCounter() as counter:
        ce_mod.ce_rows_(logits, target, logits, loss, torch.tensor(0.5), -100, 0.1, 1e-3)
    assert counter.ops["fasttrain.ce_rows_.default"] == 1
    assert not [op for op in counter.ops if "log_softmax" in op or "exp" in op or "_to_copy" in op], counter.ops
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.float(), expected.bfloat16().float(), rtol=0, atol=2e-3)
    assert logits[::5].eq(0).all()  # ignored rows: zero gradient


@pytest.mark.kernel_cases("fasttrain::ce_rows_")
@pytest.mark.parametrize("bad, message", [
    (dict(loss=torch.empty(4, dtype=torch.float64)), "loss must be a contiguous float32"),
    (dict(target=torch.zeros(3, dtype=torch.long)), r"target must have shape \(4,\)"),
    (dict(grad=torch.empty(4, 7)), "grad must be contiguous with the logits' shape"),
    (dict(target=torch.tensor([0, 1, 9, -100])), r"target\[2\] = 9 is outside \[0, 8\)"),
])
def test_cpp_rows_kernel_names_a_bad_argument(bad, message):
    if not ce_mod.cpu_rows_kernel():
        pytest.skip("the ops library is not built here (bash scripts/build_ops.sh); CI builds it")
    args = dict(logits=torch.randn(4, 8), target=torch.zeros(4, dtype=torch.long), grad=None,
                loss=torch.empty(4), scale=torch.tensor(1.0))
    args.update(bad)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fasttrain.ce_rows_(args["logits"], args["target"], args["grad"], args["loss"], args["scale"],
                                     -100, 0.0, 0.0)
