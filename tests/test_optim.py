"""configure_optimizers: every return form and scheduler-dict key of CONTRACT.md, every
misconfiguration, and how schedulers, optimizer frequencies and warm-up behave in a run."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim import SGD, Adam, RMSprop
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau, StepLR

import accel_trainer.errors
from accel_trainer import Trainer
from accel_trainer.callbacks import LearningRateMonitor
from accel_trainer.errors import ConfigurationError
from accel_trainer.optim import parse_configure_optimizers
from accel_trainer.scheduling import StepTracker
from accel_trainer.state import TrainingState
from helpers import Regressor, TwoPart, loader


def _raw(obj):
    """The user's optimizer / scheduler behind Accelerate's wrapper (or ``obj`` itself)."""
    name = type(obj).__name__
    if name == "AcceleratedOptimizer":
        return obj.optimizer
    if name == "AcceleratedScheduler":
        return obj.scheduler
    return obj


def _lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _params(n=2):
    return [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)]


# ==========================================================================================
# Modules used by the end-to-end tests
# ==========================================================================================


class Configurable(Regressor):
    """A Regressor whose configure_optimizers is ``configure(self)``.

    Records training_step calls, the learning rate each optimizer's step really used
    (a pre-hook registered in on_fit_start, after the trainer's own warm-up hook), the
    param-group LR at every batch end and at every epoch start, and logs a scripted
    validation metric per epoch.
    """

    def __init__(self, configure, val_values=None, val_name="val_loss", step_filter=None):
        super().__init__()
        self._configure = configure
        self.val_values = val_values
        self.val_name = val_name
        self.step_filter = step_filter  # (batch_nb) -> bool: take this optimizer step?
        self.training_calls = []
        self.used_lrs = []  # per optimizer: LRs used by its real steps
        self.batch_end_lrs = []
        self.epoch_lrs = []

    def configure_optimizers(self):
        return self._configure(self)

    def training_step(self, batch, batch_idx):
        self.training_calls.append((self.current_epoch, batch_idx, self.trainer.global_step))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss_real", torch.nn.functional.mse_loss(self(x), y))
        if self.val_values is not None:
            self.log(self.val_name, torch.tensor(float(self.val_values[self.current_epoch])))

    def on_fit_start(self):
        self.used_lrs = [[] for _ in self.trainer.optimizers]
        for i, opt in enumerate(self.trainer.optimizers):
            _raw(opt).register_step_pre_hook(self._pre_hook(i))

    def _pre_hook(self, i):
        def hook(optimizer, args, kwargs):
            self.used_lrs[i].append(float(optimizer.param_groups[0]["lr"]))

        return hook

    def on_train_epoch_start(self):
        if self.trainer.optimizers:
            self.epoch_lrs.append(_lr(self.trainer.optimizers[0]))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.optimizers:
            self.batch_end_lrs.append(_lr(self.trainer.optimizers[0]))

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        if self.step_filter is None or self.step_filter(batch_nb):
            optimizer.step()
            optimizer.zero_grad()


class TwoConfigurable(TwoPart):
    """TwoPart with configure_optimizers = ``configure(self)`` and an optional per-optimizer step filter."""

    def __init__(self, configure, step_filter=None):
        super().__init__()
        self._configure = configure
        self.step_filter = step_filter  # (optimizer_i, batch_nb) -> bool
        self.used_lrs = []

    def configure_optimizers(self):
        return self._configure(self)

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", self.discriminator(self.generator(x)).pow(2).mean())

    def on_fit_start(self):
        self.used_lrs = [[] for _ in self.trainer.optimizers]
        for i, opt in enumerate(self.trainer.optimizers):
            _raw(opt).register_step_pre_hook(
                lambda o, a, k, i=i: self.used_lrs[i].append(float(o.param_groups[0]["lr"]))
            )

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        if self.step_filter is None or self.step_filter(optimizer_i, batch_nb):
            optimizer.step()
            optimizer.zero_grad()


def _fit(module, trainer_kwargs, epochs=1, n_batches=2, val=False, **extra):
    trainer = Trainer(max_epochs=epochs, **trainer_kwargs, **extra)
    trainer.fit(module, loader(8 * n_batches, 8), loader(8, 8) if val else None)
    return trainer


# ==========================================================================================
# parse_configure_optimizers: the return forms
# ==========================================================================================


def test_configuration_error_is_a_value_error():
    assert issubclass(ConfigurationError, ValueError)
    assert accel_trainer.errors.ConfigurationError is ConfigurationError


def test_form1_one_optimizer():
    opt = SGD(_params(), lr=0.1)
    cfg = parse_configure_optimizers(opt)
    assert cfg.optimizers == [opt] and cfg.optimizers[0] is opt
    assert cfg.schedulers == [] and cfg.frequencies is None


@pytest.mark.parametrize("container", [list, tuple])
def test_form2_list_or_tuple_of_optimizers(container):
    a, b = SGD(_params(), lr=0.1), Adam(_params(), lr=0.1)
    cfg = parse_configure_optimizers(container([a, b]))
    assert len(cfg.optimizers) == 2 and cfg.optimizers[0] is a and cfg.optimizers[1] is b
    assert cfg.schedulers == [] and cfg.frequencies is None


def test_form3_two_lists_with_scheduler_and_scheduler_dict():
    a, b = SGD(_params(), lr=0.1), Adam(_params(), lr=0.1)
    s_b = LambdaLR(b, lambda s: 1.0)
    s_a = StepLR(a, step_size=1)
    plateau = ReduceLROnPlateau(a)
    cfg = parse_configure_optimizers(
        (
            [a, b],
            [
                {
                    "scheduler": s_b,
                    "interval": "step",
                    "frequency": 3,
                    "strict": False,
                    "name": "b_lr",
                    "warmup_steps": 5,
                },
                s_a,
                plateau,
            ],
        )
    )
    assert cfg.optimizers[0] is a and cfg.optimizers[1] is b
    first, second, third = cfg.schedulers
    # a scheduler belongs to the optimizer it was built on, whatever the order
    assert first.scheduler is s_b and first.opt_idx == 1
    assert (first.interval, first.frequency, first.strict, first.name, first.warmup_steps) == ("step", 3, False, "b_lr", 5)
    assert first.monitor is None
    assert second.scheduler is s_a and second.opt_idx == 0
    # defaults
    assert (second.interval, second.frequency, second.monitor, second.strict, second.name, second.warmup_steps) == (
        "epoch",
        1,
        None,
        True,
        None,
        None,
    )
    assert third.opt_idx == 0 and third.monitor == "val_loss"  # the plateau default
    # mapping access
    assert first["interval"] == "step" and first["frequency"] == 3 and first["opt_idx"] == 1
    with pytest.raises(KeyError):
        first["no_such_key"]


def test_form4_lightning2_dict_top_level_monitor():
    opt = SGD(_params(), lr=0.1)
    plateau = ReduceLROnPlateau(opt)
    cfg = parse_configure_optimizers({"optimizer": opt, "lr_scheduler": plateau, "monitor": "val_acc"})
    assert cfg.optimizers == [opt]
    assert len(cfg.schedulers) == 1 and cfg.schedulers[0].scheduler is plateau
    assert cfg.schedulers[0].monitor == "val_acc"

    # the top-level monitor applies when the scheduler dict has none ...
    opt = SGD(_params(), lr=0.1)
    plateau = ReduceLROnPlateau(opt)
    cfg = parse_configure_optimizers(
        {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "interval": "epoch"}, "monitor": "val_top"}
    )
    assert cfg.schedulers[0].monitor == "val_top"
    # ... and the scheduler dict's own monitor wins when it has one
    opt = SGD(_params(), lr=0.1)
    plateau = ReduceLROnPlateau(opt)
    cfg = parse_configure_optimizers(
        {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_own"}, "monitor": "val_top"}
    )
    assert cfg.schedulers[0].monitor == "val_own"
    # a dict without lr_scheduler
    opt = SGD(_params(), lr=0.1)
    cfg = parse_configure_optimizers({"optimizer": opt})
    assert cfg.optimizers == [opt] and cfg.schedulers == []


@pytest.mark.parametrize("container", [list, tuple])
def test_form4_list_of_optimizer_dicts_with_frequency(container):
    g, d = Adam(_params(), lr=0.1), SGD(_params(), lr=0.1)
    s_d = StepLR(d, step_size=2)
    cfg = parse_configure_optimizers(
        container(
            [
                {"optimizer": g, "frequency": 2},
                {"optimizer": d, "frequency": 1, "lr_scheduler": {"scheduler": s_d, "interval": "step"}},
            ]
        )
    )
    assert cfg.optimizers[0] is g and cfg.optimizers[1] is d
    assert cfg.frequencies == [2, 1]
    assert len(cfg.schedulers) == 1
    assert cfg.schedulers[0].scheduler is s_d and cfg.schedulers[0].opt_idx == 1 and cfg.schedulers[0].interval == "step"


def test_form5_none_warns():
    with pytest.warns(UserWarning, match="None"):
        cfg = parse_configure_optimizers(None)
    assert cfg.optimizers == [] and cfg.schedulers == []


def test_form5_none_fit_runs_forward_only(trainer_kwargs):
    module = Configurable(lambda m: None)
    before = [p.detach().clone() for p in module.parameters()]
    epochs, n_batches = 2, 3
    with pytest.warns(UserWarning, match="configure_optimizers returned None"):
        trainer = _fit(module, trainer_kwargs, epochs=epochs, n_batches=n_batches)
    # forward passes run (training_step is called for every batch) ...
    assert [(e, b) for e, b, _ in module.training_calls] == [
        (e, b) for e in range(epochs) for b in range(n_batches)
    ]
    # ... but no parameter is updated and nothing is counted as an optimizer step
    assert all(torch.equal(b, a.detach()) for b, a in zip(before, module.parameters()))
    assert trainer.optimizer_steps == [] and trainer.optimizers == [] and trainer.lr_schedulers == []
    assert trainer.current_epoch == epochs


def test_warmup_steps_and_name_are_parsed():
    opt = SGD(_params(), lr=0.1)
    s = LambdaLR(opt, lambda e: 1.0)
    cfg = parse_configure_optimizers(([opt], [{"scheduler": s, "warmup_steps": 7, "name": "lr-main"}]))
    assert cfg.schedulers[0].warmup_steps == 7 and cfg.schedulers[0]["warmup_steps"] == 7
    assert cfg.schedulers[0].name == "lr-main"


# ==========================================================================================
# Return forms end-to-end
# ==========================================================================================


def test_lightning2_dict_form_monitors_top_level_metric(trainer_kwargs):
    values = [3.0, 1.0, 2.0]

    def configure(m):
        opt = SGD(m.parameters(), lr=0.1)
        m.plateau = ReduceLROnPlateau(opt, patience=5)
        return {"optimizer": opt, "lr_scheduler": m.plateau, "monitor": "val_metric"}

    module = Configurable(configure, val_values=values, val_name="val_metric")
    trainer = _fit(module, trainer_kwargs, epochs=len(values), val=True)
    assert trainer.lr_schedulers[0].monitor == "val_metric"
    # the plateau scheduler was fed val_metric (not val_loss_real): its best is min(values)
    assert module.plateau.best == pytest.approx(min(values))
    assert module.plateau.num_bad_epochs == 1


def test_optimizer_frequency_counts_over_the_whole_run(trainer_kwargs):
    frequencies = [2, 1]

    def configure(m):
        return (
            {"optimizer": Adam(m.generator.parameters(), lr=0.01), "frequency": frequencies[0]},
            {"optimizer": SGD(m.discriminator.parameters(), lr=0.01), "frequency": frequencies[1]},
        )

    epochs, n_batches = 2, 5  # 5 is not a multiple of the cycle (3): a per-epoch restart would show
    module = TwoConfigurable(configure)
    trainer = _fit(module, trainer_kwargs, epochs=epochs, n_batches=n_batches)

    cycle = sum(frequencies)

    def due(step):
        return 0 if step % cycle < frequencies[0] else 1

    expected = [(b, due(e * n_batches + b), e * n_batches + b) for e in range(epochs) for b in range(n_batches)]
    restarting = [(b, due(b), e * n_batches + b) for e in range(epochs) for b in range(n_batches)]
    assert expected != restarting  # the test tells the two semantics apart
    assert [(b, i, gs) for b, i, gs, _ in module.calls] == expected
    # e.g. the first cycles: optimizer 0 on global steps 0, 1, 3, 4 and optimizer 1 on 2, 5
    assert [gs for _, i, gs in expected if i == 0][:4] == [0, 1, 3, 4]
    assert [gs for _, i, gs in expected if i == 1][:2] == [2, 5]
    counts = [sum(1 for _, i, _ in expected if i == k) for k in (0, 1)]
    assert trainer.optimizer_steps == counts
    assert trainer.global_step == epochs * n_batches


def test_scheduler_name_is_used_for_lr_logging(trainer_kwargs):
    def configure(m):
        opt = SGD(m.parameters(), lr=0.1)
        return [opt], [{"scheduler": StepLR(opt, step_size=1, gamma=0.5), "name": "my_lr"}]

    module = Configurable(configure)
    monitor = LearningRateMonitor(logging_interval="epoch")
    trainer = _fit(module, trainer_kwargs, epochs=2, callbacks=[monitor])
    assert trainer.lr_schedulers[0].name == "my_lr"
    assert "my_lr" in trainer.logged_metrics
    assert [h["my_lr"] for h in monitor.history] == pytest.approx([0.1, 0.05])


# ==========================================================================================
# Misconfigurations: ConfigurationError from fit, before any training_step
# ==========================================================================================


def _unknown_sched_key(m):
    opt = SGD(m.parameters(), lr=0.1)
    return [opt], [{"scheduler": StepLR(opt, 1), "intervall": "step"}]


def _bad_interval(m):
    opt = SGD(m.parameters(), lr=0.1)
    return [opt], [{"scheduler": StepLR(opt, 1), "interval": "epochs"}]


def _zero_frequency(m):
    opt = SGD(m.parameters(), lr=0.1)
    return [opt], [{"scheduler": StepLR(opt, 1), "frequency": 0}]


def _foreign_optimizer(m):
    opt = SGD(m.parameters(), lr=0.1)
    stray = RMSprop(m.parameters(), lr=0.1)
    return [opt], [StepLR(stray, 1)]


def _plateau_monitor_none(m):
    opt = SGD(m.parameters(), lr=0.1)
    return [opt], [{"scheduler": ReduceLROnPlateau(opt), "monitor": None}]


def _unknown_optimizer_dict_key(m):
    opt = SGD(m.parameters(), lr=0.1)
    return {"optimizer": opt, "lr_schedular": StepLR(opt, 1)}


def _non_optimizer_in_list(m):
    return [SGD(m.parameters(), lr=0.1), "adam"]


def _non_optimizer_in_two_lists(m):
    opt = SGD(m.parameters(), lr=0.1)
    return [opt, 42], [StepLR(opt, 1)]


def _optimizer_twice(m):
    opt = SGD(m.parameters(), lr=0.1)
    return [opt, opt]


def _frequency_not_for_all(m):
    return [
        {"optimizer": SGD([m.net.weight], lr=0.1), "frequency": 2},
        {"optimizer": SGD([m.net.bias], lr=0.1)},
    ]


def _two_warmups_one_optimizer(m):
    opt = SGD(m.parameters(), lr=0.1)
    return [opt], [
        {"scheduler": LambdaLR(opt, lambda s: 1.0), "interval": "step", "warmup_steps": 3},
        {"scheduler": StepLR(opt, 2), "warmup_steps": 4},
    ]


def _zero_warmup(m):
    opt = SGD(m.parameters(), lr=0.1)
    return [opt], [{"scheduler": LambdaLR(opt, lambda s: 1.0), "warmup_steps": 0}]


def _scheduler_dict_without_scheduler(m):
    opt = SGD(m.parameters(), lr=0.1)
    return [opt], [{"interval": "step"}]


@pytest.mark.parametrize(
    "configure, match",
    [
        (_unknown_sched_key, r"intervall"),
        (_bad_interval, r"'epochs'"),
        (_zero_frequency, r"frequency.*received 0"),
        (_foreign_optimizer, r"RMSprop"),
        (_plateau_monitor_none, r"monitor=None"),
        (_unknown_optimizer_dict_key, r"lr_schedular"),
        (_non_optimizer_in_list, r"str"),
        (_non_optimizer_in_two_lists, r"int \(42\)"),
        (_optimizer_twice, r"same optimizer.*0 and 1"),
        (_frequency_not_for_all, r"\[2, None\]"),
        (_two_warmups_one_optimizer, r"warmup_steps.*optimizer 0"),
        (_zero_warmup, r"warmup_steps.*received 0"),
        (_scheduler_dict_without_scheduler, r"'scheduler'"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_misconfiguration_raises_before_training(trainer_kwargs, configure, match):
    module = Configurable(configure)
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    with pytest.raises(ConfigurationError, match=match):
        trainer.fit(module, loader(16, 8))
    assert module.training_calls == []


def test_misconfiguration_messages_name_allowed_values():
    opt = SGD(_params(), lr=0.1)
    with pytest.raises(ConfigurationError, match=r"'epochs'") as info:
        parse_configure_optimizers(([opt], [{"scheduler": StepLR(opt, 1), "interval": "epochs"}]))
    assert "'epoch'" in str(info.value) and "'step'" in str(info.value)
    with pytest.raises(ConfigurationError, match=r"intervall") as info:
        parse_configure_optimizers(([opt], [{"scheduler": StepLR(opt, 1), "intervall": "step"}]))
    for key in ("scheduler", "interval", "frequency", "monitor", "strict", "name", "warmup_steps"):
        assert key in str(info.value)
    with pytest.raises(ConfigurationError, match=r"lr_schedular") as info:
        parse_configure_optimizers({"optimizer": opt, "lr_schedular": None})
    for key in ("optimizer", "lr_scheduler", "monitor", "frequency"):
        assert key in str(info.value)


# ==========================================================================================
# strict
# ==========================================================================================


def _plateau_on(monitor, strict=None):
    def configure(m):
        opt = SGD(m.parameters(), lr=0.1)
        m.plateau = ReduceLROnPlateau(opt, patience=0)
        d = {"scheduler": m.plateau, "monitor": monitor}
        if strict is not None:
            d["strict"] = strict
        return [opt], [d]

    return configure


def test_strict_true_unlogged_monitor_raises_listing_logged_metrics(trainer_kwargs):
    module = Configurable(_plateau_on("val_acc"))  # strict defaults to True
    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    with pytest.raises(ConfigurationError, match=r"val_acc") as info:
        trainer.fit(module, loader(16, 8), loader(8, 8))
    assert "val_loss_real" in str(info.value)  # the metrics that were logged
    # raised when the scheduler was first due: after the first epoch's batches
    assert [(e, b) for e, b, _ in module.training_calls] == [(0, 0), (0, 1)]


def test_strict_false_unlogged_monitor_warns_and_skips(trainer_kwargs):
    module = Configurable(_plateau_on("val_acc", strict=False))
    epochs = 3
    trainer = Trainer(max_epochs=epochs, **trainer_kwargs)
    with pytest.warns(UserWarning, match=r"val_acc"):
        trainer.fit(module, loader(16, 8), loader(8, 8))
    assert trainer.lr_schedulers[0].strict is False
    assert trainer.current_epoch == epochs
    # never stepped: no best recorded, no reduction
    assert module.plateau.last_epoch == 0
    assert module.plateau.best == module.plateau.mode_worse
    assert module.epoch_lrs == [0.1] * epochs and _lr(trainer.optimizers[0]) == 0.1


# ==========================================================================================
# When schedulers step
# ==========================================================================================


def test_step_scheduler_frequency_counts_real_steps_of_its_own_optimizer(trainer_kwargs):
    base0, base1, gamma = 0.01, 0.1, 0.5

    def configure(m):
        g = Adam(m.generator.parameters(), lr=base0)
        d = SGD(m.discriminator.parameters(), lr=base1)
        m.s0 = LambdaLR(g, lambda s: 1.0 / (1 + s))
        m.s1 = StepLR(d, step_size=1, gamma=gamma)
        return [g, d], [
            {"scheduler": m.s0, "interval": "step"},
            {"scheduler": m.s1, "interval": "step", "frequency": 2},
        ]

    def take(optimizer_i, batch_nb):
        return optimizer_i == 0 or batch_nb % 3 == 0  # optimizer 1 skips two batches in three

    epochs, n_batches = 2, 7
    module = TwoConfigurable(configure, step_filter=take)
    trainer = _fit(module, trainer_kwargs, epochs=epochs, n_batches=n_batches)

    real1 = sum(take(1, b) for _ in range(epochs) for b in range(n_batches))
    real0 = epochs * n_batches
    assert trainer.optimizer_steps == [real0, real1]
    # per-epoch restart (1 scheduler step per epoch) or counting batches (7) would differ
    assert real1 // 2 != epochs * ((real1 // epochs) // 2) and real1 // 2 != (epochs * n_batches) // 2
    assert module.s1.last_epoch == trainer.optimizer_steps[1] // 2
    assert _lr(trainer.optimizers[1]) == pytest.approx(base1 * gamma ** (real1 // 2))
    assert module.used_lrs[1] == pytest.approx([base1 * gamma ** (k // 2) for k in range(real1)])
    # optimizer 0's step scheduler advanced after each of its real steps
    assert module.s0.last_epoch == real0
    assert module.used_lrs[0] == pytest.approx([base0 / (1 + k) for k in range(real0)])


def test_step_scheduler_counter_does_not_restart_each_epoch(trainer_kwargs):
    base, gamma = 0.1, 0.5

    def configure(m):
        opt = SGD(m.parameters(), lr=base)
        m.sched = StepLR(opt, step_size=1, gamma=gamma)
        return [opt], [{"scheduler": m.sched, "interval": "step", "frequency": 2}]

    epochs, n_batches = 3, 3
    module = Configurable(configure)
    trainer = _fit(module, trainer_kwargs, epochs=epochs, n_batches=n_batches)
    n = epochs * n_batches
    assert trainer.optimizer_steps == [n]
    assert module.sched.last_epoch == n // 2  # 4, where a per-epoch restart would give 3
    assert module.used_lrs[0] == pytest.approx([base * gamma ** (k // 2) for k in range(n)])


@pytest.mark.parametrize("epochs", [4, 5])
def test_epoch_scheduler_frequency(trainer_kwargs, epochs):
    base, gamma = 0.1, 0.5

    def configure(m):
        opt = SGD(m.parameters(), lr=base)
        m.sched = StepLR(opt, step_size=1, gamma=gamma)
        return [opt], [{"scheduler": m.sched, "interval": "epoch", "frequency": 2}]

    module = Configurable(configure)
    trainer = _fit(module, trainer_kwargs, epochs=epochs)
    # steps after epochs 2, 4 (the last one too, when it is due)
    assert module.epoch_lrs == pytest.approx([base * gamma ** (e // 2) for e in range(epochs)])
    assert module.sched.last_epoch == epochs // 2
    assert _lr(trainer.optimizers[0]) == pytest.approx(base * gamma ** (epochs // 2))


class CustomSchedulerStep(Configurable):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scheduler_calls = []

    def lr_scheduler_step(self, scheduler, metric):
        self.scheduler_calls.append((scheduler, metric, self.current_epoch))
        if _raw(scheduler) is self.plateau:
            scheduler.step(metric)
        # the StepLR is deliberately never stepped: the override replaces the default


def test_lr_scheduler_step_override(trainer_kwargs):
    values = [3.0, 2.0, 2.5]

    def configure(m):
        opt = SGD(m.parameters(), lr=0.1)
        m.plateau = ReduceLROnPlateau(opt, patience=5)
        m.steplr = StepLR(opt, step_size=1, gamma=0.5)
        return [opt], [m.plateau, {"scheduler": m.steplr, "interval": "step"}]

    module = CustomSchedulerStep(configure, val_values=values)
    n_batches = 2
    trainer = _fit(module, trainer_kwargs, epochs=len(values), n_batches=n_batches, val=True)

    plateau_cfg, step_cfg = trainer.lr_schedulers
    plateau_calls = [(s, m, e) for s, m, e in module.scheduler_calls if s is plateau_cfg.scheduler]
    step_calls = [(s, m, e) for s, m, e in module.scheduler_calls if s is step_cfg.scheduler]
    assert len(plateau_calls) + len(step_calls) == len(module.scheduler_calls)
    # the plateau scheduler gets the monitored value, the others None
    assert [float(m) for _, m, _ in plateau_calls] == pytest.approx(values)
    assert [m for _, m, _ in step_calls] == [None] * (len(values) * n_batches)
    assert module.plateau.best == pytest.approx(min(values))
    # the default (scheduler.step()) was not used for the StepLR
    assert module.steplr.last_epoch == 0
    assert module.used_lrs[0] == [0.1] * (len(values) * n_batches)


def test_lr_schedulers_configs_are_exposed(trainer_kwargs):
    def configure(m):
        g = Adam(m.generator.parameters(), lr=0.01)
        d = SGD(m.discriminator.parameters(), lr=0.1)
        m.s_g = StepLR(g, step_size=1)
        m.s_d = ReduceLROnPlateau(d)
        return [g, d], [
            {"scheduler": m.s_g, "interval": "step", "frequency": 3, "name": "gen_lr", "warmup_steps": 2},
            {"scheduler": m.s_d, "monitor": "val_loss", "strict": False},
        ]

    module = TwoConfigurable(configure)
    trainer = _fit(module, trainer_kwargs, epochs=1, val=True)
    first, second = trainer.lr_schedulers
    assert _raw(first.scheduler) is module.s_g and _raw(second.scheduler) is module.s_d
    assert (first.interval, first.frequency, first.monitor, first.strict, first.name, first.warmup_steps, first.opt_idx) == (
        "step",
        3,
        None,
        True,
        "gen_lr",
        2,
        0,
    )
    assert (second.interval, second.frequency, second.monitor, second.strict, second.name, second.warmup_steps, second.opt_idx) == (
        "epoch",
        1,
        "val_loss",
        False,
        None,
        None,
        1,
    )
    for cfg in (first, second):
        for key in ("scheduler", "interval", "frequency", "monitor", "strict", "name", "warmup_steps", "opt_idx"):
            assert cfg[key] is getattr(cfg, key)


# ==========================================================================================
# Declarative warm-up
# ==========================================================================================


def _warmup_factor(k, w):
    return min(1.0, (k + 1) / w)


def test_warmup_with_constant_scheduler(trainer_kwargs):
    base, w = 0.1, 4

    def configure(m):
        opt = SGD(m.parameters(), lr=base)
        m.sched = LambdaLR(opt, lambda e: 1.0)
        return [opt], [{"scheduler": m.sched, "interval": "step", "warmup_steps": w}]

    module = Configurable(configure)
    trainer = _fit(module, trainer_kwargs, epochs=2, n_batches=3)
    n = trainer.optimizer_steps[0]
    assert n == 6
    assert module.used_lrs[0] == pytest.approx([base * _warmup_factor(k, w) for k in range(n)])
    # between steps the param group holds the scheduler's own (unscaled) LR
    assert module.batch_end_lrs == pytest.approx([base] * n)
    assert _lr(trainer.optimizers[0]) == pytest.approx(base)


def test_warmup_composes_with_step_lr(trainer_kwargs):
    base, gamma, every, w = 0.1, 0.5, 3, 4

    def configure(m):
        opt = SGD(m.parameters(), lr=base)
        m.sched = StepLR(opt, step_size=every, gamma=gamma)
        return [opt], [{"scheduler": m.sched, "interval": "step", "warmup_steps": w}]

    module = Configurable(configure)
    trainer = _fit(module, trainer_kwargs, epochs=2, n_batches=4)
    n = trainer.optimizer_steps[0]
    assert n == 8
    sched_lr = [base * gamma ** (k // every) for k in range(n)]  # the scheduler's LR before step k
    assert module.used_lrs[0] == pytest.approx([sched_lr[k] * _warmup_factor(k, w) for k in range(n)])
    # after each batch the param group holds the scheduler's LR, never a warm-up-scaled one
    assert module.batch_end_lrs == pytest.approx([base * gamma ** ((k + 1) // every) for k in range(n)])
    assert module.sched.last_epoch == n


def test_warmup_composes_with_reduce_lr_on_plateau(trainer_kwargs):
    base, factor, w = 0.1, 0.5, 8
    values = [1.0, 1.0, 1.0, 1.0]
    n_batches = 3

    def configure(m):
        opt = SGD(m.parameters(), lr=base)
        m.plateau = ReduceLROnPlateau(opt, factor=factor, patience=0)
        return [opt], [{"scheduler": m.plateau, "warmup_steps": w}]

    module = Configurable(configure, val_values=values)
    trainer = _fit(module, trainer_kwargs, epochs=len(values), n_batches=n_batches, val=True)

    # reference: the same plateau scheduler, fed the same values, on its own
    ref_opt = SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    ref = ReduceLROnPlateau(ref_opt, factor=factor, patience=0)
    ref_epoch_lrs = []
    for v in values:
        ref_epoch_lrs.append(_lr(ref_opt))
        ref.step(v)
    assert len(set(ref_epoch_lrs[: w // n_batches + 1])) > 1  # the reduction happens during the warm-up

    n = len(values) * n_batches
    assert trainer.optimizer_steps == [n]
    expected = [ref_epoch_lrs[k // n_batches] * _warmup_factor(k, w) for k in range(n)]
    assert module.used_lrs[0] == pytest.approx(expected)
    assert module.epoch_lrs == pytest.approx(ref_epoch_lrs)
    assert _lr(trainer.optimizers[0]) == pytest.approx(_lr(ref_opt))


def test_warmup_counts_only_real_steps(trainer_kwargs):
    base, w = 0.1, 3

    def configure(m):
        opt = SGD(m.parameters(), lr=base)
        return [opt], [{"scheduler": LambdaLR(opt, lambda e: 1.0), "interval": "step", "warmup_steps": w}]

    module = Configurable(configure, step_filter=lambda batch_nb: batch_nb % 2 == 1)
    epochs, n_batches = 2, 5
    trainer = _fit(module, trainer_kwargs, epochs=epochs, n_batches=n_batches)
    real = epochs * sum(1 for b in range(n_batches) if b % 2 == 1)
    assert trainer.optimizer_steps == [real]
    assert trainer.global_step == epochs * n_batches
    assert module.used_lrs[0] == pytest.approx([base * _warmup_factor(k, w) for k in range(real)])
    assert module.batch_end_lrs == pytest.approx([base] * (epochs * n_batches))


# ==========================================================================================
# Skipped optimizer steps (the fp16 GradScaler case) do not advance anything
# ==========================================================================================


class ScalerSkips(Configurable):
    """An optimizer_step that goes through a (CPU) GradScaler and overflows on some batches."""

    def __init__(self, configure, overflow_batches):
        super().__init__(configure)
        self.overflow_batches = set(overflow_batches)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10_000)
        self.param_changed = []

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        if batch_nb in self.overflow_batches:
            for p in self.parameters():
                p.grad.fill_(float("inf"))
        before = [p.detach().clone() for p in self.parameters()]
        self.scaler.scale(torch.ones(()))  # initialises the scale, as scaler.scale(loss) would
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad()
        self.param_changed.append(any(not torch.equal(b, p.detach()) for b, p in zip(before, self.parameters())))


def test_scaler_skipped_steps_do_not_advance_step_schedulers(trainer_kwargs):
    base, gamma = 0.1, 0.5

    def configure(m):
        opt = SGD(m.parameters(), lr=base)
        m.sched = StepLR(opt, step_size=1, gamma=gamma)
        return [opt], [{"scheduler": m.sched, "interval": "step"}]

    epochs, n_batches, overflow = 2, 4, {1, 2}
    module = ScalerSkips(configure, overflow)
    trainer = _fit(module, trainer_kwargs, epochs=epochs, n_batches=n_batches)
    taken = [b not in overflow for _ in range(epochs) for b in range(n_batches)]
    assert module.param_changed == taken  # the scaler really skipped those steps
    real = sum(taken)
    assert trainer.optimizer_steps == [real]
    assert trainer.global_step == epochs * n_batches
    assert module.sched.last_epoch == real
    assert module.used_lrs[0] == pytest.approx([base * gamma**k for k in range(real)])
    assert _lr(trainer.optimizers[0]) == pytest.approx(base * gamma**real)


def test_never_stepped_optimizer_advances_nothing(trainer_kwargs):
    def configure(m):
        opt = SGD(m.parameters(), lr=0.1)
        m.sched = StepLR(opt, step_size=1, gamma=0.5)
        return [opt], [{"scheduler": m.sched, "interval": "step", "warmup_steps": 2}]

    module = Configurable(configure, step_filter=lambda batch_nb: False)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _fit(module, trainer_kwargs, epochs=2, n_batches=3)
    assert trainer.optimizer_steps == [0]
    assert trainer.global_step == 6
    assert module.sched.last_epoch == 0
    assert module.used_lrs[0] == []
    assert _lr(trainer.optimizers[0]) == 0.1
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, module.parameters()))


def test_step_tracker_does_not_count_steps_the_scaler_skipped():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SGD([p], lr=0.1)
    state = TrainingState()
    state.reset_for(1)
    tracker = StepTracker([opt], state, [None])
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    try:
        # overflow: GradScaler.step never calls opt.step
        scaler.scale((p * float("inf")).sum()).backward()
        scaler.step(opt)
        scaler.update()
        assert state.optimizer_steps == [0]
        assert torch.equal(p.detach(), torch.ones(3))
        opt.zero_grad()
        # a finite step is counted
        scaler.scale((2 * p).sum()).backward()
        scaler.step(opt)
        scaler.update()
        assert state.optimizer_steps == [1]
        assert not torch.equal(p.detach(), torch.ones(3))
    finally:
        tracker.remove()
    # once removed, nothing is counted any more
    opt.step()
    assert state.optimizer_steps == [1]


def test_step_tracker_warmup_applies_only_during_the_step():
    p = torch.nn.Parameter(torch.ones(1))
    opt = SGD([p], lr=1.0)
    state = TrainingState()
    state.reset_for(1)
    w = 4
    tracker = StepTracker([opt], state, [w])
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    try:
        for _ in range(6):
            p.grad = torch.ones(1)
            opt.step()
            assert opt.param_groups[0]["lr"] == 1.0
    finally:
        tracker.remove()
    assert seen == pytest.approx([_warmup_factor(k, w) for k in range(6)])
    assert state.optimizer_steps == [6]


# ==========================================================================================
# A step-interval ReduceLROnPlateau sees the validation of its own batch (issue 13)
# ==========================================================================================


class _ImprovingValidation(Regressor):
    """Validation k (0-based, during fit) logs ``vm = 10 - k``; records the plateau's ``best`` per event."""

    def __init__(self, frequency):
        super().__init__()
        self.frequency = frequency
        self.k = 0
        self.events = []

    def validation_step(self, batch, batch_idx):
        self.log("vm", float(10 - self.k))

    def on_validation_end(self):
        self.events.append(("val_end", self.global_step, float(self.trainer.callback_metrics["vm"]), self._best()))
        self.k += 1

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.events.append(("batch_end", self.global_step, self._best()))

    def _best(self):
        return _raw(self.trainer.lr_schedulers[0].scheduler).best

    def configure_optimizers(self):
        opt = SGD(self.parameters(), lr=0.01)
        plateau = ReduceLROnPlateau(opt, patience=0, factor=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "interval": "step", "monitor": "vm", "frequency": self.frequency}}


