"""Issue 16: the per-step cost of the framework, timed step by step against a raw loop in the same process.

Cases (``--case``, repeatable; default: all):

* ``mlp``    -- tiny MLP 32 -> 64 -> 1, batch 64, Adam + StepLR stepped every step, 2,000 steps:
  the fixed per-step cost (a raw step is ~0.7 ms on one CPU thread, so every microsecond shows).
* ``log10`` / ``log50`` -- the same model, and ``training_step`` logs 10 / 50 scalar tensors per
  step with ``on_step=True, on_epoch=True`` (``log_every_n_steps=50``). The raw loop keeps each
  value's latest tensor and adds it, weighted by the batch size, into a preallocated on-device
  sum (one in-place ``add_`` per value), and every 50 steps reads the latest values back and
  appends a CSV row: what a hand-written loop needs for the same step and epoch values.
* ``opt2`` / ``opt4`` / ``opt8`` -- N small MLPs, N Adam optimizers each stepping every batch;
  optimizer i's loss depends on its own net and on net (i+1) mod N (a GAN's coupling), so the
  other nets' parameters must be kept out of each backward. The raw loop does that the cheapest
  way a hand-written loop can, ``loss.backward(inputs=own_params)``; the trainer toggles
  ``requires_grad`` (the documented semantics users see in ``training_step``). 500 batches.

**Paired per-step timing.** On this 2-vCPU machine shared with other jobs, timing two whole
runs one after the other swings the ratio between identical loops from 0.7x to 2x. So both loops
run interleaved, step by step, in one process: a callback's ``on_train_batch_end`` runs one step
of the raw loop (timed on its own) and the trainer's step is the time from the end of that hook to
the start of the next one, i.e. everything the framework does for one batch (fetching the batch,
``training_step``, backward, the optimizer steps, schedulers, logging and its boundaries,
counters, hooks) plus one extra hook call, which is counted against the framework. Whatever slows
the machine hits both loops within the same millisecond. A round is one run of ``--steps`` paired
steps; its ratio is the sum of the trainer's step times over the sum of the raw loop's (after
``WARMUP`` steps, and leaving out the pairs where either side took more than 10x its median: a
preemption of the process, not framework work; their count is printed). The table shows the
median over rounds, after one uncounted warm-up round. The final weights of the two loops must be
bit-identical (exit code 1 otherwise).

**Where the raw step goes matters, and is checked.** Each loop's phases must follow the other
loop's same phases, or the CPU caches favour one side: with the raw step at the start of a batch
(after the framework fetched it, an earlier version of this script), the raw loop's fetch ran
right after the framework's and two identical hand-written loops measured 1.011x against each
other; at the end of a batch each loop's fetch follows the other's scheduler step and they
measure 1.000x. ``--case aa`` runs that A/A check: the raw loop paired with a copy of itself,
in the same position (it needs no framework).

PyTorch Lightning is timed the same way against its own raw loop when ``--lightning-python`` names
an interpreter that has it (never a dependency of this project; several optimizers there need
manual optimization: ``toggle_optimizer`` / ``manual_backward``, its documented way).

    python benchmarks/overhead.py [--case mlp --case log50 ...] [--rounds 5]
        [--lightning-python /path/to/venv-with-lightning/bin/python]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

SEED, INPUTS, HIDDEN, BATCH = 1234, 32, 64, 64
WARMUP = 20  # paired steps left out at the start of each round
OUTLIER = 10.0  # a step longer than this many medians is a preemption of the process
LOG_EVERY = 50
#: the clock of the paired timing (set by --clock): this thread's CPU time leaves out the time the
#: process waits for a core on a busy machine; wall time is what a user waits
CLOCK = time.thread_time
CASES = ("mlp", "log10", "log50", "opt2", "opt4", "opt8")
#: the A/A calibration: two copies of the raw tiny-MLP loop paired the same way (no framework)
CALIBRATION = "aa"
STEPS = {"aa": 2000, "mlp": 2000, "log10": 2000, "log50": 2000, "opt2": 500, "opt4": 500, "opt8": 500}


def n_logged(case: str) -> int:
    return int(case[3:]) if case.startswith("log") else 0


def n_optimizers(case: str) -> int:
    return int(case[3:]) if case.startswith("opt") else 1


# -- the shared pieces: data, nets, losses, optimizers ----------------------------------------------
def make_data(steps: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((steps + 1) * BATCH, INPUTS, generator=g)
    y = x[:, :1].sin() + 0.1 * torch.randn(x.shape[0], 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def make_loader(data) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


def make_net(seed: int = SEED) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def make_nets(n: int) -> nn.ModuleList:
    return nn.ModuleList(make_net(SEED + i) for i in range(n))


def mlp_optim(params):
    opt = torch.optim.Adam(params, lr=1e-3)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=500, gamma=0.5)


def coupled_loss(nets: nn.ModuleList, x: torch.Tensor, y: torch.Tensor, i: int) -> torch.Tensor:
    """Optimizer i's loss: its own net plus its neighbour's, whose parameters it must not train."""
    return F.mse_loss(nets[i](x) + 0.5 * nets[(i + 1) % len(nets)](x), y)


def log_names(n: int) -> list[str]:
    return [f"m{k}" for k in range(n)]


def log_scales(n: int) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=torch.float32)


# -- the raw loops, one step per call ---------------------------------------------------------------
class RawMLP:
    """The hand-written loop of cases mlp/logN; ``step()`` trains on the next batch."""

    def __init__(self, data, n_log: int, csv_path: str) -> None:
        self.net = make_net()
        self.opt, self.sched = mlp_optim(self.net.parameters())
        self.batches = iter(make_loader(data))
        self.n_log = n_log
        self.scales = log_scales(n_log)
        self.sums = [torch.zeros(()) for _ in range(n_log)]  # batch-size-weighted epoch sums, on the device
        self.last: list[Any] = [None] * n_log
        self.weight = 0
        self.steps = 0
        self.csv_path = csv_path
        self.header = False

    def step(self) -> None:
        x, y = next(self.batches)
        loss = F.mse_loss(self.net(x), y)
        if self.n_log:
            values = (loss.detach() * self.scales).unbind()
            size = x.shape[0]
            sums, last = self.sums, self.last
            for k, v in enumerate(values):
                last[k] = v
                sums[k].add_(v, alpha=size)
            self.weight += size
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        self.steps += 1
        if self.n_log and self.steps % LOG_EVERY == 0:
            row = torch.stack(self.last).tolist()  # the one read-back, at a logging boundary
            with open(self.csv_path, "a", newline="") as f:
                writer = csv.writer(f)
                if not self.header:
                    writer.writerow(["step", *log_names(self.n_log)])
                    self.header = True
                writer.writerow([self.steps, *row])

    def weights(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()


class RawMulti:
    """The hand-written loop of cases optN: each optimizer's backward reaches only its own parameters."""

    def __init__(self, data, n: int) -> None:
        self.nets = make_nets(n)
        self.params = [list(net.parameters()) for net in self.nets]
        self.opts = [torch.optim.Adam(p, lr=1e-3) for p in self.params]
        self.batches = iter(make_loader(data))

    def step(self) -> None:
        x, y = next(self.batches)
        nets, params = self.nets, self.params
        for i, opt in enumerate(self.opts):
            loss = coupled_loss(nets, x, y, i)
            loss.backward(inputs=params[i])
            opt.step()
            opt.zero_grad()

    def weights(self) -> dict[str, torch.Tensor]:
        return self.nets.state_dict()


