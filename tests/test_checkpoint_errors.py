"""Bad checkpoints get errors that say what is wrong, not stack traces from deep inside torch."""

from __future__ import annotations

import pytest
import torch

from accel_trainer import Trainer
from accel_trainer.errors import CheckpointError

from helpers import Regressor, TwoPart, loader


def _trained(tmp_path, module):
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path), max_epochs=1)
    trainer.fit(module, loader())
    return tmp_path / "checkpoints" / "last.ckpt"


def _resume(tmp_path, module, path):
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path / "other"), max_epochs=2)
    trainer.fit(module, loader(), ckpt_path=str(path))


def test_different_number_of_optimizers_is_named(tmp_path):
    path = _trained(tmp_path, TwoPart())

    class OneOptimizer(TwoPart):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def training_step(self, batch, batch_idx):
            return self.discriminator(self.generator(batch[0])).mean()

    with pytest.raises(CheckpointError, match=r"2 optimizer\(s\), configure_optimizers returned 1"):
        _resume(tmp_path, OneOptimizer(), path)


def test_missing_and_unexpected_parameters_are_named(tmp_path):
    path = _trained(tmp_path, Regressor())

    class Renamed(Regressor):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(1, 1)

    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \['head.bias', 'head.weight'\]"):
        _resume(tmp_path, Renamed(), path)


def test_a_file_that_is_not_ours_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not an accel_trainer checkpoint"):
        _resume(tmp_path, Regressor(), path)


def test_truncated_checkpoint(tmp_path):
    path = _trained(tmp_path, Regressor())
    data = path.read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _resume(tmp_path, Regressor(), broken)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("garbage", "truncated or corrupt (UnpicklingError: Unsupported operand"),
        ("pickled_object", "holds a pickled fractions.Fraction object"),
    ],
)
def test_unreadable_checkpoint_messages_never_advise_weights_only_false(tmp_path, content, expected):
    import fractions

    path = tmp_path / "bad.ckpt"
    if content == "garbage":
        path.write_bytes(b"garbage bytes that are not a zip archive")
    else:
        torch.save({"format": "accel_trainer/1", "x": fractions.Fraction(1, 2)}, path)
    with pytest.raises(CheckpointError) as err:
        _resume(tmp_path, Regressor(), path)
    message = str(err.value)
    assert expected in message, message
    assert "weights_only" not in message and "arbitrary code" not in message, message
