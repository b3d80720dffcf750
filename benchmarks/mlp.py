"""Case 1 of issue 6: a tiny MLP where the per-step framework overhead dominates.

MLP 32 -> 64 -> 1, batch 64, 2,000 steps (one epoch, no shuffle), Adam + StepLR stepped
every optimizer step, ``torch.set_num_threads(1)``. Three loops over the same seed and data:

* ``torch``      -- a hand-written PyTorch loop (the baseline),
* ``accelerate`` -- the same loop with ``accelerator.prepare`` and ``accelerator.backward``,
* ``accel_trainer`` -- ``Trainer.fit`` on a ``TrainingModule``.

They run alternating, several rounds, in one process; the table shows median wall times
(whole run: model construction, prepare, and the 2,000 steps) and the median of the per-round
ratios to the raw torch loop. The final weights of accel_trainer and the torch loop must be
bit-identical.

    python benchmarks/tiny_mlp.py [--rounds 5] [--steps 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

IN, HIDDEN, BATCH = 32, 64, 64
LR, STEP_SIZE, GAMMA = 1e-3, 500, 0.5
SEED = 1234


def make_data(steps: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * BATCH, IN, generator=g)
    y = x[:, :1].sin() + 0.1 * torch.randn(steps * BATCH, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def make_net() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def make_loader(data) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


def run_torch(data, steps: int) -> nn.Module:
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)
    net.train()
    for i, (x, y) in enumerate(make_loader(data)):
        if i >= steps:
            break
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return net


def run_accelerate(data, steps: int) -> nn.Module:
    from accelerate import Accelerator
    import accelerate.optimizer as accelerate_optimizer

    # accel_trainer caches accelerate.optimizer.is_lomo_available for the process once it has
    # run; time the raw Accelerate loop with Accelerate's own, uncached check.
    cached = accelerate_optimizer.is_lomo_available
    accelerate_optimizer.is_lomo_available = getattr(cached, "__wrapped__", cached)
    try:
        return _run_accelerate(Accelerator, data, steps)
    finally:
        accelerate_optimizer.is_lomo_available = cached


def _run_accelerate(Accelerator, data, steps: int) -> nn.Module:
    accelerator = Accelerator(cpu=True)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)
    net, opt, sched, loader = accelerator.prepare(net, opt, sched, make_loader(data))
    net.train()
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        loss = nn.functional.mse_loss(net(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        sched.step()
    return accelerator.unwrap_model(net)


def run_accel_trainer(data, steps: int, root: str) -> nn.Module:
    from accel_trainer import Trainer, TrainingModule

    class TinyMLP(TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=LR)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = TinyMLP()
    trainer = Trainer(
        max_epochs=1,
        max_steps=steps,
        cpu=True,
        enable_progress_bar=False,
        default_root_dir=root,
        log_every_n_steps=50,
    )
    trainer.fit(module, make_loader(data))
    return module.net


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--only", choices=("torch", "accelerate", "accel_trainer"), action="append")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    data = make_data(args.steps)
    root_dir = tempfile.TemporaryDirectory(prefix="bench_tiny_mlp_")  # checkpoints of the runs, removed at exit
    root = root_dir.name
    runners = {
        "torch": lambda: run_torch(data, args.steps),
        "accelerate": lambda: run_accelerate(data, args.steps),
        "accel_trainer": lambda: run_accel_trainer(data, args.steps, root),
    }
    names = args.only or list(runners)
    if "torch" not in names:
        names = ["torch", *names]
    # warm-up round (imports, allocator) not counted
    for name in names:
        runners[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    finals: dict[str, nn.Module] = {}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            t0 = time.perf_counter()
            finals[name] = runners[name]()
            times[name].append(time.perf_counter() - t0)
    print(f"tiny MLP {IN}->{HIDDEN}->1, batch {BATCH}, {args.steps} steps, Adam + StepLR(step), 1 thread, "
          f"{args.rounds} rounds, torch {torch.__version__}")
    print(f"{'loop':<15}{'median s':>10}{'steps/s':>10}{'median ratio vs torch':>24}")
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times["torch"])]
        med = statistics.median(times[name])
        print(f"{name:<15}{med:>10.3f}{args.steps / med:>10.0f}{statistics.median(ratios):>23.3f}x")
    ok = True
    if "accel_trainer" in finals:
        ok = same_weights(finals["accel_trainer"], finals["torch"])
        print(f"final weights accel_trainer == torch loop: {ok}")
    if "accelerate" in finals:
        print(f"final weights accelerate == torch loop: {same_weights(finals['accelerate'], finals['torch'])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