# -- the framework's modules (accel_trainer or Lightning) ----------------------------------------
def make_module(base: type, case: str, lightning: bool) -> Any:
    n_log, n_opt = n_logged(case), n_optimizers(case)
    names, scales = log_names(n_log), log_scales(n_log)

    if n_opt == 1:

        class MLP(base):
            def __init__(self) -> None:
                super().__init__()
                self.net = make_net()

            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = F.mse_loss(self.net(x), y)
                if n_log:
                    for name, v in zip(names, (loss.detach() * scales).unbind()):
                        self.log(name, v, on_step=True, on_epoch=True)
                return loss

            def configure_optimizers(self):
                opt, sched = mlp_optim(self.parameters())
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

            def weights(self) -> dict[str, torch.Tensor]:
                return self.net.state_dict()

        return MLP()

    if lightning:  # Lightning 2 trains several optimizers only under manual optimization

        class MultiManual(base):
            def __init__(self) -> None:
                super().__init__()
                self.automatic_optimization = False
                self.nets = make_nets(n_opt)

            def training_step(self, batch, batch_idx):
                x, y = batch
                for i, opt in enumerate(self.optimizers()):
                    self.toggle_optimizer(opt)
                    loss = coupled_loss(self.nets, x, y, i)
                    self.manual_backward(loss)
                    opt.step()
                    opt.zero_grad()
                    self.untoggle_optimizer(opt)

            def configure_optimizers(self):
                return [torch.optim.Adam(net.parameters(), lr=1e-3) for net in self.nets]

            def weights(self) -> dict[str, torch.Tensor]:
                return self.nets.state_dict()

        return MultiManual()

    class Multi(base):
        def __init__(self) -> None:
            super().__init__()
            self.nets = make_nets(n_opt)

        def training_step(self, batch, batch_idx, optimizer_idx):
            x, y = batch
            return coupled_loss(self.nets, x, y, optimizer_idx)

        def configure_optimizers(self):
            return [torch.optim.Adam(net.parameters(), lr=1e-3) for net in self.nets]

        def weights(self) -> dict[str, torch.Tensor]:
            return self.nets.state_dict()

    return Multi()


