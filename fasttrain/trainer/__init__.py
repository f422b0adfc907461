"""The Trainer: the one package that knows the others and composes them into a step.

Owns the training loop (`trainer.py`), evaluation and prediction (`evaluation.py`), the
save/resume of a run (`checkpointing.py`), the profiler + compile monitor wiring
(`instruments.py`), the metrics log (`metrics_log.py`) and small batch helpers (`utils.py`).
May import every other fasttrain package; nothing else imports it (the CLI excepted).
"""
from fasttrain.trainer.trainer import Trainer

__all__ = ["Trainer"]
