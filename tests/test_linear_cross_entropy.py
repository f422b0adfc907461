"""linear_cross_entropy against the unfused fp32 reference (matmul + cross-entropy), on the CPU
path and with the Triton cross-entropy kernel (interpreter) inside the chunk loop. The
`kernel_cases` run on the GPU too (FASTTRAIN_TEST_DEVICE=cuda, tests/_devices.py)."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fasttrain.kernels import linear_cross_entropy
from fasttrain.kernels._reference import linear_cross_entropy_reference
from tests._allocations import Allocations
from tests._devices import DEVICE

ce_mod = importlib.import_module("fasttrain.kernels.cross_entropy")
flce_mod = importlib.import_module("fasttrain.kernels.linear_cross_entropy")

# fp32: the chunked matmuls sum in a different order than one big matmul
RTOL, ATOL, GATOL = 1e-5, 1e-5, 1e-5


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
    monkeypatch.setattr(flce_mod, "cpu_rows_kernel", lambda: request.param == "cpp")
    # 16-row chunks, so every case here runs several chunks and a ragged last one
    monkeypatch.setattr(flce_mod, "chunk_rows", lambda N, H, V: min(N, 16))
    return request.param


KERNEL_CASES = pytest.mark.kernel_cases(
    "fasttrain::linear_cross_entropy", "fasttrain::linear_cross_entropy_backward",
    "cross_entropy._cross_entropy_kernel")


def _case(lead, H, V, dtype=torch.float32, bias=False, ignore_every=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, V, lead, generator=gen)
    if ignore_every:
        target.view(-1)[::ignore_every] = -100
    on_device = [t if t is None else t.detach().to(DEVICE).requires_grad_()
                 for t in (hidden, weight, b)]
    return (*on_device, target.to(DEVICE))


def _grads(out, inputs, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    return torch.autograd.grad((out * w).sum(), [t for t in inputs if t is not None])


@KERNEL_CASES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_unfused_reference(backend, reduction, bias):
    hidden, weight, b, target = _case((3, 19), 24, 301, bias=bias, ignore_every=4)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    out = linear_cross_entropy(hidden, weight, target, b, **kw)
    ref = linear_cross_entropy_reference(hidden, weight, target, b, **kw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    for g, g_ref in zip(_grads(out, (hidden, weight, b)), _grads(ref, (hidden, weight, b))):
        torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=GATOL)


@KERNEL_CASES
def test_all_ignored(backend):
    hidden, weight, b, target = _case((40,), 8, 33, bias=True)
    target[:] = -100
    out = linear_cross_entropy(hidden, weight, target, b)
    assert torch.equal(out, torch.zeros((), device=DEVICE))
    out.backward()
    for t in (hidden, weight, b):
        assert torch.equal(t.grad, torch.zeros_like(t))


@KERNEL_CASES
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_error_within_torch_half_error(dtype):
    """fp16/bf16 inputs: error against the fp32 reference at most 2x that of torch's own
    half matmul + cross-entropy (compare errors, not values)."""
    hidden, weight, _, target = _case((48,), 32, 257, dtype=dtype, ignore_every=5)
    out = linear_cross_entropy(hidden, weight, target)
    ref = linear_cross_entropy_reference(hidden, weight, target)
    torch_half = F.cross_entropy((hidden @ weight.t()).float(), target)
    g_out = _grads(out, (hidden, weight))
    g_ref = _grads(ref, (hidden, weight))
    g_torch = _grads(torch_half, (hidden, weight))
    assert (out - ref).abs() <= 2 * (torch_half - ref).abs() + 1e-4
    for g, gr, gt in zip(g_out, g_ref, g_torch):
        assert g.dtype == dtype
        assert (g.float() - gr).abs().max() <= 2 * (gt.float() - gr).abs().max() + 1e-4


def test_gpt_call_pattern_and_compile():
    """The built-in GPT calls linear_cross_entropy(h.view(-1, C), lm_head.weight, t.view(-1))."""
    hidden, weight, _, target = _case((2, 9), 16, 67, ignore_every=7)
    C = hidden.shape[-1]
    fn = torch.compile(lambda h, w, t: linear_cross_entropy(h.view(-1, C), w, t.view(-1)),
                       fullgraph=True)
    out = fn(hidden, weight, target)
    ref = linear_cross_entropy_reference(hidden, weight, target)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    out.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref.backward()
    torch.testing.assert_close(gh, hidden.grad, rtol=RTOL, atol=GATOL)
    torch.testing.assert_close(gw, weight.grad, rtol=RTOL, atol=GATOL)


def test_default_chunking_never_builds_full_logits():
    """The logits buffer is one chunk: far fewer rows than tokens at LM shapes."""
    assert flce_mod.chunk_rows(4096, 1024, 65536) <= 512
    assert flce_mod.chunk_rows(8, 1024, 65536) == 8
    hidden, weight, _, target = _case((300,), 8, 4096)
    out = linear_cross_entropy(hidden, weight, target)
    torch.testing.assert_close(out, linear_cross_entropy_reference(hidden, weight, target),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_allocates_no_weight_sized_buffer(reduction):
    """mean: the backward only scales the gradients made in the forward, in place (autograd
    must not hand it zero-filled gradients for the op's gradient outputs: 2x the floor);
    none: it recomputes, so exactly one (V, H) and one (N, H) gradient appear."""
    hidden, weight, _, target = _case((64,), 16, 512)
    loss = linear_cross_entropy(hidden, weight, target, reduction=reduction)
    with Allocations() as allocs:
        loss.sum().backward() if reduction == "none" else loss.backward()
    V, H = weight.shape
    big = [n for n in allocs.sizes if n >= V * H]
    assert big == ([] if reduction == "mean" else [V * H]), allocs.sizes


class _Conversions(TorchDispatchMode):
    """Elements of every dtype conversion (copy_ across dtypes, _to_copy), in order."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default or (
                func is torch.ops.aten.copy_.default and args[0].dtype != args[1].dtype):
            self.sizes.append(out.numel())
        return out


