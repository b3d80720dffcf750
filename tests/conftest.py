"""Shared fixtures: a fresh Accelerate state per test, and quiet trainers."""

import warnings

import pytest
import torch

# The distributed tests fork ranks from this process. A fork after torch has spun up its
# OpenMP thread pool can deadlock the children's first parallel kernel, so the whole test
# session runs torch single-threaded (tiny models lose nothing by it).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; never let one test's state leak into the next."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def trainer_kwargs(tmp_path):
    """The arguments every test trainer shares: CPU, no progress bar, a temporary run dir."""
    return dict(cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path))


def pytest_runtest_setup(item):
    """Tests marked ``deepspeed`` need the optional extra: skipped without it, except where
    ``ACCEL_TRAINER_REQUIRE_DEEPSPEED=1`` (CI installs the extra and must run them: there a
    missing DeepSpeed fails them)."""
    import importlib.util
    import os

    if item.get_closest_marker("deepspeed") is None or importlib.util.find_spec("deepspeed") is not None:
        return
    if os.environ.get("ACCEL_TRAINER_REQUIRE_DEEPSPEED") == "1":
        pytest.fail('deepspeed is not installed, and ACCEL_TRAINER_REQUIRE_DEEPSPEED=1: pip install -e ".[deepspeed]"')
    pytest.skip('needs the deepspeed extra: pip install -e ".[deepspeed]"')
