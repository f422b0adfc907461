"""Part 1: the machine and the software: GPU, driver, CUDA, torch, triton, transformers,
nvcc, CMake; NVML readings through fasttrain's own interface (fasttrain/profiler/nvml.py);
installed versions against the minimums pyproject.toml declares."""
from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys

import torch

from fasttrain.cli.gpu_check.common import has_gpu
from fasttrain.cli.gpu_check.inventory import REPO_ROOT

# Data-sheet HBM bandwidth, bytes/s, by the same name rules as profiler/flops.py's peaks.
# Unknown devices get None (never a guess); NVML's clock x bus width is reported beside it.
HBM_BYTES_PER_S = {"H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12,
                   "A100": None, "B200": 8.0e12}  # A100: 40 GB 1.56 TB/s vs 80 GB 2.04 TB/s


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tool_version(cmd: list[str]):
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    found = re.search(r"(\d+\.\d+(\.\d+)?)", out.split("release")[-1] if "release" in out else out)
    return found.group(1) if found else out.strip()[:80]


def _nccl_version():
    if not has_gpu():
        return None
    try:
        v = torch.cuda.nccl.version()
    except Exception as e:  # noqa: BLE001 - a torch built without NCCL
        return f"unavailable: {e}"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)  # older torch: an int


def _driver_from_smi():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def declared_minimums(pyproject=REPO_ROOT / "pyproject.toml") -> dict[str, str]:
    """{'python': '3.10', 'torch': '2.6', ...} from requires-python and the '>=' pins."""
    text = pyproject.read_text()
    found = {}
    py = re.search(r'requires-python\s*=\s*">=([\d.]+)"', text)
    if py:
        found["python"] = py.group(1)
    for name in ("torch", "triton", "transformers"):
        pin = re.search(rf'"{name}>=([\d.]+)', text)
        if pin:
            found[name] = pin.group(1)
    return found


def _as_tuple(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": _nccl_version(),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "nvidia_ml_py": _version("nvidia-ml-py"),
        "nvcc": _tool_version(["nvcc", "--version"]),
        "cmake": _tool_version(["cmake", "--version"]),
        "ninja": _tool_version(["ninja", "--version"]),
    }


def below_minimum(found: dict, minimums: dict) -> dict:
    low = {}
    for name, minimum in minimums.items():
        have = found.get(name)
        if have and _as_tuple(have) < _as_tuple(minimum):
            low[name] = f"{have} < {minimum}"
    return low


def hbm_peak(device_name: str | None) -> float | None:
    from fasttrain.profiler.flops import device_table_key

    key = device_table_key(device_name) if device_name else None
    return HBM_BYTES_PER_S.get(key) if key else None


def _nvml(index: int) -> dict:
    """An NVML sample through fasttrain's interface, then the driver and the memory clock x
    bus width, each reading kept if the ones after it fail."""
    from fasttrain.profiler.nvml import NvmlUnavailable, open_device

    try:
        dev = open_device(index)
    except NvmlUnavailable as e:
        return {"status": "unavailable", "reason": str(e), "driver": _driver_from_smi()}
    out = {"status": "ok"}
    try:
        out["sample"] = dev.sample().as_dict()
        import pynvml

        handle = pynvml.nvmlDeviceGetHandleByIndex(dev.index)
        driver = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        # double data rate: two transfers per memory clock
        out["hbm_bytes_per_s_from_clocks"] = clock_mhz * 1e6 * bus_bits / 8 * 2
    except Exception as e:  # noqa: BLE001 - a reading NVML lacks on this device
        out.update(status="partial", reason=f"{type(e).__name__}: {e}")
        out.setdefault("driver", _driver_from_smi())
    finally:
        dev.close()
    return out


def run(ctx: dict) -> dict:
    found = versions()
    minimums = declared_minimums()
    result = {"status": "pass", "versions": found, "declared_minimums": minimums,
              "below_minimum": below_minimum(found, minimums), "executable": sys.executable}
    if not has_gpu():
        result.update(gpu=None, nvml={"status": "skipped", "reason": "skipped: no GPU"},
                      summary=f"no GPU; torch {found['torch']}, triton {found['triton']}")
        return result
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    result["gpu"] = {"name": name, "capability": f"{props.major}.{props.minor}",
                     "sm_count": props.multi_processor_count,
                     "memory_bytes": props.total_memory, "count": torch.cuda.device_count(),
                     "hbm_bytes_per_s_datasheet": hbm_peak(name)}
    result["nvml"] = _nvml(0)
    result["summary"] = (f"{name} (sm_{props.major}{props.minor}), driver "
                         f"{result['nvml'].get('driver')}, CUDA {found['torch_cuda']}, torch "
                         f"{found['torch']}, triton {found['triton']}")
    if result["below_minimum"]:
        result["status"] = "fail"
        result["reason"] = f"below the declared minimum versions: {result['below_minimum']}"
    return result
