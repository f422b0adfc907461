"""Ahead-of-time compile of every Triton kernel in `fasttrain.kernels`, on a machine without a GPU.

Convention: every module under kernels/ that defines a `@triton.jit` kernel also defines a
module-level `COMPILE_SPECS` list with one dict per compile case:

    {
        "kernel": _my_kernel,              # the @triton.jit (or @triton.autotune) object
        "signature": {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},  # every argument,
                                           # in order: "*fp32"/"*bf16"/"*i64"..., "i32", "i64",
                                           # "fp32", or "constexpr"
        "constexprs": {"BLOCK": 1024},     # a value for each constexpr (an autotuned kernel's
                                           # config kwargs are merged in per config)
        "aligned": ["x_ptr", "n"],         # optional: arguments compiled with a 16-divisibility
                                           # hint, as Triton does for 16-byte-aligned pointers
                                           # and multiples of 16 at launch time
        "num_warps": 4, "num_stages": 3,   # optional launch options (autotune configs override)
        "archs": (80, 90),                 # optional: SM versions, default sm_80 and sm_90
        "expect_ptx": ["ld.global.v4", "st.global.v4"],  # optional: substrings the PTX must
                                           # hold (memory-bound kernels: 128-bit accesses)
        "name": "my_kernel fp32",          # optional label for reports
        "attrs": {(0,): [["tt.divisibility", 16]]},  # optional raw ASTSource attrs, merged
                                           # with those made from "aligned"
    }

Accepted synonyms: "fn" for "kernel", "ptx_patterns" for "expect_ptx".

List one spec per dtype signature and constexpr combination the host code launches.
`python -m fasttrain.kernels._compile_check [module ...]` compiles every case (in parallel
worker processes), runs ptxas -v on each PTX and prints a JSON report; it must run without
TRITON_INTERPRET. tests/test_kernel_compile.py runs it and checks the report.
"""
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton

PACKAGE = "fasttrain.kernels"
DEFAULT_ARCHS = (80, 90)
SPEC_KEYS = {"kernel", "signature", "constexprs", "aligned", "num_warps", "num_stages",
             "archs", "expect_ptx", "name", "attrs"}
SYNONYMS = {"fn": "kernel", "ptx_patterns": "expect_ptx"}


def normalise(spec):
    """The spec with synonyms renamed to their canonical keys."""
    return {SYNONYMS.get(k, k): v for k, v in spec.items()}


def specs_of(module):
    return [normalise(s) for s in getattr(module, "COMPILE_SPECS", [])]


def _jit_of(obj):
    """The innermost kernel object (JITFunction, or InterpretedFunction under
    TRITON_INTERPRET) under a jit / autotuned / heuristics kernel; None for anything else."""
    for _ in range(4):
        if not isinstance(obj, triton.runtime.KernelInterface):
            return None
        if not isinstance(getattr(obj, "fn", None), triton.runtime.KernelInterface):
            return obj
        obj = obj.fn
    return None


def _base_fn(obj):
    jit = _jit_of(obj)
    return None if jit is None else jit.fn


def kernels_in(module):
    """{name: kernel object} for the Triton kernels defined (not imported) in `module`."""
    found = {}
    for name, obj in vars(module).items():
        fn = _base_fn(obj)
        if fn is not None and getattr(fn, "__module__", None) == module.__name__:
            found[name] = obj
    return found


