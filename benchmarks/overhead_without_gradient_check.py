"""Issue 16 analysis: ``overhead.py``'s paired timing with the non-finite check switched off.

Not a supported configuration (the trainer always checks); it shows how much of the per-step
ratio the check of the loss and gradients before each optimizer step costs on a tiny model,
by replacing the CPU path of ``NonFiniteGuard`` with "never non-finite" in this process only.

    python benchmarks/overhead_without_gradient_check.py [--rounds 3] [--case mlp --case log10]
"""

from __future__ import annotations

import os
import runpy
import sys

import accel_trainer.nonfinite as nonfinite

HERE = os.path.dirname(os.path.abspath(__file__))
nonfinite.NonFiniteGuard._host_check_step = lambda self: (lambda opt_idx, loss, where: False)  # type: ignore[method-assign]

if __name__ == "__main__":
    args = sys.argv[1:] or ["--case", "mlp", "--case", "log10", "--rounds", "3"]
    sys.path.insert(0, HERE)
    sys.argv = [os.path.join(HERE, "overhead.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")
