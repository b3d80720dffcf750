"""accel_trainer.engines: what FSDP and DeepSpeed can run (refused before any training), and the DDP
wrapping plan; plus the trainer wiring that can be checked without GPUs or DeepSpeed."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType

from accel_trainer import Trainer, TrainingModule
from accel_trainer.engines import DeepSpeedEngine, WrapperPlan, check_engine_support, engine_for, engine_name, plan_wrappers
from accel_trainer.errors import ConfigurationError
from accel_trainer.optim import parse_configure_optimizers
from accel_trainer.scheduling import StepTracker
from accel_trainer.state import TrainingState
from helpers import Regressor, TwoPart, loader

FSDP_YAML = Path(__file__).resolve().parents[1] / "launch" / "fsdp.yaml"


def fsdp(version: int = 1, use_orig_params: bool | None = True) -> types.SimpleNamespace:
    """The two settings of a FullyShardedDataParallelPlugin the rules read."""
    return types.SimpleNamespace(fsdp_version=version, use_orig_params=use_orig_params if version == 1 else None)


def check(engine, names=("Adam",), **kwargs) -> None:
    check_engine_support(engine, optimizer_names=list(names), **kwargs)


# ---------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------


def test_deepspeed_refuses_two_optimizers_naming_them_and_the_alternatives():
    with pytest.raises(ConfigurationError) as info:
        check("DEEPSPEED", ["Adam", "SGD"])
    msg = str(info.value)
    assert "DeepSpeed cannot train 2 optimizers" in msg and "['Adam', 'SGD']" in msg
    assert "exactly one optimizer" in msg
    assert "launch/multi_gpu.yaml" in msg and "launch/fsdp.yaml" in msg


def test_deepspeed_refuses_an_optimizer_step_override_and_points_to_the_declarative_warmup():
    with pytest.raises(ConfigurationError) as info:
        check("DEEPSPEED", overrides_optimizer_step=True, module_name="WarmUpGAN")
    msg = str(info.value)
    assert "WarmUpGAN overrides optimizer_step" in msg
    assert "inside backward" in msg  # why: the engine already stepped
    assert "'warmup_steps'" in msg and "launch/multi_gpu.yaml" in msg


def test_deepspeed_accepts_an_optimizer_step_override_under_manual_optimization():
    # the trainer never calls optimizer_step under manual optimization
    check("DEEPSPEED", overrides_optimizer_step=True, automatic_optimization=False)


def test_deepspeed_refuses_an_optimizer_that_needs_a_closure():
    with pytest.raises(ConfigurationError) as info:
        check("DEEPSPEED", ["LBFGS"], needs_closure=[0])
    msg = str(info.value)
    assert "Optimizer 0 (LBFGS) needs a closure" in msg and "without a closure" in msg
    assert "launch/multi_gpu.yaml" in msg


def test_deepspeed_refuses_clipping_by_value_and_accepts_clipping_by_norm():
    with pytest.raises(ConfigurationError) as info:
        check("DEEPSPEED", gradient_clip_val=0.5, gradient_clip_algorithm="value")
    msg = str(info.value)
    assert "gradient_clip_algorithm='value'" in msg and "gradient_clipping" in msg and "'norm'" in msg
    check("DEEPSPEED", gradient_clip_val=0.5)  # carried into the DeepSpeed config at prepare


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # one optimizer, automatic
        {"automatic_optimization": False},
        {"gradient_accumulation_steps": 4},
        {"warmup_optimizers": [0]},  # applied around the backward that takes the engine's step
        {"gradient_clip_val": 1.0},
    ],
)
def test_deepspeed_with_one_optimizer_is_accepted(kwargs):
    check("DEEPSPEED", ["AdamW"], **kwargs)


def test_deepspeed_without_an_optimizer_is_refused():
    with pytest.raises(ConfigurationError, match="no optimizer"):
        check("DEEPSPEED", [])


class _Config:
    """A DeepSpeed plugin's config and the request the engine carries into it."""

    @staticmethod
    def carry(config: dict, **request) -> dict:
        from accel_trainer.engines import RunRequest

        DeepSpeedEngine(None)._carry_trainer_settings(config, RunRequest(optimizer_names=["AdamW"], **request))
        return config


