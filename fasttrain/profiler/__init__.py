"""Measurement: the step profiler (`profiler.py`), host/CUDA timers (`timing.py`), the
hardware sampler thread (`sampler.py`), trace/memory snapshot output (`output.py`), NVML behind
one interface (`nvml.py`) and FLOPs/peak tables (`flops.py`).

May import: torch, fasttrain.models (to count FLOPs of the built-in GPT).
"""
