"""Checkpoint state under FSDP2, on 2 gloo CPU ranks (see sharded_checks.py)."""

from . import sharded_checks
from .launcher import run_on_ranks


def test_fsdp2_checkpoint_state_is_the_full_unsharded_state():
    run_on_ranks(sharded_checks.check_full_state_gather)
