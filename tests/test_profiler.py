"""The profiler's real CPU path: arithmetic of windows/warm-up/MFU on a controlled clock,
a real training loop, the torch.profiler trace, the OOM-snapshot path, bad input."""
import json

import pytest
import torch

import fasttrain.profiler.profiler as profiler_mod
import fasttrain.profiler.timing as timing_mod
from fasttrain.profiler.flops import flops_per_token_for
from fasttrain.models import GPT, GPTConfig
from fasttrain.profiler.profiler import Profiler, ProfilerConfig


class Clock:
    """A controllable perf_counter, so the arithmetic is checked exactly (no timing asserts)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(profiler_mod, "perf_counter", c)
    monkeypatch.setattr(timing_mod, "perf_counter", c)
    monkeypatch.setattr(timing_mod.HostTimer, "mark", staticmethod(c))  # the clock itself, bound at import
    return c


def run_step(prof, clock, data_s, fwd_s, bwd_s, opt_s, tokens=1000, samples=4, exclude=False):
    prof.step_begin()
    with prof.phase("data"):
        clock.now += data_s
    for _ in range(2):  # two micro-batches: phases repeat and sum
        with prof.phase("forward"):
            clock.now += fwd_s / 2
        with prof.phase("backward"):
            clock.now += bwd_s / 2
    with prof.phase("optimizer"):
        clock.now += opt_s
    prof.step_end(tokens=tokens, samples=samples, exclude=exclude)
    clock.now += 5.0  # logging/eval between steps is outside the step and not counted


def run_lap_step(prof, clock, data_s, fwd_s, bwd_s, opt_s, tokens=1000, samples=4, exclude=False):
    """`run_step` the way the Trainer times a step: a lap at the end of each phase."""
    prof.step_begin()
    clock.now += data_s
    prof.lap("data")
    for _ in range(2):
        clock.now += fwd_s / 2
        prof.lap("forward")
        clock.now += bwd_s / 2
        prof.lap("backward")
    clock.now += opt_s
    prof.lap("optimizer")
    prof.step_end(tokens=tokens, samples=samples, exclude=exclude)
    clock.now += 5.0


@pytest.fixture(params=["phase", "lap"])
def step_style(request):
    return run_step if request.param == "phase" else run_lap_step


def make(tmp_path, **kw):
    cfg = ProfilerConfig(warmup_steps=kw.pop("warmup_steps", 2), sample_interval_s=10.0,
                         **kw.pop("cfg", {}))
    return Profiler(cfg, "cpu", output_dir=tmp_path, **kw)


def test_window_arithmetic_excludes_warmup_and_excluded_steps(tmp_path, clock, step_style):
    run_step = step_style
    prof = make(tmp_path, num_devices=4, flops_per_token=2e6, cfg={"peak_tflops": 0.01})
    run_step(prof, clock, 9.0, 9.0, 9.0, 9.0)  # warm-up: huge, must not count
    run_step(prof, clock, 9.0, 9.0, 9.0, 9.0)
    for data in (0.1, 0.2, 0.3):
        run_step(prof, clock, data, 0.2, 0.4, 0.1)  # steps of 0.8, 0.9, 1.0 s
    run_step(prof, clock, 50.0, 1.0, 1.0, 1.0, exclude=True)  # e.g. a recompile
    m = prof.log_metrics()
    assert m["step_time_p50"] == pytest.approx(0.9) and m["step_time_p90"] == pytest.approx(1.0)
    assert m["tokens_per_second_per_device"] == pytest.approx(3000 / 2.7)
    assert m["tokens_per_second"] == pytest.approx(4 * 3000 / 2.7)
    assert m["samples_per_second_per_device"] == pytest.approx(12 / 2.7)
    assert m["data_wait_fraction"] == pytest.approx(0.6 / 2.7)
    assert m["phase_forward_s"] == pytest.approx(0.2) and m["phase_backward_s"] == pytest.approx(0.4)
    assert m["phase_optimizer_s"] == pytest.approx(0.1) and m["phase_data_s"] == pytest.approx(0.2)
    assert m["mfu"] == pytest.approx(2e6 * (3000 / 2.7) / 1e10)
    assert m["host_rss_peak_gib"] > 0

    run_step(prof, clock, 0.0, 0.5, 0.5, 0.0, tokens=500)  # new window after log_metrics
    m2 = prof.log_metrics()
    assert m2["tokens_per_second_per_device"] == pytest.approx(500.0)
    assert m2["step_time_p50"] == pytest.approx(1.0) and m2["data_wait_fraction"] == 0.0

    s = prof.summary()
    assert s["steps"] == {"total": 7, "warmup": 2, "excluded": 1, "measured": 4}
    assert s["throughput"]["tokens_per_second_per_device"] == pytest.approx(3500 / 3.7)
    assert s["mfu"]["value"] == pytest.approx(2e6 * (3500 / 3.7) / 1e10)
    assert s["mfu"]["formula"] == "user-supplied: 2e+06 FLOPs/token"
    prof.close()


def test_summary_counts_logged_windows_and_the_open_one_without_consuming_it(tmp_path, clock):
    # per step only the window is updated; the run takes each window when it is logged, and
    # summary() adds the window still open without flushing it
    prof = make(tmp_path, warmup_steps=0)
    run_step(prof, clock, 0.0, 0.2, 0.2, 0.1, tokens=100)  # 0.5 s
    prof.log_metrics()
    run_step(prof, clock, 0.0, 0.4, 0.4, 0.2, tokens=300)  # 1.0 s, not logged yet
    run_step(prof, clock, 0.0, 0.6, 0.6, 0.3, tokens=500)  # 1.5 s
    s = prof.summary()
    assert s["steps"]["measured"] == 3
    assert s["throughput"]["tokens_per_second_per_device"] == pytest.approx(900 / 3.0)
    assert s["step_time_s"]["p50"] == pytest.approx(1.0) and s["step_time_s"]["mean"] == pytest.approx(1.0)
    assert s["phases_s"]["optimizer"] == pytest.approx(0.2)
    m = prof.log_metrics()  # the open window is still whole for the next logging step
    assert m["tokens_per_second_per_device"] == pytest.approx(800 / 2.5)
    assert prof.summary()["steps"]["measured"] == 3  # and is not counted twice once logged
    prof.close()


def test_log_metrics_during_warmup_has_no_throughput(tmp_path, clock):
    prof = make(tmp_path, warmup_steps=5)
    run_step(prof, clock, 0.1, 0.1, 0.1, 0.1)
    m = prof.log_metrics()
    assert "tokens_per_second" not in m and "step_time_p50" not in m and "host_rss_peak_gib" in m
    prof.close()


def test_real_training_loop_on_cpu(tmp_path, capsys, monkeypatch):
    import fasttrain.models.gpt as gpt
    monkeypatch.setattr(gpt, "linear_cross_entropy", None)  # plain torch loss: no interpreter
    torch.set_num_threads(1)  # tiny ops: OpenMP spin-waits on a shared 2-core box (restored by conftest)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fpt = flops_per_token_for(model, seq_len=32)
    prof = Profiler(ProfilerConfig(warmup_steps=1, sample_interval_s=0.05), "cpu",
                    flops_per_token=fpt, output_dir=tmp_path)
    B, T = 4, 32
    for step in range(6):
        prof.step_begin()
        with prof.phase("data"):
            x = torch.randint(0, 64, (B, T))
        with prof.phase("forward"):
            loss = model(x, labels=x).loss
        with prof.phase("backward"):
            loss.backward()
        with prof.phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        prof.step_end(tokens=B * T, samples=B)
    m = prof.log_metrics()
    assert m["tokens_per_second"] > 0 and 0 < m["data_wait_fraction"] < 1
    phases = sum(m[f"phase_{p}_s"] for p in ("data", "forward", "backward", "optimizer"))
    assert phases <= m["step_time_p90"] * 1.0001 * 5 and m["phase_backward_s"] > 0
    prof.close()  # the Trainer may close before writing: the summary must survive it
    path = prof.write()
    prof.print_summary()
    prof.close()
    saved = json.loads(path.read_text())
    assert saved["hardware"]["host_rss_gib_max"] > 0
    assert path == tmp_path / "profile.json"
    assert saved["steps"]["measured"] == 5 and saved["device"]["name"] == "cpu"
    assert saved["mfu"]["value"] is None and "no peak FLOP/s known for 'cpu'" in saved["mfu"]["note"]
    assert saved["mfu"]["flops_per_token"] == fpt.value and saved["mfu"]["formula"].startswith("6*N")
    assert saved["hardware"]["nvml_status"] == "NVML not used: device is not a CUDA GPU"
    out = capsys.readouterr().out
    assert "fasttrain profile" in out and "MFU" in out and "6*N + 12*L*H*Q*T" in out


def test_torch_profiler_trace_window(tmp_path):
    prof = Profiler(ProfilerConfig(warmup_steps=0, trace_steps=(2, 3), sample_interval_s=10.0),
                    "cpu", output_dir=tmp_path)
    a = torch.randn(64, 64)
    for _ in range(5):
        prof.step_begin()
        with prof.phase("forward"):
            torch.mm(a, a)
        prof.step_end(tokens=1, samples=1)
    summary = prof.summary()
    trace = summary["trace"]
    prof.close()
    assert summary["steps"] == {"total": 5, "warmup": 0, "excluded": 2, "measured": 3}
    assert trace is not None and trace.startswith(str(tmp_path / "profiler"))
    assert trace.endswith(".pt.trace.json")
    events = json.loads(open(trace).read())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "aten::mm" in names
    steps = {n for n in names if isinstance(n, str) and n.startswith("fasttrain_step_")}
    assert steps == {"fasttrain_step_2", "fasttrain_step_3"}  # exactly the window


def test_oom_guard_writes_snapshot_then_reraises(tmp_path, monkeypatch):
    written = []
    # FAKE of torch's CUDA snapshot dumper (no CUDA here); the guard logic is what is tested.
    monkeypatch.setattr(profiler_mod, "cuda_snapshot_supported", lambda: True)
    monkeypatch.setattr(profiler_mod, "dump_memory_snapshot",
                        lambda path: written.append(str(path)) or str(path))
    prof = make(tmp_path)
    with pytest.raises(torch.OutOfMemoryError, match="fake OOM"):
        with prof.oom_guard():
            raise torch.OutOfMemoryError("fake OOM")
    assert written == [str(tmp_path / "profiler" / "oom_snapshot_rank0.pickle")]
    assert prof.summary()["oom_snapshot"] == written[0]
    with pytest.raises(ValueError):
        with prof.oom_guard():
            raise ValueError("not an OOM")
    assert len(written) == 1
    prof.close()


def test_disabled_profiler_is_a_no_op(tmp_path):
    prof = Profiler(ProfilerConfig(enabled=False), "cpu")
    prof.step_begin()
    with prof.phase("forward"):
        pass
    prof.step_end(tokens=1, samples=1)
    assert prof.log_metrics() == {} and prof.step == 0
    prof.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"warmup_steps": -1}, "warmup_steps=-1"),
    ({"sample_interval_s": 0}, "sample_interval_s=0"),
    ({"trace_steps": (3, 2)}, r"trace_steps=\(3, 2\)"),
    ({"trace_steps": (0, 2)}, "1 <= first <= last"),
    ({"peak_tflops": -3.0}, "peak_tflops=-3.0"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProfilerConfig(**kwargs)


def test_bad_calls_are_clear(tmp_path):
    with pytest.raises(ValueError, match="pass output_dir"):
        Profiler(ProfilerConfig(trace_steps=(1, 2)), "cpu")
    with pytest.raises(ValueError, match="num_devices=0"):
        Profiler(ProfilerConfig(), "cpu", num_devices=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Profiler(ProfilerConfig(), "cuda")
    prof = make(tmp_path)
    with pytest.raises(RuntimeError, match="call step_begin"):
        with prof.phase("forward"):
            pass
    with pytest.raises(RuntimeError, match="without step_begin"):
        prof.step_end(tokens=1, samples=1)
    prof.step_begin()
    with pytest.raises(TypeError, match="never tensors"):
        prof.step_end(tokens=torch.tensor(5), samples=1)
    prof.close()


@pytest.mark.gpu
def test_cuda_events_path_and_peak_and_real_oom_snapshot(tmp_path):
    device = torch.device("cuda", torch.cuda.current_device())
    prof = Profiler(ProfilerConfig(warmup_steps=1), device, flops_per_token=1e9,
                    dtype=torch.bfloat16, output_dir=tmp_path)
    a = torch.randn(2048, 2048, device=device)
    for _ in range(4):
        prof.step_begin()
        with prof.phase("forward"):
            for _ in range(10):
                a = torch.tanh(a @ a)
        prof.step_end(tokens=2048, samples=1)
    m = prof.log_metrics()
    assert 0 < m["phase_forward_s"] <= m["step_time_p90"] * 1.01
    assert m["memory_allocated_peak_gib"] > 0 and "gpu_memory_used_gib" in m
    s = prof.summary()
    assert s["mfu"]["peak_flops"] is None or s["mfu"]["value"] > 0
    with pytest.raises(torch.OutOfMemoryError):
        with prof.oom_guard():
            torch.empty(1 << 50, dtype=torch.uint8, device=device)
    assert (tmp_path / "profiler" / "oom_snapshot_rank0.pickle").stat().st_size > 0
    prof.close()


def test_profiler_from_training_args(tmp_path):
    from types import SimpleNamespace

    from fasttrain.profiler.profiler import profiler_from_args, trace_steps_from_string
    assert trace_steps_from_string("10:12") == (11, 12) and trace_steps_from_string(None) is None
    with pytest.raises(ValueError, match="START:END"):
        trace_steps_from_string("10-12")
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    args = SimpleNamespace(profile=True, profile_warmup_steps=4, profiler_trace_steps="0:2",
                           flops_per_token=None, peak_tflops=0.5, bf16=True, fp16=False,
                           output_dir=str(tmp_path))
    prof = profiler_from_args(args, model, torch.device("cpu"), num_devices=2, seq_len=16)
    assert prof.config.warmup_steps == 4 and prof.config.trace_steps == (1, 2)
    assert prof.dtype == "bf16" and prof.num_devices == 2 and prof.peak_flops() == 0.5e12
    assert prof.flops_per_token.value == flops_per_token_for(model, seq_len=16).value
    prof.close()
    args.flops_per_token, args.profile = 123.0, False
    prof = profiler_from_args(args, model, torch.device("cpu"))
    assert prof.flops_per_token.value == 123.0 and not prof.config.enabled
    prof.close()


class FakeCudaEvent:
    """FAKE torch.cuda.Event (no GPU here): records the controlled clock; `device_at` says how
    far the fake device has executed. Counts synchronize() calls, the only blocking call."""

    device_at = 0.0
    syncs = 0
    created = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        FakeCudaEvent.created += 1

    def record(self, stream=None):
        self.t = profiler_mod.perf_counter()

    def query(self):
        return self.t <= FakeCudaEvent.device_at

    def synchronize(self):
        FakeCudaEvent.syncs += 1
        FakeCudaEvent.device_at = max(FakeCudaEvent.device_at, self.t)

    def elapsed_time(self, end):
        assert self.query() and end.query(), "elapsed_time before the events completed"
        return (end.t - self.t) * 1e3


def test_cuda_event_path_syncs_only_on_logging_steps(tmp_path, clock, monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("device-wide sync"))
    FakeCudaEvent.device_at, FakeCudaEvent.syncs, FakeCudaEvent.created = 0.0, 0, 0
    prof = make(tmp_path, warmup_steps=1)
    prof.use_timer(timing_mod.CudaTimer())  # the GPU timer, driven by the fake events
    for _ in range(4):
        run_step(prof, clock, 0.1, 0.2, 0.3, 0.4)  # 1.0 s steps; the "device" lags behind
    assert FakeCudaEvent.syncs == 0 and len(prof._pending) == 4
    FakeCudaEvent.device_at = clock.now  # the device catches up: drained without a sync
    run_step(prof, clock, 0.1, 0.2, 0.3, 0.4)
    assert FakeCudaEvent.syncs == 0 and len(prof._pending) == 1
    m = prof.log_metrics()
    assert FakeCudaEvent.syncs == 1 and not prof._pending  # the logging step's one sync
    assert m["step_time_p50"] == pytest.approx(1.0) and m["phase_optimizer_s"] == pytest.approx(0.4)
    assert m["tokens_per_second"] == pytest.approx(1000.0)
    assert FakeCudaEvent.created == 5 * 12  # per step: begin, end, 5 phases x 2 (data is host)
    for _ in range(3):
        FakeCudaEvent.device_at = clock.now
        run_step(prof, clock, 0.1, 0.2, 0.3, 0.4)
    assert FakeCudaEvent.created == 60  # events come back to the pool once read: none created
    assert FakeCudaEvent.syncs == 1
    prof.close()


def test_cuda_laps_share_events_and_return_each_to_the_pool_once(tmp_path, clock, monkeypatch):
    """The Trainer's laps on a GPU: one event a boundary (a lap's event ends one phase and
    begins the next; the last lap's event ends the step), the same times as phase blocks,
    and every event back in the pool exactly once (a shared event released twice would be
    handed out twice and record two boundaries)."""
    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("device-wide sync"))
    FakeCudaEvent.device_at, FakeCudaEvent.syncs, FakeCudaEvent.created = 0.0, 0, 0
    prof = make(tmp_path, warmup_steps=1)
    prof.use_timer(timing_mod.CudaTimer())
    for _ in range(3):
        run_lap_step(prof, clock, 0.1, 0.2, 0.3, 0.4)
    # begin, the data lap's event, 2 x (forward, backward), optimizer (also the step's end)
    assert FakeCudaEvent.created == 3 * 7 and FakeCudaEvent.syncs == 0
    m = prof.log_metrics()
    assert m["step_time_p50"] == pytest.approx(1.0)  # begin to the optimizer lap
    assert m["phase_forward_s"] == pytest.approx(0.2) and m["phase_backward_s"] == pytest.approx(0.3)
    assert m["phase_optimizer_s"] == pytest.approx(0.4) and m["phase_data_s"] == pytest.approx(0.1)
    pool = prof._timer._pool
    assert len(pool) == 3 * 7 and len({id(e) for e in pool}) == len(pool)  # each event once
    for _ in range(3):
        FakeCudaEvent.device_at = clock.now
        run_lap_step(prof, clock, 0.1, 0.2, 0.3, 0.4)
    assert FakeCudaEvent.created == 21  # reused from the pool
    m = prof.log_metrics()
    assert m["step_time_p50"] == pytest.approx(1.0) and m["phase_backward_s"] == pytest.approx(0.3)
    prof.close()


def test_a_lap_outside_a_step_is_refused(tmp_path):
    prof = make(tmp_path)
    with pytest.raises(RuntimeError, match=r"lap\('forward'\) outside a step"):
        prof.lap("forward")
    prof.close()
