"""The base class of every failure medfm raises on purpose, and the one map from failures to exit codes (a leaf
module: only the standard library).

It lives in the lowest layer so that each package's own errors (``data_shards``: ``ShardError``,
``ManifestError``, ``MergeError``; ``medfm.pretrain.errors``: ``ConfigError``, ``TrainingDiverged``, ...) derive from
it, every subcommand (``medfm shard`` included) reports through :func:`run_command`, and a Python caller can
catch ``medfm.MedfmError`` around any call of the API.

The contract: a :class:`MedfmError` is a failure medfm recognised; its message names the file, key or step, and
its class carries the exit code. An ``OSError`` that names a file (permission denied on an output folder, a
file removed while it was read) is the operating system's answer about that file and exits 1 with that line too.
Anything else (a plain ``ValueError``, ``KeyError``, ``TypeError`` ...) is a bug in medfm and ends in its
traceback, so that it is reported instead of passing as a user's mistake.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import ClassVar

EXIT_OK = 0
EXIT_FAILED = 1  # an input, a file, weights or a run that cannot go on (the message names which)
EXIT_CONFIG = 2  # a config key or option (the message names the key)
EXIT_DISTRIBUTED = 3  # a peer died or hung, or the rendezvous did not complete
EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h: "try again later", what a requeued job does


class MedfmError(Exception):
    """A failure medfm reports with a message naming the file, key or step; anything else is a bug."""

    exit_code: ClassVar[int] = EXIT_FAILED

    def __init__(self, *args: object):
        # A DataLoader worker's exception comes back to the main process as ``type(err)(text)``, the text holding
        # the worker's traceback: keep the one line medfm wrote, the traceback's last line without its class name.
        if len(args) == 1 and isinstance(args[0], str) and "Original Traceback" in args[0]:
            last = args[0].rstrip().splitlines()[-1]
            args = (last.split(": ", 1)[1] if ": " in last else last,)
        super().__init__(*args)


class ConfigError(MedfmError, ValueError):
    """A config or option that cannot be run: unknown key, wrong type, missing or inconsistent value (the message
    names it). Exit code 2."""

    exit_code: ClassVar[int] = EXIT_CONFIG


class ShardError(MedfmError):
    """A problem with a shard run's output folder or the run as a whole (not with a single input)."""


class InputError(MedfmError, ValueError):
    """An input medfm cannot use as it is: a file's content, a dataset spec, a model that does not fit the method
    (the message names it). A ``ValueError`` too, for callers that caught one before."""


class MissingInputError(MedfmError, FileNotFoundError):
    """A file or folder medfm was pointed at that does not exist (the message names it)."""


class DiskFull(MedfmError):
    """No space left (or the quota exceeded) while writing an output; the message names the file, what is intact
    and how to continue. Nothing partial is left behind (``medfm.data_shards.outputs``)."""


class FolderInUse(MedfmError):
    """An output folder that another medfm process is writing (it holds the folder's lock); the message names
    the folder and the holder's pid and host (``medfm.data_shards.outputs.lock_folder``)."""


def exit_code(err: BaseException) -> int | None:
    """The exit code of a known failure; None for anything else (a bug: let the traceback show)."""
    if isinstance(err, MedfmError):
        return err.exit_code
    if isinstance(err, OSError) and err.filename is not None:  # the OS refused a named file: the line names it
        return EXIT_FAILED
    return None


def run_command(command: str, body: Callable[[], object]) -> int:
    """Run a subcommand body (its return value is not an exit code); a known failure becomes
    ``medfm COMMAND: message`` on stderr and its exit code."""
    try:
        body()
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        print(f"medfm {command}: {err}", file=sys.stderr)
        return code
    return EXIT_OK
