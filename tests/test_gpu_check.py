"""gpu_check (fasttrain/cli/gpu_check): its CPU dry run, its JSON schema, part isolation,
and that part 2 covers every Triton kernel and every fasttrain:: op, discovered, not listed."""
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fasttrain.cli.gpu_check import inventory, runner

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One CPU run of the whole script, as CI runs it (no GPU here: a dry run)."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_writes_the_schema_and_every_part_runs_or_says_why_not(dry_run):
    out, report = dry_run
    assert report["schema"] == runner.SCHEMA and report["device"] == "cpu"
    assert list(report["parts"]) == runner.PART_NAMES + ["results_size"]
    for name, part in report["parts"].items():
        assert part["status"] in runner.STATUSES, (name, part)
        # error/timeout would mean the check itself broke: on CPU each part runs its proxy
        # to the end (pass or fail are both findings) or says why it cannot run here
        assert part["status"] not in ("error", "timeout"), (name, part)
        assert isinstance(part["seconds"], float) and part["seconds"] <= part["limit_s"] + 30
        if part["status"] != "pass":
            assert part.get("reason"), (name, part)
        if part["status"] == "skipped":
            assert part["reason"].startswith("skipped: "), (name, part)
    gpu_only = {name for name, _, _, only in runner.PARTS if only}
    assert all(report["parts"][n]["reason"].startswith("skipped: no GPU") for n in gpu_only)
    # the CPU proxies really ran
    assert report["parts"]["distributed"]["backend"] == "gloo"
    assert report["parts"]["host_sync"]["method"].startswith("host-read count")
    assert report["parts"]["environment"]["versions"]["torch"]
    summary = (out / "summary.txt").read_text()
    assert all(name in summary for name in report["parts"])
    assert report["parts"]["results_size"]["status"] == "pass"
    assert report["results_bytes"] < runner.RESULTS_LIMIT_BYTES
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) == report["results_bytes"]


def test_every_kernel_and_op_has_a_kernel_case(dry_run):
    """A new Triton kernel or fasttrain:: op without a `kernel_cases` test fails here; so does
    a case naming something that no longer exists."""
    out, report = dry_run
    cases = json.loads((out / "kernel_cases.json").read_text())
    claimed = {name for case in cases.values() for name in case["covers"]}
    found = inventory.everything()
    known = set(found["triton"]) | set(found["ops"])
    assert found["triton"] and found["ops"]
    assert known - claimed == set(), f"no kernel_cases test covers {sorted(known - claimed)}"
    assert claimed - known == set(), f"kernel_cases name unknown kernels/ops {sorted(claimed - known)}"
    assert report["parts"]["correctness"]["uncovered"] == []


def test_inventory_finds_a_new_csrc_op(tmp_path):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "new.cpp").write_text(textwrap.dedent('''
        TORCH_LIBRARY_FRAGMENT(fasttrain, m) {
          m.def(
              "fancy_norm_(Tensor(a!)[] xs, float p) -> ()");
          m.def("version() -> str");
        }'''))
    assert inventory.csrc_ops(tmp_path) == ["fasttrain::fancy_norm_"]
    assert set(inventory.csrc_ops()) >= {"fasttrain::adamw_", "fasttrain::grad_norm"}


