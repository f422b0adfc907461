"""The CUDA ops (csrc/cuda): compile-checked here, run where a GPU is.

Without a GPU (this machine, CI): nvcc compiles every .cu for sm_80 and sm_90 (no torch
needed: the kernels are torch-free), ptxas must report no spills and no stack, the AdamW
kernel must use 16-byte vector accesses, and the torch glue must compile against the
installed torch headers. On a CUDA machine (marked `gpu`): the ops against torch, the Triton
kernels in fasttrain.kernels, and the CPU references.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    jobs["adamw.ptx"] = subprocess.Popen(
        [NVCC, "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", "-arch=sm_90", "-ptx",
         str(CUDA_DIR / "adamw.cu"), "-o", str(out / "adamw.ptx")],
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
    results["adamw.ptx"]["ptx"] = (out / "adamw.ptx").read_text() if (out / "adamw.ptx").exists() else ""
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
def test_adamw_kernel_uses_16_byte_accesses(compiled):
    ptx = compiled["adamw.ptx"]["ptx"]
    assert compiled["adamw.ptx"]["rc"] == 0, compiled["adamw.ptx"]["output"]
    assert re.search(r"ld\.global(\.\w+)*\.v4\.(f32|b32|u32)", ptx), "no 16-byte fp32 loads"
    assert re.search(r"st\.global(\.\w+)*\.v4\.(f32|b32|u32)", ptx), "no 16-byte fp32 stores"


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


def _state(shapes, dtype, master, device="cuda", seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    moment = torch.float32 if master else dtype
    return [params, [torch.zeros(s, device=device, dtype=moment) for s in shapes],
            [torch.zeros(s, device=device, dtype=moment) for s in shapes],
            [p.float() for p in params] if master else [],
            [torch.zeros((), device=device) for _ in shapes]]


# 200 tensors (several launches by tensor count) and one of 25M elements (by block count)
GPU_SHAPES = [(257, 131), (1,), (3, 5, 7)] * 66 + [(33, 2049), (25_000_001,)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True),
                                          (torch.float16, True), (torch.bfloat16, False)])
def test_cuda_adamw_matches_cpu_op_and_triton(cuda_ops, dtype, master):
    from fasttrain.kernels import adamw as triton_adamw

    runs = {"cuda": _state(GPU_SHAPES, dtype, master), "cpu": _state(GPU_SHAPES, dtype, master, "cpu"),
            "triton": _state(GPU_SHAPES, dtype, master)}
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(s, generator=gen).to(dtype) for s in GPU_SHAPES]
        for name, (p, m, v, w, steps) in runs.items():
            device = "cpu" if name == "cpu" else "cuda"
            g = [x.to(device) for x in grads]
            lr = torch.tensor(1e-3, device=device)
            scale = torch.tensor(4.0, device=device)
            g = [x * 4 for x in g]
            if name == "triton":
                triton_adamw.fused_adamw_(p, g, m, v, w, steps, lr, 0.9, 0.95, 0.1, 1e-8,
                                          grad_scale=scale, found_inf=torch.zeros(1, device=device))
            else:
                cuda_ops.adamw_(p, g, m, v, w, steps, lr, 0.9, 0.95, 0.1, 1e-8, scale,
                                torch.zeros(1, device=device))
    for a, b, c in zip(runs["cuda"][0], runs["cpu"][0], runs["triton"][0]):
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(a.cpu(), b, **tol)
        torch.testing.assert_close(a, c, **tol)
    if master:
        assert all(torch.equal(p, w.to(dtype)) for p, w in zip(runs["cuda"][0], runs["cuda"][3]))


@pytest.mark.gpu
def test_cuda_adamw_found_inf_skips_without_sync(cuda_ops):
    p, m, v, w, steps = _state(GPU_SHAPES[-3:], torch.bfloat16, True)
    before = [t.clone() for t in (*p, *m, *v, *w, *steps)]
    grads = [torch.ones_like(x) for x in p]
    cuda_ops.adamw_(p, grads, m, v, w, steps, torch.tensor(1e-3, device="cuda"), 0.9, 0.95, 0.1,
                    1e-8, None, torch.ones(1, device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip((*p, *m, *v, *w, *steps), before))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_unscale_and_norm_match_torch_and_triton(cuda_ops, dtype):
    from fasttrain.kernels import unscale as triton_unscale

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to("cuda", dtype) for s in GPU_SHAPES]
    grads[-1][12_345_678] = float("inf")
    ours, ref, tri = grads, [g.clone() for g in grads], [g.clone() for g in grads]
    flags = [torch.zeros(1, device="cuda") for _ in range(3)]
    inv = torch.tensor([1 / 1024], device="cuda")
    cuda_ops.unscale_and_check_(ours, inv, flags[0])
    torch._amp_foreach_non_finite_check_and_unscale_(ref, flags[1], inv)
    triton_unscale.unscale_and_check_(tri, inv, flags[2])
    assert [f.item() for f in flags] == [1.0, 1.0, 1.0]
    for a, b, c in zip(ours, ref, tri):
        assert torch.equal(a, b) and torch.equal(a, c)
    finite = [g.nan_to_num(posinf=0.0) for g in ours]
    for p in (2.0, float("inf"), 1.0):
        want = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in finite]), p)
        torch.testing.assert_close(cuda_ops.grad_norm(finite, p).double(), want, rtol=1e-5, atol=0)
    assert cuda_ops.grad_norm(ours, 2.0).item() == float("inf")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
