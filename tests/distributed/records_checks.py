"""Two-rank checks of what a run tells the user (runnable by any launcher: ``main()``)."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from helpers import Regressor, loader  # noqa: E402

from accel_trainer import Trainer  # noqa: E402


def check_ckpt_path_last_without_a_checkpoint_warns_once_per_job() -> None:
    root = tempfile.mkdtemp()  # empty: no checkpoints/last.ckpt yet
    trainer = Trainer(max_epochs=1, enable_progress_bar=False, default_root_dir=root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Regressor(), loader(32, 8), ckpt_path="last")
    mine = [w for w in caught if "ckpt_path='last' but" in str(w.message)]
    expected = 1 if trainer.accelerator.process_index == 0 else 0
    assert trainer.world_size == 2
    assert len(mine) == expected, (trainer.accelerator.process_index, [str(w.message) for w in mine])


def main() -> None:
    check_ckpt_path_last_without_a_checkpoint_warns_once_per_job()


if __name__ == "__main__":
    main()
