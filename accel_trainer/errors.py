"""Exceptions raised by accel_trainer.

Every error a user can cause by what they hand in (Trainer arguments, the output of
``configure_optimizers``, a dataloader, a checkpoint) is a subclass of one of these, so a
caller can tell "you configured this wrong" apart from a bug deep inside torch.
"""

from __future__ import annotations


class ConfigurationError(ValueError):
    """A configuration that cannot work, detected before (or instead of) training on it.

    The message names the offending argument, the value received and what is allowed.
    """


class TrainingError(RuntimeError):
    """Training reached a state it cannot continue from (a non-finite loss, say)."""


class RankDesyncError(TrainingError):
    """Two ranks disagree on counters or learning rates: continuing would silently diverge."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or does not fit the module being resumed."""
