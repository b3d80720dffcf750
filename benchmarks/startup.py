"""Case 4 of issue 6: start-up cost -- import time and time to the first training step.

Each measurement is a fresh interpreter, alternating between the variants, several rounds:

* import: ``python -c "import accelerate"`` vs ``python -c "import accel_trainer"`` (target:
  accel_trainer <= accelerate + 0.15 s; wandb, torchmetrics, jsonargparse and plotting are
  imported only when used).
* first step: from process start to the first ``training_step`` of the tiny MLP of case 1,
  for a hand-written Accelerate loop and for ``Trainer.fit`` (imports, model, ``prepare``,
  loggers and the run directory included).

Byte-code is compiled into a temporary ``PYTHONPYCACHEPREFIX`` by one uncounted warm-up run
of each variant, so neither side pays for compiling its sources (an installed package has
its ``.pyc`` files; an editable checkout under ``PYTHONDONTWRITEBYTECODE`` would not).

    python benchmarks/startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

FIRST_STEP_ACCELERATE = """
import sys, time
sys.path.insert(0, {here!r})
import torch
from accelerate import Accelerator
import mlp
p = mlp.TINY
accelerator = Accelerator(cpu=True)
net = mlp.make_net(p)
opt, sched = mlp.make_optim(p, net.parameters())
net, opt, sched, loader = accelerator.prepare(net, opt, sched, mlp.make_loader(p, mlp.make_data(p, 10)))
for x, y in loader:
    print(time.perf_counter(), flush=True)   # the first step starts here
    break
"""

FIRST_STEP_TRAINER = """
import os, sys, time, tempfile
sys.path.insert(0, {here!r})
import torch
from accel_trainer import Trainer, TrainingModule
import mlp
p = mlp.TINY

class MLP(TrainingModule):
    def __init__(self):
        super().__init__()
        self.net = mlp.make_net(p)
    def training_step(self, batch, batch_idx):
        print(time.perf_counter(), flush=True)   # the first step starts here
        os._exit(0)
    def configure_optimizers(self):
        opt, sched = mlp.make_optim(p, self.parameters())
        return {{"optimizer": opt, "lr_scheduler": {{"scheduler": sched, "interval": "step"}}}}

Trainer(max_epochs=1, cpu=True, enable_progress_bar=False, default_root_dir=tempfile.mkdtemp()).fit(
    MLP(), mlp.make_loader(p, mlp.make_data(p, 10)))
"""


def _env(pycache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPYCACHEPREFIX=pycache, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _seconds(code: str, env: dict[str, str], reports_time: bool) -> float:
    """Wall time of a fresh interpreter running ``code``, or until it prints perf_counter()."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    end = time.perf_counter()
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{result.stderr[-3000:]}")
    if reports_time:
        # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes
        return float(result.stdout.strip().splitlines()[-1]) - start
    return end - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    cases = {
        "python -c 'import torch'": ("import torch", False),
        "python -c 'import accelerate'": ("import accelerate", False),
        "python -c 'import accel_trainer'": ("import accel_trainer", False),
        "first step, Accelerate loop": (FIRST_STEP_ACCELERATE.format(here=HERE), True),
        "first step, accel_trainer": (FIRST_STEP_TRAINER.format(here=HERE), True),
    }
    with tempfile.TemporaryDirectory(prefix="bench_pycache_") as pycache:
        env = _env(pycache)
        for code, reports in cases.values():  # compile byte-code, warm the page cache
            _seconds(code, env, reports)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds):
            for name in cases if r % 2 == 0 else list(reversed(list(cases))):
                times[name].append(_seconds(*cases[name][:1], env, cases[name][1]))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"start-up, {args.rounds} rounds of fresh interpreters (median s)")
    for name, value in med.items():
        print(f"{name:<36}{value:>8.3f}")
    extra_import = statistics.median(
        [t - b for t, b in zip(times["python -c 'import accel_trainer'"], times["python -c 'import accelerate'"])]
    )
    extra_first = statistics.median(
        [t - b for t, b in zip(times["first step, accel_trainer"], times["first step, Accelerate loop"])]
    )
    print(f"import accel_trainer - import accelerate: {extra_import:+.3f} s (target <= +0.150 s)")
    print(f"first step, accel_trainer - Accelerate loop: {extra_first:+.3f} s")
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, accel_trainer; print(sorted(m for m in ('wandb', 'torchmetrics', "
         "'jsonargparse', 'matplotlib', 'tensorboard', 'rich', 'pandas') if m in sys.modules))"],
        env=_env(tempfile.gettempdir()), capture_output=True, text=True, cwd=REPO,
    ).stdout.strip()
    print(f"heavy optional packages imported by 'import accel_trainer': {heavy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
