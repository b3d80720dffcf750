"""scikit-learn's handwritten digits (``load_digits``: 1797 images of 8x8 pixels, shipped with
scikit-learn, nothing to download): a classifier and a GAN.

- :class:`DigitsDataModule`: stratified train / val / test splits, images flattened to 64
  floats in [0, 1].
- :class:`DigitsClassifier`: a small MLP; torchmetrics accuracy logged as ``val_acc``;
  Adam + ``ReduceLROnPlateau`` on ``val_acc`` (mode max), optional declarative warm-up.
- :class:`DigitsGAN`: the seed's GAN set-up — ``[Adam(generator), SGD(discriminator)]``
  with ``[ReduceLROnPlateau, LambdaLR]``, an ``optimizer_step`` override that steps the
  generator every 2 batches and the discriminator every 4, and the seed's warm-up on
  ``trainer.global_step``. It writes a grid of generated digits every epoch to
  ``{trainer.log_dir}/samples/epoch_NNN.png`` and logs ``val_digit_score``, an
  Inception-score analogue (see :func:`digit_score`).

Run them with ``accel-trainer fit --config configs/digits_classifier.yaml`` or
``configs/digits_gan.yaml``, or from Python::

    from accel_trainer import Trainer
    from accel_trainer.examples.digits import DigitsDataModule, DigitsClassifier

    trainer = Trainer(max_epochs=20, default_root_dir="runs/digits")
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..data import DataModule
from ..module import TrainingModule

IMAGE_SIDE = 8
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 images as float32 [N, 64] in [0, 1] (pixels are 0..16) and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


class DigitsDataModule(DataModule):
    """Stratified train / val / test splits of ``load_digits``, identical on every rank.

    Args:
        batch_size: training batch size (validation and test use 4x, as they need no gradients).
        val_fraction: share of the 1797 images held out for validation.
        test_fraction: share held out for ``test`` (0: ``test`` uses the validation split).
        seed: seed of the split (not of training; that is ``trainer.seed``).
        num_workers: ``DataLoader`` workers (0: load in the main process, fastest for this size).

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))      # x: [32, 64] in [0, 1], y: [32]
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"DigitsDataModule(batch_size={batch_size}): expected an int >= 1.")
        if not (0.0 < val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
            raise ValueError(
                f"DigitsDataModule(val_fraction={val_fraction}, test_fraction={test_fraction}): expected "
                "0 < val_fraction < 1, 0 <= test_fraction < 1 and val_fraction + test_fraction < 1."
            )
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        from sklearn.model_selection import train_test_split

        x, y = _digits()
        index = np.arange(len(y))
        rest, test = (index, index[:0])
        if self.test_fraction > 0:
            rest, test = train_test_split(index, test_size=self.test_fraction, stratify=y, random_state=self.seed)
        val_share = self.val_fraction / (1.0 - self.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=self.seed)
        as_set = lambda idx: TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
        self.train_set, self.val_set = as_set(train), as_set(val)
        self.test_set = as_set(test) if len(test) else self.val_set

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_made(self.train_set), batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_made(self.val_set), batch_size=self.batch_size * 4, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_made(self.test_set), batch_size=self.batch_size * 4, num_workers=self.num_workers)


def _made(dataset: TensorDataset | None) -> TensorDataset:
    """A split of :meth:`DigitsDataModule.setup` (the trainer calls it before asking for loaders)."""
    if dataset is None:
        raise RuntimeError("DigitsDataModule: call setup(stage) before asking for a dataloader")
    return dataset


# ---------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------


class DigitsClassifier(TrainingModule):
    """An MLP on the 64 pixels; ``val_acc`` is torchmetrics' multiclass accuracy.

    Args:
        hidden_dim: width of the two hidden layers.
        dropout: dropout after each hidden layer.
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
        warmup_steps: linear warm-up over this many optimizer steps (0: none); the
            declarative ``warmup_steps`` of the scheduler dict, composed with the plateau
            scheduler.
        plateau_factor, plateau_patience: ``ReduceLROnPlateau(mode="max")`` on ``val_acc``.
        cpu_threads: ``torch.set_num_threads`` for runs on the CPU (None: torch's default).
    """

    def __init__(
        self,
        hidden_dim: int = 128,
        dropout: float = 0.1,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 2,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        import torchmetrics

        self.net = nn.Sequential(
            nn.Linear(IMAGE_PIXELS, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, NUM_CLASSES),
        )
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)

    def setup(self, stage: str) -> None:
        _limit_cpu_threads(self, self.hparams.cpu_threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=hp.plateau_factor, patience=hp.plateau_patience
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": plateau, "monitor": "val_acc", "warmup_steps": hp.warmup_steps or None},
        }


