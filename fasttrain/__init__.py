"""fasttrain: a performance-first PyTorch trainer with the HuggingFace Trainer interface."""
from fasttrain.callbacks import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState
from fasttrain.trainer import Trainer
from fasttrain.trainer_utils import EvalPrediction
from fasttrain.training_args import TrainingArguments

__version__ = "0.1.0"

__all__ = ["Trainer", "TrainingArguments", "TrainerCallback", "TrainerState", "TrainerControl",
           "EarlyStoppingCallback", "EvalPrediction"]
