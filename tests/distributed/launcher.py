"""``accelerate.debug_launcher`` on a free port, with fork-safe threading.

debug_launcher always rendezvouses on port 29500, so two test runs on one machine (or a
rank orphaned by an earlier failure) make each other hang. This forks the ranks the same
way, on a port nobody holds, and resets Accelerate's singletons around the run so the
parent's state never leaks into the children. Each child runs torch single-threaded: a
fork after the parent used OpenMP's thread pool can deadlock the child's first parallel
kernel (and two ranks on two cores gain nothing from more threads).
"""

from __future__ import annotations

import socket
import tempfile
from typing import Any, Callable

from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import PrepareForLaunch, patch_environment


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SingleThreaded:
    def __init__(self, function: Callable) -> None:
        self.function = function

    def __call__(self, *args: Any) -> Any:
        import torch

        torch.set_num_threads(1)
        return self.function(*args)


def run_on_ranks(function: Callable, args: tuple[Any, ...] = (), num_processes: int = 2, start_method: str = "fork") -> None:
    """Run ``function(*args)`` on ``num_processes`` gloo ranks.

    ``start_method="spawn"`` starts clean interpreters (slower): use it when the calling
    process already ran torch kernels, after which forked children can deadlock.
    """
    from torch.multiprocessing import start_processes

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        with tempfile.NamedTemporaryFile() as rendezvous, patch_environment(
            world_size=num_processes,
            master_addr="127.0.0.1",
            master_port=str(free_port()),
            accelerate_mixed_precision="no",
            accelerate_debug_rdv_file=rendezvous.name,
            accelerate_use_cpu="yes",
            gloo_socket_ifname="lo",
        ):
            start_processes(PrepareForLaunch(_SingleThreaded(function), debug=True), args=args, nprocs=num_processes, start_method=start_method)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
