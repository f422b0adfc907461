"""The one small interface to NVML (package nvidia-ml-py, module `pynvml`).

Everything NVML-specific lives here: opening the device that matches a CUDA index, reading
one raw sample, turning it into a `GpuSample` with SI units, and formatting it. The
profiler samples on a background thread; nothing here touches the CUDA stream, so reading
NVML never synchronises the device.

`open_device(..., lib=...)` takes any object with pynvml's function names, which is how the
tests replay a fake recording (tests/data/nvml_*.json) on machines without a GPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024 ** 3


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; the message says why in one line."""


@dataclass(frozen=True)
class GpuSample:
    """One NVML reading. A field NVML does not support on this device is None."""

    name: str
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    gpu_util_percent: float | None
    memory_util_percent: float | None
    power_w: float | None
    temperature_c: float | None
    sm_clock_mhz: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _call(fn, *args):
    """NVML call that yields None for 'not supported' (MIG slices, some GeForce fields)."""
    try:
        return fn(*args)
    except Exception as exc:  # pynvml.NVMLError subclasses; the fake raises plain errors
        if "NotSupported" in type(exc).__name__ or "Not Supported" in str(exc):
            return None
        raise


def read_raw(lib, handle) -> dict[str, Any]:
    """One reading, as NVML's own units: bytes, percent, milliwatts, Celsius, MHz."""
    memory = _call(lib.nvmlDeviceGetMemoryInfo, handle)
    util = _call(lib.nvmlDeviceGetUtilizationRates, handle)
    name = lib.nvmlDeviceGetName(handle)
    return {
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "memory_info": None if memory is None else
        {"total": memory.total, "used": memory.used, "free": memory.free},
        "utilization": None if util is None else {"gpu": util.gpu, "memory": util.memory},
        "power_usage_mw": _call(lib.nvmlDeviceGetPowerUsage, handle),
        "temperature_c": _call(lib.nvmlDeviceGetTemperature, handle,
                               getattr(lib, "NVML_TEMPERATURE_GPU", 0)),
        "sm_clock_mhz": _call(lib.nvmlDeviceGetClockInfo, handle, getattr(lib, "NVML_CLOCK_SM", 1)),
    }


def _number(raw: dict, key: str, scale: float = 1.0) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"NVML field {key}={value!r}: expected a non-negative number")
    return value * scale


def parse_sample(raw: dict[str, Any]) -> GpuSample:
    """Turn `read_raw` output into a GpuSample (watts instead of milliwatts)."""
    if "name" not in raw:
        raise ValueError(f"NVML sample without 'name': keys are {sorted(raw)}")
    memory, util = raw.get("memory_info") or {}, raw.get("utilization") or {}
    used, total = memory.get("used"), memory.get("total")
    if used is not None and total is not None and used > total:
        raise ValueError(f"NVML memory_info used={used} > total={total}")
    return GpuSample(
        name=raw["name"],
        memory_used_bytes=used,
        memory_total_bytes=total,
        gpu_util_percent=_number(util, "gpu"),
        memory_util_percent=_number(util, "memory"),
        power_w=_number(raw, "power_usage_mw", 1e-3),
        temperature_c=_number(raw, "temperature_c"),
        sm_clock_mhz=_number(raw, "sm_clock_mhz"),
    )


def _fmt(value, spec: str, unit: str) -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def format_sample(sample: GpuSample) -> str:
    """One line: 'NVIDIA H100 80GB HBM3: mem 40.0/79.6 GiB, util 97%, 612 W, 64 C, SM 1980 MHz'."""
    used = None if sample.memory_used_bytes is None else sample.memory_used_bytes / GIB
    total = None if sample.memory_total_bytes is None else sample.memory_total_bytes / GIB
    return (f"{sample.name}: mem {_fmt(used, '.1f', '')}/{_fmt(total, '.1f', ' GiB')}, "
            f"util {_fmt(sample.gpu_util_percent, '.0f', '%')}, {_fmt(sample.power_w, '.0f', ' W')}, "
            f"{_fmt(sample.temperature_c, '.0f', ' C')}, SM {_fmt(sample.sm_clock_mhz, '.0f', ' MHz')}")


class NvmlDevice:
    """An opened NVML device handle; `sample()` is safe to call from any thread."""

    def __init__(self, lib, handle, index: int):
        self._lib, self._handle, self.index = lib, handle, index

    def sample(self) -> GpuSample:
        return parse_sample(read_raw(self._lib, self._handle))

    def close(self) -> None:
        _call(self._lib.nvmlShutdown)


def _nvml_index(cuda_index: int) -> int:
    """NVML enumerates all GPUs; CUDA_VISIBLE_DEVICES may reorder or hide some."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda._get_nvml_device_index(cuda_index)
    except Exception:  # private helper; fall back to the plain index
        pass
    return cuda_index


def open_device(cuda_index: int, lib=None) -> NvmlDevice:
    """Open the NVML device behind CUDA device `cuda_index`; NvmlUnavailable says why not."""
    if lib is None:
        try:
            import pynvml as lib
        except ImportError as exc:
            raise NvmlUnavailable("NVML unavailable: nvidia-ml-py is not installed "
                                  "(pip install nvidia-ml-py)") from exc
    try:
        lib.nvmlInit()
    except Exception as exc:
        raise NvmlUnavailable(f"NVML unavailable: {type(exc).__name__}: {exc}") from exc
    index = _nvml_index(cuda_index)
    try:
        handle = lib.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:
        raise NvmlUnavailable(f"NVML unavailable for device {cuda_index}: {exc}") from exc
    return NvmlDevice(lib, handle, index)
