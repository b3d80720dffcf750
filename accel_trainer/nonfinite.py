"""The non-finite policy: NaN/inf in a loss *or* in the gradients, found on the device.

``Trainer(on_nonfinite_loss=...)`` covers what an optimizer step would consume: the loss of
every ``training_step`` that reaches backward and, before each optimizer step, the gradients
of that optimizer's parameters. The check is one fused kernel per optimizer step
(``torch._amp_foreach_non_finite_check_and_unscale_``, the fp16 ``GradScaler``'s own, with a
scale of 1 so nothing is modified) that sets a per-optimizer flag on the device. No value is
read back for it in the default configuration:

* ``"raise"`` (default). On the CPU the flag lives in host memory and is read at once,
  before the optimizer steps, so the bad step is never taken. On an accelerator the flags are
  copied asynchronously to pinned host memory at the end of each batch and read during the
  next batch, after that batch's first forward/backward is queued (waiting only for the
  previous batch, which is done or nearly): the loop never waits for the device, and the
  error comes one step later, after the optimizer took the bad step. Either way the
  ``TrainingError`` names what was non-finite (the loss, or the gradients and of which
  parameters when they are still there), the optimizer, the epoch and the batch. Pending
  flags are read before every checkpoint save, validation and epoch end.
* ``"skip"`` (opt-in) decides before the optimizer steps, so a skipped step leaves the
  weights, the optimizer state and the step counters untouched (its gradients are zeroed).
  That decision needs the flag on the host: one read per optimizer step (a device sync on
  accelerators, none on the CPU). Ranks must decide alike, and they do without a collective
  under DDP: the decision reads only the gradients after DDP's all-reduce, which are the
  same on every rank (a NaN/inf on any rank is NaN/inf in the sum), as the fp16 scaler
  decides; a rank's non-finite loss is folded into them by seeding its backward with NaN.
  Under FSDP each rank holds a shard of the gradients, and a non-finite value lands in one
  rank's shard only, so the flag is all-reduced (one number per optimizer step, in this mode
  only). Under DeepSpeed the engine steps inside backward, before any check: "skip" is
  refused there.

With the fp16 ``GradScaler`` gradients are not checked: overflowing scaled gradients are the
scaler's business (it skips the step and lowers the scale); the loss still is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .collectives import all_reduce_max_
from .errors import TrainingError
from .internals import amp_foreach_non_finite_check_and_unscale_

_NEXT_STEP = (
    "Pass Trainer(on_nonfinite_loss='skip') to skip such steps instead, or lower the learning rate / "
    "enable gradient clipping."
)


class NonFiniteGuard:
    """Per-optimizer NaN/inf flags for the training loop (see the module docstring).

    Args:
        policy: ``"raise"`` or ``"skip"``.
        params: per optimizer, the parameters whose gradients its step consumes.
        device: where the loss and gradients live.
        rank: this process's index (for messages).
        num_processes: the world size.
        sharded: gradients are shards (FSDP): "skip" all-reduces the flag.
        check_gradients: False under the fp16 scaler and DeepSpeed (they own the gradients).
        names: a callable returning ``{id(param): name}`` (only called to write a message).
    """

    #: read the flags one batch late even on the CPU (tests exercise the accelerator path with it)
    force_deferred = False

    def __init__(
        self,
        policy: str,
        params: Sequence[Sequence[torch.Tensor]],
        device: torch.device,
        rank: int = 0,
        num_processes: int = 1,
        sharded: bool = False,
        check_gradients: bool = True,
        names: Callable[[], dict[int, str]] | None = None,
    ) -> None:
        self.policy = policy
        self.skip = policy == "skip"
        self.device = torch.device(device)
        self.rank = rank
        self.sharded = sharded and num_processes > 1
        self.check_gradients = check_gradients
        self._names = names
        on_host = self._on_host = self.device.type == "cpu"
        # per optimizer, its parameters grouped by dtype: the fused kernel's fast path on an
        # accelerator wants one dtype per call (GradScaler groups the same way); the CPU kernel
        # takes any mix in one call
        self.params = [list(p) for p in params]
        self._groups = [[list(p)] if on_host else _by_dtype(p) for p in params]
        n = max(len(self.params), 1)
        self.flags = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._slots = [self.flags[i : i + 1] for i in range(n)]
        self._one = torch.ones((), dtype=torch.float32, device=self.device)
        # Under DDP "skip" decides from the all-reduced gradients alone; the local loss gets in
        # there through a NaN backward seed. (One process, or FSDP's all-reduced flag: the loss
        # is checked directly.)
        self.poison_backward = self.skip and num_processes > 1 and not self.sharded and check_gradients
        self.deferred = not self.skip and (not on_host or self.force_deferred)
        self._host = self.flags if on_host and not self.deferred else _host_buffer(n, self.device)
        self._host_view = self._host.numpy()  # read without a Tensor call: no sync, nothing to count
        self._copy_back = self._host is not self.flags and not self.deferred  # "skip" on an accelerator
        self._event: Any = None
        self._pending: dict[str, Any] | None = None  # what the copy in flight describes (deferred)
        self._losses: dict[int, torch.Tensor] = {}  # this batch's loss per optimizer (deferred)
        self._settled = True
        self._fused = True
        self._local: bool | None = None  # gradients are DTensors (FSDP2): check this rank's shards
        self.skipped = 0
        if on_host and not self.deferred and check_gradients and not self.poison_backward and not self.sharded:
            self.check_step = self._host_check_step()  # type: ignore[method-assign,assignment]

    # -- each step ------------------------------------------------------------------------------
    def backward_kwargs(self, loss: torch.Tensor) -> dict[str, Any]:
        """``gradient=`` for backward: 1 for a finite loss, NaN otherwise (DDP "skip" only)."""
        if not self.poison_backward:
            return {}
        return {"gradient": torch.where(torch.isfinite(loss.detach()), 1.0, math.nan).to(loss.dtype)}

    def check_loss(self, opt_idx: int, loss: torch.Tensor, where: Callable[[], dict[str, Any]]) -> None:
        """A loss that backward consumed without an optimizer step (a non-boundary batch)."""
        if self.poison_backward:
            return  # it reaches the gradients through the backward seed
        if self.deferred:
            self._losses[opt_idx] = loss
        self._flag(self._slots[opt_idx], [loss])
        if not self.deferred and not self.skip and self._host_view[opt_idx]:
            self._raise(opt_idx, where(), False, loss)

    def check_step(self, opt_idx: int, loss: torch.Tensor, where: Callable[[], dict[str, Any]]) -> bool:
        """Before optimizer ``opt_idx`` steps: True when the step must be skipped.

        ``loss`` may still require grad: the kernel reads it (and multiplies it by 1 in place)
        without autograd noticing, so no ``detach()`` is paid for it.

        Raises:
            TrainingError: in "raise" mode, for this step (CPU) or for the previous batch's
                (accelerators, read here).
        """
        slot = self._slots[opt_idx]
        if self.check_gradients:
            for i, params in enumerate(self._groups[opt_idx]):
                grads = [g for p in params if (g := p.grad) is not None]
                if self._local is None and grads:
                    self._local = type(grads[0]).__name__ == "DTensor"
                if self._local:
                    grads = [g.to_local() for g in grads]  # type: ignore[attr-defined]  # DTensors
                if i == 0 and not self.poison_backward:
                    if self._on_host:
                        grads.append(loss)  # the CPU kernel takes any dtypes in one call
                    else:
                        self._flag(slot, [loss])
                self._flag(slot, grads)
        elif not self.poison_backward:
            self._flag(slot, [loss])
        if self.deferred:
            self._losses[opt_idx] = loss
            if not self._settled:
                self.settle()
            return False
        if self.sharded and self.skip:
            all_reduce_max_(slot)  # a non-finite value is in one rank's shard only
        if self._copy_back:
            self._host[opt_idx : opt_idx + 1].copy_(slot)  # "skip" on an accelerator: one sync per step
        if not self._host_view[opt_idx]:
            return False
        return self._found(opt_idx, loss, where)

    def _found(self, opt_idx: int, loss: torch.Tensor, where: Callable[[], dict[str, Any]]) -> bool:
        """Optimizer ``opt_idx``'s flag is set, now: raise, or skip (True) and clear the flag."""
        info = where()
        if not self.skip:
            self._raise(opt_idx, info, False, loss)
        self._slots[opt_idx].zero_()
        self.skipped += 1
        self._warn_skip(opt_idx, info, loss)
        return True

    def _host_check_step(self) -> Callable[[int, torch.Tensor, Callable[[], dict[str, Any]]], bool]:
        """:meth:`check_step` for the usual CPU case (one process or DDP, "raise", or "skip" on one
        process): the same steps with everything bound once, since it runs on every step."""
        params, slots, one, view = self.params, self._slots, self._one, self._host_view
        kernel, general, found = amp_foreach_non_finite_check_and_unscale_, self.check_step, self._found
        tensor_type = torch.Tensor

        def check_step(opt_idx: int, loss: torch.Tensor, where: Callable[[], dict[str, Any]]) -> bool:
            tensors = [g for p in params[opt_idx] if (g := p.grad) is not None]
            if tensors and type(tensors[0]) is not tensor_type:
                return general(opt_idx, loss, where)  # a tensor subclass: the general path
            tensors.append(loss)
            kernel(tensors, slots[opt_idx], one)
            return found(opt_idx, loss, where) if view[opt_idx] else False

        return check_step

    def end_batch(self, where: Callable[[], dict[str, Any]]) -> None:
        """After a batch's optimizer steps: start the copy of its flags (deferred mode only)."""
        if not self._settled:
            self.settle()
        if not self._losses:
            return  # nothing was checked in this batch
        if self.device.type == "cpu":
            self._host.copy_(self.flags)
        else:
            self._event = _copy_async(self._host, self.flags)
        self._pending = {**where(), "losses": dict(self._losses)}
        self._losses.clear()
        self._settled = False

    def settle(self) -> None:
        """Read the flags of the previous batch (deferred mode); raise if any was set."""
        self._settled = True
        pending, self._pending = self._pending, None
        if pending is None:
            return
        event, self._event = self._event, None
        if event is not None:
            event.synchronize()  # waits for the previous batch only, never for this one
        for opt_idx, flag in enumerate(self._host_view):
            if flag:
                self._raise(opt_idx, pending, True, pending["losses"].get(opt_idx))

    #: the pending flags are read before a checkpoint is saved, a validation runs or an epoch ends
    flush = settle

    # -- internals ------------------------------------------------------------------------------
    def _flag(self, slot: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """``slot`` becomes 1 (and stays so) when any of ``tensors`` holds a NaN or inf: one fused kernel."""
        if not tensors:
            return
        if self._fused:
            try:
                amp_foreach_non_finite_check_and_unscale_(tensors, slot, self._one)
                return
            except (RuntimeError, NotImplementedError, AttributeError):  # a device without the kernel
                self._fused = False
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any()
        slot.copy_(torch.maximum(slot, bad.to(slot.dtype).reshape(1)))

    def _describe(self, opt_idx: int, loss: torch.Tensor | None) -> tuple[bool, str]:
        """(the loss was non-finite, its value as text) -- read back only to write a message."""
        if loss is None:
            return False, "unknown"
        value = float(loss.detach().float().cpu())
        return not math.isfinite(value), f"{value:.6g}"

    def _bad_parameters(self, opt_idx: int) -> list[str]:
        names = self._names() if self._names is not None else {}
        bad = []
        for p in self.params[opt_idx]:
            g = p.grad
            if g is None:
                continue
            if type(g).__name__ == "DTensor":
                g = g.to_local()  # type: ignore[attr-defined]  # a DTensor
            if not bool(torch.isfinite(g).all()):
                bad.append(names.get(id(p), f"<parameter {tuple(p.shape)}>"))
        return bad

    def _raise(self, opt_idx: int, info: dict[str, Any], deferred: bool, loss: torch.Tensor | None) -> None:
        loss_bad, value = self._describe(opt_idx, loss)
        rank = f"on rank {self.rank}; on several processes this rank's exit ends the job"
        at = f"at epoch {info['epoch']}, batch_idx {info['batch_idx']}, optimizer {opt_idx}"
        late = ""
        if deferred:
            late = (
                f" (read one batch later: on {self.device.type} the flag is read after the next batch's backward is "
                "queued, so that the loop never waits for the device; that optimizer step was taken, so its "
                "parameters and state may be non-finite now)"
            )
        if loss_bad:
            message = f"training_step returned a non-finite loss ({value} {rank}) {at}{late}. {_NEXT_STEP}"
        else:
            params = [] if deferred else self._bad_parameters(opt_idx)
            which = f" in {_names_list(params)}" if params else ""
            message = (
                f"The gradients of optimizer {opt_idx} were non-finite (NaN or inf){which} after backward {at}, "
                f"although the loss was finite ({value} {rank}){late}: an overflow in the backward pass. "
                f"{_NEXT_STEP} torch.autograd.set_detect_anomaly(True) names the operation that produced it."
            )
        raise TrainingError(message)

    def _warn_skip(self, opt_idx: int, info: dict[str, Any], loss: torch.Tensor) -> None:
        # the first skip, then whenever the count doubles: a run that skips every step still says so
        if self.skipped & (self.skipped - 1) or not info.get("main_process", True):
            return
        loss_bad, value = self._describe(opt_idx, loss)
        what = f"its loss was non-finite ({value})" if loss_bad else f"its gradients were non-finite (loss {value})"
        warnings.warn(
            f"on_nonfinite_loss='skip': skipped the step of optimizer {opt_idx} at epoch {info['epoch']}, batch_idx "
            f"{info['batch_idx']}: {what}; its weights and state are unchanged. {self.skipped} step(s) skipped so far "
            "in this fit (trainer.nonfinite_skips).",
            UserWarning,
            stacklevel=4,
        )


def _by_dtype(params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    return list(groups.values()) or [[]]


def _names_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} parameter{'s' if len(names) != 1 else ''})"


def _host_buffer(n: int, device: torch.device) -> torch.Tensor:
    """Host memory the flags are copied into: pinned for accelerators, so the copy is asynchronous."""
    if device.type != "cpu":
        try:
            return torch.zeros(n, dtype=torch.float32, pin_memory=True)
        except RuntimeError:  # no pinned memory for this device: the copy below waits instead
            pass
    return torch.zeros(n, dtype=torch.float32)


def _copy_async(host: torch.Tensor, flags: torch.Tensor) -> Any:
    """Start copying ``flags`` into ``host``; returns an event to wait on (None: the copy already waited)."""
    event_cls: Any = torch.cuda.Event if flags.device.type == "cuda" else getattr(torch, "Event", None)
    if event_cls is None or not host.is_pinned():
        host.copy_(flags)  # no way to wait for this copy alone: a plain (waiting) copy
        return None
    host.copy_(flags, non_blocking=True)
    try:
        event = event_cls() if flags.device.type == "cuda" else event_cls(device=flags.device.type)
        event.record()
    except (RuntimeError, TypeError, ValueError):
        torch.accelerator.synchronize() if hasattr(torch, "accelerator") else None
        return None
    return event
