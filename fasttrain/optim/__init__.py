"""Optimizers and LR schedules: FusedAdamW (`adamw.py`), building an optimizer from the
arguments (`factory.py`), device-side tabulated schedules (`schedules.py`).

May import: torch, fasttrain.kernels, fasttrain.ops.
"""
