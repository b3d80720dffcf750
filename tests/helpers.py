"""Small models and data used across the tests."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from accel_trainer import TrainingModule


def regression_data(n: int = 64, features: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.arange(1, features + 1, dtype=torch.float32).unsqueeze(1)
    y = x @ w + 0.01 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(n: int = 64, batch_size: int = 8, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(regression_data(n, seed=seed), batch_size=batch_size, shuffle=shuffle)


class Regressor(TrainingModule):
    """One linear layer, MSE, SGD; logs train_loss and val_loss."""

    def __init__(self, lr: float = 0.05, features: int = 4):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(features, 1)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TwoPart(TrainingModule):
    """A "generator" and a "discriminator", each with its own optimizer (a GAN's shape).

    Records, per call of training_step, (batch_idx, optimizer_idx, global_step, which
    parameters required grad) so tests can check the loop's order and toggling.
    """

    def __init__(self, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.generator = torch.nn.Linear(4, 4)
        self.discriminator = torch.nn.Linear(4, 1)
        self.calls: list[tuple] = []
        self.steps_seen: list[tuple] = []

    def training_step(self, batch, batch_idx, optimizer_idx):
        x, _ = batch
        grads = (
            all(p.requires_grad for p in self.generator.parameters()),
            all(p.requires_grad for p in self.discriminator.parameters()),
        )
        self.calls.append((batch_idx, optimizer_idx, self.trainer.global_step, grads))
        fake = self.generator(x)
        if optimizer_idx == 0:
            return -self.discriminator(fake).mean()
        return self.discriminator(fake.detach()).mean() - self.discriminator(x).mean()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr),
            torch.optim.SGD(self.discriminator.parameters(), lr=self.hparams.lr),
        )
