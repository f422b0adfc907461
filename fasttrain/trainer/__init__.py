"""The Trainer: the one package that knows the others and composes them into a step.

Owns the training loop and the HF-compatible methods (`trainer.py`), the loop's mutable state
in one object (`run_state.py`: position, logging window, device-side counters, stop signal),
evaluation and prediction as explicit functions (`evaluation.py`), the profiler + compile
monitor wiring (`instruments.py`), the metrics log (`metrics_log.py`) and small batch helpers
(`utils.py`). Save/resume is `fasttrain.checkpoint.Checkpointer`, handed the components.
May import every other fasttrain package; nothing else imports it (the CLI excepted).
"""
from fasttrain.trainer.trainer import Trainer

__all__ = ["Trainer"]
