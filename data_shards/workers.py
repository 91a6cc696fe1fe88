"""Reader processes of ``medfm shard`` (header scan and pixel reading): set up so that they die with the command and,
when asked, fail a huge allocation with MemoryError instead of waking the OOM killer."""

from __future__ import annotations

import os
import signal
import sys


def init_worker(parent: int, max_memory_gb: float | None) -> None:
    """Reader process set-up: die with the parent (a ``kill -9`` of medfm shard leaves no orphan holding memory)
    and, when asked, cap the address space so that a huge allocation is a MemoryError (a skip), not the OOM killer."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    if max_memory_gb is not None:
        import resource

        limit = int(max_memory_gb * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
