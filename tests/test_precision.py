"""fasttrain.precision.mixed: DynamicLossScaler against torch.amp.GradScaler and against a plain
Python model of its update rule; skipping with real optimizers; checkpoints; the autocast
policy; bf16 parameters."""
import io
import random

import pytest
import torch

from fasttrain.ops import dispatch, native
from fasttrain.ops.dispatch import unscale_and_check_
from fasttrain.precision.mixed import (DynamicLossScaler, TrainingDivergedError, autocast_context,
                                       cast_floating_params_, needs_loss_scaler)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead; conftest restores


def reference_update(s: dict, found: bool, cfg: dict) -> dict:
    """The update rule of docs/precision.md in plain Python (host floats)."""
    s = dict(s)
    at_min = s["scale"] <= cfg["min_scale"]
    if found:
        s["skipped"] += 1
        s["growth"] = 0
        s["hysteresis"] -= 1
        s["at_min"] += int(at_min)
        if s["hysteresis"] <= 0:
            s["scale"] = max(s["scale"] * cfg["backoff_factor"], cfg["min_scale"])
        s["hysteresis"] = max(s["hysteresis"], 0)
    else:
        s["growth"] += 1
        if s["growth"] >= cfg["growth_interval"]:
            s["growth"], s["hysteresis"], s["at_min"] = 0, cfg["hysteresis"], 0
            s["scale"] = min(s["scale"] * cfg["growth_factor"], cfg["max_scale"])
    return s


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _backward(model, scaler, bad=None):
    """Scaled backward of a fixed batch; `bad` puts that value into one gradient."""
    x = torch.linspace(-1, 1, 32).reshape(4, 8).to(next(model.parameters()).dtype)
    scaler.scale(model(x).float().pow(2).mean()).backward()
    if bad is not None:
        model[2].weight.grad[0, 3] = bad


def _iteration(model, opt, scaler, bad=None):
    _backward(model, scaler, bad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def _pattern(n, p, seed):
    rng = random.Random(seed)
    return [rng.choice([float("nan"), float("inf"), float("-inf")]) if rng.random() < p else None
            for _ in range(n)]


@pytest.mark.parametrize("fused", [False, True], ids=["sgd-host-skip", "fused-adamw-device-skip"])
def test_scale_sequence_and_weights_equal_gradscaler(fused):
    make_opt = ((lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)) if fused
                else (lambda m: torch.optim.SGD(m.parameters(), lr=1e-2)))
    ours, theirs = _model(), _model()
    opt_ours, opt_theirs = make_opt(ours), make_opt(theirs)
    # Clamps out of reach: GradScaler has none.
    scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=3, min_scale=2.0**-60,
                               max_scale=2.0**60)
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    scales = []
    for step, bad in enumerate(_pattern(150, 0.3, seed=1)):
        _iteration(ours, opt_ours, scaler, bad)
        _iteration(theirs, opt_theirs, reference, bad)
        scales.append(scaler.get_scale())
        assert scales[-1] == reference.get_scale(), step
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a, b), step
    assert scaler.state_dict()["_growth_tracker"] == reference.state_dict()["_growth_tracker"]
    assert len(set(scales)) > 5  # the pattern both grows and backs off


CONFIGS = [
    dict(growth_interval=4, hysteresis=1, min_scale=1.0, max_scale=2.0**24),
    dict(growth_interval=3, hysteresis=3, min_scale=1.0, max_scale=2.0**24),
    dict(growth_interval=2, hysteresis=2, min_scale=2.0**12, max_scale=2.0**18),
    dict(growth_interval=5, hysteresis=1, min_scale=2.0**15, max_scale=2.0**17,
         backoff_factor=0.25, growth_factor=4.0),
]


@pytest.mark.parametrize("cfg", CONFIGS,
                         ids=lambda c: f"h{c['hysteresis']}-i{c['growth_interval']}")