@pytest.mark.parametrize("compiled_rows", [True, False], ids=["cpp_rows", "torch_rows"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_chunks_convert_each_chunk_once_each_way(dtype, compiled_rows, monkeypatch):
    """Half inputs on the CPU (no half matmul with an fp32 output there): the weight-sized
    tensors are the fp32 accumulator, one reused half product buffer and the cast back,
    however many chunks; the only weight-sized conversions are the first product and the cast
    back. The chunk itself: the C++ rows kernel converts each row inside (no chunk-sized
    conversion at all); the torch rows convert each chunk to fp32 once (the softmax math) and
    its gradient back once (for the half GEMMs)."""
    if compiled_rows and not ce_mod.cpu_rows_kernel():
        pytest.skip("the ops library is not built here (bash scripts/build_ops.sh); CI builds it")
    monkeypatch.setattr(flce_mod, "cpu_rows_kernel", lambda: compiled_rows)
    monkeypatch.setattr(ce_mod, "cpu_rows_kernel", lambda: compiled_rows)
    rows = 16
    monkeypatch.setattr(flce_mod, "chunk_rows", lambda N, H, V: min(N, rows))
    monkeypatch.setattr(flce_mod, "CPU_HALF_MIN_ROWS", rows)
    hidden, weight, _, target = _case((64,), 24, 512, dtype=dtype, ignore_every=5)
    V, H = weight.shape
    hidden, weight = hidden.detach(), weight.detach()
    scale = torch.ones((), dtype=torch.float32)
    row_loss = torch.empty(64, dtype=torch.float32)
    with Allocations() as allocs, _Conversions() as conversions:  # inside the opaque op
        grads = flce_mod._flce_chunks(hidden, weight, None, target, -100, 0.0, 0.0, scale,
                                      row_loss, want_grads=True)
    assert [n for n in allocs.sizes if n >= V * H] == [V * H] * 3, allocs.sizes
    chunks = 64 // rows
    per_chunk = [] if compiled_rows else [rows * V] * (2 * chunks)
    assert sorted(n for n in conversions.sizes if n >= rows * V) == per_chunk + [V * H] * 2, conversions.sizes
    assert grads[1].dtype == dtype
    expected = linear_cross_entropy_reference(hidden.float(), weight.float(), target)
    torch.testing.assert_close(row_loss.sum() / (target != -100).sum(), expected, rtol=2e-2, atol=2e-2)


def test_half_chunks_on_cpu_are_long_enough(monkeypatch):
    """Half on the CPU: at least CPU_HALF_MIN_ROWS rows per chunk (fewer (V, H) adds, a
    GEMM with a long K); fp32 keeps the memory rule's chunks."""
    seen = []
    real_ce = flce_mod.ce_rows_
    monkeypatch.setattr(flce_mod, "ce_rows_", lambda x, *a: (seen.append(x.shape[0]), real_ce(x, *a)))
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, _, target = _case((1100,), 8, 4096, dtype=dtype)
        linear_cross_entropy(hidden, weight, target).backward()
    fp32_rows = flce_mod.chunk_rows(1100, 8, 4096)
    assert fp32_rows < flce_mod.CPU_HALF_MIN_ROWS
    assert seen == [fp32_rows] * (1100 // fp32_rows) + [1100 % fp32_rows] + [512, 512, 76]


def test_frozen_weight_and_no_grad():
    hidden, weight, _, target = _case((10,), 8, 21)
    weight.requires_grad_(False)
    out = linear_cross_entropy(hidden, weight, target, reduction="sum")
    out.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, target)
    torch.testing.assert_close(out, linear_cross_entropy_reference(hidden, weight, target))


@pytest.mark.parametrize("change,error,match", [
    (dict(weight=torch.zeros(21, 7)), ValueError, "weight"),
    (dict(target=torch.zeros(9, dtype=torch.long)), ValueError, "leading shape"),
    (dict(weight=torch.zeros(21, 8, dtype=torch.float64)), TypeError, "dtype"),
    (dict(bias=torch.zeros(20)), ValueError, "bias"),
    (dict(reduction="mean_tokens"), ValueError, "reduction"),
    (dict(target=torch.full((10,), 21)), ValueError, "outside"),
])
def test_bad_inputs(change, error, match):
    args = dict(hidden=torch.zeros(10, 8), weight=torch.zeros(21, 8),
                target=torch.zeros(10, dtype=torch.long))
    args.update(change)
    with pytest.raises(error, match=match):
        linear_cross_entropy(**args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_fp32_weight_with_half_hidden_gets_an_unrounded_fp32_gradient(dtype, monkeypatch):
    """Autocast with fp32 master weights: the weight goes in as fp32, the matmuls run in half
    (the same loss and grad_hidden as a half copy of the weight gives), and grad_weight comes
    back in fp32 from the accumulator: no weight-sized conversion around the op (autocast's
    half copy and autograd's cast of the half gradient back to fp32 are gone)."""
    monkeypatch.setattr(flce_mod, "chunk_rows", lambda N, H, V: min(N, 16))  # five chunks: an
    monkeypatch.setattr(flce_mod, "CPU_HALF_MIN_ROWS", 16)  # fp32 sum of half products
    hidden, weight, _, target = _case((6, 11), 24, 300, dtype=dtype, ignore_every=4)
    master = weight.detach().float().requires_grad_()
    half_copy = weight.detach().clone().requires_grad_()
    h_mixed = hidden.detach().clone().requires_grad_()
    with _Conversions() as conversions:
        loss = linear_cross_entropy(h_mixed, master, target)
        loss.backward()
    ref = linear_cross_entropy(hidden, half_copy, target)
    ref.backward()
    assert master.grad.dtype == torch.float32 and h_mixed.grad.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(h_mixed.grad, hidden.grad, rtol=0, atol=0)
    # the half gradient is the fp32 one rounded: equal to half precision, and the fp32 one
    # really carries more bits
    torch.testing.assert_close(master.grad.to(dtype), half_copy.grad, rtol=0, atol=0)
    assert (master.grad != master.grad.to(dtype).float()).any()
    V, H = weight.shape
    assert [n for n in conversions.sizes if n >= V * H] == [], conversions.sizes
    with pytest.raises(TypeError, match="must share a dtype, or the weight and bias be float32"):
        linear_cross_entropy(hidden.float(), half_copy, target)


def test_the_hf_fused_loss_under_autocast_passes_the_fp32_head_weight():
    """fasttrain.ops.loss under bf16 autocast: the HF model's fp32 output embedding goes into
    the kernel as it is, and its gradient arrives in fp32 with no (V, H) half gradient cast
    back by autograd (ToCopyBackward)."""
    transformers = pytest.importorskip("transformers")
    from fasttrain.ops.loss import fused_causal_lm_loss
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    V, H = model.lm_head.weight.shape
    with _Conversions() as conversions:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, count = fused_causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        (loss / count).backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    assert [n for n in conversions.sizes if n >= V * H] == [], conversions.sizes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss / count, expected.float(), rtol=2e-2, atol=2e-2)
