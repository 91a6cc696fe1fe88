"""Preemption and time limits: a signal asks the run to checkpoint at the next optimizer step and exit 75.

Slurm sends SIGUSR1 ahead of the time limit (``#SBATCH --signal=USR1@300``) and SIGTERM on preemption.
The handler only records the signal; the training loop folds the flag into the collective it already
runs every step, so all ranks stop at the same step, rank 0 writes the checkpoint, and every process
exits with :data:`EXIT_REQUEUE`. ``slurm/pretrain.sbatch`` requeues the job on that code and the next
launch resumes automatically from the run directory.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from medfm.pretrain.errors import EXIT_REQUEUE, Preempted

__all__ = ["EXIT_REQUEUE", "STOP_SIGNALS", "Preempted", "StopRequest"]
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records stop signals while installed (a context manager); ``requested`` is read once per step."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> StopRequest:
        # Python only installs handlers from the main thread (tests may train from another one).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
