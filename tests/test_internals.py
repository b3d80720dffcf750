"""accel_trainer/internals.py: every private touch of Accelerate/torch is fenced and tested.

Three kinds of test: (1) the upstream code each shortcut copies is the code it was read from
(a hash of its source; a failure means "re-read upstream, update the copy and the hash"), and
the private attributes the rest relies on still exist; (2) each shortcut gives the same result
as the stock upstream code; (3) outside the tested version window the shortcuts are off, with
a warning, and the stock code runs.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import pickle
import warnings

import pytest
import torch
from helpers import Regressor, loader

from accel_trainer import Trainer, internals

# -- (1) upstream unchanged --------------------------------------------------------------------------

# sha256[:16] of inspect.getsource(...) on the versions in internals.TESTED_WINDOWS
UPSTREAM_SOURCES = {
    ("accelerate", "accelerate.optimizer", "AcceleratedOptimizer.step"): "3c449e5cf706c537",
    ("accelerate", "accelerate.optimizer", "AcceleratedOptimizer.zero_grad"): "433740953f6d1ef5",
    ("accelerate", "accelerate.optimizer", "AcceleratedOptimizer.__init__"): "18e5ad15da0c6379",
    ("accelerate", "accelerate.optimizer", "patch_optimizer_step"): "3a48a3aa2ccaeca8",
    ("accelerate", "accelerate.data_loader", "DataLoaderShard.__iter__"): "77b896b76f3c73e9",
    ("torch", "torch.nn.modules.module", "Module._call_impl"): "62587dee2896dff4",
}


@pytest.fixture(autouse=True)
def fresh_fence(monkeypatch):
    monkeypatch.delenv("ACCEL_TRAINER_FAST_PATHS", raising=False)
    internals.fast_paths_enabled.cache_clear()
    yield
    internals.fast_paths_enabled.cache_clear()


def _resolve(module_name: str, dotted: str):
    import importlib

    obj = importlib.import_module(module_name)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("package,module_name,dotted", list(UPSTREAM_SOURCES), ids=[k[2] for k in UPSTREAM_SOURCES])
def test_upstream_code_the_shortcuts_copy_is_unchanged(package, module_name, dotted):
    if not internals.fast_paths_enabled(package):
        pytest.skip(f"{package} is outside the tested window: the shortcut is off, stock code runs")
    source = inspect.getsource(_resolve(module_name, dotted))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == UPSTREAM_SOURCES[(package, module_name, dotted)], (
        f"{module_name}.{dotted} changed upstream: re-read it, bring the copy in accel_trainer/internals.py in line, "
        "then record the new hash here"
    )


def test_private_hooks_the_trainer_relies_on_still_exist():
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from torch.distributed import distributed_c10d
    from torch.nn.modules import module as nn_module

    assert "reset_partial_state" in inspect.signature(AcceleratorState._reset_state).parameters
    assert callable(GradientState._reset_state)
    assert isinstance(PartialState._shared_state, dict)
    assert list(inspect.signature(distributed_c10d._set_pg_timeout).parameters)[:1] == ["timeout"]
    for name in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks", "_global_backward_hooks"):
        assert isinstance(getattr(nn_module, name), dict)
    assert internals.foreach_add_ is torch._foreach_add_
    assert internals.amp_foreach_non_finite_check_and_unscale_ is torch._amp_foreach_non_finite_check_and_unscale_
    from torch.distributed.checkpoint import default_planner, format_utils, state_dict_loader

    assert {"storage_reader", "planner", "no_dist"} <= set(inspect.signature(state_dict_loader._load_state_dict).parameters)
    assert "keys" in inspect.signature(default_planner._EmptyStateDictLoadPlanner).parameters
    assert "_EmptyStateDictLoadPlanner" in inspect.getsource(format_utils.dcp_to_torch_save)
    from torch.optim import lr_scheduler

    assert "_opt_called" in inspect.getsource(lr_scheduler)
    lin = torch.nn.Linear(2, 2)
    internals.ddp_ignore(lin, ["bias"])
    assert lin._ddp_params_and_buffers_to_ignore == ["bias"]
    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_compiled_call_impl"):
        assert hasattr(lin, name)


def test_a_scheduler_after_mark_optimizer_stepped_does_not_warn():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    internals.mark_optimizer_stepped(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()


def test_torchmetrics_private_state_is_where_fsdp_engine_reads_it():
    torchmetrics = pytest.importorskip("torchmetrics")
    metric = torchmetrics.MeanMetric()
    defaults = internals.metric_defaults(metric)
    assert set(defaults) >= {"mean_value", "weight"}
    assert internals.metric_device(metric) == torch.device("cpu")
    metric.update(torch.tensor([3.0]))
    internals.restore_metric_states(metric, copy.deepcopy(defaults), {"mean_value": torch.tensor(0.0)}, torch.device("cpu"))
    assert float(metric.mean_value) == 0.0


# -- (2) the shortcuts give upstream's results -----------------------------------------------------------


def _prepared(opt_cls=torch.optim.Adam, scaler=None, **kw):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    internals.reset_accelerate_state("no")
    Accelerator(cpu=True)  # AcceleratedOptimizer reads the shared AcceleratorState
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return model, AcceleratedOptimizer(opt_cls(model.parameters(), lr=0.1, **kw), scaler=scaler)


def _train(model, opt, steps=5, accumulate=1, inf_at=None):
    from accelerate.state import GradientState

    state = GradientState()
    g = torch.Generator().manual_seed(1)
    skipped = []
    for i in range(steps * accumulate):
        state._set_sync_gradients((i + 1) % accumulate == 0)
        x = torch.randn(8, 4, generator=g)
        loss = model(x).pow(2).mean()
        if opt.scaler is not None:
            loss = opt.scaler.scale(loss)
        loss.backward()
        if inf_at == i:
            model.weight.grad[0, 0] = float("inf")
        opt.step()
        skipped.append(opt.step_was_skipped if opt.scaler is not None else None)
        opt.zero_grad()
    state._set_sync_gradients(True)
    return [p.detach().clone() for p in model.parameters()], skipped


@pytest.mark.parametrize("accumulate", [1, 3])
def test_fast_optimizer_steps_exactly_like_accelerates(accumulate):
    stock_model, stock = _prepared()
    fast_model, fast = _prepared()
    assert internals.install_fast_optimizer(fast)
    assert type(fast).__qualname__ == "FastAcceleratedOptimizer" and type(stock).__qualname__ == "AcceleratedOptimizer"
    assert type(fast).__name__ == "AcceleratedOptimizer"  # recognised by name, like Accelerate's
    a, _ = _train(stock_model, stock, accumulate=accumulate)
    b, _ = _train(fast_model, fast, accumulate=accumulate)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(p.grad is None for p in fast_model.parameters())  # set_to_none defaults to True, as upstream


def test_fast_optimizer_with_a_grad_scaler_matches_accelerates_including_skipped_steps():
    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0**4)

    stock_model, stock = _prepared(scaler=scaler())
    fast_model, fast = _prepared(scaler=scaler())
    assert internals.install_fast_optimizer(fast)
    a, skipped_a = _train(stock_model, stock, inf_at=2)
    b, skipped_b = _train(fast_model, fast, inf_at=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert skipped_a == skipped_b and skipped_b[2] is True and skipped_b.count(True) == 1
    assert fast.scaler.get_scale() == stock.scaler.get_scale()


def test_fast_zero_grad_refuses_set_to_none_like_accelerate_when_the_optimizer_has_no_such_argument():
    class NoArg(torch.optim.SGD):
        def zero_grad(self):  # type: ignore[override]
            super().zero_grad()

    _, stock = _prepared(NoArg)
    _, fast = _prepared(NoArg)
    assert internals.install_fast_optimizer(fast)
    for opt in (stock, fast):
        with pytest.raises(ValueError, match="set_to_none"):
            opt.zero_grad(set_to_none=False)
        opt.zero_grad()


def test_direct_optimizer_only_where_the_wrapper_would_only_forward_the_call():
    """The lean one-process step calls the torch optimizer's step/zero_grad itself only where the
    prepared wrapper's own would do nothing else: fast class installed, no scaler, no instance override."""
    _, stock = _prepared()
    assert internals.direct_optimizer(stock) is None  # Accelerate's own class: its step is not mirrored
    _, fast = _prepared()
    assert internals.install_fast_optimizer(fast)
    assert internals.direct_optimizer(fast) is fast.optimizer
    _, scaled = _prepared(scaler=torch.amp.GradScaler("cpu"))
    assert internals.install_fast_optimizer(scaled)
    assert internals.direct_optimizer(scaled) is None  # the scaler protocol runs in the wrapper's step
    _, patched = _prepared()
    assert internals.install_fast_optimizer(patched)
    patched.step = lambda closure=None: None  # a user's (or a library's) instance-level step
    assert internals.direct_optimizer(patched) is None


