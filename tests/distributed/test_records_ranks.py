"""What a run tells the user, on 2 gloo ranks: said once per job, not once per rank."""

from . import records_checks
from .launcher import run_on_ranks


def test_ckpt_path_last_without_a_checkpoint_warns_once_per_job():
    run_on_ranks(records_checks.check_ckpt_path_last_without_a_checkpoint_warns_once_per_job)
