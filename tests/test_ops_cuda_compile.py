"""The CUDA op (csrc/cuda: grad_norm, which the Trainer's clipping runs on CUDA): compile-checked
here, run where a GPU is.

Without a GPU (this machine, CI): nvcc compiles every .cu for sm_80 and sm_90 (no torch
needed: the kernels are torch-free), ptxas must report no spills and no stack, the norm
kernel must read fp32 with 16-byte vector loads, and the torch glue must compile against the
installed torch headers. On a CUDA machine (marked `gpu`): the op against the fp64 reference
and the clipping built on it against torch.nn.utils.clip_grad_norm_.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttrain.kernels._reference import grad_norm_reference

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNEL_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
ARCHS = ("-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90")
NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")


def _cuda_include() -> Path:
    # nvcc may be a wrapper script: ask it where its own headers are.
    listing = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", "/dev/null"], text=True,
                             capture_output=True).stderr
    found = re.search(r'INCLUDES="?-I"?([^" ]+)', listing)
    candidates = [Path(found.group(1))] if found else []
    candidates += [Path(NVCC).resolve().parent.parent / "include", Path("/usr/local/cuda/include")]
    return next((c for c in candidates if (c / "cuda_runtime.h").exists()), candidates[-1])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs every compile in parallel once; returns {name: CompletedProcess-like dict}."""
    out = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    for name in KERNEL_FILES:
        cmd = [NVCC, "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", *ARCHS, "--resource-usage",
               "-Werror", "all-warnings", "-c", str(CUDA_DIR / name), "-o", str(out / f"{name}.o")]
        jobs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jobs["grad_norm.ptx"] = subprocess.Popen(
        [NVCC, "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", "-arch=sm_90", "-ptx",
         str(CUDA_DIR / "grad_norm.cu"), "-o", str(out / "grad_norm.ptx")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jobs["glue"] = _compile_glue(out)
    (out / "harness.cu").write_text(LAUNCHER_HARNESS)
    jobs["harness"] = subprocess.Popen(
        f"{NVCC} -std=c++17 -O1 -I{ROOT / 'csrc'} -arch=sm_90 {out / 'harness.cu'} "
        f"-o {out / 'harness'} && {out / 'harness'}", shell=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, proc in jobs.items():
        text, _ = proc.communicate(timeout=300)
        results[name] = {"rc": proc.returncode, "output": text}
    ptx = out / "grad_norm.ptx"
    results["grad_norm.ptx"]["ptx"] = ptx.read_text() if ptx.exists() else ""
    for name in KERNEL_FILES:
        results[name]["object"] = out / f"{name}.o"
    return results


# Host-only check of the launcher's bookkeeping (no GPU needed): a recording `launch` must see
# every chunk of every tensor exactly once, within the per-launch limits, with the right
# addresses and sizes, also when a tensor is split across launches.
LAUNCHER_HARNESS = r"""
#include "cuda/multi_tensor_apply.cuh"
#include <cstdio>
#include <vector>
using namespace fasttrain::cuda;

template <int DEPTH>
int check(const std::vector<int64_t>& sizes) {
  std::vector<std::vector<int>> seen(sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t) seen[t].assign((sizes[t] + kChunkSize - 1) / kChunkSize, 0);
  int launches = 0, bad = 0;
  auto numel = [&](int t) { return sizes[t]; };
  auto addresses_of = [&](int t, TensorListMeta<DEPTH>& meta, int slot) {
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][slot] = reinterpret_cast<void*>(uintptr_t(t) * 16 + d + 1);
  };
  auto launch = [&](const TensorListMeta<DEPTH>& meta, int blocks) -> const char* {
    ++launches;
    bad += blocks < 1 || blocks > kMaxBlocks;
    for (int b = 0; b < blocks; ++b) {
      const int slot = meta.block_to_tensor[b];
      bad += slot >= TensorListMeta<DEPTH>::kMaxTensors;
      const uintptr_t a0 = reinterpret_cast<uintptr_t>(meta.addresses[0][slot]) - 1;
      const size_t t = a0 / 16;
      for (int d = 0; d < DEPTH; ++d) bad += reinterpret_cast<uintptr_t>(meta.addresses[d][slot]) != t * 16 + d + 1;
      if (t >= sizes.size() || meta.numel[slot] != sizes[t]) { ++bad; continue; }
      const int chunk = meta.block_to_chunk[b];
      if (chunk < 0 || chunk >= int(seen[t].size())) { ++bad; continue; }
      seen[t][chunk] += 1;
    }
    return nullptr;
  };
  if (multi_tensor_apply<DEPTH>(int(sizes.size()), numel, addresses_of, launch) != nullptr) ++bad;
  for (const auto& chunks : seen) for (int count : chunks) bad += count != 1;
  std::printf("depth %d: %zu tensors, %d launches, %d errors\n", DEPTH, sizes.size(), launches, bad);
  return bad;
}

int main() {
  std::vector<int64_t> sizes;
  for (int i = 0; i < 250; ++i) sizes.push_back(i % 17 == 0 ? 0 : 1 + (i * 7919) % 150000);
  sizes.push_back(kChunkSize * 700 + 5);  // spans three launches by block count
  sizes.push_back(0);
  sizes.push_back(3);
  int bad = check<6>(sizes) + check<1>(sizes) + check<6>({0, 0}) + check<1>({kChunkSize});
  std::printf(bad == 0 ? "LAUNCHER OK\n" : "LAUNCHER BROKEN\n");
  return bad != 0;
}
"""


def _compile_glue(out: Path) -> subprocess.Popen:
    # The CPU wheel ships the c10/cuda headers but not the one CMake generates for them.
    stub = out / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_include = Path(torch.__file__).parent / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{ROOT / 'csrc'}", f"-I{torch_include}",
           f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{_cuda_include()}",
           f"-I{out / 'stub'}", str(CUDA_DIR / "ops_cuda.cpp")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@needs_nvcc
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernels_compile_for_sm80_and_sm90_without_spills(compiled, name):
    result = compiled[name]
    assert result["rc"] == 0, result["output"]
    properties = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                            result["output"])
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", result["output"])
    assert {arch for _, arch in kernels} == {"80", "90"}, result["output"]
    assert len(properties) >= len(kernels) > 0
    assert all(triple == ("0", "0", "0") for triple in properties), result["output"]


@needs_nvcc
def test_norm_kernel_reads_with_vector_loads(compiled):
    ptx = compiled["grad_norm.ptx"]["ptx"]
    assert compiled["grad_norm.ptx"]["rc"] == 0, compiled["grad_norm.ptx"]["output"]
    assert re.search(r"ld\.global(\.\w+)*\.v4\.(f32|b32|u32)", ptx), "no 16-byte fp32 loads"
    assert re.search(r"ld\.global(\.\w+)*\.v2\.(b32|u32)", ptx), "no 8-byte bf16/fp16 loads"


@needs_nvcc
def test_every_launcher_the_glue_declares_is_compiled(compiled):
    """launch.h's launchers (grad_norm's and grad_norm_clip's finish among them) are defined
    in the compiled objects, and the finish kernel stores norm, divisor and flag."""
    declared = set(re.findall(r"const char\* (launch_\w+)\(", (CUDA_DIR / "launch.h").read_text()))
    assert {"launch_grad_norm_finish", "launch_grad_norm_clip_finish"} <= declared
    symbols = subprocess.run(["nm", "-C", *(str(compiled[n]["object"]) for n in KERNEL_FILES)],
                             text=True, capture_output=True, check=True).stdout
    defined = set(re.findall(r" T fasttrain::cuda::(launch_\w+)\(", symbols))
    assert declared <= defined, declared - defined
    ptx = compiled["grad_norm.ptx"]["ptx"]
    finish = ptx[ptx.index("norm_finish_kernel"):]
    finish = finish[:finish.find(".entry", 1) if ".entry" in finish[1:] else len(finish)]
    assert len(re.findall(r"st\.global\.f32", finish)) >= 3, "the finish kernel writes fewer than 3 outputs"


@needs_nvcc
def test_launcher_covers_every_chunk_once_within_limits(compiled):
    result = compiled["harness"]
    assert result["rc"] == 0 and "LAUNCHER OK" in result["output"], result["output"]
    assert re.search(r"depth 6: 253 tensors, [3-9] launches, 0 errors", result["output"])


@needs_nvcc
def test_torch_glue_compiles_against_installed_torch_headers(compiled):
    assert compiled["glue"]["rc"] == 0, compiled["glue"]["output"][-4000:]
    assert " error" not in compiled["glue"]["output"]


def test_kernels_stay_free_of_torch_headers():
    for path in CUDA_DIR.glob("*.cu*"):
        includes = re.findall(r'#include [<"]([^>"]+)[>"]', path.read_text())
        assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")], path


# ----------------------------------------------------------------------------- on a GPU
@pytest.fixture
def cuda_ops():
    from fasttrain.ops import native as _ops

    assert _ops.available() and _ops.build_info().get("cuda") == "ON", \
        "on a CUDA machine build the library with CUDA: bash scripts/build_ops.sh"
    return torch.ops.fasttrain


# 200 tensors (several launches by tensor count) and one of 25M elements (by block count)
GPU_SHAPES = [(257, 131), (1,), (3, 5, 7)] * 66 + [(33, 2049), (25_000_001,)]


def _gpu_grads(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to("cuda", dtype) for s in GPU_SHAPES]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_grad_norm_matches_reference(cuda_ops, dtype):
    grads = _gpu_grads(dtype)
    for p in (2.0, float("inf"), 1.0):
        want = grad_norm_reference(grads, p)
        torch.testing.assert_close(cuda_ops.grad_norm(grads, p), want.cuda(), rtol=1e-5, atol=0)
    grads[-1][12_345_678] = float("inf")
    assert cuda_ops.grad_norm(grads, 2.0).item() == float("inf")
    grads[0][3, 4] = float("nan")
    assert cuda_ops.grad_norm(grads, 2.0).isnan() and cuda_ops.grad_norm(grads, float("inf")).isnan()


@pytest.mark.gpu
def test_cuda_clipping_runs_the_op_and_matches_torch(cuda_ops):
    from fasttrain.ops import dispatch

    assert dispatch.implementation("grad_norm", "cuda") == "c++"
    ours = [torch.nn.Parameter(torch.zeros(s, device="cuda")) for s in GPU_SHAPES]
    ref = [torch.nn.Parameter(torch.zeros(s, device="cuda")) for s in GPU_SHAPES]
    for a, b, g in zip(ours, ref, _gpu_grads(torch.float32)):
        a.grad, b.grad = g.clone(), g.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = dispatch.clip_grad_norm_(ours, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(norm, want, rtol=1e-5, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=1e-12)


@pytest.mark.gpu
def test_cuda_grad_norm_clip_matches_reference_without_a_host_sync(cuda_ops):
    from fasttrain.kernels._reference import grad_norm_clip_reference
    from fasttrain.ops import dispatch

    assert dispatch.implementation("grad_norm_clip", "cuda") == "c++"
    grads = _gpu_grads(torch.bfloat16)[:-1] + _gpu_grads(torch.float32)[-1:]
    for p, max_norm in ((2.0, 1.0), (float("inf"), 1e9)):
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = dispatch.grad_norm_clip(grads, max_norm, p)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want = grad_norm_clip_reference(grads, max_norm, p)
        for a, b in zip(got, want):
            assert a.device.type == "cuda" and a.shape == () and a.dtype == torch.float32
            torch.testing.assert_close(a, b.cuda(), rtol=1e-5, atol=0)
    for poison in (float("inf"), float("nan")):
        grads[-1][12_345_678] = poison
        norm, divisor, found_inf = cuda_ops.grad_norm_clip(grads, 2.0, 1.0)
        assert found_inf.item() == 1.0 and not divisor.isfinite() and not norm.isfinite()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