def make_pairing(base: type, raw: Any) -> Any:
    """A callback that runs one raw step in every ``on_train_batch_end`` and times both sides."""

    class Pairing(base):
        def __init__(self) -> None:
            super().__init__()
            self.framework: list[float] = []
            self.raw: list[float] = []
            self.left = None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            entered = CLOCK()
            if self.left is not None:
                self.framework.append(entered - self.left)
            t0 = CLOCK()
            raw.step()
            self.raw.append(CLOCK() - t0)
            self.left = CLOCK()

    return Pairing()


def paired_ratios(framework: list[float], raw: list[float]) -> dict[str, Any]:
    """The round's figures from the two lists of step times.

    ``framework[k]`` is the framework's step k+1 (from the end of hook k to hook k+1; step 0 has
    no hook before it), paired with the raw loop's step k+1, ``raw[k + 1]``.
    """
    fw, rw = framework[WARMUP:], raw[WARMUP + 1 : len(framework) + 1]
    mf, mr = statistics.median(fw), statistics.median(rw)
    kept = [(f, r) for f, r in zip(fw, rw) if f <= OUTLIER * mf and r <= OUTLIER * mr]
    return {
        "ratio": sum(f for f, _ in kept) / sum(r for _, r in kept),
        "median_step_ratio": statistics.median(f / r for f, r in kept),
        "framework_us": 1e6 * statistics.mean(f for f, _ in kept),
        "raw_us": 1e6 * statistics.mean(r for _, r in kept),
        "dropped": len(fw) - len(kept),
    }


def run_calibration_round(steps: int) -> dict[str, Any]:
    """The A/A check: a raw loop "A" in the framework's place, stepped exactly as the trainer steps
    a batch (fetch, then the step, then the hook), with the timed raw loop "B" in the hook."""
    data = make_data(steps)
    a = RawMLP(data, 0, os.devnull)
    b = RawMLP(data, 0, os.devnull)
    framework: list[float] = []
    raw: list[float] = []
    left = None
    for _ in range(steps):
        x, y = next(a.batches)  # A's own loader, as RawMLP.step fetches
        loss = F.mse_loss(a.net(x), y)
        loss.backward()
        a.opt.step()
        a.opt.zero_grad()
        a.sched.step()
        entered = CLOCK()  # the hook: as Pairing.on_train_batch_end
        if left is not None:
            framework.append(entered - left)
        t0 = CLOCK()
        b.step()
        raw.append(CLOCK() - t0)
        left = CLOCK()
    same = all(torch.equal(a.net.state_dict()[k], v) for k, v in b.weights().items())
    return {**paired_ratios(framework, raw), "same_weights": bool(same)}


def run_round(case: str, steps: int, root: str, lightning: bool) -> dict[str, Any]:
    """One paired run: the framework's fit with the raw loop stepping inside it."""
    data = make_data(steps)
    raw: Any = RawMLP(data, n_logged(case), os.path.join(root, "raw_metrics.csv")) if n_optimizers(case) == 1 else RawMulti(data, n_optimizers(case))
    if lightning:
        import lightning as L
        from lightning.pytorch.loggers import CSVLogger

        module = make_module(L.LightningModule, case, lightning=True)
        pairing = make_pairing(L.Callback, raw)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, max_steps=steps, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
            log_every_n_steps=LOG_EVERY, logger=CSVLogger(root), callbacks=[pairing],
        )
    else:
        from accel_trainer import Callback, Trainer, TrainingModule

        module = make_module(TrainingModule, case, lightning=False)
        pairing = make_pairing(Callback, raw)
        trainer = Trainer(
            max_epochs=1, max_steps=steps, cpu=True, enable_progress_bar=False, default_root_dir=root,
            log_every_n_steps=LOG_EVERY, callbacks=[pairing],
        )
    trainer.fit(module, make_loader(data))
    a, b = module.weights(), raw.weights()
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {**paired_ratios(pairing.framework, pairing.raw), "same_weights": bool(same)}


