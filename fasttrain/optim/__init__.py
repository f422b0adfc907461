"""Optimizers and LR schedules: FusedAdamW (`adamw.py`), building an optimizer from the
arguments (`factory.py`: FusedAdamW or HF's torch-native `optim` names), device-side
tabulated schedules (`schedules.py`) of every HF `lr_scheduler_type` (`lr_multipliers.py`).

May import: torch, fasttrain.kernels, fasttrain.ops.
"""
