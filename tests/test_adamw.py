"""FusedAdamW against torch.optim.AdamW and the fp32 reference, through each implementation
fasttrain.ops.dispatch can pick: the C++ op (CPU), torch's fused op (CPU without the library)
and the Triton kernel (interpreter: conftest sets TRITON_INTERPRET=1). The
`kernel_cases` run on the GPU too (FASTTRAIN_TEST_DEVICE=cuda, tests/_devices.py)."""
import copy
import importlib

import pytest
import torch

from fasttrain.ops import dispatch, native
from fasttrain.kernels._reference import adamw_reference_
from fasttrain.optim.adamw import FusedAdamW
from tests._devices import DEVICE, INTERPRETED

adamw_kernels = importlib.import_module("fasttrain.kernels.adamw")

SHAPES = [(37, 5), (3001,), (1,), (2048,), (2, 1025)]  # odd sizes and block edges
STEPS = 15
# fp32: torch's for-loop AdamW uses fp64 bias corrections and lerp; the kernel fp32 exp2
FP32_TOL = dict(rtol=1e-5, atol=2e-6)
KERNEL_CASES = pytest.mark.kernel_cases("adamw._adamw_kernel")


@pytest.fixture(params=["c++", "torch", "triton"])
def backend(request, monkeypatch):
    if DEVICE.type == "cuda" and request.param != "triton":
        pytest.skip("CUDA tensors always take the Triton kernel")
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", request.param == "triton")
    if request.param == "torch":
        monkeypatch.setattr(native, "_loaded", False)  # as if the library were not built
    elif request.param == "c++" and not native.available():
        pytest.skip("the C++ ops library is not built (bash scripts/build_ops.sh)")
    assert dispatch.implementation("adamw_", DEVICE.type) == request.param
    return request.param


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype)) for s in SHAPES]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(DEVICE) for p in params]


def _rounded(master, dtype, backend):
    """master in the param dtype. The interpreter truncates fp32->bf16 (the compiled kernel
    rounds to nearest, checked in PTX by tests/test_kernel_compile.py), so mirror it there."""
    if INTERPRETED and backend == "triton" and dtype == torch.bfloat16:
        return (master.view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return master.to(dtype)


def _groups(params, lr):
    return [{"params": params[:3], "weight_decay": 0.1},
            {"params": params[3:], "weight_decay": 0.0, "lr": lr * 0.5}]


@KERNEL_CASES
def test_fp32_matches_torch_adamw_with_device_lr_schedule(backend):
    ours, ref = _params(), _params()
    lr = torch.tensor(1e-2, device=DEVICE)  # a device LR updated in place, as the trainer's schedule does
    opt = FusedAdamW(_groups(ours, lr), lr=lr, betas=(0.8, 0.99), weight_decay=0.1)
    opt.param_groups[1]["lr"] = 5e-3  # a Python float in the second group
    torch_opt = torch.optim.AdamW(_groups(ref, 1e-2), lr=1e-2, betas=(0.8, 0.99),
                                  foreach=False)
    torch_opt.param_groups[1]["lr"] = 5e-3
    for step in range(STEPS):
        lr.fill_(1e-2 * (1 - step / STEPS))
        torch_opt.param_groups[0]["lr"] = 1e-2 * (1 - step / STEPS)
        for p, q, g in zip(ours, ref, _grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, **FP32_TOL)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch_opt.state[q]["exp_avg_sq"],
                                   **FP32_TOL)
    assert float(opt.state[ours[0]]["step"]) == STEPS


@KERNEL_CASES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_follow_fp32_adamw(backend, dtype):
    """The fp32 master follows torch's fp32 AdamW fed the same (half) gradients; the
    parameter is exactly the master rounded to its dtype."""
    ours = _params(dtype)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = FusedAdamW(ours, lr=1e-2, master_weights=True)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(STEPS):
        for p, q, g in zip(ours, ref, _grads(ours, step)):
            p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, ref):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(master, q.detach(), **FP32_TOL)
        assert torch.equal(p.detach(), _rounded(master, dtype, backend))