def test_inventory_finds_a_new_triton_kernel(tmp_path, monkeypatch):
    import importlib.util

    from fasttrain.kernels import _compile_check as cc

    src = tmp_path / "newop.py"
    src.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def _helper(x):
            return x * 2

        @triton.jit
        def _newop_kernel(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs)))
        '''))
    spec = importlib.util.spec_from_file_location("fasttrain.kernels.newop", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(cc, "kernel_modules", lambda names=None: [module])
    assert inventory.triton_kernels() == ["newop._newop_kernel"]  # the helper rides along


def test_a_hanging_part_is_cut_at_its_limit_and_says_so(tmp_path, monkeypatch):
    (tmp_path / "logs").mkdir()
    monkeypatch.setattr(runner, "worker_command",
                        lambda *a: [sys.executable, "-c", "import time; time.sleep(120)"])
    result = runner.run_part("stuck", "environment", 2.0, tmp_path)
    assert result["status"] == "timeout" and result["seconds"] < 30
    assert "after 2 s" in result["reason"]


def test_a_crashing_part_reports_error_with_the_traceback(tmp_path):
    (tmp_path / "logs").mkdir()
    result = runner.run_part("broken", "environment:no_such_function", 120.0, tmp_path)
    assert result["status"] == "error" and "no_such_function" in result["reason"]
    assert "Traceback" in result["traceback"]


def test_bad_part_name_is_named():
    proc = subprocess.run([sys.executable, "-m", "fasttrain.cli.gpu_check", "/tmp/unused",
                           "--parts", "environment,speed"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "unknown part(s) ['speed']" in proc.stderr


# The speed code runs on the GPU only in gpu_check; here it runs at toy sizes on CPU so that
# what the GPU will execute has at least run once (figures are not checked: timing-free).
def test_speed_adamw_code_runs_at_toy_size():
    from fasttrain.cli.gpu_check import speed

    assert sum(math.prod(s) for s in speed.gpt2_small_shapes()) == 124_475_904
    r = speed.adamw_figures([(64, 32), (33,), (1,)], repeats=2)
    assert r["params"] == 64 * 32 + 34 and r["bytes_per_step"] == 28 * r["params"]
    assert set(r["seconds"]) == {"fasttrain", "torch_fused"}
    assert r["hbm_bytes_per_s_peak"] is None and r["fasttrain_fraction_of_peak"] is None


def test_speed_linear_cross_entropy_code_runs_at_toy_size():
    import torch

    from fasttrain.cli.gpu_check import speed

    r = speed.linear_cross_entropy_figures(64, 32, 512, torch.float32, repeats=2)
    assert r["floor_bytes"] == (512 * 32 + 64 * 32) * 4
    assert r["seconds"]["fused"]["n"] == 2 and r["peak_bytes_above_inputs"]["fused"] is None


def test_speed_trainer_runs_at_toy_size(tmp_path):
    import time

    from fasttrain.cli.gpu_check import speed

    r = speed.step_overhead_figures(16, steps=8, warmup=3, outdir=str(tmp_path))
    assert r["steps_timed"] == 5 and r["fasttrain_s_per_step"] > 0 and r["hand_loop_s_per_step"] > 0
    ctx = {"outdir": str(tmp_path), "deadline": time.time() + 600}
    size = dict(n_layer=1, n_embd=32, n_head=2, vocab=50257, block=16)
    r = speed.end_to_end_figures(ctx, size, batch=2, seq=16, steps=4, warmup=2, min_seconds_per_run=1)
    assert set(r["runs"]) == {"fasttrain", "hf_trainer"} and r["fasttrain_over_hf_tokens_per_s"] > 0
    assert r["runs"]["fasttrain"]["mfu"] is None  # no peak is known for a CPU: never guessed
    assert not (tmp_path / "speed_end_to_end.partial.json").exists()



def test_sync_guard_records_each_synchronising_call_with_its_stack(monkeypatch):
    """The GPU side of part 3 without a GPU: torch's sync warning ("warn" level) raised inside
    an armed step is recorded with the step and the caller's stack; outside, it is not."""
    import warnings

    import torch

    from fasttrain.cli.gpu_check import host_sync

    levels = []
    monkeypatch.setattr(host_sync, "has_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", levels.append)
    guard = host_sync.SyncGuard(logging_steps=4, max_steps=8)

    class State:
        global_step = 0

    def reads_a_loss():
        warnings.warn("called a synchronizing CUDA operation", UserWarning)

    for step in range(8):
        State.global_step = step
        guard.on_step_begin(None, State, None)
        if step in (1, 3, 4):  # steps 2 (armed), 4 (logging: not armed), 5 (armed)
            reads_a_loss()
        guard.on_step_end(None, State, None)
    assert guard.checked == [2, 3, 5, 6, 7]
    assert [s["step"] for s in guard.syncs] == [2, 5]
    assert all("reads_a_loss" in s["stack"] for s in guard.syncs)
    assert guard.by_owner == {__file__: 2}  # owner: the innermost caller outside torch
    assert levels == ["warn", 0] * 5 and warnings.showwarning is not guard._show_warning


def test_cuda_cases_on_a_machine_without_cuda_skip_and_say_why():
    import os

    env = dict(os.environ, FASTTRAIN_TEST_DEVICE="cuda", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "kernel_cases",
                           "-p", "no:cacheprovider", "tests/test_unscale.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert " passed" not in proc.stdout and "FASTTRAIN_TEST_DEVICE=cuda but no CUDA" in proc.stdout
