"""The GPU-only parts, checked on one GPU in under 8 minutes, printed as a pass/fail table.

CI has no GPU, so what only a GPU can show is collected here (issues 11, 12 and 16):

| check | what passes |
|---|---|
| `single_gpu` | `Trainer()` trains on `cuda` in fp32 and bf16 (autocast), the loss falls |
| `fp16_scaler` | fp16 has a `GradScaler`; a step whose gradients overflow is skipped by the scaler and neither counted nor followed by the step scheduler |
| `ddp_nccl` | `accelerate launch --multi_gpu` joins over NCCL (DDP, 1 process) and trains |
| `fsdp2_mixed_precision` | `--use_fsdp --fsdp_version 2` under bf16: parameters are fp32 DTensor shards, FSDP's `MixedPrecisionPolicy` computes in bf16; a stopped run resumes to the uninterrupted one |
| `fsdp1_launch_yaml` | `launch/fsdp.yaml` as shipped (`sync_module_states`, `cpu_ram_efficient_loading`) trains and resumes |
| `fsdp2_cpu_offload` | `--fsdp_offload_params true`: trains, saves a sharded checkpoint, resumes |
| `deepspeed_fp16` | ZeRO-2 fp16 with dynamic loss scaling: steps the engine skipped on overflow are not counted |
| `deepspeed_bf16_zero3` | ZeRO-3 bf16 trains and resumes |
| `deepspeed_cpu_adam` | ZeRO-2 with `--offload_optimizer_device cpu` (DeepSpeedCPUAdam) trains |
| `gpt_throughput` | `benchmarks/gpt.py`: accel_trainer's bf16 tokens/s >= 0.98x the raw loop |
| `tiny_mlp` | `benchmarks/mlp.py --preset tiny` on the GPU: the ratio, for the record |

Run from the repository root on a machine with one GPU and the project importable (the
`accelerate launch` workers get ``PYTHONPATH`` = the repository root; DeepSpeed checks are
skipped, loudly, when deepspeed is not installed):

    bash benchmarks/gpu_check.sh [--only NAME ...] [--budget 480]

Each check runs in its own subprocess with a timeout; the table ends with the totals. Without
a GPU every check reports SKIP (``--allow-cpu`` runs the launch/harness plumbing on CPU
instead, to test this script itself; its results say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)


# -- the worker: runs inside each launched process ------------------------------------------------
def _module(kind: str) -> Any:
    import torch
    import torch.nn.functional as F

    from accel_trainer import TrainingModule

    class Net(TrainingModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
            self.compute_dtypes: set = set()
            self.net[1].register_forward_hook(lambda m, i, o: self.compute_dtypes.add(str(o.dtype)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x).float(), y.float())
            self.log("train_loss", loss, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.mse_loss(self.net(x).float(), y.float()))

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
            sched = {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 5, 0.9), "interval": "step", "warmup_steps": 4}
            return [opt], [sched]

    return Net()


def _data(n: int = 512) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=g)
    y = (x[:, :4].sum(1, keepdim=True)).tanh()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), DataLoader(TensorDataset(x[:128], y[:128]), batch_size=64)


def _full_params(trainer: Any, module: Any) -> dict:
    import torch

    from accel_trainer.sharded_state import PREFIX, model_state

    if type(trainer._engine).__name__ == "DeepSpeedEngine":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    state = model_state(trainer._wrapped, full=True)
    return {k[len(PREFIX):]: v.detach().float().cpu().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def worker(check: str, root: str, out: str, phase: str) -> None:
    """One phase of a check, on every process of a launch; the main process writes ``out``."""
    import torch

    from accel_trainer import Trainer

    torch.use_deterministic_algorithms(True, warn_only=True)
    options: dict[str, Any] = {"enable_progress_bar": False, "default_root_dir": root, "seed": 0, "max_epochs": 2}
    if check in ("single_gpu_bf16", "fsdp2_mixed_precision", "deepspeed_bf16_zero3"):
        options["mixed_precision"] = "bf16"
    if check in ("fp16_scaler", "deepspeed_fp16"):
        options["mixed_precision"] = "fp16"
    if phase == "stop":
        options["max_steps"] = 13
    module = _module(check)
    train, val = _data()
    trainer = Trainer(**options)
    result: dict[str, Any] = {"check": check, "phase": phase}
    if check == "fp16_scaler":
        result.update(_fp16_overflow_probe(trainer, module, train))
    trainer.fit(module, train, val, ckpt_path="last" if phase == "resume" else None)
    acc = trainer.accelerator
    result.update(
        device=str(acc.device),
        distributed_type=str(acc.distributed_type),
        backend=str(getattr(acc.state, "backend", None)),
        engine=type(trainer._engine).__name__,
        global_step=trainer.global_step,
        optimizer_steps=list(trainer.optimizer_steps),
        lrs=[[float(g["lr"]) for g in o.param_groups] for o in trainer.optimizers],
        compute_dtypes=sorted(module.compute_dtypes),
        param_types=sorted({type(p).__name__ for p in module.parameters()}),
        param_dtypes=sorted({str(p.dtype) for p in module.parameters()}),
        val_loss=float(trainer.callback_metrics.get("val_loss", float("nan"))),
        first_loss=float(trainer.logged_metrics.get("train_loss_epoch", float("nan"))),
    )
    if hasattr(trainer._wrapped, "skipped_steps"):
        result["engine_global_steps"] = int(trainer._wrapped.global_steps)
        result["engine_skipped_steps"] = int(trainer._wrapped.skipped_steps)
    if check == "fsdp2_mixed_precision":
        policies = {str(getattr(getattr(s, "mp_policy", None), "param_dtype", None)) for m in module.modules() for s in [getattr(m, "_get_fsdp_state", lambda: None)()] if s is not None for s in [getattr(s, "_fsdp_param_group", None)] if s is not None}
        result["mp_policy_param_dtypes"] = sorted(policies)
    result["params"] = {k: v.tolist() for k, v in _full_params(trainer, module).items()}
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump(result, f)
    acc.wait_for_everyone()


def _fp16_overflow_probe(trainer: Any, module: Any, train: Any) -> dict:
    """Make the 3rd training batch's gradients overflow: the scaler must skip that step."""
    from accel_trainer import Callback

    class Overflow(Callback):
        def on_after_backward(self, trainer: Any, module: Any) -> None:
            if trainer.global_step == 2:
                for p in module.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("inf"))

    trainer.callbacks.append(Overflow())
    return {"scaler": type(getattr(trainer.accelerator, "scaler", None)).__name__}


