"""torchrun elastic restarts: a rank dies mid-epoch, the launcher restarts the job, and the
restarted job resumes from ``last`` -- written every few steps by ``ModelCheckpoint`` -- to end
bitwise equal to an uninterrupted run.

After a restart gloo cannot reconnect through a rendezvous store the workers share with the
elastic agent: it still holds the first attempt's addresses (static rendezvous keeps one store
for good; PyTorch issue 135712). ``--rdzv_backend c10d`` with
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives each attempt a store of its own (README,
"Elastic restarts"); the trainer warns when restarts are asked for without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from .test_fsdp_launch import _env
from .test_launch import ACCELERATE, _free_port


SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from helpers import loader
    from test_resume import Everything
    from accel_trainer import Callback, Trainer
    from accel_trainer.callbacks import ModelCheckpoint

    root, out, crash_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    class DieOnce(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if attempt == 0 and trainer.global_step == crash_at and trainer.accelerator.process_index == 1:
                os._exit(3)  # a rank lost mid-epoch, without any cleanup

    last_every_4_steps = ModelCheckpoint(every_n_train_steps=4, save_top_k=0, save_last=True)
    trainer = Trainer(max_epochs=3, seed=3, enable_progress_bar=False, default_root_dir=root,
                      callbacks=[last_every_4_steps, DieOnce()])
    module = Everything()
    trainer.fit(module, loader(64, batch_size=4, shuffle=True), loader(33, batch_size=5), ckpt_path="last")
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in module.parameters())).hexdigest()
    result = {"attempt": attempt, "world_size": trainer.world_size, "global_step": trainer.global_step,
              "optimizer_steps": trainer.optimizer_steps, "lrs": [[g["lr"] for g in o.param_groups] for o in trainer.optimizers],
              "params": digest}
    with open(f"{out}-{trainer.accelerator.process_index}.json", "w") as f:
        json.dump(result, f)
    """
)


def _launch(script, root, out, crash_at: int, max_restarts: int) -> subprocess.CompletedProcess:
    command = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--max_restarts", str(max_restarts),
        "--rdzv_backend", "c10d",
        "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        str(script), str(root), str(out), str(crash_at),
    ]
    env = _env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_a_rank_lost_mid_epoch_is_restarted_and_the_job_resumes_exactly(tmp_path):
    script = tmp_path / "elastic.py"
    script.write_text(SCRIPT)
    reference = _launch(script, tmp_path / "reference", tmp_path / "reference", crash_at=0, max_restarts=0)
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-3000:]
    restarted = _launch(script, tmp_path / "restarted", tmp_path / "restarted", crash_at=14, max_restarts=1)
    assert restarted.returncode == 0, restarted.stdout[-2000:] + restarted.stderr[-3000:]
    # the first attempt died at step 14 (last.ckpt was written at step 12, mid-epoch); the second resumed
    assert "exitcode: 3" in restarted.stderr, restarted.stderr[-3000:]
    assert "restarts will not reconnect" not in restarted.stderr
    for rank in (0, 1):
        ref = json.load(open(f"{tmp_path / 'reference'}-{rank}.json"))
        res = json.load(open(f"{tmp_path / 'restarted'}-{rank}.json"))
        assert res["attempt"] == 1 and ref["attempt"] == 0
        assert res["world_size"] == 2
        for key in ("global_step", "optimizer_steps", "lrs", "params"):
            assert res[key] == ref[key], key


def test_restarts_through_the_launchers_shared_store_are_warned_about(monkeypatch):
    from accel_trainer.launching import warn_if_restarts_cannot_reconnect as _warn_if_restarts_cannot_reconnect

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # what a static rendezvous sets
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(UserWarning, match="--rdzv_backend c10d and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        _warn_if_restarts_cannot_reconnect()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # each attempt has its own store
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_restarts_cannot_reconnect()
