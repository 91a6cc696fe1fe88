"""What a pretraining or evaluation command can fail with (a leaf module: no torch; only ``medfm.data_shards.errors``,
where ``MedfmError``, the exit codes and the one map from failures to them live, re-exported here).

Each error class carries its exit code: 0 done, 1 diverged or a file / input / weights problem (the message names
the file and keys), 2 bad config (the message names the key), 3 distributed failure (a peer died or hung, or the
rendezvous did not complete), 75 checkpointed on a stop signal (requeue). ``run_command`` turns them into one line
on stderr and that code; an exception that is not a ``MedfmError`` (nor an ``OSError`` naming a file) is a bug and
keeps its traceback.
"""

from __future__ import annotations

from medfm.data_shards.errors import EXIT_CONFIG as EXIT_CONFIG  # re-exported: the codes and the map live in the leaf
from medfm.data_shards.errors import EXIT_DISTRIBUTED, EXIT_REQUEUE, MedfmError
from medfm.data_shards.errors import EXIT_FAILED as EXIT_FAILED
from medfm.data_shards.errors import EXIT_OK as EXIT_OK
from medfm.data_shards.errors import ConfigError as ConfigError  # re-exported: every package raises this one
from medfm.data_shards.errors import InputError as InputError
from medfm.data_shards.errors import MissingInputError as MissingInputError
from medfm.data_shards.errors import exit_code as exit_code
from medfm.data_shards.errors import run_command as run_command


class TrainingDiverged(MedfmError, RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


class DistributedFailure(MedfmError, RuntimeError):
    """A rendezvous that did not complete, or a peer that died or stopped answering."""

    exit_code = EXIT_DISTRIBUTED


class ReleaseError(MedfmError, RuntimeError):
    """Weights that cannot be released or loaded as asked: no checkpoint, refused pickle, keys that do not match."""


class Preempted(MedfmError):
    """Raised by the training loop after the checkpoint of ``step`` is written (``checkpointed``), or after a stop
    that landed on a skipped step, when the newest checkpoint on disk is an older one."""

    exit_code = EXIT_REQUEUE

    def __init__(self, step: int, signal_name: str, checkpointed: bool = True):
        done = f"checkpoint written at step {step}" if checkpointed else f"no checkpoint at step {step} (skipped step)"
        super().__init__(f"{signal_name} received: {done}, exiting for requeue")
        self.step = step
        self.signal_name = signal_name
        self.checkpointed = checkpointed


class ExportError(ReleaseError):
    """A run that cannot be released: no checkpoint, a checkpoint that does not match its config, bad keys."""