def test_prepared_optimizer_pickles_and_deep_copies():
    model, opt = _prepared()
    assert internals.install_fast_optimizer(opt)
    _train(model, opt, steps=2)
    from accel_trainer.optim import unwrap_optimizer

    assert unwrap_optimizer(opt) is opt.optimizer
    clones = [pickle.loads(pickle.dumps(opt, protocol=p)) for p in (2, pickle.DEFAULT_PROTOCOL)] + [copy.deepcopy(opt)]
    for clone in clones:
        assert type(clone) is type(opt)
        assert clone.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
        # the copy steps its own parameters
        clone.zero_grad()
        params = clone.param_groups[0]["params"]
        before = params[0].detach().clone()
        params[0].grad = torch.ones_like(params[0])
        clone.step()
        assert not torch.equal(params[0], before)


def test_optimizers_of_a_fit_are_fast_picklable_and_accelerate_is_not_patched(tmp_path):
    import accelerate.optimizer as accelerate_optimizer

    check = accelerate_optimizer.is_lomo_available
    module = Regressor()
    trainer = Trainer(max_epochs=1, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(module, loader())
    assert accelerate_optimizer.is_lomo_available is check  # nothing process-wide replaced
    (opt,) = trainer.optimizers
    assert type(opt).__qualname__ == "FastAcceleratedOptimizer"
    assert type(pickle.loads(pickle.dumps(opt))) is type(opt)
    assert type(copy.deepcopy(opt)) is type(opt)


def test_fit_with_shortcuts_off_gives_the_same_weights(monkeypatch, tmp_path):
    def fit():
        module = Regressor()
        Trainer(max_epochs=2, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path)).fit(module, loader())
        return [p.detach().clone() for p in module.parameters()]

    fast = fit()
    monkeypatch.setenv("ACCEL_TRAINER_FAST_PATHS", "0")
    internals.fast_paths_enabled.cache_clear()
    stock = fit()
    assert all(torch.equal(a, b) for a, b in zip(fast, stock))


