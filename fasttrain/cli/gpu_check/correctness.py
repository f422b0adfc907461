"""Part 2: every Triton kernel and every CUDA C++ op against its fp32 reference on the GPU.

`build` compiles csrc/ with CMake + nvcc into build/ (scripts/build_ops.sh) for this GPU's
architecture only (the fastest build). `run` reruns the test cases marked `kernel_cases`
(the same ones the CPU suite runs under the Triton interpreter) with
FASTTRAIN_TEST_DEVICE=cuda, and reports them per kernel/op, against the inventory of all
kernels and ops. Without a GPU it only collects the cases (they run in the CPU suite).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

from fasttrain.cli.gpu_check.common import NO_GPU, has_gpu, seconds_left, skipped
from fasttrain.cli.gpu_check.inventory import REPO_ROOT, everything, on_cuda

CASES_FILE = "kernel_cases.json"


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def build(ctx: dict) -> dict:
    if not has_gpu():
        return skipped(NO_GPU + "; the CPU build is scripts/build_ops.sh (CI runs it)")
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    arch = f"{major}{minor}"
    cmd = ["bash", str(REPO_ROOT / "scripts" / "build_ops.sh"), "-DFASTTRAIN_WITH_CUDA=ON",
           f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
    env = dict(os.environ, PYTHON=sys.executable)
    if shutil.which("nvcc") is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env.setdefault("CUDACXX", "/usr/local/cuda/bin/nvcc")  # nvcc installed off the PATH
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=seconds_left(ctx, reserve=20), cwd=REPO_ROOT)
    result = {"command": " ".join(cmd), "returncode": proc.returncode, "arch": f"sm_{arch}",
              "output_tail": _tail(proc.stdout + proc.stderr)}
    if proc.returncode != 0:
        return {"status": "fail", "reason": f"build failed (exit {proc.returncode})",
                "summary": "CMake/nvcc build failed: see output_tail", **result}
    probe = subprocess.run([sys.executable, "-c", (
        "from fasttrain.ops import native; import json; ok = native.available(); "
        "print(json.dumps({'loaded': ok, 'path': native.library_path(), "
        "'build_info': native.build_info()}))")], capture_output=True, text=True, timeout=60,
        cwd=REPO_ROOT)
    try:
        loaded = json.loads(probe.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        loaded = {"loaded": False, "probe_output": _tail(probe.stdout + probe.stderr)}
    result["library"] = loaded
    cuda_on = loaded.get("build_info", {}).get("cuda") == "ON"
    status = "pass" if loaded.get("loaded") and cuda_on else "fail"
    return {"status": status, **result,
            **({} if status == "pass" else {"reason": "the library did not load with CUDA kernels"}),
            "summary": f"CUDA kernels built for sm_{arch} and loaded" if status == "pass"
            else "built, but the library did not load with CUDA kernels"}


def case_files(marker: str = "kernel_cases") -> list[str]:
    tests = REPO_ROOT / "tests"
    needle = f"mark.{marker}"
    return sorted(str(p.relative_to(REPO_ROOT)) for p in tests.glob("test_*.py")
                  if needle in p.read_text())


def run_cases(device: str, outdir: str, collect_only: bool, timeout: float,
              marker: str = "kernel_cases") -> tuple[dict, str, int]:
    """pytest -m MARKER on `device`; returns ({nodeid: case}, output tail, exit code)."""
    out = os.path.join(outdir, CASES_FILE if marker == "kernel_cases" else f"{marker}_tests.json")
    env = dict(os.environ, FASTTRAIN_TEST_DEVICE=device, FASTTRAIN_CASES_OUT=out)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if device == "cuda":
        env["TRITON_INTERPRET"] = "0"
        library = REPO_ROOT / "build" / "libfasttrain_ops.so"
        if not library.is_file():  # the build part failed: the op cases fail, none rebuilds
            env["FASTTRAIN_OPS_LIB"] = str(library)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider",
           "-p", "fasttrain.cli.gpu_check.cases_plugin", "-o", "addopts=", "-rfE",
           *(["--collect-only"] if collect_only else []), *case_files(marker)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              cwd=REPO_ROOT)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or "")
        code = f"timeout after {timeout:.0f} s"
    cases = json.loads(open(out).read()) if os.path.isfile(out) else {}
    return cases, _tail(output, 6000), code


def per_name(cases: dict, inventory: dict) -> dict:
    """{kernel or op: {'passed': n, 'failed': n, 'skipped': n, ...}} over the inventory, plus
    names the cases claim that the inventory does not know."""
    table = {name: defaultdict(int) for group in inventory.values() for name in group}
    for case in cases.values():
        for name in case["covers"]:
            table.setdefault(name, defaultdict(int))[case["outcome"]] += 1
    return {name: dict(counts) for name, counts in table.items()}


def run(ctx: dict) -> dict:
    inventory = everything()
    if not has_gpu():
        cases, output, code = run_cases("cpu", ctx["outdir"], collect_only=True,
                                        timeout=seconds_left(ctx))
        counts = per_name({k: dict(v, outcome="collected") for k, v in cases.items()}, inventory)
        missing = sorted(n for n, c in counts.items() if not c)
        return skipped(NO_GPU + "; the same cases run on CPU (Triton interpreter) in the test "
                       "suite", inventory=inventory, cases_collected=len(cases),
                       per_kernel=counts, uncovered=missing,
                       summary=f"no GPU: {len(cases)} kernel cases collected over "
                       f"{len(counts)} kernels/ops; uncovered: {missing or 'none'}")
    cases, output, code = run_cases("cuda", ctx["outdir"], collect_only=False,
                                    timeout=seconds_left(ctx, reserve=5))
    expected = on_cuda(inventory)
    cpu_only = expected.pop("cpu_only")
    counts = per_name(cases, expected)
    bad = sorted(n for n, c in counts.items() if c.get("failed") or c.get("error")
                 or c.get("not run"))
    unexercised = sorted(n for n, c in counts.items() if not c.get("passed") and n not in cpu_only)
    outcomes = defaultdict(int)
    for case in cases.values():
        outcomes[case["outcome"]] += 1
    failures = {k: v.get("message", "")[-800:] for k, v in cases.items()
                if v["outcome"] in ("failed", "error")}
    status = "pass" if not bad and not unexercised and code == 0 else "fail"
    return {"status": status, "inventory": inventory, "cpu_only_ops": cpu_only,
            "outcomes": dict(outcomes),
            "per_kernel": counts, "failing": bad, "without_a_passing_case": unexercised,
            "failures": dict(list(failures.items())[:20]), "pytest_exit_code": code,
            "pytest_output_tail": output,
            **({} if status == "pass" else {"reason": f"failing: {bad}; no passing case: "
                                            f"{unexercised}; pytest exit {code}"}),
            "summary": f"{outcomes.get('passed', 0)}/{len(cases)} cases passed on the GPU over "
            f"{len(counts)} kernels/ops" + (f"; failing: {bad}" if bad else "")}


def gpu_tests(ctx: dict) -> dict:
    """The rest of the suite's GPU-only tests (marked `gpu`, skipped in CI), run here."""
    if not has_gpu():
        return skipped(NO_GPU + "; the tests marked gpu skip in CI for the same reason")
    cases, output, code = run_cases("cuda", ctx["outdir"], collect_only=False,
                                    timeout=seconds_left(ctx, reserve=5), marker="gpu")
    outcomes = defaultdict(int)
    for case in cases.values():
        outcomes[case["outcome"]] += 1
    bad = sorted(k for k, v in cases.items() if v["outcome"] not in ("passed", "skipped"))
    status = "pass" if cases and not bad and code == 0 else "fail"
    return {"status": status, "outcomes": dict(outcomes), "tests": cases, "pytest_exit_code": code,
            "pytest_output_tail": output,
            **({} if status == "pass" else {"reason": f"not passing: {bad}; pytest exit {code}"}),
            "summary": f"{outcomes.get('passed', 0)}/{len(cases)} gpu-marked tests passed"
            + (f"; not passing: {bad}" if bad else "")}
