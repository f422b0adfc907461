"""Measurement: the step profiler (`profiler.py`), host/CUDA timers (`timing.py`), the
hardware sampler thread (`sampler.py`), trace/memory snapshot output (`output.py`), NVML behind
one interface (`nvml.py`), FLOPs/peak tables (`flops.py`) and HF's memory metrics
(`memory_metrics.py`).

May import: torch, fasttrain.models (to count FLOPs of the built-in GPT).
"""
