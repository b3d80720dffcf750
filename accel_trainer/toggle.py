"""Which parameters require grad during each optimizer's turn (several optimizers, automatic optimization).

While optimizer ``i`` trains, the parameters that only other optimizers own have
``requires_grad=False`` (so its backward gives them no gradient, and ``training_step`` can see
which optimizer's turn it is); its own parameters keep the flag they had. After the batch every
flag is back as it was, so hooks between batches, validation and checkpoints see the user's flags.

Setting the flags afresh for every optimizer (off before its turn, back after it) costs
``n`` x (all parameters) calls per batch -- quadratic in the number of optimizers (448
``requires_grad_`` calls per batch for 8 optimizers of 4 tensors). :class:`OptimizerToggle` goes
from one optimizer's turn to the next by changing only the parameters whose state differs
between the two, and restores the rest once at the end of the batch: linear in the number of
parameters, whatever the number of optimizers, with the same flags at every point where user
code runs (``training_step``, the backward and optimizer-step hooks, ``optimizer_step``).

Why not ``loss.backward(inputs=own_params)`` instead of toggling: it keeps other parameters'
gradients out of the backward just as well, but ``training_step`` would no longer see the
documented flags, and FSDP1 relies on the flags to leave other optimizers' gradient shards
alone (see ``engines/fsdp.check_fsdp``). With the flags already off, ``inputs=`` adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class OptimizerToggle:
    """Per-batch ``requires_grad`` toggling for several optimizers.

    Args:
        params: per optimizer, the parameters it owns (shared parameters stay on for all owners).

    Example:
        >>> a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
        >>> toggle = OptimizerToggle([[a], [b]])
        >>> toggle.enter(0); (a.requires_grad, b.requires_grad)
        (True, False)
        >>> toggle.enter(1); (a.requires_grad, b.requires_grad)
        (False, True)
        >>> toggle.restore(); (a.requires_grad, b.requires_grad)
        (True, True)
    """

    def __init__(self, params: Sequence[Sequence[torch.Tensor]]) -> None:
        owners = [{id(p) for p in ps} for ps in params]
        union: dict[int, torch.Tensor] = {}
        for ps in params:
            for p in ps:
                union.setdefault(id(p), p)
        #: per optimizer, the parameters turned off during its turn (only other optimizers own them)
        self.off = [[p for key, p in union.items() if key not in own] for own in owners]
        self._owners = owners
        self._transitions: dict[tuple[int, int], tuple[list, list]] = {}
        self._saved: dict[int, bool] = {}  # the flag a turned-off parameter gets back
        self._current: int | None = None

    def enter(self, i: int) -> None:
        """Optimizer ``i``'s turn: only parameters of other optimizers are turned off."""
        current = self._current
        if current == i:
            return
        saved = self._saved
        if current is None:
            turn_off = self.off[i]
        else:
            turn_on, turn_off = self._transition(current, i)
            for p in turn_on:
                p.requires_grad_(saved.pop(id(p)))
        for p in turn_off:
            saved[id(p)] = p.requires_grad
            p.requires_grad_(False)
        self._current = i

    def restore(self) -> None:
        """Every parameter gets back the flag it had before the batch's first turn."""
        current = self._current
        if current is None:
            return
        saved = self._saved
        for p in self.off[current]:
            p.requires_grad_(saved[id(p)])
        saved.clear()
        self._current = None

    def _transition(self, a: int, b: int) -> tuple[list, list]:
        """(turn back on, turn off) going from optimizer ``a``'s turn to ``b``'s."""
        key = (a, b)
        found = self._transitions.get(key)
        if found is None:
            own_a, own_b = self._owners[a], self._owners[b]
            turn_on = [p for p in self.off[a] if id(p) in own_b]  # off for a, b's own
            turn_off = [p for p in self.off[b] if id(p) in own_a]  # a's own, off for b
            found = self._transitions[key] = (turn_on, turn_off)
        return found
