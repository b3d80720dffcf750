"""World-size invariance on 2 gloo CPU ranks forked by ``accelerate.debug_launcher``.

Checks that compare against a single process get a reference computed here, in the pytest
process, before forking; it reaches the ranks as a file (``debug_launcher`` passes ``args``).
"""

import pytest
from .launcher import run_on_ranks
from accelerate.state import AcceleratorState, GradientState

from . import invariance_checks


def _reset_accelerate_state() -> None:
    # The reference run initialised a 1-process state; the forked ranks must start clean.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("check", sorted(invariance_checks.CHECKS_WITH_REFERENCE))
def test_same_as_one_process(check, tmp_path):
    ref_path = str(tmp_path / "reference.pt")
    _reset_accelerate_state()
    invariance_checks.write_references(ref_path, [invariance_checks.CHECKS_WITH_REFERENCE[check]])
    _reset_accelerate_state()
    run_on_ranks(getattr(invariance_checks, check), args=(ref_path,))


@pytest.mark.parametrize("check", invariance_checks.CHECKS_WITHOUT_REFERENCE)
def test_two_ranks_agree(check):
    run_on_ranks(getattr(invariance_checks, check))
