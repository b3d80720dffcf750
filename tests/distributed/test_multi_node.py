"""Two "machines" on this one: two `accelerate launch --num_machines 2 --machine_rank {0,1}` over loopback.

They must form one 2-rank job equal to a 2-process single-node run (counters, LRs, bitwise
parameters), write each checkpoint once, and resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from .test_launch import ACCELERATE, REPO, TESTS, _LAUNCH_VARS, _free_port

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    from helpers import loader
    from test_resume import Everything
    from accel_trainer import Trainer

    root, out, ckpt = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    max_steps = 7 if ckpt == "stop" else -1
    trainer = Trainer(max_epochs=2, max_steps=max_steps, enable_progress_bar=False, default_root_dir=root, seed=3)
    module = Everything()
    data = loader(64, batch_size=4, shuffle=True)
    trainer.fit(module, data, loader(33, batch_size=5), ckpt_path="last" if ckpt == "resume" else None)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in module.parameters())).hexdigest()
    result = {"rank": trainer.accelerator.process_index, "world_size": trainer.world_size,
              "global_step": trainer.global_step, "optimizer_steps": trainer.optimizer_steps,
              "lrs": [[g["lr"] for g in o.param_groups] for o in trainer.optimizers], "params": digest}
    with open(f"{out}-{result['rank']}.json", "w") as f:
        json.dump(result, f)
    """
)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(ACCELERATE_USE_CPU="1", PYTHONPATH=os.pathsep.join([TESTS, REPO]), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return env


def _common(port: int) -> list[str]:
    return ["--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]


def _two_nodes(script, root, out, *extra):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [ACCELERATE, "launch", "--config_file", os.path.join(REPO, "launch", "multi_node.yaml"),
             "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
             "--main_process_ip", "127.0.0.1", *_common(port), str(script), str(root), str(out), *extra],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]


def _one_node(script, root, out, *extra):
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_machines", "1", "--num_processes", "2",
               *_common(_free_port()), str(script), str(root), str(out), *extra]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def _results(out):
    return [json.load(open(f"{out}-{rank}.json")) for rank in (0, 1)]


@pytest.mark.slow
def test_two_nodes_equal_one_node_and_resume(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    _one_node(script, tmp_path / "single", tmp_path / "single")
    _two_nodes(script, tmp_path / "multi", tmp_path / "multi")
    single, multi = _results(tmp_path / "single"), _results(tmp_path / "multi")
    assert [r["world_size"] for r in multi] == [2, 2]
    for s, m in zip(single, multi):
        for key in ("global_step", "optimizer_steps", "lrs", "params"):
            assert s[key] == m[key], key
    assert multi[0]["params"] == multi[1]["params"]
    assert os.listdir(tmp_path / "multi" / "checkpoints") == ["last.ckpt"]  # written once, no stray temp files

    # stop mid-run on two nodes, resume on two nodes: same end state as uninterrupted
    _two_nodes(script, tmp_path / "resumed", tmp_path / "stopped", "stop")
    _two_nodes(script, tmp_path / "resumed", tmp_path / "resumed", "resume")
    resumed = _results(tmp_path / "resumed")
    for m, r in zip(multi, resumed):
        for key in ("global_step", "optimizer_steps", "lrs", "params"):
            assert m[key] == r[key], key


MORE_FEATURES = textwrap.dedent(
    """
    import hashlib, json, sys, tempfile
    import torch
    from helpers import Regressor, loader
    from test_resume import Everything
    from accel_trainer import Trainer

    root, out = sys.argv[1], sys.argv[2]

    class LBFGSRegressor(Regressor):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5, line_search_fn="strong_wolfe")

    runs = {
        "accumulation_bf16": (Everything(), dict(gradient_accumulation_steps=2, mixed_precision="bf16"), True),
        "lbfgs": (LBFGSRegressor(), {}, False),
    }
    result = {}
    for name, (module, kwargs, with_val) in runs.items():
        trainer = Trainer(max_epochs=2, enable_progress_bar=False, default_root_dir=f"{root}/{name}", seed=3, **kwargs)
        trainer.fit(module, loader(64, batch_size=4, shuffle=True), loader(33, batch_size=5) if with_val else None)
        digest = hashlib.sha256(b"".join(p.detach().float().numpy().tobytes() for p in module.parameters())).hexdigest()
        result[name] = {"world_size": trainer.world_size, "global_step": trainer.global_step,
                        "optimizer_steps": trainer.optimizer_steps,
                        "lrs": [[g["lr"] for g in o.param_groups] for o in trainer.optimizers], "params": digest}
    with open(f"{out}-{trainer.accelerator.process_index}.json", "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.slow
def test_two_nodes_equal_one_node_with_accumulation_bf16_and_lbfgs(tmp_path):
    script = tmp_path / "more.py"
    script.write_text(MORE_FEATURES)
    _one_node(script, tmp_path / "single", tmp_path / "single")
    _two_nodes(script, tmp_path / "multi", tmp_path / "multi")
    single, multi = _results(tmp_path / "single"), _results(tmp_path / "multi")
    for name in ("accumulation_bf16", "lbfgs"):
        assert [r[name]["world_size"] for r in multi] == [2, 2]
        assert multi[0][name]["params"] == multi[1][name]["params"], name
        for s, m in zip(single, multi):
            for key in ("global_step", "optimizer_steps", "lrs", "params"):
                assert s[name][key] == m[name][key], (name, key)
    # 64 samples, batch 4 per rank over 2 ranks: 8 batches per rank per epoch, a boundary every 2
    assert multi[0]["accumulation_bf16"]["global_step"] == 8