def test_update_matches_reference_rule(cfg):
    full = {"growth_factor": 2.0, "backoff_factor": 0.5, **cfg}
    scaler = DynamicLossScaler(init_scale=2.0**16, **full, max_overflows_at_min_scale=10**6)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.0)
    state = dict(scale=2.0**16, growth=0, hysteresis=cfg["hysteresis"], skipped=0, at_min=0)
    for step, bad in enumerate(_pattern(300, 0.35, seed=2)):
        scaler.scale(p.sum()).backward()
        if bad is not None:
            p.grad[1] = bad
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        state = reference_update(state, bad is not None, full)
        sd = scaler.state_dict()
        got = dict(scale=sd["scale"], growth=sd["_growth_tracker"],
                   hysteresis=sd["_hysteresis_tracker"], skipped=sd["_skipped_steps"],
                   at_min=sd["_overflows_at_min_scale"])
        assert got == state, step
        assert full["min_scale"] <= got["scale"] <= full["max_scale"]


def _drive(scaler, found_pattern):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    scales = []
    for found in found_pattern:
        _iteration_param(p, opt, scaler, float("inf") if found else None)
        scales.append(scaler.get_scale())
    return scales


def _iteration_param(p, opt, scaler, bad):
    scaler.scale(p.sum()).backward()
    if bad is not None:
        p.grad[0] = bad
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def test_growth_after_exactly_the_interval_and_max_clamp():
    scaler = DynamicLossScaler(init_scale=2.0**20, growth_interval=4, max_scale=2.0**21 + 1)
    assert _drive(scaler, [0] * 9) == [2.0**20] * 3 + [2.0**21] * 4 + [2.0**21 + 1] * 2


def test_hysteresis_skips_then_backs_off_and_refills_on_growth():
    scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=2, hysteresis=2)
    scales = _drive(scaler, [1, 0, 1, 1, 0, 0, 1, 1])
    assert scales == [2.0**10, 2.0**10, 2.0**9, 2.0**8, 2.0**8, 2.0**9, 2.0**9, 2.0**8]
    assert scaler.state_dict()["_skipped_steps"] == 5


def test_min_clamp_and_divergence_detection():
    scaler = DynamicLossScaler(init_scale=8.0, min_scale=2.0, growth_interval=3,
                               max_overflows_at_min_scale=3)
    scales = _drive(scaler, [1, 1, 1, 1])  # 8 -> 4 -> 2 -> floor, 2 overflows at the floor
    assert scales == [4.0, 2.0, 2.0, 2.0]
    scaler.check_divergence()
    _drive(scaler, [0, 0, 0])  # growth leaves the floor and resets the count
    assert scaler.get_scale() == 4.0
    scaler.check_divergence()
    _drive(scaler, [1, 1, 1, 0])  # 4 -> 2, then two overflows at the floor; clean steps
    assert not bool(scaler.diverged())  # short of growth_interval do not reset the count
    _drive(scaler, [1])
    assert bool(scaler.diverged())
    with pytest.raises(TrainingDivergedError, match="min_scale=2.0.*bf16"):
        scaler.check_divergence()


def test_nan_loss_forever_is_detected_as_divergence():
    scaler = DynamicLossScaler()  # defaults: 2**16 down to 1.0 in 16 backoffs, then 5 more
    _drive(scaler, [1] * 20)
    scaler.check_divergence()
    _drive(scaler, [1])
    with pytest.raises(TrainingDivergedError):
        scaler.check_divergence()


def _adamw_state(opt):
    return {k: v.clone() for st in opt.state.values() for k, v in st.items()}


def _fused_adamw(model, master=False):
    from fasttrain.optim.adamw import FusedAdamW

    if master:
        cast_floating_params_(model, torch.bfloat16)
    return FusedAdamW(model.parameters(), lr=1e-2, master_weights=master)


OPTIMIZERS = {
    "torch-fused-adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True),
    "fasttrain-fused-adamw": _fused_adamw,
    "fasttrain-bf16-master-weights": lambda m: _fused_adamw(m, master=True),
}


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_overflow_skips_fused_optimizer_without_host_sync(make_opt):
    from tests._dispatch_count import LOCAL_SCALAR_DENSE, OpCounter
    model = _model()
    opt = make_opt(model)
    scaler = DynamicLossScaler(init_scale=2.0**8)
    _iteration(model, opt, scaler)
    params = [p.detach().clone() for p in model.parameters()]
    moments = _adamw_state(opt)
    # every host read, from Python or C++, reaches aten._local_scalar_dense
    with OpCounter() as counter:
        _backward(model, scaler, bad=float("nan"))
        scaler.unscale_(opt)  # the trainer's path: unscale, clip, step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        flag = scaler.found_inf_flag()
    assert counter.ops[LOCAL_SCALAR_DENSE] == 0, dict(counter.ops)
    assert flag.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    after = _adamw_state(opt)
    assert after.keys() == moments.keys()
    assert all(torch.equal(after[k], moments[k]) for k in moments)  # incl. the step counter
    assert scaler.get_scale() == 2.0**7 and scaler.log_state()["skipped_steps"].item() == 1