def test_step_plateau_scheduler_steps_after_the_validation_of_its_batch(trainer_kwargs):
    """PyTorch Lightning 2.6.6 on the same job prints exactly these events: the plateau step due
    on a validating batch uses that validation's value (it used to use the one before, and
    raise on the first due step with strict=True)."""
    module = _ImprovingValidation(frequency=2)
    trainer = Trainer(max_epochs=1, val_check_interval=2, **trainer_kwargs)
    trainer.fit(module, loader(64, 8), loader(16, 8))  # 8 batches, validation after every 2nd
    inf = float("inf")
    assert module.events == [
        ("batch_end", 1, inf), ("batch_end", 2, inf), ("val_end", 2, 10.0, inf),
        ("batch_end", 3, 10.0), ("batch_end", 4, 10.0), ("val_end", 4, 9.0, 10.0),
        ("batch_end", 5, 9.0), ("batch_end", 6, 9.0), ("val_end", 6, 8.0, 9.0),
        ("batch_end", 7, 8.0), ("batch_end", 8, 8.0), ("val_end", 8, 7.0, 8.0),
    ]
    assert _raw(trainer.lr_schedulers[0].scheduler).best == 7.0  # the last (end-of-epoch) validation too
    assert _lr(trainer.optimizers[0]) == 0.01  # always improving: never reduced


def test_step_plateau_due_before_any_validation_still_raises_with_strict(trainer_kwargs):
    """Due after batch 0, first validation after batch 1: nothing to monitor yet (Lightning raises too)."""
    with pytest.raises(ConfigurationError, match="'vm'"):
        Trainer(max_epochs=1, val_check_interval=2, **trainer_kwargs).fit(_ImprovingValidation(frequency=1), loader(64, 8), loader(16, 8))