def test_deepspeed_config_gets_the_trainers_clipping_and_accumulation():
    config = _Config.carry({"gradient_clipping": "auto", "gradient_accumulation_steps": "auto"}, gradient_clip_val=0.5, gradient_accumulation_steps=3)
    assert config == {"gradient_clipping": 0.5, "gradient_accumulation_steps": 3}


def test_deepspeed_config_does_not_clip_unless_asked():
    # Accelerate would fill an unset gradient_clipping with 1.0: clipping nobody asked for
    assert _Config.carry({"gradient_clipping": "auto"})["gradient_clipping"] == 0.0
    # a value from the launch (--gradient_clipping 1.0) is kept when the Trainer does not clip
    assert _Config.carry({"gradient_clipping": 1.0})["gradient_clipping"] == 1.0


@pytest.mark.parametrize(
    "config, request_kwargs, message",
    [
        ({"gradient_clipping": 1.0}, {"gradient_clip_val": 0.5}, "gradient_clip_val=0.5) conflicts with the DeepSpeed config's gradient_clipping=1.0"),
        ({"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2) conflicts"),
    ],
)
def test_deepspeed_config_conflicts_with_the_trainer_are_errors(config, request_kwargs, message):
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        _Config.carry(config, **request_kwargs)


# ---------------------------------------------------------------------------------------------
# FSDP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["AdamW"], ["Adam", "SGD"]])
def test_fsdp1_without_use_orig_params_is_refused_for_any_optimizer(names):
    with pytest.raises(ConfigurationError) as info:
        check("FSDP", names, fsdp_plugin=fsdp(1, use_orig_params=False))
    msg = str(info.value)
    assert "use_orig_params=False" in msg and "FlatParameter" in msg and "nothing trains" in msg
    assert "fsdp_use_orig_params: true" in msg and "fsdp_version: 2" in msg


def test_fsdp1_without_use_orig_params_and_no_optimizer_is_accepted():
    check("FSDP", [], fsdp_plugin=fsdp(1, use_orig_params=False))


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_refuses_an_optimizer_that_needs_a_closure(version):
    with pytest.raises(ConfigurationError) as info:
        check("FSDP", ["LBFGS"], needs_closure=[0], fsdp_plugin=fsdp(version))
    msg = str(info.value)
    assert "Optimizer 0 (LBFGS) needs a closure" in msg and "shard" in msg and "launch/multi_gpu.yaml" in msg


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
        ({"overrides_optimizer_step": True}, "an overridden optimizer_step"),
    ],
)
def test_fsdp1_refuses_several_optimizers_that_keep_gradients_across_turns(kwargs, named):
    with pytest.raises(ConfigurationError) as info:
        check("FSDP", ["Adam", "SGD"], fsdp_plugin=fsdp(1), **kwargs)
    msg = str(info.value)
    assert "2 optimizers with" in msg and named in msg and "drops the gradients" in msg
    assert "fsdp_version: 2" in msg and "launch/multi_gpu.yaml" in msg


def test_fsdp1_refuses_clipping_several_optimizers():
    with pytest.raises(ConfigurationError) as info:
        check("FSDP", ["Adam", "SGD"], fsdp_plugin=fsdp(1), gradient_clip_val=1.0)
    msg = str(info.value)
    assert "gradient_clip_val=1.0" in msg and "this rank's shards" in msg and "fsdp_version: 2" in msg


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_refuses_clipping_by_value(version):
    with pytest.raises(ConfigurationError, match="gradient_clip_algorithm='value'.*Use gradient_clip_algorithm='norm'"):
        check("FSDP", fsdp_plugin=fsdp(version), gradient_clip_val=1.0, gradient_clip_algorithm="value")


def test_fsdp2_refuses_no_optimizer():
    with pytest.raises(ConfigurationError, match="fsdp_version: 2 needs an optimizer.*fsdp_version: 1 or DDP"):
        check("FSDP", [], fsdp_plugin=fsdp(2))


