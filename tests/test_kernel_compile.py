"""Ahead-of-time compile of every Triton kernel under kernels/ for sm_80 and sm_90, and checks
of what was compiled. No GPU needed: Triton compiles to PTX and cubin for an explicit target.

How to cover a new kernel: in its module under kernels/, define a module-level list

    COMPILE_SPECS = [{
        "kernel": _my_kernel,                       # @triton.jit or @triton.autotune object
        "signature": {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},  # all args, in order
        "constexprs": {"BLOCK": 1024},              # value of every constexpr
        "aligned": ["x_ptr", "n"],                  # optional: 16-divisibility hints
        "num_warps": 4, "num_stages": 3,            # optional launch options
        "archs": (80, 90),                          # optional, this is the default
        "expect_ptx": ["ld.global.v4", "st.global.v4"],  # optional PTX substrings
        "name": "my_kernel fp32",                   # optional label
    }, ...]

one entry per dtype signature / constexpr combination the host code launches (an autotuned
kernel is compiled once per config). `@triton.jit` helpers called from a listed kernel are
covered by it. The full format is in the docstring of `fasttrain.kernels._compile_check`
and in docs/kernels.md. Modules are discovered automatically: nothing to register here.

Everything compiles in one subprocess (without TRITON_INTERPRET) with two worker processes;
the tests below read its JSON report.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fasttrain.kernels import _compile_check

pytestmark = pytest.mark.slow

_CHILD = textwrap.dedent("""
    import json, sys
    from fasttrain.kernels import _compile_check as c
    report = c.run()
    # Negative control: the fp32 cross-entropy kernel without alignment hints must lose its
    # 128-bit accesses, or the vector check below could not tell a regression apart.
    job = [j for j in c.jobs_for(c.kernel_modules(["cross_entropy"])[0]) if j["arch"] == 90][0]
    job["aligned"] = []
    report["control"] = c.compile_job(job)
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_discovers_the_kernels(report):
    kernels = report["kernels"]
    assert "_cross_entropy_kernel" in kernels["fasttrain.kernels.cross_entropy"]
    assert "_adamw_kernel" in kernels["fasttrain.kernels.adamw"]


def test_specs_are_well_formed(report):
    assert report["spec_errors"] == {}


def test_every_kernel_is_covered(report):
    assert report["uncovered"] == {}, (
        f"kernels without a COMPILE_SPECS entry: {report['uncovered']}; add one (see the "
        f"docstring of this file)")


def test_every_case_compiles_for_sm80_and_sm90(report):
    failed = [f"{r['label']}: {r['error']}" for r in report["results"] if not r["ok"]]
    assert not failed, "\n".join(failed)
    for module, names in report["kernels"].items():
        if names:
            archs = {r["arch"] for r in report["results"] if r["module"] == module}
            assert {80, 90} <= archs, module


def test_memory_bound_kernels_use_128_bit_accesses(report):
    missing = [f"{r['label']}: no {r['missing_ptx']} in PTX (has {r['memory_ops']})"
               for r in report["results"] if r["ok"] and r["missing_ptx"]]
    assert not missing, "\n".join(missing)
    assert any(r["expect_ptx"] for r in report["results"])


def test_vector_check_detects_unaligned_code(report):
    control = report["control"]
    assert control["ok"], control.get("error")
    assert "ld.global.v4" in control["missing_ptx"], control["memory_ops"]


def test_no_register_spills(report):
    for r in report["results"]:
        if r["ok"]:
            assert r["ptxas_ran"], f"{r['label']}: ptxas -v printed no register report"
            assert r["spill_bytes"] == 0, f"{r['label']}: {r['spill_bytes']} bytes spilled"


# ---- the harness itself (in-process, interpreter mode) ---------------------------------

_MODULE_SRC = '''
import triton
import triton.language as tl

@triton.jit
def _helper(x):
    return x * 2

@triton.jit
def _covered(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs)))

@triton.jit
def _forgotten(x_ptr):
    pass

COMPILE_SPECS = [{"kernel": _covered, "signature": {"x_ptr": "*fp32", "BLOCK": "constexpr"},
                  "constexprs": {"BLOCK": 16}}]
'''


def _load(tmp_path, name, src):
    import importlib.util
    path = tmp_path / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uncovered_kernel_is_reported_and_helpers_count_as_covered(tmp_path):
    module = _load(tmp_path, "fake_kernels", _MODULE_SRC)
    assert sorted(_compile_check.kernels_in(module)) == ["_covered", "_forgotten", "_helper"]
    assert _compile_check.uncovered(module) == ["_forgotten"]


@pytest.mark.parametrize("change,match", [
    ({"signature": {"x_ptr": "*fp32"}}, "every argument"),
    ({"constexprs": {}}, "needs a value"),
    ({"aligned": ["y_ptr"]}, "not an argument"),
    ({"kernel": print}, "kernel"),
    ({"num_warp": 4}, "unknown keys"),
])
def test_malformed_spec_names_the_problem(tmp_path, change, match):
    module = _load(tmp_path, "fake_kernels2", _MODULE_SRC)
    spec = dict(module.COMPILE_SPECS[0], **change)
    with pytest.raises(ValueError, match=match):
        _compile_check.check_spec("fake", 0, spec)
