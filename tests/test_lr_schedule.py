"""simulate_lr_schedule against the learning rates a real Trainer.fit used, step by step."""

from __future__ import annotations

import pytest
import torch
from torch.optim import SGD, Adam
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau, StepLR

from accel_trainer import Trainer, TrainingModule
from accel_trainer.errors import ConfigurationError
from accel_trainer.lr_schedule import LRSchedule, plot_lr_schedule, simulate_lr_schedule
from accel_trainer.optim import unwrap_optimizer
from helpers import loader


def _decay(epoch):
    return 0.8**epoch


def _harmonic(epoch):
    return 1.0 / (epoch + 1)


class Scheduled(TrainingModule):
    """A generator and a discriminator, with one of several schedule set-ups.

    ``on_fit_start`` registers a step pre-hook on every optimizer recording the learning
    rates of each real step (after the trainer's warm-up hook, which was registered first).
    """

    def __init__(self, setup: str, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.generator = torch.nn.Linear(4, 4)
        self.discriminator = torch.nn.Linear(4, 1)
        self.used: list[tuple[int, int, list[float]]] = []  # (global_step, optimizer_i, lrs)

    def training_step(self, batch, batch_idx, optimizer_idx=0):
        x, _ = batch
        fake = self.generator(x)
        if optimizer_idx == 0:
            return -self.discriminator(fake).mean()
        return self.discriminator(fake.detach()).mean() - self.discriminator(x).mean()

    def configure_optimizers(self):
        lr, setup = self.hparams.lr, self.hparams.setup
        opt_g = Adam(self.generator.parameters(), lr=lr)
        opt_d = SGD(self.discriminator.parameters(), lr=lr)
        if setup in ("seed_gan", "two_groups"):
            if setup == "two_groups":
                opt_d = SGD(
                    [{"params": self.discriminator.weight}, {"params": self.discriminator.bias, "lr": lr / 10}], lr=lr
                )
            return [opt_g, opt_d], [
                {
                    "scheduler": StepLR(opt_g, step_size=2, gamma=0.5),
                    "interval": "step",
                    "frequency": 2,
                    "warmup_steps": 3,
                },
                LambdaLR(opt_d, _decay),  # epoch interval
            ]
        if setup == "seed_warmup":
            return [opt_g], [{"scheduler": StepLR(opt_g, step_size=3, gamma=0.7), "interval": "step"}]
        if setup == "frequency":
            return (
                {
                    "optimizer": opt_g,
                    "frequency": 2,
                    "lr_scheduler": {"scheduler": StepLR(opt_g, step_size=1, gamma=0.9), "interval": "step"},
                },
                {
                    "optimizer": opt_d,
                    "frequency": 1,
                    "lr_scheduler": {"scheduler": LambdaLR(opt_d, _harmonic), "warmup_steps": 2},
                },
            )
        raise AssertionError(setup)

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        setup = self.hparams.setup
        if setup in ("seed_gan", "two_groups"):
            # Alternating schedule for optimizer steps (the seed's): G every 2 batches, D every 4
            if optimizer_i == 0 and batch_nb % 2 == 0:
                optimizer.step()
                optimizer.zero_grad()
            if optimizer_i == 1 and batch_nb % 4 == 0:
                optimizer.step()
                optimizer.zero_grad()
        elif setup == "seed_warmup":
            # the seed's warm-up, writing pg['lr'] itself (500 steps shortened to 5)
            if self.trainer.global_step < 5:
                lr_scale = min(1.0, float(self.trainer.global_step + 1) / 5.0)
                for pg in optimizer.param_groups:
                    pg["lr"] = lr_scale * self.hparams.lr
            optimizer.step()
            optimizer.zero_grad()
        else:
            super().optimizer_step(current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure)

    def on_fit_start(self):
        for i, opt in enumerate(self.trainer.optimizers):
            raw = unwrap_optimizer(opt)

            def record(o, args, kwargs, i=i):
                self.used.append((self.trainer.global_step, i, [float(g["lr"]) for g in o.param_groups]))

            raw.register_step_pre_hook(record)


@pytest.mark.parametrize(
    "setup, batches_per_epoch, epochs, accumulate",
    [
        ("seed_gan", 6, 3, 1),  # seed override (G every 2, D every 4) + step StepLR freq 2 + warm-up + epoch LambdaLR
        ("seed_gan", 9, 3, 2),  # same under gradient accumulation with a partial last window
        ("two_groups", 5, 2, 1),  # a second param group
        ("seed_warmup", 5, 3, 1),  # the seed's warm-up override writing pg['lr'] + step StepLR
        ("frequency", 5, 3, 1),  # optimizer-dict frequency 2/1 + step StepLR + epoch LambdaLR with warm-up
    ],
)
def test_simulation_matches_real_fit(trainer_kwargs, setup, batches_per_epoch, epochs, accumulate):
    module = Scheduled(setup)
    trainer = Trainer(max_epochs=epochs, gradient_accumulation_steps=accumulate, **trainer_kwargs)
    trainer.fit(module, loader(n=8 * batches_per_epoch, batch_size=8))
    assert module.used, "the run took no step"

    schedule = simulate_lr_schedule(
        Scheduled(setup),
        steps=trainer.global_step,
        batches_per_epoch=batches_per_epoch,
        gradient_accumulation_steps=accumulate,
    )
    names = list(schedule)
    per_optimizer = {0: [n for n in names if "Adam" in n], 1: [n for n in names if "SGD" in n]}
    assert all(len(v) == trainer.global_step for v in schedule.values())

    real = {name: [] for name in names}
    for step, i, lrs in module.used:
        for name, lr in zip(per_optimizer[i], lrs):
            real[name].append(step)
            assert schedule[name][step] == pytest.approx(lr, rel=1e-12), (name, step)
    assert {n: v for n, v in schedule.real_steps.items()} == real
    assert [len(schedule.real_steps[per_optimizer[i][0]]) for i in (0, 1) if per_optimizer[i]] == [
        s for s in trainer.optimizer_steps
    ]


def test_seed_gan_schedule_by_hand():
    """Steps the seed's override takes, the warm-up and the step scheduler, spelled out."""
    s = simulate_lr_schedule(Scheduled("seed_gan", lr=1.0), steps=8, batches_per_epoch=4)
    assert s.real_steps["lr-Adam"] == [0, 2, 4, 6]  # batch_nb % 2 == 0, batch_nb restarting each epoch
    assert s.real_steps["lr-SGD"] == [0, 4]  # batch_nb % 4 == 0
    # warm-up of 3 real steps: 1/3, 2/3, 1; StepLR(2, 0.5) advances every 2nd real step -> halves after 4
    assert s["lr-Adam"][0] == pytest.approx(1 / 3)
    assert s["lr-Adam"][2] == pytest.approx(2 / 3)
    assert s["lr-Adam"][4] == pytest.approx(1.0)
    assert s["lr-Adam"][6] == pytest.approx(1.0)  # StepLR stepped once (after real step 2) of step_size 2
    # LambdaLR 0.8**epoch after the first epoch of 4 batches
    assert s["lr-SGD"][:4] == [1.0] * 4 and s["lr-SGD"][4] == pytest.approx(0.8)
    assert s.epoch_starts == [4]


class Plateau(TrainingModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def configure_optimizers(self):
        opt = SGD(self.parameters(), lr=1.0)
        return {
            "optimizer": opt,
            "lr_scheduler": {
                "scheduler": ReduceLROnPlateau(opt, patience=0, factor=0.5),
                "monitor": "val_loss",
                "warmup_steps": 2,
            },
        }


def test_plateau_with_and_without_metric():
    flat = simulate_lr_schedule(Plateau(), steps=6, batches_per_epoch=2, plateau_metric=lambda epoch: 1.0)
    # warm-up 1/2 then 1; no improvement after epoch 0 -> halved from epoch 2 on (patience 0)
    assert flat["lr-SGD"] == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.5, 0.5])
    improving = simulate_lr_schedule(Plateau(), steps=6, batches_per_epoch=2, plateau_metric={"val_loss": lambda e: -e})
    assert improving["lr-SGD"] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    skipped = simulate_lr_schedule(Plateau(), steps=6, batches_per_epoch=2)
    assert skipped["lr-SGD"] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert len(skipped.skipped) == 1 and "ReduceLROnPlateau" in skipped.skipped[0]