@pytest.mark.parametrize(
    "version, names, kwargs",
    [
        (1, ["AdamW"], {}),
        (1, ["AdamW"], {"gradient_accumulation_steps": 4, "overrides_optimizer_step": True, "gradient_clip_val": 1.0}),
        (1, ["Adam", "SGD"], {}),  # accumulation 1, default optimizer_step: nothing kept, nothing lost
        (1, ["Adam", "SGD"], {"automatic_optimization": False, "gradient_accumulation_steps": 2}),
        (2, ["Adam", "SGD"], {"gradient_accumulation_steps": 4, "overrides_optimizer_step": True, "gradient_clip_val": 1.0}),
        (2, ["AdamW"], {"warmup_optimizers": [0]}),
    ],
)
def test_fsdp_accepts(version, names, kwargs):
    check("FSDP", names, fsdp_plugin=fsdp(version), **kwargs)


@pytest.mark.parametrize("engine", ["NO", "MULTI_CPU", "MULTI_GPU", DistributedType.MULTI_GPU])
def test_other_engines_have_no_rules(engine):
    check(
        engine,
        ["LBFGS", "SGD"],
        needs_closure=[0],
        overrides_optimizer_step=True,
        gradient_accumulation_steps=4,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="value",
        warmup_optimizers=[1],
    )


def test_engine_name_reads_enums_and_strings():
    assert engine_name(DistributedType.DEEPSPEED) == "DEEPSPEED"
    assert engine_name("DistributedType.FSDP") == "FSDP"
    assert engine_name("multi_gpu") == "MULTI_GPU"


# ---------------------------------------------------------------------------------------------
# launch/fsdp.yaml, read the way `accelerate launch` reads it
# ---------------------------------------------------------------------------------------------


