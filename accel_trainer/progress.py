"""Progress display on the main process."""

from __future__ import annotations

import math
from typing import Any


def make_progress(total: Any, epoch: int, enabled: bool) -> Any:
    """A progress bar for one training epoch, or ``None`` when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total if total != math.inf else None, desc=f"Epoch {epoch}", leave=False, dynamic_ncols=True)
