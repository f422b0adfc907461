"""kernels/unscale.py under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)
against the fp32 PyTorch reference. The sm_80/sm_90 compile, vector-load and spill checks
come from COMPILE_SPECS via tests/test_kernel_compile.py. The `kernel_cases` run on the GPU
too (FASTTRAIN_TEST_DEVICE=cuda, tests/_devices.py)."""
import pytest
import torch

from fasttrain.kernels import unscale as K
from fasttrain.kernels._reference import unscale_and_check_reference_
from tests._devices import DEVICE, INTERPRETED

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Largest allowed |kernel - reference| in units of the dtype's spacing (ulp) at the value.
# Power-of-two scales are exact in every dtype; for other scales fp32 and fp16 round the
# same fp32 product the same way; the interpreter truncates fp32 -> bf16 (NOTES.md) where
# torch rounds, so bf16 may differ by one ulp there (compiled Triton rounds: exact).
ULP_TOLERANCE = {torch.float32: 0, torch.float16: 0, torch.bfloat16: 1 if INTERPRETED else 0}
KERNEL_CASES = pytest.mark.kernel_cases("unscale._unscale_kernel")
SIZES = [1, 7, K.BLOCK - 1, K.BLOCK, K.BLOCK + 1, 3 * K.BLOCK + 5]


def _grads(dtype, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen) * 1000).to(DEVICE, dtype) for n in sizes]


def _run(grads, inv_scale, found_inf=None):
    found_inf = torch.zeros(()) if found_inf is None else found_inf
    found_inf = found_inf.to(DEVICE)
    inv_scale = inv_scale if inv_scale is None else inv_scale.to(DEVICE)
    K.unscale_and_check_(grads, inv_scale, found_inf)
    return found_inf


def _assert_close_ulp(out, ref, dtype):
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=torch.finfo(dtype).tiny)
    err = (out.float() - ref.float()).abs()
    assert (err <= ULP_TOLERANCE[dtype] * ulp).all(), f"max error {err.max()} ({dtype})"


@KERNEL_CASES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inv", [2.0**-16, 1.0 / 3.0])
def test_unscale_matches_reference(dtype, inv):
    grads, ref = _grads(dtype), _grads(dtype)
    inv_scale = torch.tensor(inv, device=DEVICE)
    found = _run(grads, inv_scale)
    ref_found = torch.zeros((), device=DEVICE)
    unscale_and_check_reference_(ref, inv_scale, ref_found)
    assert found.item() == ref_found.item() == 0.0
    for out, expect in zip(grads, ref):
        if inv == 2.0**-16:
            assert torch.equal(out, expect)
        else:
            _assert_close_ulp(out, expect, dtype)


@KERNEL_CASES
def test_odd_2d_shape():
    g = torch.randn(181, 97, device=DEVICE)
    ref = g.clone() * 0.125
    found = _run([g], torch.tensor(0.125))
    assert torch.equal(g, ref) and found.item() == 0.0


@KERNEL_CASES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_found(dtype, bad):
    sizes = [1, K.BLOCK + 1, 2 * K.BLOCK + 5]
    # first element, last of a full block, the lone tail element, last of a longer tail
    for tensor, index in [(0, 0), (1, K.BLOCK - 1), (1, K.BLOCK), (2, 2 * K.BLOCK + 4)]:
        grads = _grads(dtype, sizes)
        grads[tensor][index] = bad
        assert _run(grads, None).item() == 1.0, (tensor, index)
    assert _run(_grads(dtype, sizes), torch.tensor(0.5)).item() == 0.0


@KERNEL_CASES
@pytest.mark.parametrize("dtype", DTYPES)
def test_extremes_are_finite(dtype):
    info = torch.finfo(dtype)
    g = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, 0.0, -0.0], dtype=dtype,
                     device=DEVICE)
    expect = (g.float() * 2.0**-16).to(dtype)
    assert _run([g], torch.tensor(2.0**-16)).item() == 0.0
    assert torch.equal(g, expect)


@KERNEL_CASES
def test_check_only_writes_nothing_and_flag_is_never_cleared():
    grads = _grads(torch.float32)
    before = [g.clone() for g in grads]
    found = _run(grads, None, torch.ones(()))
    assert found.item() == 1.0, "a clean pass must not clear a flag set earlier"
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


@KERNEL_CASES
def test_misaligned_views_and_mixed_dtypes():
    buf = torch.randn(2 * K.BLOCK + 3, device=DEVICE)
    view = buf[1:]  # 4-byte offset: takes the launch without the 16-byte alignment hint
    assert view.data_ptr() % 16 != 0
    half = torch.randn(K.BLOCK + 9, device=DEVICE).half()
    expect_view, expect_half = view * 0.25, (half.float() * 0.25).half()
    found = _run([view, half], torch.tensor(0.25))
    assert found.item() == 0.0
    assert torch.equal(view, expect_view) and torch.equal(half, expect_half)
    view[-1] = float("nan")
    assert _run([view], None).item() == 1.0


@KERNEL_CASES
def test_neighbours_of_a_view_untouched():
    buf = torch.randn(3 * K.BLOCK, device=DEVICE)
    before = buf.clone()
    _run([buf[K.BLOCK + 4: 2 * K.BLOCK - 3]], torch.tensor(0.5))
    assert torch.equal(buf[: K.BLOCK + 4], before[: K.BLOCK + 4])
    assert torch.equal(buf[2 * K.BLOCK - 3:], before[2 * K.BLOCK - 3:])
    inside = slice(K.BLOCK + 4, 2 * K.BLOCK - 3)
    assert torch.equal(buf[inside], before[inside] * 0.5)


def test_block_table_maps_every_block_once():
    sizes = [5, K.BLOCK, K.BLOCK + 1, 1]
    table = K._block_table(sizes, torch.device("cpu"))
    expect = [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    assert [tuple(r) for r in table.tolist()] == expect
    assert K._block_table(sizes, torch.device("cpu")) is table  # cached


def test_empty_list_and_empty_tensors():
    found = _run([], torch.tensor(0.5))
    assert _run([torch.empty(0)], torch.tensor(0.5)).item() == found.item() == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(found_inf=torch.zeros((), dtype=torch.float64)), "found_inf must be"),
    (dict(inv_scale=torch.tensor(0.5, dtype=torch.float64)), "inv_scale must be"),
    (dict(grads=[torch.randn(4, 4).t()]), "not contiguous"),
    (dict(grads=[torch.ones(3, dtype=torch.int32)]), "dtype"),
])
def test_bad_inputs(kwargs, match):
    args = dict(grads=[torch.randn(3)], inv_scale=torch.tensor(0.5), found_inf=torch.zeros(()))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        K.unscale_and_check_(args["grads"], args["inv_scale"], args["found_inf"])


def test_compile_specs_cover_every_dtype_and_mode():
    names = {spec["name"] for spec in K.COMPILE_SPECS}
    assert names == {f"unscale {d} {m}" for d in ("fp32", "bf16", "fp16")
                     for m in ("unscale", "check-only")}
