"""``TrainingModule``: the model-side half of the API (hooks, ``self.log``, hyperparameters).

A ``TrainingModule`` is a plain ``torch.nn.Module`` with documented no-op hooks. The
``Trainer`` calls them by name; overriding one is the only way to change its behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .optim import marked_requires_closure

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer


class AttributeDict(dict):
    """A dict whose keys read as attributes: ``self.hparams.learning_rate``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(f"hparams has no {key!r}; it has {sorted(self)}") from err

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        del self[key]


class TrainingModule(torch.nn.Module):
    """Base class for what you train: a ``torch.nn.Module`` plus training hooks.

    Override ``training_step`` and ``configure_optimizers`` (and optionally
    ``validation_step``/``test_step`` and any ``on_*`` hook). The trainer calls
    ``training_step(batch, batch_idx, optimizer_idx)`` through the (possibly DDP-wrapped,
    autocast) model, once per optimizer per batch; ``optimizer_idx`` is passed only when
    there is more than one optimizer.

    Example:
        >>> class Regressor(TrainingModule):
        ...     def __init__(self, lr=0.1):
        ...         super().__init__()
        ...         self.save_hyperparameters()
        ...         self.net = torch.nn.Linear(3, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         loss = torch.nn.functional.mse_loss(self.net(x), y)
        ...         self.log("train_loss", loss)
        ...         return loss
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
    """

    # set with object.__setattr__ (not nn.Module's, which would register a Trainer as a submodule)
    _trainer: Trainer | None
    _hparams: AttributeDict

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_trainer", None)
        object.__setattr__(self, "_hparams", AttributeDict())
        self.automatic_optimization: bool = True

    # -- trainer-backed views -------------------------------------------------------------------
    @property
    def trainer(self) -> Trainer | None:
        """The :class:`Trainer` running this module (None outside a run)."""
        return self._trainer

    @trainer.setter
    def trainer(self, trainer: Trainer | None) -> None:
        object.__setattr__(self, "_trainer", trainer)

    @property
    def current_epoch(self) -> int:
        """``trainer.current_epoch``: the epoch being trained, 0-based (0 outside a run)."""
        return self._trainer.current_epoch if self._trainer is not None else 0

    @property
    def global_step(self) -> int:
        """``trainer.global_step``: accumulation boundaries so far, the same on every rank (0 outside a run)."""
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def global_rank(self) -> int:
        """This process's rank among all processes (0 without a trainer)."""
        return self._trainer.global_rank if self._trainer is not None else 0

    @property
    def local_rank(self) -> int:
        """This process's rank on its machine (0 without a trainer)."""
        return self._trainer.local_rank if self._trainer is not None else 0

    @property
    def logger(self) -> Any:
        """The first of ``self.loggers`` (``None`` when nothing logs), as Lightning's ``self.logger``."""
        return self._trainer.logger if self._trainer is not None else None

    @property
    def loggers(self) -> list:
        """The run's trackers as Lightning-style loggers (``log_metrics``, ``log_hyperparams``, ``experiment``)."""
        return self._trainer.loggers if self._trainer is not None else []

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the main process only (without breaking the progress bar), as Lightning's ``self.print``."""
        if self._trainer is None:
            print(*args, **kwargs)
        else:
            self._trainer.print(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        """The device of the module's parameters (else buffers, else the trainer's)."""
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        if self._trainer is not None:
            return self._trainer.accelerator.device
        return torch.device("cpu")

    # -- hyperparameters --------------------------------------------------------------------------
    @property
    def hparams(self) -> AttributeDict:
        """Hyperparameters read as attributes (``self.hparams.lr``); assign a dict or ``argparse.Namespace``, or call ``save_hyperparameters()``."""
        return self._hparams

    @hparams.setter
    def hparams(self, value: Mapping[str, Any] | argparse.Namespace) -> None:
        if isinstance(value, argparse.Namespace):
            value = vars(value)
        if not isinstance(value, Mapping):
            raise TypeError(f"hparams must be a dict or an argparse.Namespace, received {type(value).__name__}.")
        object.__setattr__(self, "_hparams", AttributeDict(value))

    def save_hyperparameters(self, *names: str, ignore: list[str] | str | None = None) -> None:
        """Fill ``self.hparams`` from the arguments of the calling ``__init__``.

        Args:
            *names: only these arguments (default: all).
            ignore: arguments to leave out (e.g. a large tensor or a submodule).
        """
        here = inspect.currentframe()
        frame = here.f_back if here is not None else None
        del here
        try:
            init_args = _collect_init_args(frame)
        finally:
            del frame
        ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
        if len(names) == 1 and isinstance(names[0], (dict, argparse.Namespace)):
            self.hparams = names[0]
            return
        selected = {k: v for k, v in init_args.items() if (not names or k in names) and k not in ignore}
        self._hparams.update(selected)

    # -- logging --------------------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Any,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        prog_bar: bool = False,
        logger: bool = True,
        sync_dist: bool = False,
        reduce_fx: Any = "mean",
        batch_size: int | None = None,
        add_dataloader_idx: bool = True,
    ) -> None:
        """Record a metric: a number, a scalar tensor or a ``torchmetrics.Metric``, for the trackers, the progress bar (``prog_bar``) and callbacks (``trainer.callback_metrics``).

        In ``training_step`` the defaults are ``on_step=True, on_epoch=False``; in
        ``validation_step``/``test_step`` and epoch-end hooks ``on_step=False, on_epoch=True``.
        Epoch values are means weighted by ``batch_size`` (inferred from the batch when not
        given) over the whole epoch and across all ranks. A ``torchmetrics.Metric`` value is
        computed and reset by the trainer at epoch end.

        With several validation/test dataloaders the name becomes ``name/dataloader_idx_N``
        (as in Lightning); ``add_dataloader_idx=False`` keeps ``name`` as given, one value over
        every dataloader that logs it.
        """
        trainer = self._trainer
        collector = trainer.metric_collector if trainer is not None else None
        if collector is None:
            warnings.warn(f"self.log({name!r}) was called outside a Trainer run and is ignored.", UserWarning, stacklevel=2)
            return
        collector.log(
            name, value, on_step, on_epoch, prog_bar, logger, sync_dist, reduce_fx, batch_size, add_dataloader_idx
        )

    def log_dict(self, dictionary: Mapping[str, Any], **kwargs: Any) -> None:
        """``self.log`` every item of ``dictionary`` with the same options."""
        for name, value in dictionary.items():
            self.log(name, value, **kwargs)

    # -- manual optimization --------------------------------------------------------------------
    def optimizers(self) -> Any:
        """The prepared optimizer (one) or list of optimizers (several)."""
        opts = self._require_trainer("optimizers").optimizers
        return opts[0] if len(opts) == 1 else opts

    def lr_schedulers(self) -> Any:
        """The prepared scheduler (one), list of schedulers (several) or ``None``."""
        cfgs = self._require_trainer("lr_schedulers").lr_schedulers
        if not cfgs:
            return None
        return cfgs[0].scheduler if len(cfgs) == 1 else [c.scheduler for c in cfgs]

    def manual_backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward()`` through the accelerator (mixed-precision scaling, DeepSpeed…)."""
        self._require_trainer("manual_backward").accelerator.backward(loss, **kwargs)

    def toggle_optimizer(self, optimizer: Any) -> None:
        """Only ``optimizer``'s parameters require grad until :meth:`untoggle_optimizer` (manual optimization).

        As Lightning's: every other optimizer's parameters are switched off (their
        ``requires_grad`` remembered), a parameter shared with ``optimizer`` stays as it was.
        """
        state: dict[torch.nn.Parameter, bool] = {}
        for opt in self._require_trainer("toggle_optimizer").optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p not in state:
                        state[p] = p.requires_grad
                        p.requires_grad_(False)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.requires_grad_(state.get(p, p.requires_grad))
        object.__setattr__(self, "_toggled_requires_grad", state)

    def untoggle_optimizer(self, optimizer: Any) -> None:
        """Undo :meth:`toggle_optimizer`: the other optimizers' parameters get their ``requires_grad`` back."""
        state = getattr(self, "_toggled_requires_grad", {})
        mine = {p for group in optimizer.param_groups for p in group["params"]}
        for p, flag in state.items():
            if p not in mine:
                p.requires_grad_(flag)
        object.__setattr__(self, "_toggled_requires_grad", {})

    @contextlib.contextmanager
    def toggled_optimizer(self, optimizer: Any) -> Iterator[None]:
        """``with self.toggled_optimizer(opt):`` — :meth:`toggle_optimizer` for the block."""
        self.toggle_optimizer(optimizer)
        try:
            yield
        finally:
            self.untoggle_optimizer(optimizer)

    def _require_trainer(self, what: str) -> Trainer:
        if self._trainer is None:
            raise RuntimeError(f"self.{what}() is only available while a Trainer runs this module.")
        return self._trainer

    # -- the steps ------------------------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Return the loss (a scalar tensor), a dict with ``"loss"``, or ``None`` to skip.

        Called as ``training_step(batch, batch_idx, optimizer_idx)``; ``optimizer_idx`` is passed
        only when there is more than one optimizer.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch, batch_idx).")

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        """Log validation metrics with ``self.log``; a returned scalar becomes ``val_loss``.

        Called as ``validation_step(batch, batch_idx, dataloader_idx)``; ``dataloader_idx`` is
        passed only when there is more than one validation dataloader.
        """

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        """Log test metrics with ``self.log``; a returned scalar becomes ``test_loss``.

        Called as ``test_step(batch, batch_idx, dataloader_idx)``; ``dataloader_idx`` is passed
        only when there is more than one test dataloader.
        """

    def configure_optimizers(self) -> Any:
        """Return the optimizers and schedulers, in any form of CONTRACT.md."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define configure_optimizers(). Return an optimizer (or any accepted form) "
            "from it, or return None to run forward passes only."
        )

    def optimizer_step(
        self,
        current_epoch: int,
        batch_nb: int,
        optimizer: torch.optim.Optimizer,
        optimizer_i: int,
        second_order_closure: Any = None,
    ) -> None:
        """Step ``optimizer`` and zero its gradients; override to decide when each optimizer steps.

        The default passes ``second_order_closure`` to optimizers that need one (LBFGS). An
        override may skip steps or change learning rates; the trainer never steps an
        optimizer behind its back and counts only the steps that really happen.
        """
        if marked_requires_closure(optimizer):
            optimizer.step(second_order_closure)
        else:
            optimizer.step()
        trainer = self._trainer
        if trainer is None:
            self.on_before_zero_grad(optimizer)
        elif not getattr(trainer, "simulating", False):  # the LR-schedule preview (lr_schedule.py) runs no hooks
            trainer.before_zero_grad(optimizer)  # callbacks, then this module (as in Lightning 0.7 and 2.x)
        self.optimizer_zero_grad(current_epoch, batch_nb, optimizer)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Zero ``optimizer``'s gradients; called by the default ``optimizer_step`` after the step.

        Override to change how (Lightning 2's hook of the same name), e.g.
        ``optimizer.zero_grad(set_to_none=False)``.
        """
        optimizer.zero_grad()

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step one scheduler; override for schedulers with an unusual ``step`` signature."""
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def configure_callbacks(self) -> Any:
        """Callbacks this module brings (a callback or a list), added to the trainer's at the start of
        ``fit``/``validate``/``test``. As in Lightning, one replaces a trainer callback of the same type,
        and ``ModelCheckpoint`` callbacks run last."""
        return []

    # -- data (optional) --------------------------------------------------------------------------
    # train_dataloader / val_dataloader / test_dataloader are looked up by name when defined.
    def prepare_data(self) -> None:
        """Download or write data, once per machine (the local main process), before ``setup``."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Change a batch after it reached the device (e.g. GPU augmentation); return the batch.

        Called for every training (``dataloader_idx`` 0), validation and test batch, before
        ``on_*_batch_start``. (A ``DataModule`` may define it instead; the DataModule's wins.)
        """
        return batch

    # -- hooks (no-ops) -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before anything else in fit/validate/test (``stage`` is "fit", "validate" or "test")."""

    def teardown(self, stage: str) -> None:
        """After everything else in fit/validate/test."""

    def on_fit_start(self) -> None:
        """After optimizers are prepared, before the sanity check and training."""

    def on_fit_end(self) -> None:
        """At the very end of fit."""

    def on_train_start(self) -> None:
        """Before the first training epoch."""

    def on_train_end(self) -> None:
        """After the last training epoch."""

    def on_train_epoch_start(self) -> None:
        """Before the first batch of each training epoch."""

    def on_train_epoch_end(self) -> None:
        """After the epoch's batches and its end-of-epoch validation, before epoch schedulers step."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        """Before each training batch; return -1 to end the epoch early."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After each training batch (after its optimizer steps)."""

    def on_validation_start(self) -> None:
        """Before a validation run."""

    def on_validation_end(self) -> None:
        """After a validation run, its metrics reduced across ranks."""

    def on_validation_epoch_start(self) -> None:
        """Before the first validation batch."""

    def on_validation_epoch_end(self) -> None:
        """After the last validation batch, before metrics are reduced (log here)."""

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Before each validation batch."""

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """After each validation batch."""

    def on_test_start(self) -> None:
        """Before a test run."""

    def on_test_end(self) -> None:
        """After a test run."""

    def on_test_epoch_start(self) -> None:
        """Before the first test batch."""

    def on_test_epoch_end(self) -> None:
        """After the last test batch (log here)."""

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Before each test batch."""

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """After each test batch."""

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Before ``backward(loss)``."""

    def on_after_backward(self) -> None:
        """After ``backward``, before clipping and ``optimizer_step``."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """On an accumulation boundary, after clipping, before ``optimizer_step``."""

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by the default ``optimizer_step`` after the step, right before the gradients are zeroed."""

    def on_validation_model_eval(self) -> None:
        """Put the module in eval mode for validation (default ``self.eval()``)."""
        self.eval()

    def on_validation_model_train(self) -> None:
        """After validation during fit. Not overridden: every submodule gets back the mode it had before
        validation (a frozen submodule kept in eval stays in eval). Overridden: only this runs."""
        self.train()

    def on_test_model_eval(self) -> None:
        """Put the module in eval mode for testing (default ``self.eval()``)."""
        self.eval()

    def on_test_model_train(self) -> None:
        """After testing; like :meth:`on_validation_model_train`."""
        self.train()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add entries to a checkpoint being saved."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read entries from a checkpoint being loaded."""


def _collect_init_args(frame: Any) -> dict[str, Any]:
    """Arguments of the ``__init__`` frames up the stack (subclass frames override parents')."""
    collected: dict[str, Any] = {}
    chain = []
    while frame is not None and frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
        chain.append(frame)
        frame = frame.f_back
    for f in chain:  # innermost __init__ first, so the outermost subclass (the user's call) wins
        code = f.f_code
        n = code.co_argcount + code.co_kwonlyargcount
        names = list(code.co_varnames[:n])
        local = f.f_locals
        for name in names:
            if name != "self" and name in local:
                collected[name] = local[name]
        if code.co_flags & inspect.CO_VARKEYWORDS:
            varkw = code.co_varnames[n + bool(code.co_flags & inspect.CO_VARARGS)]
            collected.update(local.get(varkw, {}))
    return {k: v for k, v in collected.items() if not k.startswith("__")}
