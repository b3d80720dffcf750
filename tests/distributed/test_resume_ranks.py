"""Exact resume on 2 ranks, and resume across world sizes (2 -> 1 and 1 -> 2).

Forked ranks must be started before this process runs the single-process halves (a fork
after the parent ran torch kernels can deadlock the children), so the 1 -> 2 test runs its
single-process half in a subprocess.
"""

import os
import subprocess
import sys

import pytest

from . import resume_checks
from .launcher import run_on_ranks


def test_two_rank_resume_is_bitwise_exact(tmp_path):
    run_on_ranks(resume_checks.check_two_rank_resume_is_exact, args=(str(tmp_path),))


@pytest.mark.slow
def test_two_rank_resume_from_validation_driven_checkpoints_is_exact(tmp_path):
    run_on_ranks(resume_checks.check_two_rank_resume_from_validation_checkpoints, args=(str(tmp_path),))


def test_a_signal_on_one_rank_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    run_on_ranks(resume_checks.check_signal_on_one_rank_stops_every_rank_at_the_same_step, args=(str(tmp_path),))


def test_saved_on_two_ranks_resumed_on_one(tmp_path):
    run_on_ranks(resume_checks.save_on_this_world, args=(str(tmp_path / "run"), 7))
    # the same 1-process run uninterrupted gives the schedule the resumed run must continue on
    reference = resume_checks.fit_unshuffled(str(tmp_path / "reference"), 12, max_epochs=3)
    result = resume_checks.resume_on_this_world(str(tmp_path / "run"))
    assert result["global_step"] == reference.global_step == 15
    assert result["optimizer_steps"] == list(reference.optimizer_steps)
    assert result["lrs"] == [[g["lr"] for g in opt.param_groups] for opt in reference.optimizers]


@pytest.mark.slow
def test_saved_on_one_resumed_on_two_ranks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    subprocess.run(
        [sys.executable, resume_checks.__file__, "--save-on-one", str(tmp_path)], env=env, check=True, timeout=300
    )
    run_on_ranks(resume_checks.check_resume_saved_on_1, args=(str(tmp_path / "run"),))
