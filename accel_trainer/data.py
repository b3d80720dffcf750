"""``DataModule`` and resolving which dataloaders a stage uses."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigurationError


class DataModule:
    """Bundles the data of a run: ``prepare_data`` (once per machine), ``setup(stage)``
    (on every process) and the three dataloader factories.

    Example:
        >>> class Digits(DataModule):
        ...     def setup(self, stage):
        ...         self.train, self.val = make_datasets()
        ...     def train_dataloader(self):
        ...         return torch.utils.data.DataLoader(self.train, batch_size=64, shuffle=True)
        ...     def val_dataloader(self):
        ...         return torch.utils.data.DataLoader(self.val, batch_size=256)
    """

    def prepare_data(self) -> None:
        """Download or write data to disk. Called on the local main process only."""

    def setup(self, stage: str) -> None:
        """Build datasets. Called on every process with "fit", "validate" or "test"."""

    def teardown(self, stage: str) -> None:
        """Release what ``setup`` built."""

    def train_dataloader(self) -> Any:
        """The training dataloader ``fit`` uses (after ``setup("fit")``)."""
        return None

    def val_dataloader(self) -> Any:
        """The validation dataloader(s) of ``fit`` and ``validate`` (None: no validation)."""
        return None

    def test_dataloader(self) -> Any:
        """The test dataloader(s) of ``test``."""
        return None


def as_list(loaders: Any) -> list:
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def resolve(explicit: Any, datamodule: Any, module: Any, factory: str) -> list:
    """Explicit dataloaders win, then the DataModule's, then the module's own factory."""
    if explicit is not None:
        return as_list(explicit)
    for source in (datamodule, module):
        fn = getattr(source, factory, None) if source is not None else None
        if callable(fn):
            loaders = as_list(fn())
            if loaders:
                return loaders
    return []


def loader_length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def check_not_empty(loader: Any, what: str) -> None:
    n = loader_length(loader)
    if n == 0:
        dataset = getattr(loader, "dataset", None)
        size = loader_length(dataset) if dataset is not None else None
        raise ConfigurationError(
            f"The {what} dataloader has length 0 (dataset size {size}, batch_size "
            f"{getattr(loader, 'batch_size', None)}, drop_last {getattr(loader, 'drop_last', None)}). "
            "Give it at least one batch: a non-empty dataset, or drop_last=False."
        )


def limit_batches(limit: int | float | None, length: int | None, what: str) -> int | float:
    """How many batches a ``limit_*_batches`` value allows (``math.inf`` for all)."""
    if limit is None:
        return length if length is not None else math.inf
    if isinstance(limit, float):
        if length is None:
            if limit == 1.0:
                return math.inf
            raise ConfigurationError(
                f"{what}={limit} is a fraction, but the dataloader has no length. Pass an int number of batches."
            )
        return max(1, int(length * limit)) if limit > 0 else 0
    return min(limit, length) if length is not None else limit