def test_module_is_left_untouched_and_no_gradient_is_computed():
    module = Scheduled("seed_gan")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    simulate_lr_schedule(module, steps=10, batches_per_epoch=4)
    assert module.trainer is None
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    # copy_module=False works on the module itself and still changes nothing
    simulate_lr_schedule(module, steps=10, batches_per_epoch=4, copy_module=False)
    assert module.trainer is None
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_endless_epoch_never_steps_epoch_schedulers():
    s = simulate_lr_schedule(Scheduled("seed_gan", lr=1.0), steps=20)
    assert s["lr-SGD"] == [1.0] * 20 and s.epoch_starts == []


def test_bad_arguments_and_manual_optimization():
    with pytest.raises(ConfigurationError, match="steps=0"):
        simulate_lr_schedule(Plateau(), steps=0)
    with pytest.raises(ConfigurationError, match="batches_per_epoch"):
        simulate_lr_schedule(Plateau(), steps=3, batches_per_epoch=0)
    with pytest.raises(ConfigurationError, match="gradient_accumulation_steps"):
        simulate_lr_schedule(Plateau(), steps=3, gradient_accumulation_steps=0)
    manual = Plateau()
    manual.automatic_optimization = False
    with pytest.raises(ConfigurationError, match="manual optimization"):
        simulate_lr_schedule(manual, steps=3)