def test_forward_callable_directly_only_without_hooks():
    lin = torch.nn.Linear(2, 2)
    assert internals.forward_callable_directly(lin)
    handle = lin.register_forward_hook(lambda *a: None)
    assert not internals.forward_callable_directly(lin)
    handle.remove()
    lin.forward = lin.forward  # an instance-level forward (Accelerate's autocast wrapper does this)
    assert not internals.forward_callable_directly(lin)


def test_skip_noop_placement_only_on_a_cpu_only_machine():
    from accelerate import Accelerator

    prepared = Accelerator(cpu=True).prepare(loader())
    internals.skip_noop_placement(prepared)
    expected = torch.device("cpu") if internals.accelerator_present() else None
    assert prepared.device == expected
    assert [b[0].tolist() for b in prepared] == [b[0].tolist() for b in loader()]


# -- (3) outside the window: stock code, and a warning ---------------------------------------------------


def test_outside_the_version_window_the_shortcuts_are_off_with_one_warning(monkeypatch):
    monkeypatch.setattr(internals, "_installed_version", lambda package: "9.99.0")
    with pytest.warns(internals.UntestedVersionWarning, match=r"accelerate 9\.99\.0 is outside .* 1\.15\.x"):
        assert not internals.fast_paths_enabled("accelerate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not internals.fast_paths_enabled("accelerate")  # once per process
        _, opt = _prepared()
        assert not internals.install_fast_optimizer(opt)
    assert type(opt).__qualname__ == "AcceleratedOptimizer"
    with pytest.warns(internals.UntestedVersionWarning, match="torch 9.99.0"):
        assert not internals.forward_callable_directly(torch.nn.Linear(2, 2))


def test_shortcuts_can_be_turned_off_without_a_warning(monkeypatch):
    monkeypatch.setenv("ACCEL_TRAINER_FAST_PATHS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not internals.fast_paths_enabled("accelerate")
        _, opt = _prepared()
        assert not internals.install_fast_optimizer(opt)