# ---------------------------------------------------------------------------------------------
# GAN
# ---------------------------------------------------------------------------------------------


class DigitsGAN(TrainingModule):
    """A GAN on 8x8 digits with the seed's two-optimizer set-up.

    ``configure_optimizers`` returns ``[Adam(generator), SGD(discriminator)],
    [ReduceLROnPlateau(adam), LambdaLR(sgd)]``; ``optimizer_step`` steps the generator every
    2 batches and the discriminator every 4 (gradients accumulate in between: only a real
    step zeroes them) after the seed's warm-up of both learning rates on
    ``trainer.global_step``.

    Args:
        latent_dim: size of the generator's noise input.
        hidden_dim: width of the hidden layers of both networks.
        learning_rate: the generator's (Adam) learning rate, ``self.hparams.learning_rate``
            of the seed's warm-up.
        d_learning_rate: the discriminator's (SGD) learning rate.
        d_momentum: SGD momentum.
        d_lr_decay: ``LambdaLR`` factor per epoch on the discriminator (``d_lr_decay ** epoch``).
        warmup_steps: the seed's warm-up length in ``global_step`` (0: none).
        plateau_patience, plateau_factor: ``ReduceLROnPlateau`` on ``val_loss`` (the
            generator's validation loss) for the generator.
        num_samples: generated digits per grid (a square number).
        cpu_threads: ``torch.set_num_threads`` for runs on the CPU (None: torch's default).
    """

    fixed_noise: torch.Tensor  # a buffer (registered in __init__): the same noise for every epoch's samples

    def __init__(
        self,
        latent_dim: int = 16,
        hidden_dim: int = 256,
        learning_rate: float = 1e-3,
        d_learning_rate: float = 0.05,
        d_momentum: float = 0.5,
        d_lr_decay: float = 0.99,
        warmup_steps: int = 100,
        plateau_patience: int = 5,
        plateau_factor: float = 0.5,
        num_samples: int = 64,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        side = math.isqrt(num_samples)
        if side * side != num_samples:
            raise ValueError(f"DigitsGAN(num_samples={num_samples}): expected a square number (16, 36, 64, ...).")
        self.generator = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, IMAGE_PIXELS), nn.Tanh(),
        )
        self.discriminator = nn.Sequential(
            nn.Linear(IMAGE_PIXELS, hidden_dim), nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, 1),
        )
        # The same noise every epoch, so the grids show one set of digits improving.
        noise = torch.randn(max(num_samples, 256), latent_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("fixed_noise", noise, persistent=False)

    def setup(self, stage: str) -> None:
        _limit_cpu_threads(self, self.hparams.cpu_threads)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], shape ``[N, 64]``."""
        return self.generator(z)

    def _noise(self, n: int, seed: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return torch.randn(n, self.hparams.latent_dim, generator=generator).to(self.device)

    def _d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        # one-sided label smoothing (0.9) keeps the SGD discriminator from saturating early
        return 0.5 * (
            F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, 0.9))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        )

    def _g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        logits = self.discriminator(fake)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # non-saturating

    def training_step(self, batch: Any, batch_idx: int, optimizer_idx: int) -> torch.Tensor:
        real = batch[0] * 2 - 1
        z = self._noise(real.shape[0])
        if optimizer_idx == 0:
            g_loss = self._g_loss(self.generator(z))
            self.log("g_loss", g_loss, prog_bar=True)
            return g_loss
        d_loss = self._d_loss(real, self.generator(z).detach())
        self.log("d_loss", d_loss, prog_bar=True)
        return d_loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0] * 2 - 1
        fake = self.generator(self._noise(real.shape[0], seed=batch_idx))
        self.log("val_loss", self._g_loss(fake))  # monitored by the generator's ReduceLROnPlateau
        self.log("val_d_loss", self._d_loss(real, fake))

    def on_validation_epoch_end(self) -> None:
        with torch.no_grad():
            samples = self.generator(self.fixed_noise)
        self.log("val_digit_score", digit_score(samples), batch_size=1)

    def configure_optimizers(self) -> tuple[list, list]:
        hp = self.hparams
        adam = torch.optim.Adam(self.generator.parameters(), lr=hp.learning_rate, betas=(0.5, 0.999))
        sgd = torch.optim.SGD(self.discriminator.parameters(), lr=hp.d_learning_rate, momentum=hp.d_momentum)
        # Adversarial losses are no measure of progress (the generator's rises as the
        # discriminator improves), so the generator's plateau watches the sample quality.
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            adam, mode="max", factor=hp.plateau_factor, patience=hp.plateau_patience
        )
        decay = hp.d_lr_decay
        lambda_lr = torch.optim.lr_scheduler.LambdaLR(sgd, lambda epoch: decay**epoch)
        return [adam, sgd], [{"scheduler": plateau, "monitor": "val_digit_score"}, lambda_lr]

    def optimizer_step(
        self,
        current_epoch: int,
        batch_nb: int,
        optimizer: torch.optim.Optimizer,
        optimizer_i: int,
        second_order_closure: Any = None,
    ) -> None:
        # the seed's warm-up (each optimizer warms up to its own base learning rate)
        warmup = self.hparams.warmup_steps
        assert self.trainer is not None  # optimizer_step runs inside fit
        step = self.trainer.global_step
        if warmup and step < warmup:
            lr_scale = min(1.0, float(step + 1) / warmup)
            base = self.hparams.learning_rate if optimizer_i == 0 else self.hparams.d_learning_rate
            for pg in optimizer.param_groups:
                pg["lr"] = lr_scale * base
        # update generator opt every 2 steps, discriminator opt every 4 steps
        if (optimizer_i == 0 and batch_nb % 2 == 0) or (optimizer_i == 1 and batch_nb % 4 == 0):
            optimizer.step()
            optimizer.zero_grad()

    def on_train_epoch_end(self) -> None:
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        with torch.no_grad():
            images = self.generator(self.fixed_noise[: self.hparams.num_samples])
        images = ((images.float().cpu().numpy() + 1) / 2).clip(0, 1).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        path = os.path.join(trainer.log_dir, "samples", f"epoch_{epoch:03d}.png")
        save_digit_grid(images, path, title=f"epoch {epoch}")
        from .. import loggers

        if hasattr(loggers, "log_image"):  # wandb.Image when a W&B tracker is active
            loggers.log_image(trainer, "samples", path, step=trainer.global_step)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _limit_cpu_threads(module: TrainingModule, threads: int | None) -> None:
    # These networks are tiny: on the CPU, synchronising intra-op threads costs more than
    # it saves (3x slower with 2 threads than with 1 on a busy 2-core machine).
    trainer = module.trainer
    if threads is not None and trainer is not None and trainer.accelerator.device.type == "cpu":
        torch.set_num_threads(threads)


@lru_cache(maxsize=1)
def _reference_classifier() -> Any:
    """A logistic regression on all 1797 real digits (~98% train accuracy; fitted once, < 1 s)."""
    from sklearn.linear_model import LogisticRegression

    x, y = _digits()
    return LogisticRegression(max_iter=2000).fit(x, y)


def digit_score(samples: torch.Tensor) -> float:
    """Inception score of generated digits, with a logistic regression as the "Inception" net.

    ``exp(E_x KL(p(y|x) || p(y)))``: 1 for noise or a single repeated digit, 10 at most for
    confident and evenly spread digits; the real digits score about 7.5.

    Args:
        samples: generator output in [-1, 1], shape ``[N, 64]``.
    """
    x = ((samples.detach().float().cpu().numpy() + 1) / 2).clip(0, 1)
    p = _reference_classifier().predict_proba(x)
    marginal = p.mean(axis=0, keepdims=True)
    kl = (p * (np.log(p + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
    return float(np.exp(kl.mean()))


def save_digit_grid(images: np.ndarray, path: str, title: str | None = None) -> str:
    """Write ``images`` ([N, 8, 8] in [0, 1], N square) as one PNG grid; returns ``path``.

    Uses matplotlib's object API on the Agg canvas, so it never touches pyplot's global
    backend of the calling program.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = images.shape[0]
    side = math.isqrt(n)
    cell = IMAGE_SIDE + 1  # one-pixel gutter
    grid = np.full((side * cell - 1, side * cell - 1), 0.15, dtype=np.float32)
    for i in range(side * side):
        r, c = divmod(i, side)
        grid[r * cell : r * cell + IMAGE_SIDE, c * cell : c * cell + IMAGE_SIDE] = images[i]
    fig = Figure(figsize=(4, 4.3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
