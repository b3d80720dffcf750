"""Setting up the processes a ``Trainer`` runs in: the ``Accelerator``, the launch checks, seeding.

Everything here runs once, in ``Trainer.__init__`` (or when a run fails): it makes (or checks) the
``Accelerator``, refuses a launch that would train N independent copies, bounds collectives by
``collective_timeout``, warns about torchrun restarts that cannot reconnect, and lets gloo settle
at interpreter exit. None of it is per step.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Any

import torch

from .engines import requested_engine
from .errors import ConfigurationError
from .internals import reset_accelerate_state, set_process_group_timeout


def say_safely(message: str) -> None:
    """One line on stderr; a closed stderr (the launcher is gone) must not turn it into a crash."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def explain_collective_timeout(exc: BaseException, trainer: Any) -> None:
    """One line saying what a collective that timed out means (the exception itself is torch's)."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not ("Timed out" in text or "timed out" in text or "Timeout" in text):
        return
    if trainer.accelerator.num_processes < 2:
        return
    bound = trainer.collective_timeout
    setting = f"collective_timeout={bound:g} s" if bound else "torch's default timeout (collective_timeout=None)"
    say_safely(
        f"accel_trainer: rank {trainer.accelerator.process_index}: a collective timed out after {setting}: another "
        "rank did not reach it (it hangs, or died without the launcher noticing). Its traceback, if any, says where."
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) through Accelerate's ``set_seed``."""
    from accelerate.utils import set_seed

    set_seed(seed)


def make_accelerator(cpu: bool, mixed_precision: str, gradient_accumulation_steps: int, collective_timeout: float | None = None) -> Any:
    """The ``Accelerator`` a ``Trainer`` makes when none is passed in (the engine's, when one is requested)."""
    from accelerate import Accelerator

    # A previous Trainer in this process may have fixed the precision; start from a clean
    # AcceleratorState (the process group, held by PartialState, is kept).
    reset_accelerate_state(mixed_precision)
    if launched_world_size() > 1 and not cpu and not torch.cuda.is_available():
        # A multi-process launch on a machine without GPUs: join the job over gloo on CPU
        # instead of letting every process train its own world-size-1 copy.
        cpu = True
    kwargs: dict[str, Any] = dict(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
    )
    if collective_timeout is not None:
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        # a process group created by this Accelerator starts with the bound (an existing one
        # gets it from apply_collective_timeout)
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout))]
    if requested_engine() == "DEEPSPEED":
        from .engines.deepspeed import make_accelerator as deepspeed_accelerator

        return deepspeed_accelerator(cpu, **kwargs)
    if requested_engine() == "FSDP" and (cpu or not torch.cuda.is_available()):
        from .engines.fsdp import cpu_accelerator

        return cpu_accelerator(**kwargs)
    return Accelerator(cpu=cpu, **kwargs)


def apply_collective_timeout(seconds: float) -> None:
    """Bound every collective of the default process group by ``seconds`` (gloo and NCCL alike).

    Also when the group existed before this Trainer (an earlier Trainer in the process, or an
    ``accelerator=`` passed in), whose timeout ``InitProcessGroupKwargs`` can no longer set.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from datetime import timedelta

    if not set_process_group_timeout(timedelta(seconds=seconds)):  # pragma: no cover - a torch without it
        warnings.warn(
            "Trainer(collective_timeout=...) could not be applied to the existing process group (this torch has no "
            "_set_pg_timeout); create the Accelerator with InitProcessGroupKwargs(timeout=...) instead.",
            UserWarning,
            stacklevel=3,
        )


def launched_world_size() -> int:
    """The world size the launcher announced (``WORLD_SIZE``; 1 when unset or unreadable)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


@functools.cache
def settle_collectives_at_exit() -> None:
    """Let gloo's worker threads finish with the last collectives before the interpreter shuts down.

    A gloo worker thread drops its reference to a finished collective a moment after the
    caller's ``wait()`` returned; when that is the last reference, the work's destructor
    releases the Python tensors it held, which needs the GIL. If the main thread has begun
    interpreter shutdown by then (a process that exits right after its last collective, on a
    loaded machine), the worker thread cannot take the GIL, Python ends the thread, and the
    forced unwind through C++ aborts the process ("terminate called without an active
    exception", SIGABRT: seen in a core dump, in ``AsyncAllgatherCoalescedWork``'s destructor
    from ``ProcessGroupGloo::runLoop``) -- after all the work is done, yet the launcher reports
    the job failed. The process group cannot simply be destroyed first: FSDP's device mesh and
    the sharded parameters keep it alive. So at exit (registered once per process, when a
    Trainer joins several processes) the main thread sleeps briefly without the GIL, which lets
    those threads release their last references while Python still runs, then destroys the
    process group, as Accelerate's ``end_training()`` does.
    """
    import atexit

    def settle() -> None:
        import time

        import torch.distributed as dist

        time.sleep(0.25)
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # pragma: no cover - exiting anyway; never mask the run's own outcome
                pass

    atexit.register(settle)


def warn_if_restarts_cannot_reconnect() -> None:
    """torchrun restarts (``--max_restarts N``) whose workers share the agent's rendezvous store.

    That store keeps the first attempt's keys (a static rendezvous keeps one store for good),
    so after a restart the workers read the dead attempt's addresses and gloo fails to connect
    (PyTorch issue 135712). ``--rdzv_backend c10d`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    gives every attempt a store of its own (README, "Elastic restarts").
    """
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        if os.environ.get("RANK", "0") == "0":
            warnings.warn(
                "torchrun restarts are on (--max_restarts) but the workers share the launcher's rendezvous store, "
                "which keeps the first attempt's keys: after a restart the processes would find the dead attempt's "
                "addresses and fail to connect, so restarts will not reconnect. Launch with --rdzv_backend c10d and "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.",
                UserWarning,
                stacklevel=3,
            )


def check_launch(accelerator: Any) -> None:
    """Refuse a launch that would silently train N independent world-size-1 copies."""
    world_size = launched_world_size()
    if world_size > 1 and accelerator.num_processes == 1:
        raise ConfigurationError(
            f"WORLD_SIZE={world_size} in the environment, but this process joined no process group "
            "(accelerator.num_processes == 1), so each process would train its own copy. On a machine "
            "without GPUs launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes "
            f"{world_size} ... (or Trainer(cpu=True)); on GPUs check that every process sees a GPU."
        )