def _plugin_from_launch_config(monkeypatch, **overrides: str):
    """The FullyShardedDataParallelPlugin a rank launched with launch/fsdp.yaml builds."""
    import accelerate.utils.dataclasses as accelerate_dataclasses
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(FSDP_YAML), "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    fsdp_env = {k: v for k, v in env.items() if k.startswith("FSDP_")}
    assert fsdp_env["FSDP_VERSION"] == "1" and fsdp_env["FSDP_USE_ORIG_PARAMS"] == "true"
    for key, value in {**fsdp_env, **overrides}.items():
        monkeypatch.setenv(key, value)
    # sync_module_states (set by the yaml) asks for the current GPU; this machine may have none
    monkeypatch.setattr(accelerate_dataclasses, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return FullyShardedDataParallelPlugin()


def test_launch_fsdp_yaml_accepts_one_and_two_disjoint_optimizers(monkeypatch):
    plugin = _plugin_from_launch_config(monkeypatch)
    assert (plugin.fsdp_version, plugin.use_orig_params) == (1, True)
    model = TwoPart()
    one = parse_configure_optimizers(torch.optim.AdamW(model.parameters()))
    two = parse_configure_optimizers(model.configure_optimizers())
    for config in (one, two):
        check("FSDP", [type(o).__name__ for o in config.optimizers], fsdp_plugin=plugin)


def test_launch_fsdp_yaml_without_use_orig_params_refuses_two_optimizers(monkeypatch):
    plugin = _plugin_from_launch_config(monkeypatch, FSDP_USE_ORIG_PARAMS="false")
    assert (plugin.fsdp_version, plugin.use_orig_params) == (1, False)
    with pytest.raises(ConfigurationError, match="use_orig_params=False"):
        check("FSDP", ["Adam", "SGD"], fsdp_plugin=plugin)


# ---------------------------------------------------------------------------------------------
# plan_wrappers
# ---------------------------------------------------------------------------------------------

DISJOINT = [{1, 2}, {3, 4}]
SHARED = [{1, 2}, {2, 3}]


@pytest.mark.parametrize("engine", ["MULTI_GPU", "MULTI_CPU", DistributedType.MULTI_CPU, "DistributedType.MULTI_GPU"])
def test_plan_wrappers_one_ddp_wrapper_per_disjoint_optimizer(engine):
    assert plan_wrappers(engine, 2, True, DISJOINT) == WrapperPlan(per_optimizer=True, find_unused_parameters=False)
    assert plan_wrappers(engine, 8, True, DISJOINT + [{5}]).per_optimizer


def test_plan_wrappers_shared_parameters_get_one_wrapper_finding_unused_parameters():
    assert plan_wrappers("MULTI_GPU", 2, True, SHARED) == WrapperPlan(per_optimizer=False, find_unused_parameters=True)
    assert plan_wrappers("MULTI_GPU", 2, True, [{1}, {2}, {1, 3}]).find_unused_parameters


@pytest.mark.parametrize(
    "engine, processes, automatic, owners",
    [
        ("MULTI_GPU", 1, True, DISJOINT),  # one process
        ("MULTI_GPU", 2, True, [{1, 2}]),  # one optimizer
        ("MULTI_GPU", 2, True, []),  # no optimizer
        ("MULTI_GPU", 2, False, DISJOINT),  # manual optimization: no toggling
        ("MULTI_GPU", 2, False, SHARED),
        ("FSDP", 2, True, DISJOINT),  # FSDP2's prepare takes one model
        ("DEEPSPEED", 2, True, DISJOINT),  # prepare refuses several models
        ("NO", 1, True, SHARED),
        ("MULTI_XPU", 2, True, DISJOINT),  # as before: only MULTI_GPU/MULTI_CPU get per-optimizer wrappers
    ],
)
def test_plan_wrappers_one_plain_wrapper_otherwise(engine, processes, automatic, owners):
    assert plan_wrappers(engine, processes, automatic, owners) == WrapperPlan()


def _ddp_trainer(monkeypatch, trainer_kwargs) -> Trainer:
    trainer = Trainer(**trainer_kwargs)
    acc_type = type(trainer.accelerator)
    monkeypatch.setattr(acc_type, "distributed_type", property(lambda self: DistributedType.MULTI_CPU))
    monkeypatch.setattr(acc_type, "num_processes", property(lambda self: 2))
    trainer._automatic = True
    trainer._engine = engine_for(trainer.accelerator)
    return trainer


def test_make_dispatchers_follows_the_plan_for_disjoint_optimizers(monkeypatch, trainer_kwargs):
    trainer = _ddp_trainer(monkeypatch, trainer_kwargs)
    model = TwoPart()
    dispatchers = trainer._make_dispatchers(model, parse_configure_optimizers(model.configure_optimizers()))
    assert len(dispatchers) == 2
    ignored = [set(d._ddp_params_and_buffers_to_ignore) for d in dispatchers]
    assert ignored == [
        {"module.discriminator.weight", "module.discriminator.bias"},
        {"module.generator.weight", "module.generator.bias"},
    ]
    assert trainer.accelerator.ddp_handler is None


def test_make_dispatchers_follows_the_plan_for_shared_parameters(monkeypatch, trainer_kwargs):
    trainer = _ddp_trainer(monkeypatch, trainer_kwargs)
    model = TwoPart()
    config = parse_configure_optimizers(
        (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.discriminator.parameters(), lr=0.1))
    )
    dispatchers = trainer._make_dispatchers(model, config)
    assert len(dispatchers) == 1 and not hasattr(dispatchers[0], "_ddp_params_and_buffers_to_ignore")
    assert trainer.accelerator.ddp_handler.find_unused_parameters is True


# ---------------------------------------------------------------------------------------------
# the trainer runs the check before any training
# ---------------------------------------------------------------------------------------------


def _pretend(monkeypatch, trainer: Trainer, engine: DistributedType, fsdp_plugin=None) -> None:
    monkeypatch.setattr(type(trainer.accelerator), "distributed_type", property(lambda self: engine))
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", fsdp_plugin, raising=False)


def test_trainer_refuses_two_optimizers_under_deepspeed_before_training(monkeypatch, trainer_kwargs):
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    _pretend(monkeypatch, trainer, DistributedType.DEEPSPEED)
    prepared = []
    monkeypatch.setattr(trainer.accelerator, "prepare", lambda *a, **k: prepared.append(a))
    model = TwoPart()
    with pytest.raises(ConfigurationError, match="DeepSpeed cannot train 2 optimizers"):
        trainer.fit(model, loader(32, 8))
    assert model.calls == [] and prepared == []  # no training_step ran, nothing was prepared


