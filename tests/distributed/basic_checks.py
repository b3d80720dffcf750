"""Two-rank checks, importable and runnable by any launcher (``main()``).

Each function trains on every rank and asserts, on every rank, what must agree across ranks.
Run directly with:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/distributed/basic_checks.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from helpers import Regressor, TwoPart, loader  # noqa: E402

from accel_trainer import Trainer  # noqa: E402


def _flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _assert_identical_on_all_ranks(trainer: Trainer, module: torch.nn.Module) -> None:
    acc = trainer.accelerator
    assert acc.num_processes == 2, f"expected 2 ranks, got {acc.num_processes}"
    gathered = acc.gather(_flat_params(module).unsqueeze(0))
    assert torch.equal(gathered[0], gathered[1]), "parameters differ across ranks"
    counters = torch.tensor([trainer.global_step, *trainer.optimizer_steps], dtype=torch.float64)
    all_counters = acc.gather(counters.unsqueeze(0))
    assert torch.equal(all_counters[0], all_counters[1]), f"counters differ across ranks: {all_counters.tolist()}"


def check_one_optimizer() -> None:
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(max_epochs=2, cpu=True, enable_progress_bar=False, default_root_dir=root)
        module = Regressor()
        trainer.fit(module, loader(64, shuffle=True), loader(33))
        _assert_identical_on_all_ranks(trainer, module)
        # 64 samples / batch 8 = 8 batches, sharded over 2 ranks = 4 per rank per epoch
        assert trainer.global_step == 8 and trainer.optimizer_steps == [8]


def check_two_optimizers() -> None:
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(max_epochs=2, cpu=True, enable_progress_bar=False, default_root_dir=root)
        module = TwoPart()
        trainer.fit(module, loader(64, shuffle=True))
        _assert_identical_on_all_ranks(trainer, module)
        assert trainer.optimizer_steps == [8, 8]


def check_lbfgs_ranks_agree_and_match_one_process_on_the_global_batch() -> None:
    """LBFGS (strong-Wolfe line search) on 2 ranks == one process on the 2x batch."""
    features, batch, lr = 4, 8, 0.5

    def lbfgs(params):
        return torch.optim.LBFGS(params, lr=lr, max_iter=6, line_search_fn="strong_wolfe", tolerance_change=1e-4)

    class LBFGSRegressor(Regressor):
        def configure_optimizers(self):
            return lbfgs(self.parameters())

    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(max_epochs=2, cpu=True, enable_progress_bar=False, default_root_dir=root)
        module = LBFGSRegressor()
        trainer.fit(module, loader(64, batch_size=batch))
        _assert_identical_on_all_ranks(trainer, module)
        assert trainer.optimizer_steps == [8]
    # the same optimization by hand in this process: rank r got batches r, r+2, ... so step k
    # saw batches 2k and 2k+1 of the unsharded loader, i.e. one batch of 2x the size
    reference = Regressor().net
    optimizer = lbfgs(reference.parameters())
    for _ in range(2):
        for x, y in loader(64, batch_size=2 * batch):
            def closure():
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(reference(x), y)
                loss.backward()
                return loss
            optimizer.step(closure)
    for mine, expected in zip(module.net.parameters(), reference.parameters()):
        assert torch.allclose(mine, expected, atol=1e-5), f"2-rank LBFGS {mine} vs one process {expected}"


def main() -> None:
    check_one_optimizer()
    check_two_optimizers()


if __name__ == "__main__":
    main()
