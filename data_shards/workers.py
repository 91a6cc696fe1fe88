"""The reading side of ``medfm shard``: what a reader process is told (:class:`ShardConfig`), how it reads and encodes
one input (:func:`read_unit`, in the process, under an alarm), what it returns, and the pool of reader processes
(:class:`ReaderPool`): set up so that they die with the command and, when asked, fail a huge allocation with
MemoryError instead of waking the OOM killer; a watchdog kills a reader stuck where its alarm cannot reach it."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfm.data_shards.codec import CODECS, content_hash, encode_pixels, perceptual_hash
from medfm.data_shards.errors import ConfigError
from medfm.data_shards.records import ALLOWED_META_KEYS, InputUnit, ReadOptions, SkipInput, SkippedPart

DEDUP_MODES = ("none", "exact", "near")


@dataclass(frozen=True)
class ShardConfig:
    """Options of one ``medfm shard`` run; saved in the manifest and checked on ``--resume``."""

    max_count: int = 2000  # samples per shard
    max_bytes: int = 256 * 1024**2  # bytes per shard (a single larger sample gets a shard of its own)
    codec: str = "npy"  # npy (raw, fastest to read) | png (smaller); both lossless, see codec.encode_pixels
    dedup: str = "exact"  # none | exact (content hash) | near (exact + perceptual hash)
    near_threshold: int = 4  # max Hamming distance (of 64 bits) between perceptual hashes of near-duplicates
    hash_paths: bool = False  # store a salted hash of each source path instead of the path itself
    path_salt: str = ""
    read: ReadOptions = field(default_factory=ReadOptions)
    unit_timeout_s: int = 900  # an input still being read after this long is skipped ("timed out")
    max_memory_gb: float | None = None  # address-space limit per reader process: MemoryError, i.e. a skip

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.dedup not in DEDUP_MODES:
            raise ConfigError(f"dedup must be one of {DEDUP_MODES}, got {self.dedup!r}")
        if self.max_count < 1 or self.max_bytes < 1:
            raise ConfigError("max_count and max_bytes must be positive")


@dataclass
class EncodedSample:
    extension: str
    data: bytes
    meta: dict[str, Any]
    label: Any
    sha256: str
    phash: int | None


@dataclass
class UnitResult:
    index: int
    samples: list[EncodedSample]
    skip_reason: str | None = None
    parts_skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of unreadable slices


class UnitTimeout(Exception):
    """Raised inside a reader by the alarm of ``ShardConfig.unit_timeout_s``."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise UnitTimeout in the block after ``seconds`` (SIGALRM; main thread of a process only, else no limit)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise UnitTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _StuckReader(Exception):
    """The oldest input in flight outlived the watchdog; its pool's processes were killed."""


def _result_or_kill(future: Future, pool: ProcessPoolExecutor, timeout_s: float | None) -> UnitResult:
    """``future.result()``, or, past ``timeout_s``, kill the pool's reader processes and raise _StuckReader."""
    try:
        return future.result(timeout=timeout_s)
    except FuturesTimeout:
        # ProcessPoolExecutor has no public way to stop a running task before Python 3.14 (kill_workers)
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        raise _StuckReader from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    return value


def read_unit(index: int, unit: InputUnit, config: ShardConfig, skip_records: int = 0) -> UnitResult:
    """Read and encode one unit (runs in a worker process). Never raises for a bad input."""
    samples: list[EncodedSample] = []
    parts: list[tuple[str, str]] = []
    position = -1
    try:
        with time_limit(config.unit_timeout_s):
            for item in unit.read(config.read):
                if isinstance(item, SkippedPart):
                    parts.append((item.source, item.reason))
                    continue
                position += 1
                if position < skip_records:
                    continue
                samples.append(_encode(item, config))
    except SkipInput as skip:
        return UnitResult(index, [], skip.reason)
    except UnitTimeout:
        return UnitResult(index, [], f"timed out: still reading after {config.unit_timeout_s} s")
    except MemoryError:
        return UnitResult(index, [], "out of memory while reading (over the reader's memory budget)")
    except Exception as error:  # an unexpected failure on one input must not end a long run
        return UnitResult(index, [], f"unexpected error while reading: {type(error).__name__}: {error}")
    if not samples and skip_records == 0:
        return UnitResult(index, [], "no image left (all slices near-empty)", parts)
    return UnitResult(index, samples, None, parts if skip_records == 0 else [])