def test_plot_lr_schedule(tmp_path):
    s = simulate_lr_schedule(Scheduled("two_groups", lr=0.01), steps=40, batches_per_epoch=8)
    assert isinstance(s, LRSchedule) and list(s) == ["lr-Adam", "lr-SGD/pg1", "lr-SGD/pg2"]  # Lightning names param groups pg1, pg2 (issue 13)
    path = plot_lr_schedule(s, tmp_path / "out" / "lr_schedule.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ValueError, match="empty"):
        plot_lr_schedule(LRSchedule(), tmp_path / "x.png")


class LinearDecay(TrainingModule):
    """configure_optimizers reads the trainer (as with a schedule sized by max_steps)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def configure_optimizers(self):
        opt = SGD(self.parameters(), lr=1.0)
        total = self.trainer.max_steps
        return [opt], [{"scheduler": LambdaLR(opt, lambda k: 1 - k / total), "interval": "step"}]


def test_configure_optimizers_sees_the_simulated_trainer():
    s = simulate_lr_schedule(LinearDecay(), steps=10)
    assert s["lr-SGD"] == pytest.approx([1 - k / 10 for k in range(10)])
    assert s.real_steps["lr-SGD"] == list(range(10))


# -- plateau schedulers from the command line -----------------------------------------------------------

import csv  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from accel_trainer import cli  # noqa: E402
from accel_trainer.lr_schedule import MetricsHistory, plateau_metric_from  # noqa: E402
from accel_trainer.plotting import lr_columns  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = os.path.join(REPO, "configs", "digits_classifier.yaml")
# 12 short epochs (5 steps) with a patience of 0: ReduceLROnPlateau on val_acc fires several times.
SHORT = ["--config", CLASSIFIER, "--trainer.max_epochs=12", "--trainer.limit_train_batches=5",
         "--trainer.log_every_n_steps=5", "--module.init_args.plateau_patience=0", "--trainer.enable_progress_bar=false"]


def _table(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "accel_trainer", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WANDB_MODE": "offline"})


def test_without_a_metric_the_plateau_scheduler_is_named_on_the_terminal_and_left_flat(tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert cli.main(["lr-schedule", *SHORT, "--steps=60", f"--out={out}"]) == 0
    captured = capsys.readouterr()
    assert "note: not simulated: scheduler 0 (ReduceLROnPlateau of optimizer 0, monitor 'val_acc')" in captured.err
    assert "--plateau_from RUN_DIR/metrics.csv" in captured.err
    assert captured.out.split() == [str(out), str(tmp_path / "lr.csv")] and out.is_file()
    (column,) = lr_columns(_table(tmp_path / "lr.csv")[0])
    assert {row[column] for row in _table(tmp_path / "lr.csv")} == {"0.003"}

    # a constant: a metric that never improves after the first epoch, so the LR halves at every
    # later epoch end (steps 10, 15, ..., 55)
    assert cli.main(["lr-schedule", *SHORT, "--steps=60", f"--out={out}", "--plateau_from=0.5"]) == 0
    assert "stepped on a constant val_acc=0.5" in capsys.readouterr().err
    lrs = [float(row[column]) for row in _table(tmp_path / "lr.csv")]
    assert lrs[:10] == [0.003] * 10 and lrs[-1] == pytest.approx(0.003 * 0.5**10)


@pytest.mark.slow
def test_a_preview_fed_with_a_runs_own_metrics_equals_the_learning_rates_it_logged(tmp_path):
    run = tmp_path / "run"
    fit = _cli("fit", *SHORT, f"--trainer.default_root_dir={run}")
    assert fit.returncode == 0, fit.stderr[-3000:]
    preview = _cli("lr-schedule", *SHORT, "--steps=60", f"--out={tmp_path / 'preview.png'}",
                   f"--plateau_from={run / 'metrics.csv'}")
    assert preview.returncode == 0, preview.stderr[-3000:]
    assert f"stepped on val_acc from {run / 'metrics.csv'} (epochs 0-11)" in preview.stderr

    logged = _table(run / "metrics.csv")
    simulated = _table(tmp_path / "preview.csv")
    (column,) = lr_columns(logged[0])
    assert lr_columns(simulated[0]) == [column]
    # LearningRateMonitor logs the LR of the next step at every epoch start
    pairs = [(int(r["step"]), float(r[column])) for r in logged if r[column]]
    assert len(pairs) == 12
    assert len({lr for _, lr in pairs}) >= 2, "the plateau scheduler never fired: the comparison would prove nothing"
    for step, lr in pairs:
        assert float(simulated[step][column]) == lr, (step, lr, simulated[step][column])


def test_metrics_history_reads_epoch_values_and_stops_past_its_end(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "step,train_loss,epoch,val_acc\n"
        "5,1.0,0,\n5,,,0.5\n10,0.9,1,\n10,,,0.7\n"   # validation rows without an epoch cell
        "15,0.8,2,\n20,0.7,3,\n20,,3,0.6\n"          # epoch 2 not validated: carries epoch 1's value
    )
    history = plateau_metric_from(str(tmp_path))  # a run directory works too
    assert isinstance(history, MetricsHistory)
    f = history["val_acc"]
    assert [f(e) for e in range(5)] == [0.5, 0.7, 0.7, 0.6, None]
    with pytest.raises(ConfigurationError, match=r"has no column 'val_loss'.*Columns: \['train_loss', 'val_acc'\]"):
        history["val_loss"]
    with pytest.raises(ConfigurationError, match="no such file"):
        plateau_metric_from(str(tmp_path / "nothing.csv"))
    assert plateau_metric_from("0.25")(7) == 0.25
