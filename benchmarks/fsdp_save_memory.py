"""Rank 0's peak memory while saving an FSDP checkpoint: sharded (what the trainer does) vs gathered.

Issue 11, point 5: under FSDP every rank writes only its own shards, so no rank ever holds
the full model and optimizer state while saving; the memory a save needs must not grow
with the full state. Measured on 2 gloo CPU ranks (FSDP2 through the real Trainer) for
models of two sizes, Adam (so the full state is 3x the parameters):

* **sharded**: ``trainer.save_checkpoint`` (torch.distributed.checkpoint, each rank its shards);
* **gathered**: for comparison, what a single-file checkpoint of an FSDP run needs: the
  full model and optimizer state gathered onto rank 0 (``get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``) and
  ``torch.save``d there -- the approach the trainer used before.

Peak memory is the process's resident-set high-water mark (``VmHWM``), reset just before
the save by writing 5 to ``/proc/self/clear_refs`` (after ``malloc_trim`` returned memory
freed during training to the OS); the figure is the peak minus the resident size just
before the save, i.e. what the save itself needed on top of the live training state.

    python benchmarks/fsdp_save_memory.py [--sizes 2048 4096]   # spawns `accelerate launch` (2 CPU processes)
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import torch

MiB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(sizes: list[int]) -> int:
    root = tempfile.mkdtemp(prefix="fsdp_save_memory-")
    try:
        return _launch(sizes, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # GiBs of checkpoints


def _launch(sizes: list[int], root: str) -> int:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", ACCELERATE_USE_FSDP="true", FSDP_VERSION="2",
               FSDP_CPU_RAM_EFFICIENT_LOADING="false", FSDP_AUTO_WRAP_POLICY="SIZE_BASED_WRAP", FSDP_MIN_NUM_PARAMS="100000")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), os.path.abspath(__file__), "--worker", "--root", root,
        *[a for s in sizes for a in ("--size", str(s))],
    ]
    return subprocess.run(cmd, env=env).returncode


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _release_free_memory() -> None:
    """Hand memory freed earlier (training's temporaries) back to the OS, so that the resident
    size is the live data and what a save allocates shows up in the peak (glibc keeps freed
    heap memory resident and would reuse it without raising the peak)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def _peak_during(fn) -> tuple[float, float]:
    """(MiB the call added to the resident-set peak, seconds)."""
    import time

    import torch.distributed as dist

    dist.barrier()
    _release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    dist.barrier()
    return (peak - before) / 1024, seconds


def worker(sizes: list[int], base: str) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from accel_trainer import Trainer, TrainingModule
    from accel_trainer.sharded_state import _raw

    class Wide(TrainingModule):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(8)])

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-5)

    rows = []
    for width in sizes:
        root = os.path.join(base, str(width))
        module = Wide(width)
        trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, max_steps=1, log_with="csv")
        trainer.fit(module, DataLoader(TensorDataset(torch.randn(4, width)), batch_size=2))
        numel = sum(p.numel() for p in module.parameters())  # global sizes (DTensors)
        full_mib = 3 * 4 * numel / MiB  # parameters + Adam's two moments, fp32
        sharded, sharded_s = _peak_during(lambda: trainer.save_checkpoint(os.path.join(root, "sharded.ckpt")))

        def gathered_save() -> None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model = get_model_state_dict(trainer._wrapped, options=options)
            optim = get_optimizer_state_dict(trainer._wrapped, _raw(trainer.optimizers[0]), options=options)
            if trainer.is_global_zero:
                torch.save({"state_dict": model, "optimizer": optim}, os.path.join(root, "gathered.ckpt"))

        gathered, gathered_s = _peak_during(gathered_save)
        rows.append((numel, full_mib, sharded, sharded_s, gathered, gathered_s))
        trainer.accelerator.wait_for_everyone()
        if trainer.is_global_zero:
            shutil.rmtree(root, ignore_errors=True)
    if trainer.is_global_zero:
        print("\nRank 0's resident-set peak added by one checkpoint save (FSDP2, 2 gloo CPU ranks, Adam):\n")
        print("| parameters | full state (params + Adam) | sharded save (trainer) | gathered single file |")
        print("|---:|---:|---:|---:|")
        for numel, full_mib, sharded, sharded_s, gathered, gathered_s in rows:
            print(
                f"| {numel / 1e6:.1f} M | {full_mib:.0f} MiB | +{sharded:.1f} MiB ({sharded / full_mib:.2f}x full; {sharded_s:.2f} s) "
                f"| +{gathered:.0f} MiB ({gathered / full_mib:.2f}x full; {gathered_s:.2f} s) |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", dest="sizes", type=int, action="append", help="layer width (8 square layers)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = args.sizes or [1024, 2048]
    if args.worker:
        worker(sizes, args.root)
    else:
        sys.exit(launch(sizes))


if __name__ == "__main__":
    main()