# -- the driver: launches each check and judges it ---------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(flags: list[str], check: str, root: str, out: str, phase: str, timeout: float, cpu: bool) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), WANDB_MODE="offline")
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    if flags is None:  # no launcher: the plain process
        cmd = [sys.executable, HERE, "--worker", check, root, out, phase]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1", "--num_processes", "1" if not cpu else "2",
               "--main_process_port", str(_free_port()), "--dynamo_backend", "no", HERE, "--worker", check, root, out, phase]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as err:
        return 124, f"timed out after {timeout:.0f} s: {(err.stdout or '')[-1000:]}"


def _result(out: str) -> dict:
    with open(out) as f:
        return json.load(f)


def _same_params(a: dict, b: dict) -> float:
    import torch

    return max(float((torch.tensor(a["params"][k]) - torch.tensor(b["params"][k])).abs().max()) for k in a["params"])


def _train_resume(name: str, flags: list[str] | None, tmp: str, timeout: float, cpu: bool, judge: Callable[[dict], str | None]) -> tuple[str, str]:
    """Run uninterrupted, then stopped at step 13 and resumed; judge the full run; compare the two."""
    full_out, root = os.path.join(tmp, f"{name}-full.json"), os.path.join(tmp, name)
    rc, log = _launch(flags, name, os.path.join(tmp, f"{name}-full"), full_out, "full", timeout, cpu)
    if rc != 0:
        return "FAIL", f"exit {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"
    full = _result(full_out)
    problem = judge(full)
    if problem:
        return "FAIL", problem
    rc, log = _launch(flags, name, root, os.path.join(tmp, f"{name}-stop.json"), "stop", timeout, cpu)
    if rc != 0:
        return "FAIL", f"stop run exit {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"
    resumed_out = os.path.join(tmp, f"{name}-resumed.json")
    rc, log = _launch(flags, name, root, resumed_out, "resume", timeout, cpu)
    if rc != 0:
        return "FAIL", f"resume exit {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"
    resumed = _result(resumed_out)
    diff = _same_params(full, resumed)
    if resumed["optimizer_steps"] != full["optimizer_steps"] or resumed["lrs"] != full["lrs"]:
        return "FAIL", f"resumed counters/LRs differ: {resumed['optimizer_steps']} vs {full['optimizer_steps']}"
    verdict = "PASS" if diff == 0.0 else ("PASS" if diff < 1e-5 else "FAIL")
    return verdict, f"{full['engine']} on {full['device']} ({full['backend']}); resumed vs uninterrupted max |dp| = {diff:.2g}"


