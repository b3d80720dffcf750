"""Case 3 of issue 6: two processes over gloo on CPU, accel_trainer vs hand-written Accelerate DDP loops.

Two models, each timed in the same 2-rank job, alternating, several rounds:

* the tiny MLP of case 1 (``benchmarks/mlp.py``): 2,000 batches of 64 sharded over the two
  ranks (1,000 steps each), Adam + StepLR; baseline: the raw Accelerate loop of case 1 run
  under DDP with ``step_scheduler_with_optimizer=False`` (Accelerate's default steps the
  scheduler once per process per call, so the LR would decay twice as fast as on one
  process; accel_trainer's schedules do not depend on the number of processes).
* the two-optimizer GAN of case 2 (``benchmarks/gan.py``): per-batch G and D passes, the
  step-interval override, two schedulers; baseline: its hand-written Accelerate loop, which
  under DDP needs ``find_unused_parameters=True`` (the toggled-off network gets no gradient
  in the other network's backward) -- what a user writing the loop would do.

Every run starts behind a barrier; times are rank 0's (the ranks move in lock step through
the gradient all-reduce). Final weights of each pair are compared on rank 0.

    python benchmarks/ddp.py [--rounds 5]      # spawns `accelerate launch` with 2 CPU processes
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gan  # noqa: E402
import mlp  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(rounds: int, cases: list[str]) -> int:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), os.path.abspath(__file__), "--worker", "--rounds", str(rounds),
        *[a for c in cases for a in ("--case", c)],
    ]
    return subprocess.run(cmd, env=env).returncode


def _barriered(fn):
    def run():
        torch.distributed.barrier()
        return fn()
    return run


def worker(rounds: int, cases: list[str]) -> int:
    from accelerate import PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    state = PartialState(cpu=True)
    assert state.num_processes == 2, f"expected a 2-process job, got {state.num_processes}"
    main = state.is_main_process
    root_dir = tempfile.TemporaryDirectory(prefix=f"bench_ddp_{state.process_index}_")
    root = root_dir.name
    ok = True
    if "mlp" in cases:
        p = mlp.TINY
        data = mlp.make_data(p)
        runners = {
            # step_scheduler_with_optimizer=False: Accelerate's default steps the scheduler
            # num_processes times per call; the world-size-invariant loop steps it once
            "accelerate": _barriered(lambda: mlp.run_accelerate(p, data, p.steps, step_scheduler_with_optimizer=False)),
            "accel_trainer": _barriered(lambda: mlp.run_accel_trainer(p, data, p.steps, os.path.join(root, "mlp"))),
        }
        times, finals = mlp.time_alternating(runners, rounds)
        same = mlp.same_weights(finals["accel_trainer"], finals["accelerate"])
        ok = ok and same
        if main:
            print(f"DDP 2 processes (gloo, CPU, 1 thread each): tiny MLP, {p.steps // 2} steps per rank, {rounds} rounds")
            print(mlp.ratio_table(times, "accelerate", p.steps // 2))
            print(f"final weights accel_trainer == accelerate DDP loop: {same}\n", flush=True)
    if "gan" in cases:
        data = gan.make_data()
        unused = DistributedDataParallelKwargs(find_unused_parameters=True)
        epochs = 8
        runners = {
            "accelerate": _barriered(lambda: gan.run_accelerate(data, epochs, kwargs_handlers=[unused])),
            "accel_trainer": _barriered(lambda: gan.run_accel_trainer(data, epochs, os.path.join(root, "gan"))),
        }
        times, finals = mlp.time_alternating(runners, rounds)
        same = gan.same(finals["accel_trainer"], [m.module if hasattr(m, "module") else m for m in finals["accelerate"]])
        ok = ok and same
        if main:
            print(f"DDP 2 processes: two-optimizer GAN, {epochs} epochs x {gan.N // gan.BATCH // 2} batches per rank, {rounds} rounds")
            print(mlp.ratio_table(times, "accelerate"))
            print(f"final weights accel_trainer == accelerate DDP loop: {same}", flush=True)
    state.wait_for_everyone()
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--case", choices=("mlp", "gan"), action="append")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = args.case or ["mlp", "gan"]
    return worker(args.rounds, cases) if args.worker else launch(args.rounds, cases)


if __name__ == "__main__":
    sys.exit(main())
