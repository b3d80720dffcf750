"""Cases 1 and 6 of issue 6: an MLP trained by a raw torch loop, a raw Accelerate loop and accel_trainer.

Presets (``--preset``):

* ``tiny`` (case 1): MLP 32 -> 64 -> 1, batch 64, 2,000 steps. A step costs well under a
  millisecond, so the per-step framework overhead dominates.
* ``large`` (case 6): MLP 512 -> 1024 -> 1024 -> 1, batch 160, 200 steps: a step takes tens
  of milliseconds on one CPU thread, like a real model; what remains is the overhead a user
  would actually feel.

All three loops use the same seed and data, Adam + StepLR stepped every optimizer step,
one epoch without shuffling and ``torch.set_num_threads(1)``:

* ``torch``      -- a hand-written PyTorch loop (the baseline),
* ``accelerate`` -- the same loop with ``accelerator.prepare`` and ``accelerator.backward``,
* ``accel_trainer`` -- ``Trainer.fit`` on a ``TrainingModule``,
* ``lightning`` -- PyTorch Lightning 2.x's ``Trainer.fit``, only when ``lightning`` is installed.

They run alternating, several rounds, in one process, after one uncounted warm-up run each;
the table shows median wall times (whole run: model construction, prepare, and the steps)
and the median of the per-round ratios to the raw torch loop. The final weights of
accel_trainer and the torch loop must be bit-identical (exit code 1 otherwise).

    python benchmarks/mlp.py [--preset tiny|large] [--rounds 5] [--steps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

SEED = 1234


@dataclasses.dataclass(frozen=True)
class Preset:
    inputs: int
    hidden: tuple[int, ...]
    batch: int
    steps: int
    lr: float = 1e-3
    step_size: int = 500
    gamma: float = 0.5


PRESETS = {
    "tiny": Preset(inputs=32, hidden=(64,), batch=64, steps=2000),
    "large": Preset(inputs=512, hidden=(1024, 1024), batch=160, steps=200, step_size=50),
}
TINY = PRESETS["tiny"]


def make_data(p: Preset, steps: int | None = None) -> torch.utils.data.TensorDataset:
    n = (steps or p.steps) * p.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p.inputs, generator=g)
    y = x[:, :1].sin() + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def make_net(p: Preset) -> nn.Module:
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    width = p.inputs
    for h in p.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


def make_loader(p: Preset, data) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=p.batch, shuffle=False)


def make_optim(p: Preset, params):
    opt = torch.optim.Adam(params, lr=p.lr)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=p.step_size, gamma=p.gamma)


def run_torch(p: Preset, data, steps: int) -> nn.Module:
    net = make_net(p)
    opt, sched = make_optim(p, net.parameters())
    net.train()
    for i, (x, y) in enumerate(make_loader(p, data)):
        if i >= steps:
            break
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return net


def run_accelerate(p: Preset, data, steps: int, **accelerator_kwargs) -> nn.Module:
    """The loop a user writes with Accelerate, timed with Accelerate's own per-step checks.

    accel_trainer up to issue 16 cached ``accelerate.optimizer.is_lomo_available`` for the whole
    process once it had run; the cache is undone around this loop so it pays what it would alone
    (a no-op since issue 17, which patches nothing process-wide; kept to compare older versions).
    """
    from accelerate import Accelerator
    import accelerate.optimizer as accelerate_optimizer

    cached = accelerate_optimizer.is_lomo_available
    accelerate_optimizer.is_lomo_available = getattr(cached, "__wrapped__", cached)
    try:
        accelerator = Accelerator(cpu=True, **accelerator_kwargs)
        net = make_net(p)
        opt, sched = make_optim(p, net.parameters())
        net, opt, sched, loader = accelerator.prepare(net, opt, sched, make_loader(p, data))
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
    finally:
        accelerate_optimizer.is_lomo_available = cached


def run_accel_trainer(p: Preset, data, steps: int, root: str) -> nn.Module:
    from accel_trainer import Trainer, TrainingModule

    class MLP(TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(p)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt, sched = make_optim(p, self.parameters())
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = MLP()
    trainer = Trainer(
        max_epochs=1,
        max_steps=steps,
        cpu=True,
        enable_progress_bar=False,
        default_root_dir=root,
        log_every_n_steps=50,
    )
    trainer.fit(module, make_loader(p, data))
    return module.net


def run_lightning(p: Preset, data, steps: int, root: str) -> nn.Module:
    """The same run under PyTorch Lightning 2.x (only when it is installed; not a dependency)."""
    import logging

    import lightning

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # its banner and tips, once per run

    class MLP(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(p)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt, sched = make_optim(p, self.parameters())
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = MLP()
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, max_steps=steps, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, log_every_n_steps=50,
    )
    trainer.fit(module, make_loader(p, data))
    return module.net


def lightning_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lightning") is not None


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def time_alternating(runners: dict, rounds: int) -> tuple[dict[str, list[float]], dict]:
    """One uncounted warm-up run each, then ``rounds`` rounds in alternating order."""
    names = list(runners)
    for name in names:
        runners[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    finals: dict = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            t0 = time.perf_counter()
            finals[name] = runners[name]()
            times[name].append(time.perf_counter() - t0)
    return times, finals


def ratio_table(times: dict[str, list[float]], baseline: str, steps: int | None = None) -> str:
    lines = [f"{'loop':<15}{'median s':>10}" + (f"{'steps/s':>10}" if steps else "") + f"{'median ratio vs ' + baseline:>28}"]
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[baseline])]
        med = statistics.median(ts)
        lines.append(f"{name:<15}{med:>10.3f}" + (f"{steps / med:>10.0f}" if steps else "") + f"{statistics.median(ratios):>27.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--only", choices=("accelerate", "accel_trainer", "lightning"), action="append",
                        help="loops to time beside the raw torch loop (default: both)")
    args = parser.parse_args(argv)
    p = PRESETS[args.preset]
    steps = args.steps or p.steps
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    data = make_data(p, steps)
    root_dir = tempfile.TemporaryDirectory(prefix="bench_mlp_")  # checkpoints of the runs, removed at exit
    runners = {
        "torch": lambda: run_torch(p, data, steps),
        "accelerate": lambda: run_accelerate(p, data, steps),
        "accel_trainer": lambda: run_accel_trainer(p, data, steps, root_dir.name),
    }
    if lightning_installed():
        runners["lightning"] = lambda: run_lightning(p, data, steps, root_dir.name)
    runners = {k: v for k, v in runners.items() if k == "torch" or not args.only or k in args.only}
    times, finals = time_alternating(runners, args.rounds)
    dims = "->".join(str(d) for d in (p.inputs, *p.hidden, 1))
    print(f"MLP preset {args.preset!r} {dims}, batch {p.batch}, {steps} steps, Adam + StepLR(step), 1 thread, "
          f"{args.rounds} rounds, torch {torch.__version__}")
    print(ratio_table(times, "torch", steps))
    ok = True
    for name in ("accel_trainer", "accelerate", "lightning"):
        if name in finals:
            same = same_weights(finals[name], finals["torch"])
            print(f"final weights {name} == torch loop: {same}")
            ok = ok and (same or name != "accel_trainer")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