def test_trainer_passes_the_modules_override_and_name_to_the_check(monkeypatch, trainer_kwargs):
    class SkipsSteps(Regressor):
        def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
            if batch_nb % 2 == 0:
                optimizer.step()
                optimizer.zero_grad()

    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    _pretend(monkeypatch, trainer, DistributedType.DEEPSPEED)
    with pytest.raises(ConfigurationError, match="SkipsSteps overrides optimizer_step"):
        trainer.fit(SkipsSteps(), loader(32, 8))


def test_trainer_reads_the_fsdp_plugin(monkeypatch, trainer_kwargs):
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    _pretend(monkeypatch, trainer, DistributedType.FSDP, fsdp(1, use_orig_params=False))
    with pytest.raises(ConfigurationError, match="use_orig_params=False"):
        trainer.fit(Regressor(), loader(32, 8))
    assert trainer.global_step == 0


def test_trainer_without_an_engine_trains_as_before(trainer_kwargs):
    model = TwoPart()
    trainer = Trainer(max_epochs=1, gradient_clip_val=1.0, **trainer_kwargs)
    trainer.fit(model, loader(32, 8))
    assert trainer.optimizer_steps == [4, 4]


# ---------------------------------------------------------------------------------------------
# DeepSpeed preparation and step counting (no DeepSpeed here: Accelerate's pieces, or stand-ins)
# ---------------------------------------------------------------------------------------------


class _FakeDeepSpeedPlugin:
    def __init__(self, micro_batch="auto"):
        self.deepspeed_config = {"train_micro_batch_size_per_gpu": micro_batch}

    def is_auto(self, key):
        return self.deepspeed_config.get(key) == "auto"


class _FakeDeepSpeedAccelerator:
    """Records what the trainer hands to prepare / prepare_scheduler."""

    split_batches = False
    num_processes = 2

    def __init__(self, plugin):
        self.deepspeed_plugin = plugin
        self.calls = []

    def prepare(self, *objs):
        self.calls.append(("prepare", objs))
        return tuple(("engine", o) if isinstance(o, torch.nn.Module) else ("ds_opt", o) for o in objs)

    def prepare_scheduler(self, scheduler):
        self.calls.append(("prepare_scheduler", scheduler))
        return ("accelerated", scheduler)


def test_deepspeed_preparation_keeps_every_scheduler_ours_and_fills_the_micro_batch():
    model = Regressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s1 = torch.optim.lr_scheduler.StepLR(opt, 2)
    s2 = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    acc = _FakeDeepSpeedAccelerator(_FakeDeepSpeedPlugin())
    dispatcher = torch.nn.Linear(1, 1)
    out = DeepSpeedEngine(acc).prepare([dispatcher], [opt], [s1, s2], loader(32, 8))
    # one prepare with the model and the optimizer only, then each scheduler on its own
    assert acc.calls == [("prepare", (dispatcher, opt)), ("prepare_scheduler", s1), ("prepare_scheduler", s2)]
    assert out.wrappers == [("engine", dispatcher)] and out.optimizers == [("ds_opt", opt)]
    assert out.schedulers == [("accelerated", s1), ("accelerated", s2)]
    assert acc.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 8


def test_deepspeed_preparation_leaves_a_set_micro_batch_alone():
    model = Regressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = _FakeDeepSpeedAccelerator(_FakeDeepSpeedPlugin(micro_batch=4))
    DeepSpeedEngine(acc).prepare([torch.nn.Linear(1, 1)], [opt], [], loader(32, 8))
    assert acc.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4


def test_step_tracker_counts_deepspeed_wrapper_steps_unless_the_engine_skipped_them():
    from accelerate import Accelerator
    from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper

    Accelerator(cpu=True)  # the wrapper reads AcceleratorState
    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    inner.overflow = False  # what DeepSpeed's fp16 optimizers expose
    wrapper = DeepSpeedOptimizerWrapper(inner)
    state = TrainingState()
    state.reset_for(1)
    tracker = StepTracker([wrapper], state, [None])
    wrapper.step()
    wrapper.step()
    inner.overflow = True
    wrapper.step()
    assert state.optimizer_steps == [2]
    tracker.remove()
    assert "step" not in vars(wrapper)
    wrapper.step()
    assert state.optimizer_steps == [2]
