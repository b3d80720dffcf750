"""Run the two-rank checks on 2 gloo CPU ranks forked by ``accelerate.debug_launcher``."""

import pytest
from .launcher import run_on_ranks

from . import basic_checks


@pytest.mark.parametrize(
    "check", ["check_one_optimizer", "check_two_optimizers", "check_lbfgs_ranks_agree_and_match_one_process_on_the_global_batch"]
)
def test_two_ranks(check):
    run_on_ranks(getattr(basic_checks, check))
