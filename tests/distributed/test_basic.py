"""Run the two-rank checks on 2 gloo CPU ranks forked by ``accelerate.debug_launcher``."""

import pytest
from accelerate import debug_launcher

from . import basic_checks


@pytest.mark.parametrize("check", ["check_one_optimizer", "check_two_optimizers"])
def test_two_ranks(check):
    debug_launcher(getattr(basic_checks, check), num_processes=2)