@KERNEL_CASES
def test_half_params_without_master_round_each_step(backend):
    """No master: fp32 math on the rounded parameter each step, as the reference does.
    fp16, because the interpreter truncates fp32->bf16 and truncation drifts over steps."""
    ours = _params(torch.float16)
    ref = [p.detach().clone() for p in ours]
    ref_m = [torch.zeros_like(p, dtype=torch.float32) for p in ref]
    ref_v = [torch.zeros_like(m) for m in ref_m]
    ref_steps = [torch.zeros((), device=DEVICE) for _ in ref]
    opt = FusedAdamW(ours, lr=1e-2)
    for step in range(10):
        grads = [g.half() for g in _grads(ours, step)]
        for p, g in zip(ours, grads):
            p.grad = g
        opt.step()
        adamw_reference_(ref, grads, ref_m, ref_v, [], ref_steps, 1e-2, 0.9, 0.999, 1e-2, 1e-8)
    for p, q in zip(ours, ref):
        # Where the fp32 results straddle an fp16 rounding boundary one side flips by an ulp
        # and that element's trajectory drifts by a few ulps: rare, and never far.
        diff = (p.detach().float() - q.float()).abs()
        ulp = torch.finfo(torch.float16).eps * q.float().abs().clamp(min=2 ** -14)
        assert (diff <= 4 * ulp).all()
        assert (diff > 0).float().mean() <= 0.01


