"""CompileMonitor: compiles, recompiles with their cause, graph breaks, compile time.

Recompiles are decided by Dynamo's guards, before any backend runs, so these tests use a
counting eager backend (Dynamo tracing only) and stay fast.
"""
import logging
import time

import pytest
import torch
from torch import nn

from _compile_models import (  # noqa: F401  (fresh_dynamo is an autouse fixture)
    T, Block, CountingBackend, TensorLRDecay, TinyGPT, batch, fresh_dynamo, train_steps,
)
from fasttrain.compile.apply import CompileMonitor, apply_compile


# ---- recompiles ----------------------------------------------------------------------

def _ours(caplog):
    """fasttrain's records only: torch may emit its own (e.g. structured-trace DEBUG records
    on a cold compile cache) into the same capture."""
    return [r for r in caplog.records if r.name.startswith("fasttrain")]

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
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile.apply"):
        for step in range(1, 6):
            lrs.append(float(opt.param_groups[0]["lr"]))
            train_steps(model, opt, sched, steps=1, seed0=step)
    assert len(set(lrs)) == 5  # the LR really changed every step
    stats = monitor.stats()
    assert stats["compiles"] == 1 and stats["compiles_after_warmup"] == 0
    assert stats["recompiles"] == 0 and stats["recompiles_after_warmup"] == 0
    assert monitor.warnings == [] and _ours(caplog) == []
    monitor.stop()


def test_shape_change_after_warmup_warns_naming_the_guard(caplog):
    model, opt, sched = _compiled_run()
    monitor = CompileMonitor().start()
    train_steps(model, opt, sched, steps=2)
    monitor.end_warmup()
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile.apply"):
        train_steps(model, opt, sched, steps=1, t=T - 4)  # a short last batch
    stats = monitor.stats()
    assert stats["recompiles"] == 1 and stats["recompiles_after_warmup"] == 1
    assert len(monitor.warnings) == 1
    message = _ours(caplog)[-1].getMessage()
    assert _ours(caplog)[-1].levelno == logging.WARNING
    assert "recompiled after warm-up" in message
    assert f"size mismatch at index 1. expected {T}, actual {T - 4}" in message
    assert "forward (_compile_models.py:" in message  # which code recompiled
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
    with caplog.at_level(logging.WARNING, logger="fasttrain.compile.apply"):
        model.eval()
        with monitor.expect_compiles("first evaluation"), torch.no_grad():
            model(*batch(9))  # eval mode and no_grad are guarded: one recompile
        model.train()
        train_steps(model, opt, sched, steps=2, seed0=10)  # back to the cached train graph
    assert monitor.recompiles_after_warmup == 1 and monitor.warnings == []
    assert _ours(caplog) == []
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


