"""What a medfm command can fail with, and the one mapping from those failures to exit codes.

A leaf module (no torch; only ``data_shards.errors``: ``MedfmError``, the base of them all, and ``ConfigError``):
configs, methods, the engine, the checkpoint store, the release module and every subcommand raise these, and ``run_command`` turns them into one line on stderr and an exit code.

Exit codes: 0 done, 1 diverged or a file / weights problem (the message names the file and keys), 2 bad config
(the message names the key), 3 distributed failure (a peer died or hung, or the rendezvous did not complete),
75 checkpointed on a stop signal (requeue).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from data_shards.errors import ConfigError as ConfigError  # re-exported: every package raises this one
from data_shards.errors import MedfmError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DISTRIBUTED = 3
EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h: "try again later", what a requeued job does


class TrainingDiverged(MedfmError, RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


class DistributedFailure(MedfmError, RuntimeError):
    """A rendezvous that did not complete, or a peer that died or stopped answering."""


class ReleaseError(MedfmError, RuntimeError):
    """Weights that cannot be released or loaded as asked: no checkpoint, refused pickle, keys that do not match."""


class Preempted(MedfmError):
    """Raised by the training loop after the checkpoint of ``step`` is written (``checkpointed``), or after a stop
    that landed on a skipped step, when the newest checkpoint on disk is an older one."""

    def __init__(self, step: int, signal_name: str, checkpointed: bool = True):
        done = f"checkpoint written at step {step}" if checkpointed else f"no checkpoint at step {step} (skipped step)"
        super().__init__(f"{signal_name} received: {done}, exiting for requeue")
        self.step = step
        self.signal_name = signal_name
        self.checkpointed = checkpointed


def exit_code(err: BaseException) -> int | None:
    """The exit code of a known failure; None for anything else (a bug: let the traceback show)."""
    if isinstance(err, ConfigError):
        return EXIT_CONFIG
    if isinstance(err, DistributedFailure):
        return EXIT_DISTRIBUTED
    if isinstance(err, Preempted):
        return EXIT_REQUEUE
    if isinstance(err, (MedfmError, FileNotFoundError, ValueError)):  # diverged, release, shard, manifest ...
        return EXIT_FAILED
    return None


def run_command(command: str, body: Callable[[], object]) -> int:
    """Run a subcommand body; a known failure becomes ``medfm COMMAND: message`` on stderr and its exit code."""
    try:
        body()
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        print(f"medfm {command}: {err}", file=sys.stderr)
        return code
    return EXIT_OK
