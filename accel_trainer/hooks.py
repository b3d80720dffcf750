"""Calling hooks: which callbacks and whether the module implement each hook, resolved once per run.

Unused per-step hooks then cost nothing; the trainer asks :meth:`_Hooks.caller` for a direct
function (or None) and :meth:`_Hooks.implementations` for the callbacks it orders itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .callbacks.base import Callback
from .module import TrainingModule

if TYPE_CHECKING:
    from .trainer import Trainer


class _Hooks:
    """Calls a hook on the callbacks that override it, then on the module.

    Which objects override which hook is decided once per run, so unused hooks cost nothing.
    """

    def __init__(self, trainer: Trainer, module: TrainingModule | None, callbacks: list[Callback]) -> None:
        self.trainer = trainer
        self.module = module
        self.callbacks = callbacks
        self._cache: dict[str, tuple[list[Callable], Callable | None]] = {}

    def _resolve(self, name: str) -> tuple[list[Callable], Callable | None]:
        base = getattr(Callback, name, None)
        cbs = [getattr(cb, name) for cb in self.callbacks if getattr(type(cb), name, None) is not base]
        mod_base = getattr(TrainingModule, name, None)
        impl = getattr(type(self.module), name, None)
        mod = getattr(self.module, name) if impl is not None and impl is not mod_base else None
        self._cache[name] = (cbs, mod)
        return cbs, mod

    def __call__(self, name: str, *args: Any, monitoring: bool | None = None) -> Any:
        cbs, mod = self._cache.get(name) or self._resolve(name)
        for fn in cbs:
            if monitoring is None or getattr(getattr(fn, "__self__", None), "monitors_metrics", False) == monitoring:
                fn(self.trainer, self.module, *args)
        if mod is not None and monitoring is not True:
            return mod(*args)
        return None

    def caller(self, name: str, result: bool = False) -> Callable | None:
        """A function that calls hook ``name`` as ``__call__`` does, or None when neither a callback nor
        the module implements it (resolved once, so per-step hooks nobody uses cost nothing at all).

        ``result``: the caller reads the return value, which is the module's (a callback's is
        ignored), so a lone callback is not called directly then.
        """
        cbs, mod = self._cache.get(name) or self._resolve(name)
        if not cbs:
            return mod  # None when nobody implements it
        if len(cbs) == 1 and mod is None and not result:
            return functools.partial(cbs[0], self.trainer, self.module)
        return functools.partial(self.__call__, name)

    def implementations(self, name: str) -> tuple[list[Callable], Callable | None]:
        """(the bound ``name`` of every callback that overrides it, in order; the module's, or None)."""
        return self._cache.get(name) or self._resolve(name)

    def callbacks_only(self, name: str, *args: Any) -> None:
        cbs, _ = self._cache.get(name) or self._resolve(name)
        for fn in cbs:
            fn(self.trainer, self.module, *args)



def _overrides(module: TrainingModule, name: str) -> bool:
    """Whether ``module`` replaces ``TrainingModule.<name>`` (in its class or on the instance)."""
    return getattr(type(module), name) is not getattr(TrainingModule, name) or name in vars(module)



def _batch_transfer_hook(module: TrainingModule, datamodule: Any) -> Callable | None:
    """``on_after_batch_transfer`` of the DataModule or else the module, when one defines it (else None)."""
    hook = getattr(datamodule, "on_after_batch_transfer", None) if datamodule is not None else None
    if callable(hook):
        return hook
    if type(module).on_after_batch_transfer is not TrainingModule.on_after_batch_transfer:
        return module.on_after_batch_transfer
    return None