def kernel_modules(names=None):
    pkg = importlib.import_module(PACKAGE)
    names = names or [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    return [importlib.import_module(f"{PACKAGE}.{n}") for n in names]


def uncovered(module):
    """Kernels of `module` that no COMPILE_SPECS entry compiles: neither listed in a spec nor
    called (as a @triton.jit helper) from a listed kernel, directly or transitively."""
    kernels = {name: _base_fn(k) for name, k in kernels_in(module).items()}
    covered = {_base_fn(s.get("kernel")) for s in specs_of(module)}
    grew = True
    while grew:
        srcs = [inspect.getsource(fn) for fn in kernels.values() if fn in covered]
        called = {fn for name, fn in kernels.items()
                  if any(re.search(rf"\b{name}\s*\(", src) for src in srcs)}
        grew = not called <= covered
        covered |= called
    return sorted(n for n, fn in kernels.items() if fn not in covered)


def check_spec(module_name, index, spec):
    """Raise ValueError naming the module, spec and field when a spec is malformed."""
    where = f"{module_name}.COMPILE_SPECS[{index}]"
    extra = set(spec) - SPEC_KEYS
    if extra:
        raise ValueError(f"{where}: unknown keys {sorted(extra)}; allowed: {sorted(SPEC_KEYS)}")
    fn = _base_fn(spec.get("kernel"))
    if fn is None:
        raise ValueError(f"{where}: 'kernel' must be a @triton.jit or @triton.autotune object")
    jit = _jit_of(spec["kernel"])
    sig = spec.get("signature", {})
    if list(sig) != list(jit.arg_names):
        raise ValueError(f"{where}: 'signature' must list every argument of {fn.__name__} in "
                         f"order: {list(jit.arg_names)}, got {list(sig)}")
    autotuned = hasattr(spec["kernel"], "configs")
    for name, ty in sig.items():
        tuned = autotuned and any(name in c.kwargs for c in spec["kernel"].configs)
        if ty == "constexpr" and name not in spec.get("constexprs", {}) and not tuned:
            raise ValueError(f"{where}: constexpr {name!r} needs a value in 'constexprs'")
    for name in spec.get("aligned", []):
        if name not in sig:
            raise ValueError(f"{where}: 'aligned' names {name!r}, not an argument")
    return jit


def jobs_for(module):
    """Expand a module's specs into compile jobs (one per arch and autotune config)."""
    jobs = []
    for i, spec in enumerate(specs_of(module)):
        jit = check_spec(module.__name__, i, spec)
        configs = getattr(spec["kernel"], "configs", None) or [None]
        for cfg_index, cfg in enumerate(configs):
            constexprs = dict(spec.get("constexprs", {}))
            options = {"num_warps": spec.get("num_warps", 4),
                       "num_stages": spec.get("num_stages", 3)}
            if cfg is not None:
                constexprs.update(cfg.kwargs)
                options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            for arch in spec.get("archs", DEFAULT_ARCHS):
                label = spec.get("name", jit.fn.__name__)
                if cfg is not None:
                    label += f" config{cfg_index}"
                jobs.append({"module": module.__name__, "spec": i, "kernel": jit.fn.__name__,
                             "label": f"{label} sm_{arch}", "arch": arch,
                             "constexprs": constexprs, "options": options,
                             "expect_ptx": list(spec.get("expect_ptx", []))})
    return jobs


def _ptxas(arch):
    """The ptxas Triton itself uses for this SM version (it ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def _resolve(job):
    module = importlib.import_module(job["module"])
    spec = specs_of(module)[job["spec"]]
    return _jit_of(spec["kernel"]), spec


def compile_job(job):
    """Compile one job to PTX/cubin and run ptxas -v on the PTX; returns a result dict."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {k: job[k] for k in ("module", "kernel", "label", "arch", "expect_ptx")}
    try:
        jit, spec = _resolve(job)
        sig = spec["signature"]
        names = list(sig)
        aligned = job.get("aligned", spec.get("aligned", []))  # a job may override (tests)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        attrs.update(spec.get("attrs", {}))
        constexprs = {(names.index(k),): v for k, v in job["constexprs"].items()}
        src = ASTSource(fn=jit, signature=sig, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                  options=job["options"])
        ptx = compiled.asm["ptx"]
        result["memory_ops"] = sorted(set(re.findall(r"\b(?:ld|st)\.global[.\w]*", ptx)))
        result["missing_ptx"] = [s for s in job["expect_ptx"] if s not in ptx]
        result.update(_ptxas_report(ptx, job["arch"]))
        result["ok"] = True
    except Exception as exc:  # reported, the test fails on it
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return result


def _ptxas_report(ptx, sm):
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        proc = subprocess.run([_ptxas(sm), f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    info = proc.stderr
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", info)]
    return {"spill_bytes": sum(spills), "registers": max(regs, default=0),
            "ptxas_ran": bool(regs)}


def run(module_names=None, workers=2):
    """Compile every case of the named kernel modules (default: all) and report."""
    modules = kernel_modules(module_names)
    report = {"uncovered": {}, "spec_errors": {}, "results": [],
              "kernels": {m.__name__: sorted(kernels_in(m)) for m in modules}}
    jobs = []
    for m in modules:
        if uncovered(m):
            report["uncovered"][m.__name__] = uncovered(m)
        try:
            jobs += jobs_for(m)
        except ValueError as exc:
            report["spec_errors"][m.__name__] = str(exc)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        report["results"] = list(pool.map(compile_job, jobs))
    return report


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: the compile check needs the real Triton compiler")
    print(json.dumps(run(sys.argv[1:] or None), indent=1))