@KERNEL_CASES
def test_found_inf_skips_everything_and_grad_scale_divides(backend):
    ours = _params(torch.float16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = FusedAdamW(ours, lr=1e-2, master_weights=True)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    scale = torch.tensor(1024.0, device=DEVICE)
    for step in range(6):
        grads = _grads(ours, step)
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = (g * 1024).half(), (g * 1024).half().float() / 1024
        before = [t.clone() for p in ours for t in (p.detach(), *opt.state[p].values())] \
            if step else []
        grad_copies = [p.grad.clone() for p in ours]
        skip = step in (2, 4)
        opt.step(grad_scale=scale, found_inf=torch.tensor(1.0 if skip else 0.0, device=DEVICE))
        if skip:
            after = [t for p in ours for t in (p.detach(), *opt.state[p].values())]
            assert all(torch.equal(a, b) for a, b in zip(before, after))
        else:
            torch_opt.step()
        assert all(torch.equal(p.grad, c) for p, c in zip(ours, grad_copies))  # not in place
    assert float(opt.state[ours[0]]["step"]) == 4
    for p, q in zip(ours, ref):
        torch.testing.assert_close(opt.state[p]["master_param"], q.detach(), **FP32_TOL)


def test_torch_grad_scaler_drives_it_without_sync(backend):
    """torch.amp.GradScaler sets optimizer.grad_scale / found_inf for amp-aware optimizers."""
    model = torch.nn.Linear(8, 3)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(4, 8)
    scaler.scale(model(x).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    w0 = model.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight.detach(), w0) and float(opt.state[model.weight]["step"]) == 0
    assert scaler.get_scale() == 128.0
    opt.zero_grad()
    scaler.scale(model(x).sum()).backward()
    scaler.step(opt)
    assert not torch.equal(model.weight.detach(), w0)


def test_state_dict_round_trips_with_torch_adamw(backend):
    ours, ref = _params(), _params()
    opt = FusedAdamW(ours, lr=1e-2)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(3):
        for p, q, g in zip(ours, ref, _grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].dim() == 0
    # ours -> torch and torch -> ours, then both continue in lockstep with the originals
    other_torch = torch.optim.AdamW(_params(), lr=1e-2, foreach=False)
    other_ours = FusedAdamW(_params(), lr=1e-2)
    # deep copies, as a checkpoint round trip gives: torch's load aliases the tensors it gets
    other_torch.load_state_dict(copy.deepcopy(sd))
    other_ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for p, q in zip(other_torch.param_groups[0]["params"], ours):
        p.data.copy_(q.detach())
    for p, q in zip(other_ours.param_groups[0]["params"], ref):
        p.data.copy_(q.detach())
    for step in range(3, 6):
        grads = _grads(ours, step)
        for o in (opt, torch_opt, other_torch, other_ours):
            for p, g in zip(o.param_groups[0]["params"], grads):
                p.grad = g.clone()
            o.step()
    for a, b, c, d in zip(ours, ref, other_torch.param_groups[0]["params"],
                          other_ours.param_groups[0]["params"]):
        torch.testing.assert_close(c, a, **FP32_TOL)
        torch.testing.assert_close(d, b, **FP32_TOL)


def test_master_weights_state_loads_from_torch_state():
    ours = _params(torch.bfloat16)
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ours])
    for p in torch_opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    torch_opt.step()
    opt = FusedAdamW(ours, master_weights=True)
    opt.load_state_dict(torch_opt.state_dict())
    state = opt.state[ours[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["master_param"].dtype == torch.float32
    assert torch.equal(state["master_param"], ours[0].detach().float())


def test_one_triton_launch_per_dtype_group(monkeypatch):
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    launches = []
    real = adamw_kernels._launch
    monkeypatch.setattr(adamw_kernels, "_launch",
                        lambda group, *a: launches.append(len(group)) or real(group, *a))
    params = _params() + _params(torch.bfloat16)
    for p in params:
        p.grad = torch.ones_like(p)
    FusedAdamW(params, lr=1e-3).step()
    assert sorted(launches) == [len(SHAPES), len(SHAPES)]


def test_cpu_dispatches_to_compiled_op_when_available(monkeypatch):
    if not native.available():
        pytest.skip("the C++ ops library is not built (bash scripts/build_ops.sh)")
    calls = []
    real = torch.ops.fasttrain.adamw_
    monkeypatch.setattr(torch.ops.fasttrain, "adamw_", lambda *a: calls.append(a) or real(*a))
    params = [p.cpu() for p in _params()]
    for p in params:
        p.grad = torch.ones_like(p)
    FusedAdamW(params).step()
    assert len(calls) == 1 and len(calls[0]) == 13 and calls[0][6].dtype == torch.float32


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(lr=torch.tensor([1e-3, 1e-3])), "0-d"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedAdamW(_params(), **kwargs)


def test_amsgrad_state_is_rejected():
    opt = FusedAdamW(_params())
    opt.param_groups[0]["amsgrad"] = True
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()


def test_the_pointer_tables_are_copied_once_for_the_same_tensors(monkeypatch):
    """A loop that keeps its gradients (a CUDA graph's, or zeroed in place) pays no host-to-
    device table copy after its first step; other tensors get their own table."""
    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    monkeypatch.setattr(adamw_kernels, "_block_tables", {})  # earlier tests' tables: not this one's
    monkeypatch.setattr(adamw_kernels, "_row_tables", {})
    copies = []
    real = adamw_kernels._to_device
    monkeypatch.setattr(adamw_kernels, "_to_device", lambda host, device: copies.append(host.shape) or real(host, device))
    params = _params()
    for p in params:
        p.grad = torch.ones_like(p)
    opt = FusedAdamW(params, lr=1e-3)
    opt.step()
    first = len(copies)
    assert first == 2  # the (tensor, block) table and the pointer table
    opt.step()
    opt.step()
    assert len(copies) == first
    for p in params:
        p.grad = torch.ones_like(p) * 2  # new gradient tensors: a new pointer table
    opt.step()
    assert len(copies) == first + 1 and torch.isfinite(torch.cat([p.detach().flatten() for p in params])).all()
