"""``accel-trainer``: configs, overrides, errors, the resolved config, resume, optimizers from config.

Most tests call :func:`accel_trainer.cli.main` / :func:`~accel_trainer.cli.run` in-process on
the digits classifier with a few batches; two run the real command in a subprocess
(``python -m accel_trainer`` and the ``accel-trainer`` script) to check exit codes and that
no traceback reaches the user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from accel_trainer import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = os.path.join(REPO, "configs", "digits_classifier.yaml")
GAN = os.path.join(REPO, "configs", "digits_gan.yaml")


def tiny(tmp_path, *extra: str, config: str = CLASSIFIER, command: str = "fit") -> list[str]:
    """A few batches of the classifier config in a temporary run directory."""
    return [
        command, "--config", config,
        "--trainer.limit_train_batches", "3", "--trainer.max_epochs", "1",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false",
        *extra,
    ]


def run_cli(argv: list[str]):
    command, parser, cfg = cli.parse(argv)
    return cli.run(command, parser, cfg)


# -- end to end ------------------------------------------------------------------------------------


def test_fit_from_config_saves_the_resolved_config_and_hands_it_to_the_trainer(tmp_path):
    trainer = run_cli(tiny(tmp_path, "--module.init_args.lr=0.01", "--data.init_args.batch_size", "32"))
    run_dir = tmp_path / "run"
    assert trainer.global_step == 3 and trainer.current_epoch == 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "val_acc" in (run_dir / "metrics.csv").read_text().splitlines()[0]

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["module"]["class_path"] == "accel_trainer.examples.digits.DigitsClassifier"
    assert saved["module"]["init_args"]["lr"] == 0.01                      # --a.b=c
    assert saved["data"]["init_args"]["batch_size"] == 32                   # --a.b c
    assert saved["trainer"]["limit_train_batches"] == 3
    assert saved["module"]["init_args"]["hidden_dim"] == 128                # from the YAML
    assert saved["module"]["init_args"]["weight_decay"] == 0.0              # a default, resolved
    assert "config" not in saved
    assert trainer.run_config == saved
    assert trainer.lightning_module.hparams.lr == 0.01


def test_both_override_forms_and_the_exact_flags_wandb_agent_produces():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(open(os.path.join(REPO, "configs", "sweeps", "digits_classifier.yaml")))
    assert sweep["metric"] == {"name": "val_acc", "goal": "maximize"}
    assert sweep["method"] in ("bayes", "random", "grid")
    assert sweep["program"] == "launch/train.py"
    assert set(sweep["parameters"]) == {"module.init_args.lr", "data.init_args.batch_size", "module.init_args.warmup_steps"}
    values = {"module.init_args.lr": 0.0042, "data.init_args.batch_size": 16, "module.init_args.warmup_steps": 50}
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
    assert flags[0] == "--module.init_args.lr=0.0042"  # the form the agent substitutes for ${args}
    fixed = sweep["command"][sweep["command"].index("--config") : sweep["command"].index("${args}")]
    _, _, cfg = cli.parse(["fit", *[os.path.join(REPO, a) if a.endswith(".yaml") else a for a in fixed], *flags])
    assert (cfg.module.init_args.lr, cfg.data.init_args.batch_size, cfg.module.init_args.warmup_steps) == (0.0042, 16, 50)
    assert cfg.trainer.log_with == "wandb"

    _, _, cfg = cli.parse(["fit", "--config", CLASSIFIER, "--trainer.max_epochs", "3", "--module.init_args.dropout=0.25"])
    assert cfg.trainer.max_epochs == 3 and cfg.module.init_args.dropout == 0.25


def test_a_sweep_run_gets_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    trainer = run_cli(tiny(tmp_path))
    assert trainer.default_root_dir == os.path.join(str(tmp_path / "run"), "sweeps", "sw1", "run7")
    assert os.path.isfile(os.path.join(trainer.default_root_dir, "config.yaml"))


def test_rerunning_the_same_command_resumes_from_last_ckpt(tmp_path, capsys):
    argv = tiny(tmp_path)
    first = run_cli(argv)
    assert (first.global_step, first.current_epoch) == (3, 1)
    weights = {k: v.clone() for k, v in first.lightning_module.state_dict().items()}

    again = run_cli(argv)  # same command: the run is complete, nothing more to train
    assert "Resuming from" in capsys.readouterr().err
    assert (again.global_step, again.current_epoch) == (3, 1)
    for k, v in again.lightning_module.state_dict().items():
        assert torch.equal(v, weights[k]), k

    longer = run_cli([*argv, "--trainer.max_epochs=2"])  # a longer run continues it
    assert (longer.global_step, longer.current_epoch) == (6, 2)
    capsys.readouterr()

    fresh = run_cli([*argv, "--resume=false"])
    assert "Resuming" not in capsys.readouterr().err
    assert (fresh.global_step, fresh.current_epoch) == (3, 1)


def test_validate_and_test_load_the_runs_last_checkpoint(tmp_path, capsys):
    assert cli.main(tiny(tmp_path, "--trainer.max_epochs=2")) == 0
    capsys.readouterr()
    assert cli.main(tiny(tmp_path, command="test")) == 0
    out = capsys.readouterr()
    assert "Loaded weights from" in out.err and "last.ckpt" in out.err
    assert "test_acc:" in out.out
    assert cli.main(tiny(tmp_path, command="validate")) == 0
    assert "val_acc:" in capsys.readouterr().out
    assert (tmp_path / "run" / "config_test.yaml").is_file()


# -- optimizer and lr_scheduler from the config ----------------------------------------------------

PLAIN_MODULE = textwrap.dedent(
    '''
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from accel_trainer import TrainingModule


    class Plain(TrainingModule):
        """No configure_optimizers: the config provides the optimizer and scheduler."""

        def __init__(self, features: int = 4):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(features, 1)

        def _loader(self, n):
            x = torch.randn(n, self.hparams.features, generator=torch.Generator().manual_seed(0))
            return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

        def train_dataloader(self):
            return self._loader(64)

        def val_dataloader(self):
            return self._loader(16)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))
    '''
)

PLAIN_CONFIG = textwrap.dedent(
    """
    module:
      class_path: plain_models.Plain
    trainer:
      max_epochs: 2
      enable_progress_bar: false
    optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.1, momentum: 0.5}
    lr_scheduler:
      class_path: StepLR
      init_args: {step_size: 4, gamma: 0.5}
      interval: step
      warmup_steps: 3
    """
)


@pytest.fixture
def plain_project(tmp_path, monkeypatch):
    """A project directory with its own module file: class paths resolve from the working directory."""
    (tmp_path / "plain_models.py").write_text(PLAIN_MODULE)
    (tmp_path / "plain.yaml").write_text(PLAIN_CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("plain_models", None)


def test_a_module_without_configure_optimizers_trains_from_the_config(plain_project):
    trainer = run_cli(["fit", "--config", "plain.yaml", "--trainer.default_root_dir", "runs/plain"])
    from accel_trainer import TrainingModule

    assert type(trainer.lightning_module).configure_optimizers is TrainingModule.configure_optimizers  # not defined
    (optimizer,) = trainer.optimizers
    (sched,) = trainer.lr_schedulers
    raw = getattr(optimizer, "optimizer", optimizer)
    assert isinstance(raw, torch.optim.SGD) and raw.param_groups[0]["momentum"] == 0.5
    assert type(getattr(sched.scheduler, "scheduler", sched.scheduler)).__name__ == "StepLR"
    assert (sched.interval, sched.warmup_steps, sched.frequency) == ("step", 3, 1)
    assert trainer.optimizer_steps == [16]
    assert raw.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (16 // 4))  # 16 real steps, step_size 4
    saved = yaml.safe_load((plain_project / "runs" / "plain" / "config.yaml").read_text())
    assert saved["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"
    assert saved["optimizer"]["init_args"]["lr"] == 0.1


def test_a_config_optimizer_replaces_the_modules_own_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="configure_optimizers is replaced"):
        trainer = run_cli(tiny(tmp_path, "--optimizer=torch.optim.SGD", "--optimizer.init_args.lr=0.2"))
    raw = getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])
    assert isinstance(raw, torch.optim.SGD) and raw.param_groups[0]["lr"] == 0.2
    assert trainer.lr_schedulers == []


def test_attach_optimizers_from_python_builds_what_the_specs_name():
    from accel_trainer.examples.digits import DigitsClassifier

    module = DigitsClassifier()
    with pytest.warns(UserWarning, match=r"replaced by the config's optimizer \(SGD\) and lr_scheduler \(StepLR\)"):
        cli.attach_optimizers(module, {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
                              lr_scheduler={"class_path": "StepLR", "init_args": {"step_size": 2}, "interval": "step"})
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.1
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.StepLR) and scheduler["scheduler"].step_size == 2
    assert scheduler["scheduler"].optimizer is optimizer and scheduler["interval"] == "step"
    assert module.configure_optimizers()["optimizer"] is not optimizer  # a fresh optimizer per call
    with pytest.raises(cli.CLIError, match="optimizer"):
        cli.attach_optimizers(module, {"class_path": "torch.optim.NoSuchOptimizer"})


# -- building: the order a run needs ---------------------------------------------------------------


def test_the_trainer_applies_the_seed_before_the_module_is_built(tmp_path):
    def initial_weights(seed: int) -> torch.Tensor:
        _, _, cfg = cli.parse(tiny(tmp_path, f"--trainer.seed={seed}"))
        _, _, module = cli.build(cfg)
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    assert torch.equal(initial_weights(3), initial_weights(3))
    assert not torch.equal(initial_weights(3), initial_weights(4))


def test_a_callbacks_own_argument_check_names_its_place_in_the_list(tmp_path, capsys):
    argv = tiny(tmp_path, "--trainer.callbacks+=accel_trainer.callbacks.EarlyStopping", "--trainer.callbacks.mode=sideways")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: trainer.callbacks[1]: EarlyStopping(mode='sideways')" in err and "Traceback" not in err


# -- bad configs: exit code 2, the key, the value, what is allowed ---------------------------------

BAD_YAML = {
    "unknown_nested_key.yaml": "module:\n  class_path: accel_trainer.examples.digits.DigitsClassifier\n  init_args: {lrr: 0.1}\n",
    "unknown_trainer_key.yaml": "module: accel_trainer.examples.digits.DigitsClassifier\ntrainer: {max_epoch: 1}\n",
    "wrong_type.yaml": "module: accel_trainer.examples.digits.DigitsClassifier\ntrainer: {limit_train_batches: [1]}\n",
}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--trainer.max_epoch", "3"], ["trainer.max_epoch", "unknown key", "max_epochs", "Did you mean trainer.max_epochs"]),
        (["--foo=1"], ["foo", "unknown key", "module", "trainer"]),
        (["--trainer.max_epochs", "abc"], ["trainer.max_epochs", "'abc'", "int | None"]),
        (["--module.init_args.lr=fast"], ["module.init_args.lr", "'fast'", "float", "DigitsClassifier"]),
        (["--module.init_args.lrr=0.1"], ["module.init_args.lrr", "unknown key", "hidden_dim", "Did you mean module.init_args.lr"]),
        (["--data.init_args.batch_size=x"], ["data.init_args.batch_size", "'x'", "int"]),
        (["--module.class_path=accel_trainer.examples.digits.DigitsClasifier"],
         ["module.class_path", "DigitsClasifier", "subclass of accel_trainer.TrainingModule", "Did you mean"]),
        (["--module=no_such_package.Model"], ["module.class_path", "no_such_package.Model", "TrainingModule"]),
        (["--optimizer=torch.optim.Adamm"], ["optimizer.class_path", "Adamm", "torch.optim.Optimizer"]),
        (["--optimizer=Adam", "--lr_scheduler.class_path=StepLRR"], ["lr_scheduler.class_path", "StepLRR", "LRScheduler", "StepLR"]),
        (["--optimizer=Adam", "--lr_scheduler.class_path=StepLR", "--lr_scheduler.init_args.step_size=x"],
         ["lr_scheduler.init_args.step_size", "'x'", "int"]),
        (["--optimizer=Adam", "--lr_scheduler.class_path=StepLR", "--lr_scheduler.interval=steps"],
         ["lr_scheduler.interval", "'steps'", "'epoch', 'step'"]),
        (["--lr_scheduler.class_path=StepLR"], ["lr_scheduler.class_path", "optimizer"]),
        (["--trainer.mixed_precision=fp8"], ["mixed_precision", "'fp8'", "'bf16'"]),
        (["--config=unknown_nested_key.yaml"], ["module.init_args.lrr", "unknown key", "lr"]),
        (["--config=unknown_trainer_key.yaml"], ["trainer.max_epoch", "unknown key", "max_epochs"]),
        (["--config=wrong_type.yaml"], ["trainer.limit_train_batches", "[1]", "int | float | None"]),
    ],
    ids=lambda v: "_".join(v)[:60] if isinstance(v, list) and v and v[0].startswith("--") else None,
)
def test_bad_config_names_key_value_and_allowed_with_exit_code_2(tmp_path, monkeypatch, capsys, args, expected):
    for name, text in BAD_YAML.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "--config", CLASSIFIER, "--trainer.max_epochs=0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("accel-trainer fit: error: ")
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_python_dash_m_runs_the_cli_and_a_bad_config_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    ok = subprocess.run(
        [sys.executable, "-m", "accel_trainer", *tiny(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert "fit done on 1 process(es): epoch 1, global_step 3" in ok.stderr

    script = os.path.join(os.path.dirname(sys.executable), "accel-trainer")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "accel_trainer"]
    bad = subprocess.run(
        [*command, "fit", "--config", CLASSIFIER, "--trainer.max_epochs", "many"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2
    assert "trainer.max_epochs: received 'many'; allowed: int | None" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "plot", "lr-schedule"):
        assert name in out


def test_lr_schedule_and_plot_subcommands(tmp_path, capsys):
    out_png = tmp_path / "lr.png"
    assert cli.main(["lr-schedule", "--config", GAN, "--steps", "300", f"--out={out_png}"]) == 0
    assert out_png.is_file() and str(out_png) in capsys.readouterr().out
    assert cli.main(tiny(tmp_path)) == 0
    capsys.readouterr()
    assert cli.main(["plot", str(tmp_path / "run")]) == 0
    paths = capsys.readouterr().out.split()
    assert paths and all(p.endswith(".png") and os.path.isfile(p) for p in paths)
    assert cli.main(["plot", str(tmp_path / "nothing_here")]) == 2


# -- messages that name the real cause --------------------------------------------------------------

BROKEN_MODULES = {
    "syntax_error.py": "from accel_trainer import TrainingModule\n\nclass Net(TrainingModule)\n    pass\n",
    "bad_import.py": "import no_such_dependency_xyz\nfrom accel_trainer import TrainingModule\n\nclass Net(TrainingModule):\n    pass\n",
    "raises.py": "from accel_trainer import TrainingModule\nraise RuntimeError('boom at import')\n",
}

UNTYPED_MODULE = textwrap.dedent(
    '''
    from accel_trainer import TrainingModule


    class Net(TrainingModule):
        def __init__(self, g_lr=0.01, layers=2, name="net", use_bias=True, extra=None):
            super().__init__()
            self.save_hyperparameters()
    '''
)


@pytest.mark.parametrize(
    "class_path, expected",
    [
        ("syntax_error.Net", ["importing syntax_error failed: SyntaxError: expected ':'", "syntax_error.py, line 3",
                              "class Net(TrainingModule)"]),
        ("bad_import.Net", ["importing bad_import failed: ModuleNotFoundError", "no_such_dependency_xyz"]),
        ("raises.Net", ["importing raises failed: RuntimeError: boom at import", "raises.py, line 2"]),
    ],
)
def test_a_broken_user_module_is_reported_with_its_own_error(tmp_path, monkeypatch, capsys, class_path, expected):
    for name, text in BROKEN_MODULES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    try:
        assert cli.main(["fit", f"--module={class_path}"]) == 2
    finally:
        for name in BROKEN_MODULES:
            sys.modules.pop(name[:-3], None)
    err = capsys.readouterr().err
    assert err.startswith("accel-trainer fit: error: module.class_path: received")
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"
    assert "allowed: the import path" not in err and "Traceback" not in err


def test_an_unknown_top_level_section_is_named_with_a_suggestion(tmp_path, monkeypatch, capsys):
    (tmp_path / "typo.yaml").write_text("module: accel_trainer.examples.digits.DigitsClassifier\ntrainr:\n  max_epochs: 1\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "--config", "typo.yaml"]) == 2
    err = capsys.readouterr().err
    assert "trainr: unknown key. Allowed at the top level: module, data, trainer, optimizer, lr_scheduler" in err
    assert "Did you mean trainer?" in err


def test_untyped_init_args_are_checked_against_their_default(tmp_path, monkeypatch, capsys):
    (tmp_path / "untyped.py").write_text(UNTYPED_MODULE)
    monkeypatch.chdir(tmp_path)
    try:
        for override, expected in (
            ("--module.init_args.g_lr=fast", "module.init_args.g_lr: received 'fast'; allowed: float (inferred from the "
                                             "default g_lr=0.01 of Net, which has no type hint"),
            ("--module.init_args.layers=2.5", "module.init_args.layers: received 2.5; allowed: int"),
            ("--module.init_args.use_bias=3", "module.init_args.use_bias: received 3; allowed: bool"),
        ):
            assert cli.main(["fit", "--module=untyped.Net", override]) == 2
            assert expected in capsys.readouterr().err
        _, _, cfg = cli.parse(["fit", "--module=untyped.Net", "--module.init_args.g_lr=1", "--module.init_args.name=5",
                               "--module.init_args.extra=anything"])
        init_args = cfg.module.init_args
        assert (init_args.g_lr, init_args.name, init_args.extra) == (1.0, "5", "anything")
        assert isinstance(init_args.g_lr, float)
    finally:
        sys.modules.pop("untyped", None)