def run_case(case: str, rounds: int, steps: int | None, lightning: bool) -> dict[str, Any]:
    steps = steps or STEPS[case]
    results = []
    with tempfile.TemporaryDirectory(prefix=f"bench_{case}_") as root:
        for r in range(rounds + 1):
            if case == CALIBRATION:
                result = run_calibration_round(steps)
            else:
                result = run_round(case, steps, os.path.join(root, str(r)), lightning)
            if r:  # round 0 is the uncounted warm-up
                results.append(result)
    return {
        "case": case,
        "steps": steps,
        "rounds": [r["ratio"] for r in results],
        "ratio": statistics.median(r["ratio"] for r in results),
        "median_step_ratio": statistics.median(r["median_step_ratio"] for r in results),
        "framework_us": statistics.median(r["framework_us"] for r in results),
        "raw_us": statistics.median(r["raw_us"] for r in results),
        "dropped": sum(r["dropped"] for r in results),
        "same_weights": all(r["same_weights"] for r in results),
    }


def lightning_results(python: str, cases: list[str], rounds: int, steps: int | None, clock: str) -> dict[str, dict]:
    command = [python, os.path.abspath(__file__), "--framework", "lightning", "--json", "--rounds", str(rounds), "--clock", clock]
    for case in cases:
        command += ["--case", case]
    if steps:
        command += ["--steps", str(steps)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        print(f"Lightning run failed ({python}):\n{out.stderr[-2000:]}", file=sys.stderr)
        return {}
    return {r["case"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])}


def describe(case: str) -> str:
    if case == CALIBRATION:
        return "A/A: raw vs raw"
    if case == "mlp":
        return "tiny MLP"
    if case.startswith("log"):
        return f"{n_logged(case)} self.log per step"
    return f"{n_optimizers(case)} optimizers"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=(*CASES, CALIBRATION), action="append",
                        help=f"repeatable; default: {CALIBRATION!r} (the A/A check of the method) and all of {CASES}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="paired steps per round (default: per case)")
    parser.add_argument("--framework", choices=("accel_trainer", "lightning"), default="accel_trainer")
    parser.add_argument("--lightning-python", default=None, help="an interpreter with lightning installed")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread",
                        help="thread: this thread's CPU time (default); wall: time.perf_counter")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("ACCEL_TRAINER_PROGRESS", "off")
    cases = args.case or [CALIBRATION, *CASES]
    lightning = args.framework == "lightning"
    if lightning:
        import logging

        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
    results = [run_case(c, args.rounds, args.steps, lightning) for c in cases]
    if args.json:
        print(json.dumps(results))
        return 0
    others = lightning_results(args.lightning_python, [c for c in cases if c != CALIBRATION], args.rounds, args.steps, args.clock) if args.lightning_python else {}
    print(f"paired per-step timing ({args.clock} clock), {args.rounds} rounds (+1 warm-up), 1 thread, torch {torch.__version__}")
    header = f"{'case':<22}{'steps':>6}{'raw µs/step':>13}{'fw µs/step':>12}{'ratio':>8}{'per-step med':>14}{'dropped':>9}  rounds"
    print(header + ("   Lightning ratio" if others else ""))
    ok = True
    for r in results:
        line = (
            f"{describe(r['case']):<22}{r['steps']:>6}{r['raw_us']:>13.1f}{r['framework_us']:>12.1f}{r['ratio']:>7.3f}x"
            f"{r['median_step_ratio']:>13.3f}x{r['dropped']:>9}  " + " ".join(f"{x:.3f}" for x in r["rounds"])
        )
        if r["case"] in others:
            line += f"   {others[r['case']]['ratio']:.3f}x"
        print(line)
        if not r["same_weights"]:
            ok = False
            print(f"  final weights differ from the raw loop's in case {r['case']}")
    print("final weights identical to the raw loop's:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
