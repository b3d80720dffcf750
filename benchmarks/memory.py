"""Case 5 of issue 6: peak resident memory of the tiny-MLP run (case 1), per loop.

Each loop runs alone in a fresh interpreter (imports, data, model, 2,000 steps), which then
reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``); loops alternate over several
rounds and the table shows medians. Most of the peak is torch itself (its libraries and
allocator), which every loop pays; the ratio shows what each framework adds on top.

    python benchmarks/memory.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CHILD = """
import resource, sys, tempfile, warnings
sys.path[:0] = [{here!r}, {repo!r}]
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import mlp
p = mlp.TINY
data = mlp.make_data(p)
loop = {loop!r}
if loop == "torch":
    mlp.run_torch(p, data, p.steps)
elif loop == "accelerate":
    mlp.run_accelerate(p, data, p.steps)
else:
    mlp.run_accel_trainer(p, data, p.steps, tempfile.mkdtemp())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)   # KiB on Linux
"""

LOOPS = ("torch", "accelerate", "accel_trainer")


def peak_rss_mib(loop: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(here=HERE, repo=REPO, loop=loop)],
        env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"{loop} child failed:\n{result.stderr[-3000:]}")
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    peaks: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    for r in range(args.rounds):
        for loop in LOOPS if r % 2 == 0 else reversed(LOOPS):
            peaks[loop].append(peak_rss_mib(loop))
    print(f"peak RSS of the tiny-MLP run (case 1), fresh interpreter each, {args.rounds} rounds")
    print(f"{'loop':<15}{'median MiB':>12}{'vs accelerate':>16}")
    base = statistics.median(peaks["accelerate"])
    for loop, values in peaks.items():
        med = statistics.median(values)
        print(f"{loop:<15}{med:>12.1f}{med / base:>15.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