class _KwargsOptimizer(torch.optim.SGD):
    """The FusedAdamW contract: step(grad_scale=..., found_inf=...), skipping on the flag."""
    _step_supports_amp_scaling = True

    def step(self, closure=None, grad_scale=None, found_inf=None):
        self.calls.append((grad_scale, found_inf))
        if grad_scale is not None:
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad.div_(grad_scale)
        for g in self.param_groups:
            for p in g["params"]:
                p.data.add_(p.grad * (1 - found_inf), alpha=-g["lr"])


def test_kwargs_optimizer_gets_scale_only_when_grads_are_still_scaled():
    model, reference = _model(), _model()
    opt = _KwargsOptimizer(model.parameters(), lr=0.1)
    opt.calls = []
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    scaler, ref_scaler = DynamicLossScaler(init_scale=4.0), torch.amp.GradScaler("cpu", 4.0)
    _iteration(model, opt, scaler)  # no unscale_: check-only pass, the optimizer divides
    _iteration(reference, ref_opt, ref_scaler)
    _backward(model, scaler)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    _iteration(reference, ref_opt, ref_scaler)
    (scale0, found0), (scale1, found1) = opt.calls
    assert scale0.item() == 4.0 and scale1 is None and found0.item() == found1.item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_extra_found_inf_skips_and_counts():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = DynamicLossScaler(init_scale=2.0**8)
    _backward(model, scaler)
    scaler.unscale_(opt)
    assert scaler.found_inf_flag().item() == 0.0
    scaler.step(opt, found_inf=torch.tensor(1.0))  # e.g. the loss itself was NaN
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert scaler.found_inf_flag().item() == 1.0 and scaler.get_scale() == 2.0**7


@pytest.fixture
def unscale_impl(monkeypatch):
    """Force fasttrain.ops.dispatch onto one unscale implementation for CPU tensors."""
    def force(name):
        monkeypatch.setattr(dispatch, "TRITON_ON_CPU", name == "triton")
        monkeypatch.setattr(native, "_loaded", False if name == "torch" else None)
        if dispatch.implementation("unscale_and_check_", "cpu") != name:
            pytest.skip(f"{name} unscale is not available here (C++: bash scripts/build_ops.sh)")
    return force


def test_every_unscale_implementation_drives_the_scaler_alike(unscale_impl):
    results = []
    for impl in ("torch", "c++", "triton"):
        unscale_impl(impl)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = DynamicLossScaler(init_scale=2.0**6, growth_interval=2)
        for bad in [None, float("nan"), None, None, float("inf"), None]:
            _iteration(model, opt, scaler, bad)
        results.append(([p.detach().clone() for p in model.parameters()], scaler.state_dict()))
    (p_torch, sd_torch), *others = results
    for params, sd in others:
        assert sd == sd_torch
        assert all(torch.equal(a, b) for a, b in zip(params, p_torch))


def test_state_dict_round_trip_is_exact_and_resumes_identically():
    pattern = _pattern(60, 0.3, seed=3)
    cfg = dict(init_scale=2.0**12, growth_interval=3, hysteresis=2, min_scale=4.0)
    first = DynamicLossScaler(**cfg)
    _drive(first, [b is not None for b in pattern[:30]])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = DynamicLossScaler()  # settings come from the checkpoint
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.state_dict() == first.state_dict()
    rest = [b is not None for b in pattern[30:]]
    assert _drive(resumed, rest) == _drive(first, rest)
    assert resumed.state_dict() == first.state_dict()


def test_loads_a_gradscaler_state_dict():
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**9, growth_interval=7)
    _drive(reference, [0, 0, 1, 0])
    scaler = DynamicLossScaler()
    _drive(scaler, [1])
    live = scaler.log_state()["loss_scale"]
    scaler.load_state_dict(reference.state_dict())
    assert live.item() == 2.0**8  # loaded in place: tensors handed out stay current
    sd = scaler.state_dict()
    assert sd["scale"] == 2.0**8 and sd["growth_interval"] == 7 and sd["_growth_tracker"] == 1
    assert sd["_skipped_steps"] == 0 and sd["_hysteresis_tracker"] == 1


