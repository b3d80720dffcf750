"""Non-finite loss and gradients on 2 gloo ranks (DDP and FSDP2): ranks agree on skipping
without a collective per step under DDP; FSDP checks its local shards (see nonfinite_checks.py)."""

import pytest

from . import nonfinite_checks
from .launcher import run_on_ranks

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("check", nonfinite_checks.CHECKS)
def test_ranks_agree_on_nonfinite_steps(check):
    run_on_ranks(getattr(nonfinite_checks, check))