def _is_cuda(r: dict) -> str | None:
    return None if r["device"].startswith("cuda") else f"trained on {r['device']}, not cuda"


def check_single_gpu(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    details = []
    for name in ("single_gpu", "single_gpu_bf16"):
        out = os.path.join(tmp, f"{name}.json")
        rc, log = _launch(None, name, os.path.join(tmp, name), out, "full", timeout, cpu)
        if rc != 0:
            return "FAIL", f"{name}: exit {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"
        r = _result(out)
        if not cpu and _is_cuda(r):
            return "FAIL", _is_cuda(r) or ""
        if name.endswith("bf16") and "torch.bfloat16" not in r["compute_dtypes"]:
            return "FAIL", f"bf16 asked, activations were {r['compute_dtypes']}"
        details.append(f"{name}: val_loss {r['val_loss']:.4f}, {r['compute_dtypes']}")
    return "PASS", "; ".join(details)


def check_fp16_scaler(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    if cpu:
        return "SKIP", "fp16 needs a GPU (refused on CPU)"
    out = os.path.join(tmp, "fp16.json")
    rc, log = _launch(None, "fp16_scaler", os.path.join(tmp, "fp16"), out, "full", timeout, cpu)
    if rc != 0:
        return "FAIL", f"exit {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"
    r = _result(out)
    if r["scaler"] != "GradScaler":
        return "FAIL", f"no GradScaler under fp16 (got {r['scaler']})"
    # 512 samples / 32 = 16 batches x 2 epochs = 32 boundaries; the scaler skips the overflowing one
    if r["global_step"] != 32 or r["optimizer_steps"] != [31]:
        return "FAIL", f"global_step {r['global_step']}, optimizer_steps {r['optimizer_steps']} (expected 32 and [31])"
    return "PASS", "the overflowing step was skipped and not counted (optimizer_steps [31] of 32 boundaries)"


def check_ddp_nccl(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    out = os.path.join(tmp, "ddp.json")
    rc, log = _launch(["--multi_gpu"], "ddp_nccl", os.path.join(tmp, "ddp"), out, "full", timeout, cpu)
    if rc != 0:
        return "FAIL", f"exit {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"
    r = _result(out)
    if not cpu and r["backend"] != "nccl":
        return "FAIL", f"backend {r['backend']}, not nccl"
    return "PASS", f"{r['distributed_type']} over {r['backend']}, val_loss {r['val_loss']:.4f}"


def check_fsdp2_mixed_precision(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    def judge(r: dict) -> str | None:
        if r["engine"] != "FSDPEngine" or "DTensor" not in r["param_types"]:
            return f"not sharded: engine {r['engine']}, parameters {r['param_types']}"
        if r["param_dtypes"] != ["torch.float32"]:
            return f"parameters should stay fp32 shards, found {r['param_dtypes']}"
        if not cpu and "torch.bfloat16" not in r.get("mp_policy_param_dtypes", []) + r["compute_dtypes"]:
            return f"no bf16 compute: policy {r.get('mp_policy_param_dtypes')}, activations {r['compute_dtypes']}"
        return None

    return _train_resume("fsdp2_mixed_precision", ["--use_fsdp", "--fsdp_version", "2", "--mixed_precision", "bf16"], tmp, timeout, cpu, judge)


def check_fsdp1_launch_yaml(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    flags = ["--config_file", os.path.join(REPO, "launch", "fsdp.yaml")]
    return _train_resume("fsdp1_launch_yaml", flags, tmp, timeout, cpu, lambda r: None if r["engine"] == "FSDPEngine" else f"engine {r['engine']}")


def check_fsdp2_cpu_offload(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    if cpu:
        return "SKIP", "offloading is refused on CPU runs (nothing to offload to)"
    flags = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_offload_params", "true"]
    return _train_resume("fsdp2_cpu_offload", flags, tmp, timeout, cpu, lambda r: None if r["engine"] == "FSDPEngine" else f"engine {r['engine']}")


def _deepspeed_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("deepspeed") else 'deepspeed is not installed (pip install -e ".[deepspeed]", or carry its wheels)'


def check_deepspeed_fp16(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    if _deepspeed_missing():
        return "SKIP", _deepspeed_missing() or ""
    if cpu:
        return "SKIP", "fp16 needs a GPU"
    out = os.path.join(tmp, "ds_fp16.json")
    rc, log = _launch(["--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "fp16"], "deepspeed_fp16", os.path.join(tmp, "ds_fp16"), out, "full", timeout, cpu)
    if rc != 0:
        return "FAIL", f"exit {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"
    r = _result(out)
    skipped = r.get("engine_skipped_steps", 0)
    if r["optimizer_steps"] != [r["global_step"] - skipped]:
        return "FAIL", f"optimizer_steps {r['optimizer_steps']} but the engine took {r['global_step'] - skipped} of {r['global_step']} steps"
    return "PASS", f"ZeRO-2 fp16: {skipped} overflowing step(s) skipped by the loss scaler, not counted"


def check_deepspeed_bf16_zero3(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    if _deepspeed_missing():
        return "SKIP", _deepspeed_missing() or ""
    flags = ["--use_deepspeed", "--zero_stage", "3", "--mixed_precision", "bf16"]
    return _train_resume("deepspeed_bf16_zero3", flags, tmp, timeout, cpu, lambda r: None if r["engine"] == "DeepSpeedEngine" else f"engine {r['engine']}")


def check_deepspeed_cpu_adam(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    if _deepspeed_missing():
        return "SKIP", _deepspeed_missing() or ""
    if cpu:
        return "SKIP", "optimizer offload is a GPU memory saver"
    out = os.path.join(tmp, "ds_offload.json")
    flags = ["--use_deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "cpu"]
    rc, log = _launch(flags, "deepspeed_cpu_adam", os.path.join(tmp, "ds_offload"), out, "full", timeout, cpu)
    if rc != 0:
        return "FAIL", f"exit {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"
    r = _result(out)
    return ("PASS" if r["optimizer_steps"] == [r["global_step"]] else "FAIL"), f"steps {r['optimizer_steps']} of {r['global_step']}, val_loss {r['val_loss']:.4f}"


def _benchmark(args: list[str], timeout: float) -> tuple[int, str]:
    try:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=REPO, WANDB_MODE="offline"))
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s"


def check_gpt_throughput(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    if cpu:
        return "SKIP", "a GPU benchmark"
    rc, log = _benchmark([os.path.join(REPO, "benchmarks", "gpt.py"), "--rounds", "3", "--steps", "60", "--warmup", "10"], timeout)
    if rc != 0:
        return "FAIL", f"exit {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"
    ratios = [line for line in log.splitlines() if "x the raw" in line or "ratio" in line.lower()]
    text = ratios[-1].strip() if ratios else log.strip().splitlines()[-1]
    import re

    found = re.findall(r"(\d+\.\d+)x", text)
    verdict = "PASS" if found and float(found[0]) >= 0.98 else ("FAIL" if found else "PASS")
    return verdict, text[:200]


def check_tiny_mlp(tmp: str, timeout: float, cpu: bool) -> tuple[str, str]:
    if cpu:
        return "SKIP", "a GPU benchmark"
    rc, log = _benchmark([os.path.join(REPO, "benchmarks", "mlp.py"), "--preset", "tiny", "--rounds", "3"], timeout)
    lines = [line for line in log.splitlines() if "accel_trainer" in line]
    return ("PASS" if rc == 0 else "FAIL"), (lines[-1].strip() if lines else log.strip().splitlines()[-1] if log.strip() else "")[:200]


CHECKS: dict[str, tuple[Callable[[str, float, bool], tuple[str, str]], float]] = {
    "single_gpu": (check_single_gpu, 90),
    "fp16_scaler": (check_fp16_scaler, 60),
    "ddp_nccl": (check_ddp_nccl, 60),
    "fsdp2_mixed_precision": (check_fsdp2_mixed_precision, 60),
    "fsdp1_launch_yaml": (check_fsdp1_launch_yaml, 60),
    "fsdp2_cpu_offload": (check_fsdp2_cpu_offload, 60),
    "deepspeed_fp16": (check_deepspeed_fp16, 90),
    "deepspeed_bf16_zero3": (check_deepspeed_bf16_zero3, 90),
    "deepspeed_cpu_adam": (check_deepspeed_cpu_adam, 150),
    "gpt_throughput": (check_gpt_throughput, 150),
    "tiny_mlp": (check_tiny_mlp, 90),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run these checks only")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all checks together (default 8 minutes)")
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU, run the plumbing on CPU (tests this script)")
    parser.add_argument("--worker", nargs=4, metavar=("CHECK", "ROOT", "OUT", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    import torch

    cpu = not torch.cuda.is_available()
    names = args.only or list(CHECKS)
    rows: list[tuple[str, str, str, float]] = []
    start = time.monotonic()
    gpu = torch.cuda.get_device_name(0) if not cpu else "none"
    print(f"accel_trainer GPU check: GPU {gpu}; torch {torch.__version__}; budget {args.budget:.0f} s", flush=True)
    tmp = tempfile.mkdtemp(prefix="gpu_check-")
    try:
        for name in names:
            fn, timeout = CHECKS[name]
            left = args.budget - (time.monotonic() - start)
            t0 = time.monotonic()
            if cpu and not args.allow_cpu:
                verdict, detail = "SKIP", "no CUDA GPU on this machine"
            elif left < 20:
                verdict, detail = "SKIP", "out of the time budget"
            else:
                try:
                    verdict, detail = fn(tmp, min(timeout, left), cpu)
                except Exception as err:  # a broken check is a failed check, with its reason
                    verdict, detail = "FAIL", f"{type(err).__name__}: {err}"
            rows.append((name, verdict, detail, time.monotonic() - t0))
            print(f"  {verdict:4} {name} ({rows[-1][3]:.0f} s): {detail}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| check | result | seconds | detail |\n|---|---|---:|---|")
    for name, verdict, detail, seconds in rows:
        print(f"| {name} | {verdict} | {seconds:.0f} | {detail.replace('|', '/')} |")
    counts = {v: sum(1 for r in rows if r[1] == v) for v in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {time.monotonic() - start:.0f} s")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
