"""The base class of every failure medfm raises on purpose (a leaf module: nothing imported).

It lives in the lowest layer so that each package's own errors (``data_shards``: ``ShardError``,
``ManifestError``, ``MergeError``; ``pretrain.errors``: ``ConfigError``, ``TrainingDiverged``, ...) derive from
it, and a Python caller can catch ``medfm.MedfmError`` around any call of the API.
"""

from __future__ import annotations


class MedfmError(Exception):
    """A failure medfm reports with a message naming the file, key or step; anything else is a bug."""


class ConfigError(MedfmError, ValueError):
    """A config or option that cannot be run: unknown key, wrong type, missing or inconsistent value (the message
    names it). Re-exported by ``pretrain.errors``, whose commands map it to exit code 2."""


class ShardError(MedfmError):
    """A problem with a shard run's output folder or the run as a whole (not with a single input)."""
