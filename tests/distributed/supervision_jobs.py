"""Jobs for the supervision tests (issue 15), on 2 ranks: forked by ``launcher.run_on_ranks``, or
started by the real ``accelerate launch`` (``main()``).

``accelerate launch supervision_jobs.py MODE ROOT [CKPT]``:

* ``slow``: a Regressor for 50 epochs; from global step 3 each rank writes ``pid-<rank>``
  and ``training`` into ROOT's parent and sleeps 0.1 s after each batch, so that the test
  can kill or signal the launcher while training runs.
* ``hang``: rank 1 hangs in ``training_step`` at global step 3 (writing ``hanging`` first),
  with ``collective_timeout=5``.
* ``finish``: resume ROOT's ``last.ckpt`` and train to 6 epochs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from helpers import Regressor, loader  # noqa: E402

from accel_trainer import Callback, Trainer  # noqa: E402
from accel_trainer.preemption import Preempted  # noqa: E402

HANG_TIMEOUT_S = 5


class Slow(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= 3:
            rank = trainer.accelerator.process_index
            marker = os.path.join(self.out_dir, f"pid-{rank}")
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
            if trainer.is_global_zero:
                open(os.path.join(self.out_dir, "training"), "w").close()
            time.sleep(0.1)


class HangOnRank1(Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.trainer.global_step == 3 and self.trainer.accelerator.process_index == 1:
            open(os.path.join(os.path.dirname(self.trainer.default_root_dir), "hanging"), "w").close()
            time.sleep(600)  # stuck: never reaches the next collective
        return super().training_step(batch, batch_idx)


def main() -> None:
    import faulthandler

    faulthandler.enable()
    mode, root = sys.argv[1], sys.argv[2]
    out_dir = os.path.dirname(root)
    data = loader(64, batch_size=4)  # 8 steps an epoch on 2 ranks
    if mode == "slow":
        trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, max_epochs=50, callbacks=[Slow(out_dir)])
        trainer.fit(Regressor(), data)
    elif mode == "hang":
        trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, max_epochs=50, collective_timeout=HANG_TIMEOUT_S)
        trainer.fit(HangOnRank1(), data)
    elif mode == "finish":
        trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, max_epochs=6)
        trainer.fit(Regressor(), data, ckpt_path="last")
        if trainer.is_global_zero:
            with open(os.path.join(out_dir, "finished.json"), "w") as f:
                json.dump({"global_step": trainer.global_step, "epoch": trainer.current_epoch}, f)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


# -- forked by run_on_ranks ------------------------------------------------------------------------
def _result(out_dir: str, rank: int, **values: Any) -> None:
    with open(os.path.join(out_dir, f"result-{rank}.json"), "w") as f:
        json.dump(values, f)


def locked_run(root: str, out_dir: str) -> None:
    """fit on every rank while the test process holds the run directory's lock."""
    from accel_trainer.run_dir import RunDirectoryLocked

    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, max_epochs=1)
    rank = trainer.accelerator.process_index
    try:
        trainer.fit(Regressor(), loader(32, batch_size=4))
        _result(out_dir, rank, outcome="trained")
    except RunDirectoryLocked as err:
        _result(out_dir, rank, outcome="refused", message=str(err), global_step=trainer.global_step)


class _PoisonOnRank1(Callback):
    """Rank 1 alone gets a NaN weight at the end of epoch 1 (ranks out of step, as after a local fault)."""

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if trainer.current_epoch == 1 and trainer.accelerator.process_index == 1:
            with torch.no_grad():
                module.net.weight[0, 0] = float("nan")


def nonfinite_on_one_rank(root: str, out_dir: str) -> None:
    """Both ranks refuse the save together, and neither waits for the other forever."""
    import warnings

    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, max_epochs=2, callbacks=[_PoisonOnRank1()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Regressor(), loader(32, batch_size=4))
    refused = [str(w.message) for w in caught if "NOT writing checkpoint" in str(w.message)]
    written = trainer.save_checkpoint(os.path.join(root, "after.ckpt"))
    _result(out_dir, trainer.accelerator.process_index, refused=refused, written_after=written, global_step=trainer.global_step)


class _SignalInValidation(Callback):
    """Rank 0 alone receives SIGTERM in its second validation batch of epoch 1."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.seen: list[int] = []

    def on_validation_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.training and trainer.current_epoch == 1:
            self.seen.append(batch_idx)
            if batch_idx == 1 and trainer.accelerator.process_index == 0:
                import signal

                os.kill(os.getpid(), signal.SIGTERM)


def sigterm_in_validation(root: str, out_dir: str) -> None:
    spy = _SignalInValidation(out_dir)
    val = loader(64, batch_size=2)  # 16 validation batches per rank
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, max_epochs=3, callbacks=[spy])
    rank = trainer.accelerator.process_index
    try:
        trainer.fit(Regressor(), loader(32, batch_size=4), val)
        _result(out_dir, rank, outcome="finished", seen=spy.seen)
    except Preempted as stop:
        _result(out_dir, rank, outcome="preempted", seen=spy.seen, global_step=trainer.global_step, code=stop.code,
                checkpoint=stop.checkpoint_path)


if __name__ == "__main__":
    main()
