"""accel_trainer: Lightning-style optimization on Hugging Face Accelerate."""

from .callbacks.base import Callback
from .data import DataModule
from .module import TrainingModule
from .trainer import Trainer

__all__ = ["Callback", "DataModule", "Trainer", "TrainingModule"]
__version__ = "0.1.0"
