"""Case 2 of issue 6: a two-optimizer GAN, accel_trainer vs the equivalent hand-written Accelerate loop.

The seed's set-up in small: generator and discriminator MLPs (64-dim "images", latent 16,
hidden 128), ``[Adam(generator), SGD(discriminator)]``, a step-interval ``StepLR`` on the
generator and an epoch-interval ``LambdaLR`` on the discriminator, and an ``optimizer_step``
override that steps the generator every 2 batches and the discriminator every 4 (gradients
accumulate in between). Batch 16, 125 batches per epoch, 8 epochs (1,000 batches, 2,000
training_step calls), no shuffle, ``torch.set_num_threads(1)``. The loops alternate, several
rounds, in one process; the table shows medians. Final weights are compared as well.

    python benchmarks/gan.py [--rounds 5] [--epochs 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

PIXELS, LATENT, HIDDEN, BATCH, N = 64, 16, 128, 16, 2000
SEED = 4321


def make_data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.rand(N, PIXELS, generator=g))


def make_nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(SEED)
    gen = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.LeakyReLU(0.2), nn.Linear(HIDDEN, PIXELS), nn.Tanh())
    disc = nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.LeakyReLU(0.2), nn.Linear(HIDDEN, 1))
    return gen, disc


def make_optim(gen: nn.Module, disc: nn.Module):
    adam = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    sgd = torch.optim.SGD(disc.parameters(), lr=0.05, momentum=0.5)
    step_lr = torch.optim.lr_scheduler.StepLR(adam, step_size=100, gamma=0.9)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(sgd, lambda epoch: 0.99**epoch)
    return adam, sgd, step_lr, lambda_lr


def losses(gen, disc, real, optimizer_idx):
    real = real * 2 - 1
    z = torch.randn(real.shape[0], LATENT)
    if optimizer_idx == 0:
        logits = disc(gen(z))
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    real_logits, fake_logits = disc(real), disc(gen(z).detach())
    return 0.5 * (
        F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, 0.9))
        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    )


def due(optimizer_idx: int, batch_idx: int) -> bool:
    return (optimizer_idx == 0 and batch_idx % 2 == 0) or (optimizer_idx == 1 and batch_idx % 4 == 0)


def run_accelerate(data, epochs: int, **accelerator_kwargs):
    from accelerate import Accelerator
    import accelerate.optimizer as accelerate_optimizer

    cached = accelerate_optimizer.is_lomo_available  # time Accelerate's own uncached check (older accel_trainer cached it)
    accelerate_optimizer.is_lomo_available = getattr(cached, "__wrapped__", cached)
    try:
        accelerator = Accelerator(cpu=True, **accelerator_kwargs)
        gen, disc = make_nets()
        adam, sgd, step_lr, lambda_lr = make_optim(gen, disc)
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)
        gen, disc, adam, sgd, step_lr, lambda_lr, loader = accelerator.prepare(gen, disc, adam, sgd, step_lr, lambda_lr, loader)
        step_lr.step_with_optimizer = lambda_lr.step_with_optimizer = False
        owned = [list(gen.parameters()), list(disc.parameters())]
        for _ in range(epochs):
            for batch_idx, (real,) in enumerate(loader):
                for i, opt in enumerate((adam, sgd)):
                    for p in owned[1 - i]:
                        p.requires_grad_(False)
                    loss = losses(gen, disc, real, i)
                    accelerator.backward(loss)
                    if due(i, batch_idx):
                        opt.step()
                        opt.zero_grad()
                        if i == 0:
                            step_lr.step()
                    for p in owned[1 - i]:
                        p.requires_grad_(True)
            lambda_lr.step()
        return gen, disc
    finally:
        accelerate_optimizer.is_lomo_available = cached


def run_accel_trainer(data, epochs: int, root: str):
    from accel_trainer import Trainer, TrainingModule

    class GAN(TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            self.gen, self.disc = make_nets()

        def training_step(self, batch, batch_idx, optimizer_idx):
            return losses(self.gen, self.disc, batch[0], optimizer_idx)

        def configure_optimizers(self):
            adam, sgd, step_lr, lambda_lr = make_optim(self.gen, self.disc)
            return [adam, sgd], [{"scheduler": step_lr, "interval": "step"}, lambda_lr]

        def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
            if due(optimizer_i, batch_nb):
                optimizer.step()
                optimizer.zero_grad()

    module = GAN()
    trainer = Trainer(max_epochs=epochs, cpu=True, enable_progress_bar=False, default_root_dir=root)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False))
    return module.gen, module.disc


def same(a, b) -> bool:
    return all(torch.equal(x, y) for m, n in zip(a, b) for x, y in zip(m.state_dict().values(), n.state_dict().values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    data = make_data()
    root_dir = tempfile.TemporaryDirectory(prefix="bench_gan_")  # checkpoints of the runs, removed at exit
    root = root_dir.name
    runners = {"accelerate": lambda: run_accelerate(data, args.epochs), "accel_trainer": lambda: run_accel_trainer(data, args.epochs, root)}
    for f in runners.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in runners}
    finals = {}
    for r in range(args.rounds):
        for name in (list(runners) if r % 2 == 0 else list(reversed(list(runners)))):
            t0 = time.perf_counter()
            finals[name] = runners[name]()
            times[name].append(time.perf_counter() - t0)
    print(f"GAN, 2 optimizers (G every 2, D every 4 batches), StepLR(step) + LambdaLR(epoch), batch {BATCH}, "
          f"{args.epochs} epochs x {N // BATCH} batches, 1 thread, {args.rounds} rounds")
    print(f"{'loop':<15}{'median s':>10}{'median ratio vs accelerate':>29}")
    for name in runners:
        ratios = [t / b for t, b in zip(times[name], times["accelerate"])]
        print(f"{name:<15}{statistics.median(times[name]):>10.3f}{statistics.median(ratios):>28.3f}x")
    print(f"final weights accel_trainer == accelerate loop: {same(finals['accel_trainer'], finals['accelerate'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
