"""fasttrain: a performance-first PyTorch trainer with the HuggingFace Trainer interface.

Layout (docs/ARCHITECTURE.md): cli -> trainer -> the concerns it composes (checkpoint, optim,
precision, profiler, compile, data, ops, models) -> foundations (distributed, kernels,
training_args, callbacks). Imports point downward only; tests/test_architecture.py enforces it.
"""
import os as _os

# kernels/ sits at the repository root and installs as fasttrain.kernels. Run from a source
# tree (PYTHONPATH=., or an editable install seen from a git worktree), the package's search
# path also covers the root so that `fasttrain.kernels` resolves to *this* tree's kernels/.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and \
        _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    __path__.append(_root)  # noqa: F821 (module __path__)

from fasttrain.callbacks import (DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback,  # noqa: E402
                                 ProgressCallback, TrainerCallback, TrainerControl, TrainerState)
from fasttrain.trainer.trainer import Trainer  # noqa: E402
from fasttrain.trainer.utils import EvalPrediction  # noqa: E402
from fasttrain.training_args import TrainingArguments  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Trainer", "TrainingArguments", "TrainerCallback", "TrainerState", "TrainerControl",
           "EarlyStoppingCallback", "DefaultFlowCallback", "ProgressCallback", "PrinterCallback",
           "EvalPrediction"]