def _encode(image: Any, config: ShardConfig) -> EncodedSample:
    """Encode one image and keep only its allowlisted metadata (runs in the reader process)."""
    extension, data = encode_pixels(image.pixels, config.codec)
    meta = {k: _jsonable(v) for k, v in image.meta.items() if k in ALLOWED_META_KEYS}
    if config.hash_paths and "source" in meta:
        meta["source"] = hash_path(meta["source"], config.path_salt)
    near = perceptual_hash(image.pixels) if config.dedup == "near" else None
    return EncodedSample(extension, data, meta, _jsonable(image.label), content_hash(image.pixels), near)


def hash_path(path: str, salt: str) -> str:
    return "sha256:" + hashlib.sha256((salt + path).encode()).hexdigest()[:24]


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


class ReaderPool:
    """The reader processes of one run: ``workers`` of them (at least one), a watchdog on the oldest input in
    flight, and a dead or stuck reader costing one input, not the run."""

    def __init__(self, config: ShardConfig, workers: int):
        self.config, self.workers = config, workers

    def results(
        self, units: Iterator[tuple[int, InputUnit, str]], start_record: int = 0
    ) -> Iterator[tuple[UnitResult, InputUnit, str]]:
        """(result, unit, SOURCE argument) for ``units`` (``(index, unit, SOURCE argument)``, streamed from the plan
        file), in their order, read by a pool of reader processes with a bounded number in flight; the first unit's
        first ``start_record`` records are already written (a resumed run).

        Always in child processes, even for one worker: a reader that dies (OOM killer, codec segfault) or hangs
        inside a decoder's C code, where the SIGALRM of ``time_limit`` cannot reach it, costs one input, not the run.
        """
        jobs = ((index, unit, origin, start_record if n == 0 else 0) for n, (index, unit, origin) in enumerate(units))
        in_flight: deque[tuple] = deque()  # submitted to the current pool, oldest first
        while True:
            try:
                yield from self._pooled(jobs, in_flight)
                return
            except _StuckReader:  # its process was killed: the input is skipped, the others are read again
                job = in_flight.popleft()
                yield UnitResult(job[0], [], self._stuck_reason()), job[1], job[2]
            except BrokenProcessPool:
                # A reader process died (the OOM killer, a segfault in a codec): the oldest unit in flight or one
                # read with it. Read it alone; if that kills its process too, it is the culprit: skip it.
                job = in_flight.popleft()
                yield self._isolated(job), job[1], job[2]

    def _watchdog_s(self) -> float | None:
        """How long the parent waits for the oldest input in flight before killing its reader: the reader's own
        alarm (``unit_timeout_s``) plus a grace for the alarm to be handled; None when there is no time limit."""
        timeout = self.config.unit_timeout_s
        return timeout + min(30, timeout) if timeout > 0 else None

    def _stuck_reason(self) -> str:
        return (
            f"timed out: the reader was still busy after {self._watchdog_s():.0f} s, stuck where its alarm cannot "
            "interrupt it (inside a decoder's C code), and was killed"
        )

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=workers, initializer=init_worker, initargs=(os.getpid(), self.config.max_memory_gb)
        )

    def _pooled(self, jobs: Iterator[tuple], in_flight: deque[tuple]) -> Iterator[tuple[UnitResult, InputUnit, str]]:
        """Read ``in_flight`` (survivors of a broken pool) and then ``jobs`` in a new pool, in order."""
        window = max(self.workers, 1) * 4
        with self._pool(max(self.workers, 1)) as pool:
            futures = deque(self._submit(pool, job) for job in in_flight)
            while True:
                while len(in_flight) < window and (job := next(jobs, None)) is not None:
                    in_flight.append(job)
                    futures.append(self._submit(pool, job))
                if not in_flight:
                    return
                # every earlier input is done, so the oldest has been running at least since now: the wait
                # bounds its reading time
                result = _result_or_kill(futures[0], pool, self._watchdog_s())
                futures.popleft()
                job = in_flight.popleft()
                yield result, job[1], job[2]

    def _submit(self, pool: ProcessPoolExecutor, job: tuple) -> Future:
        index, unit, _, skip_records = job
        return pool.submit(read_unit, index, unit, self.config, skip_records)

    def _isolated(self, job: tuple) -> UnitResult:
        try:
            with self._pool(1) as pool:
                return _result_or_kill(self._submit(pool, job), pool, self._watchdog_s())
        except BrokenProcessPool:
            return UnitResult(job[0], [], "the reader process died while reading it (killed, e.g. out of memory)")
        except _StuckReader:
            return UnitResult(job[0], [], self._stuck_reason())
