"""Case 4 of issue 6: start-up cost -- import time and time to the first training step.

Each measurement is a fresh interpreter, alternating between the variants, several rounds:

* import: ``python -c "import accelerate"`` vs ``python -c "import accel_trainer"`` (target:
  accel_trainer <= accelerate + 0.15 s; wandb, torchmetrics, jsonargparse and plotting are
  imported only when used). Whole interpreters vary by +-0.2 s on a busy VM, so the cost
  accel_trainer adds is also timed inside one interpreter, after ``import accelerate``.
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

# the import cost accel_trainer adds on top of accelerate, timed inside one interpreter
INCREMENT = """
import time
import accelerate
start = time.perf_counter()
import accel_trainer
print(time.perf_counter() - start)
"""

# the same, after a full collection: what is left is accel_trainer's own import work
# (the import above happens to trigger Python's generation-2 collection over the objects
# torch and accelerate created -- ~0.09 s here -- which any next allocation-heavy code would)
INCREMENT_AFTER_GC = INCREMENT.replace("start = time.perf_counter()", "import gc; gc.collect(); start = time.perf_counter()")

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


def _seconds(code: str, env: dict[str, str], mode: str) -> float:
    """Run ``code`` in a fresh interpreter and measure it.

    ``mode``: "wall" -- the whole process; "until-print" -- until the child prints
    ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux, so comparable across processes);
    "printed" -- the child prints the duration itself.
    """
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    end = time.perf_counter()
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{result.stderr[-3000:]}")
    if mode == "wall":
        return end - start
    printed = float(result.stdout.strip().splitlines()[-1])
    return printed - start if mode == "until-print" else printed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    cases = {
        "python -c 'import torch'": ("import torch", "wall"),
        "python -c 'import accelerate'": ("import accelerate", "wall"),
        "python -c 'import accel_trainer'": ("import accel_trainer", "wall"),
        "import accel_trainer after accelerate": (INCREMENT, "printed"),
        "  the same after gc.collect()": (INCREMENT_AFTER_GC, "printed"),
        "first step, Accelerate loop": (FIRST_STEP_ACCELERATE.format(here=HERE), "until-print"),
        "first step, accel_trainer": (FIRST_STEP_TRAINER.format(here=HERE), "until-print"),
    }
    with tempfile.TemporaryDirectory(prefix="bench_pycache_") as pycache:
        env = _env(pycache)
        for code, mode in cases.values():  # compile byte-code, warm the page cache
            _seconds(code, env, mode)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds):
            for name in cases if r % 2 == 0 else list(reversed(list(cases))):
                code, mode = cases[name]
                times[name].append(_seconds(code, env, mode))
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
    print(f"import accel_trainer - import accelerate (separate interpreters): {extra_import:+.3f} s (target <= +0.150 s)")
    print(f"import accel_trainer after accelerate, same interpreter: +{med['import accel_trainer after accelerate']:.3f} s "
          f"(+{med['  the same after gc.collect()']:.3f} s without the garbage collection it triggers)")
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