def test_found_inf_flag_and_log_state_are_device_tensors():
    scaler = DynamicLossScaler(init_scale=2.0**8)
    assert scaler.found_inf_flag() is None and scaler.log_state() == {}
    _drive(scaler, [0, 1])
    logs = scaler.log_state()
    assert logs["loss_scale"].item() == 2.0**7 and logs["skipped_steps"].item() == 1
    assert scaler.found_inf_flag().item() == 1.0


def test_disabled_scaler_is_transparent():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = DynamicLossScaler(enabled=False)
    loss = model(torch.ones(2, 8)).sum()
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0
    loss.backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert scaler.state_dict() == {} and not scaler.is_enabled()
    scaler.check_divergence()


@pytest.mark.parametrize("kwargs, match", [
    (dict(growth_factor=1.0), "growth_factor"), (dict(backoff_factor=1.0), "backoff_factor"),
    (dict(growth_interval=0), "growth_interval"), (dict(hysteresis=0), "hysteresis"),
    (dict(min_scale=0.0), "min_scale"), (dict(init_scale=2.0**30), "init_scale"),
    (dict(min_scale=4.0, max_scale=2.0), "min_scale"),
])
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLossScaler(**kwargs)


def test_misuse_errors():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = DynamicLossScaler()
    with pytest.raises(RuntimeError, match="before scale"):
        scaler.unscale_(opt)
    _backward(model, scaler)
    with pytest.raises(RuntimeError, match="no overflow check"):
        scaler.update()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="closure"):
        scaler.step(opt, closure=lambda: 0)
    with pytest.raises(RuntimeError, match="empty"):
        scaler.load_state_dict({})
    with pytest.raises(KeyError, match="scale"):
        scaler.load_state_dict({"growth_factor": 2.0})


def test_unscale_implementations_agree_with_strided_and_mixed_grads(unscale_impl):
    grads = [torch.randn(100), torch.randn(7).bfloat16(), torch.randn(5, 3).t(), torch.zeros(0)]
    grads[0][17] = float("inf")
    outs = []
    for impl in ("torch", "c++", "triton"):
        unscale_impl(impl)
        gs = [g.clone() for g in grads]
        found = torch.zeros(())
        unscale_and_check_(gs, torch.tensor(0.5), found)
        outs.append((gs, found.item()))
    for gs, found in outs[1:]:
        assert found == outs[0][1] == 1.0
        assert all(torch.equal(a, b) for a, b in zip(gs, outs[0][0]))


# ----------------------------------------------------------------------------- policy
@pytest.mark.parametrize("bf16, fp16, dtype", [(True, False, torch.bfloat16),
                                               (False, True, torch.float16),
                                               (False, False, torch.float32)])
def test_autocast_context_on_cpu(bf16, fp16, dtype):
    layer = torch.nn.Linear(4, 4)
    with autocast_context("cpu", bf16=bf16, fp16=fp16):
        out = layer(torch.ones(2, 4))
    assert out.dtype == dtype
    assert needs_loss_scaler(bf16=bf16, fp16=fp16) == fp16


def test_precision_flag_errors():
    with pytest.raises(ValueError, match="both set"):
        autocast_context("cpu", bf16=True, fp16=True)
    with pytest.raises(ValueError, match="both set"):
        needs_loss_scaler(bf16=True, fp16=True)
    with pytest.raises(ValueError, match="device_type"):
        autocast_context("tpu", bf16=True, fp16=False)


def test_cast_floating_params_keeps_buffers_and_ties():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.BatchNorm1d(4))
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = model[0].weight
    model.append(head)
    cast_floating_params_(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model[2].weight is model[0].weight
    assert model[1].running_mean.dtype == torch.float32
    assert model[1].num_batches_tracked.dtype == torch.int64
    model[2].weight.grad = torch.zeros_like(model[2].weight)
    with pytest.raises(ValueError, match="before the first backward"):
        cast_floating_params_(model)
    with pytest.raises(ValueError, match="dtype"):
        cast_floating_params_(torch.nn.Linear(2, 2), torch.int8)
