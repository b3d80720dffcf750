"""Checkpoint save / load time for a ~100M-parameter model with Adam state.

    python benchmarks/checkpoint_io.py [--params 100e6] [--rounds 3]

Saves with ``Trainer.save_checkpoint`` (atomic write: temp file, fsync, rename) and loads
with the same path ``fit(ckpt_path=...)`` takes (validated ``torch.load(weights_only=True)``
plus restoring model, optimizer, scheduler and RNG state), and prints median timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from accel_trainer import Trainer, TrainingModule
from accel_trainer import checkpoint as ckpt_io


class Big(TrainingModule):
    def __init__(self, n_params: float):
        super().__init__()
        width = 2048
        layers = max(1, round(n_params / (width * width + width)))
        self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-4)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 10)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="ckpt-bench-")
    module = Big(args.params)
    n = sum(p.numel() for p in module.parameters())
    data = DataLoader(TensorDataset(torch.randn(2, 2048)), batch_size=2)
    trainer = Trainer(max_steps=1, cpu=True, enable_progress_bar=False, default_root_dir=root)
    trainer.fit(module, data)  # one real step, so Adam holds its two moment buffers
    path = os.path.join(root, "bench.ckpt")
    saves, loads = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        trainer.save_checkpoint(path)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer._attach(module, "fit", None)  # a fresh hook table, as fit() would build
        ckpt_io.restore_checkpoint(trainer, path)
        loads.append(time.perf_counter() - start)
    size = os.path.getsize(path) / 2**30
    print(f"parameters: {n / 1e6:.1f} M   checkpoint file: {size:.2f} GiB (weights + Adam moments)")
    print(f"save: median {statistics.median(saves):.2f} s over {args.rounds} ({', '.join(f'{s:.2f}' for s in saves)})")
    print(f"load: median {statistics.median(loads):.2f} s over {args.rounds} ({', '.join(f'{s:.2f}' for s in loads)})")


if __name__ == "__main__":
    main()
