"""Measurement: the step profiler (`profiler.py`), host/CUDA timers (`timing.py`), the
hardware sampler thread (`sampler.py`), trace/memory snapshot output (`output.py`), NVML behind
one interface (`nvml.py`), FLOPs/peak tables (`flops.py`), HF's memory metrics
(`memory_metrics.py`) and the hand-written loop the Trainer's per-step overhead is measured
against (`hand_loop.py`: bench, tests, gpu-check).

May import: torch, fasttrain.models (to count FLOPs of the built-in GPT).
"""
