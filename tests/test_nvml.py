"""NVML parsing and formatting against FAKE recordings (tests/data/nvml_*.json, marked _FAKE),
the real 'NVML absent' path of this machine, and a real NVML read on a GPU (marked gpu)."""
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fasttrain.profiler.nvml import GIB, NvmlUnavailable, format_sample, open_device, parse_sample, read_raw
from fasttrain.profiler.sampler import HardwareSampler

DATA = Path(__file__).parent / "data"


class NVMLError_NotSupported(Exception):  # same class name pynvml uses
    pass


class FakeNvml:
    """FAKE pynvml: replays one JSON recording; never used outside tests."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, name: str, fail_init: Exception | None = None):
        self.data = json.loads((DATA / name).read_text())
        assert "FAKE" in self.data["_FAKE"]
        self.fail_init, self.shutdowns, self.calls = fail_init, 0, []

    def _get(self, key):
        value = self.data[key]
        if value == "NotSupported":
            raise NVMLError_NotSupported("Not Supported")
        return SimpleNamespace(**value) if isinstance(value, dict) else value

    def nvmlInit(self):
        if self.fail_init:
            raise self.fail_init

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        self.calls.append(index)
        return ("handle", index)

    def nvmlDeviceGetName(self, h):
        return self._get("nvmlDeviceGetName")

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._get("nvmlDeviceGetMemoryInfo")

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._get("nvmlDeviceGetUtilizationRates")

    def nvmlDeviceGetPowerUsage(self, h):
        return self._get("nvmlDeviceGetPowerUsage")

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._get("nvmlDeviceGetTemperature")

    def nvmlDeviceGetClockInfo(self, h, clock):
        assert clock == self.NVML_CLOCK_SM
        return self._get("nvmlDeviceGetClockInfo")


def test_parse_full_sample_converts_units():
    sample = parse_sample(read_raw(FakeNvml("nvml_h100_sxm.json"), None))
    assert sample.name == "NVIDIA H100 80GB HBM3"
    assert sample.memory_used_bytes == 42949672960 and sample.memory_total_bytes == 85520809984
    assert sample.gpu_util_percent == 97 and sample.memory_util_percent == 41
    assert sample.power_w == pytest.approx(612.345)
    assert sample.temperature_c == 64 and sample.sm_clock_mhz == 1980


def test_format_full_sample():
    sample = parse_sample(read_raw(FakeNvml("nvml_h100_sxm.json"), None))
    assert format_sample(sample) == ("NVIDIA H100 80GB HBM3: mem 40.0/79.6 GiB, util 97%, "
                                     "612 W, 64 C, SM 1980 MHz")


def test_not_supported_fields_become_none_and_na():
    sample = parse_sample(read_raw(FakeNvml("nvml_geforce_notsupported.json"), None))
    assert sample.power_w is None and sample.gpu_util_percent is None
    assert sample.memory_used_bytes == GIB and sample.temperature_c == 41
    assert format_sample(sample) == ("NVIDIA GeForce RTX 4090: mem 1.0/24.0 GiB, util n/a, "
                                     "n/a, 41 C, SM 2520 MHz")


def test_other_nvml_errors_propagate_from_read():
    fake = FakeNvml("nvml_h100_sxm.json")
    fake.nvmlDeviceGetPowerUsage = lambda h: (_ for _ in ()).throw(RuntimeError("GPU is lost"))
    with pytest.raises(RuntimeError, match="GPU is lost"):
        read_raw(fake, None)


@pytest.mark.parametrize("raw, match", [
    ({"memory_info": None}, "without 'name'"),
    ({"name": "x", "memory_info": {"used": 2, "total": 1}}, "used=2 > total=1"),
    ({"name": "x", "power_usage_mw": -5}, "power_usage_mw=-5"),
])
def test_parse_rejects_malformed(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_sample(raw)


def test_open_device_reports_init_failure_in_one_line():
    fake = FakeNvml("nvml_h100_sxm.json", fail_init=OSError("NVML Shared Library Not Found"))
    with pytest.raises(NvmlUnavailable) as info:
        open_device(0, lib=fake)
    assert "\n" not in str(info.value) and "NVML Shared Library Not Found" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real NVML-absent path")
def test_real_pynvml_absent_here_raises_unavailable():
    with pytest.raises(NvmlUnavailable, match="NVML unavailable"):
        open_device(0)


def test_sampler_with_fake_gpu_reports_gpu_metrics_and_aggregates():
    fake = FakeNvml("nvml_h100_sxm.json")
    sampler = HardwareSampler(torch.device("cuda", 0), interval_s=0.01, nvml_lib=fake)
    assert sampler.nvml_status == "NVML ok" and fake.calls == [0]
    sampler.start()
    time.sleep(0.05)
    sampler.stop()
    latest = sampler.latest()
    assert latest["gpu_memory_used_gib"] == pytest.approx(40.0)
    assert latest["gpu_power_w"] == pytest.approx(612.345)
    assert latest["gpu_sm_clock_mhz"] == 1980.0 and latest["gpu_temperature_c"] == 64.0
    agg = sampler.aggregates()
    assert agg["gpu_util_percent_mean"] == 97.0 and agg["gpu_util_percent_max"] == 97.0
    assert sampler.last_gpu_line.startswith("NVIDIA H100 80GB HBM3: mem 40.0/79.6 GiB")
    assert fake.shutdowns == 1


def test_sampler_nvml_absent_says_so_in_one_line_and_still_samples_host():
    fake = FakeNvml("nvml_h100_sxm.json", fail_init=OSError("NVML Shared Library Not Found"))
    sampler = HardwareSampler(torch.device("cuda", 0), interval_s=0.01, nvml_lib=fake)
    assert sampler.nvml_status.startswith("NVML unavailable") and "\n" not in sampler.nvml_status
    metrics = sampler.sample_once()
    assert metrics["host_rss_gib"] > 0 and not any(k.startswith("gpu_") for k in metrics)


def test_sampler_real_cpu_path_measures_rss_and_cpu_utilisation():
    # 0.1 s samples (the Trainer's are 1 s): over 20 ms, the two clocks' jitter alone read 108%
    sampler = HardwareSampler(torch.device("cpu"), interval_s=0.1)
    assert sampler.nvml_status == "NVML not used: device is not a CUDA GPU"
    sampler.start()
    end = time.perf_counter() + 0.6
    x = torch.randn(256, 256)
    while time.perf_counter() < end:  # keep this process busy so CPU% is clearly above 0
        x = torch.tanh(x @ x)
    sampler.stop()
    latest, agg = sampler.latest(), sampler.aggregates()
    assert 0.01 < latest["host_rss_gib"] <= latest["host_rss_peak_gib"] + 1e-9
    assert 5.0 < agg["cpu_util_percent_max"] <= 105.0
    with pytest.raises(ValueError, match="interval_s"):
        HardwareSampler(torch.device("cpu"), interval_s=0)


@pytest.mark.gpu
def test_real_nvml_sample_on_gpu():
    device = open_device(torch.cuda.current_device())
    sample = device.sample()
    device.close()
    assert sample.name == torch.cuda.get_device_name()
    assert 0 < sample.memory_used_bytes <= sample.memory_total_bytes
    total = torch.cuda.get_device_properties(0).total_memory
    assert abs(sample.memory_total_bytes - total) < 0.1 * total
