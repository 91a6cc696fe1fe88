"""The ``medfm pretrain`` supervisor: turns an NCCL watchdog abort into exit 3 and a ``distributed_failure`` event.

Why: NCCL collectives are asynchronous. When a peer dies or hangs, the surviving process's Python thread blocks in
its next host sync (``.item()``, a barrier) and never sees an exception; torch's NCCL watchdog thread notices the
failed or timed-out collective (``dist.timeout_s``), logs it and takes the process down with ``std::abort``
(SIGABRT: returncode -6, or 134 through a shell). medfm's own handling (``medfm.pretrain.distributed.as_collective_failure``:
a message naming the failure, the event in ``metrics.jsonl``, exit 3) never runs. Gloo raises in Python instead,
which is why the CPU tests never showed this.

What: ``medfm pretrain`` runs the training as a child process (``python -m medfm.pretrain.main ARGS``, same environment
plus ``MEDFM_SUPERVISED=1`` so that it does not supervise again) and

- forwards SIGTERM, SIGINT, SIGUSR1, SIGUSR2 and SIGCONT to it (the child has its own process group, so a signal
  sent to the group of the supervisor, e.g. Ctrl-C in a terminal, reaches it once, through the supervisor; a
  launcher that signals every process, like Slurm's cgroup tracking, may deliver a stop signal twice, which
  ``medfm.pretrain.preemption.StopRequest`` treats as once); the child is SIGKILLed if the supervisor dies (Linux
  ``PR_SET_PDEATHSIG``), so a launcher that kills the supervisor never leaves a training process behind;
- passes stdout through untouched (the child writes to the same file) and stderr through as it comes (progress
  bars included), scanning it line by line and keeping a bounded tail (:data:`TAIL_LINES`);
- when the child dies of SIGABRT and its stderr shows an NCCL watchdog / collective failure
  (:data:`SIGNATURES`, the texts of torch 2.4-2.14's ``ProcessGroupNCCL.cpp``), prints one line naming the
  collective, its sequence number and timeout and the rank, appends ``{"event": "distributed_failure", ...}`` to
  ``RUN_DIR/metrics.jsonl`` (global rank 0 only, and only if the child did not write one itself) and exits
  :data:`medfm.pretrain.errors.EXIT_DISTRIBUTED` (3). Every other exit passes through unchanged (75 preempted, 0, 1,
  2; a child killed by signal N gives 128 + N, as a shell reports it).

When: by default (``MEDFM_SUPERVISE`` unset or ``auto``) under a multi-process launch (``WORLD_SIZE`` > 1) on a
machine with a GPU driver (``/proc/driver/nvidia/version``, or ``/dev/kfd`` for ROCm's RCCL, which shares
ProcessGroupNCCL), i.e. exactly where NCCL is the backend: there a user who launches N processes would otherwise get
exit 134 and no event, and a flag that one has to know about would be missing on the day it matters. Not on CPU
(gloo raises in Python and medfm handles it; an extra process would add nothing). ``MEDFM_SUPERVISE=0`` opts out
(attach a debugger or profiler to the training process directly, or a launcher that manages signals itself);
``MEDFM_SUPERVISE=1`` forces it (``slurm/pretrain.sbatch`` sets it, and the CPU tests). ``accelerate launch -m
medfm.pretrain.main`` starts the training module directly and is not supervised. ``MEDFM_SUPERVISE_CHILD`` replaces the
child's command (shell words, the arguments follow), e.g. ``nsys profile python -m medfm.pretrain.main``; the tests use
it for a fake child.

Which run directory: the child names it by calling :func:`report_run_dir` (one line in ``medfm.pretrain.main``, once the
config is loaded), which writes it to the file named by ``MEDFM_SUPERVISOR_RUN_DIR_FILE``; until then, or if the
child died first, the last ``train.run_dir=`` override, else ``train.run_dir`` in the config file.

Exit records (``slurm/pretrain.sbatch``): with ``MEDFM_EXIT_RECORD_DIR`` set, ``medfm pretrain`` writes its exit code
to ``DIR/rank-RANK``, supervised or not. srun's own status cannot tell a preempted job from a crashed one (with
``--kill-on-bad-exit`` the first task to exit 75 gets the others SIGKILLed and srun returns 137); a record of 75
can: a task exits 75 only after the checkpoint is written and every rank passed the barrier that follows it.

What only a GPU can show: the exact text torch writes on a given version (the patterns here are taken from torch's
source and from published logs of 2.4-2.9 and main, and the CPU tests replay such lines), and the timing: how long
after a peer's death the watchdog aborts (the collective timeout, ``dist.timeout_s``, for a hang; sooner for an
``ncclRemoteError``; recent torch also waits for the flight-recorder dump, up to a minute, before it aborts).

Keep this module light: no torch (it runs before, and instead of, the heavy imports).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from medfm.pretrain.errors import EXIT_DISTRIBUTED, EXIT_FAILED

SUPERVISE = "MEDFM_SUPERVISE"  # auto (default) | 1 | 0
SUPERVISED = "MEDFM_SUPERVISED"  # set in the child's environment: do not supervise again
CHILD = "MEDFM_SUPERVISE_CHILD"  # the child's command (shell words); default: python -m medfm.pretrain.main
RUN_DIR_FILE = "MEDFM_SUPERVISOR_RUN_DIR_FILE"  # where the child writes its resolved run directory
EXIT_RECORD_DIR = "MEDFM_EXIT_RECORD_DIR"  # where each task writes its exit code (slurm/pretrain.sbatch)

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)
TAIL_LINES = 200  # stderr lines kept (the watchdog's lines come shortly before the abort's C++ trace)
MAX_LINE = 4000  # characters kept of one line; a longer run without a newline is cut into lines this long

# Lines torch (ProcessGroupNCCL.cpp, 2.4-2.14) and NCCL write when a collective fails or times out. Any of them
# in the stderr of a process that died of SIGABRT means the watchdog took it down.
SIGNATURES = (
    "Watchdog caught collective operation timeout",  # WorkNCCL::checkTimeout
    "failure detected by watchdog at work sequence id",  # the watchdog loop, >= 2.4
    "raised the following async exception",  # WorkNCCL::checkAndSetException: ncclRemoteError & co.
    "Some NCCL operations have failed or timed out",  # WorkNCCL::handleException
    "watchdog thread terminated with exception",  # the watchdog thread's exit
    "watchdog got stuck for",  # the heartbeat monitor (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC)
    "NCCL communicator encountered error",
    "ncclRemoteError",
    "ncclSystemError",
    "NCCL error",
)
# An error-level glog line from ProcessGroupNCCL.cpp, e.g. "[rank1]:[E1118 20:32:23.957 ProcessGroupNCCL.cpp:681]".
_PG_ERROR_LINE = re.compile(r"\[E\d{3,4} [^\]]*ProcessGroupNCCL\.cpp:\d+\]")
_GLOBAL_RANK = re.compile(r"\[rank(\d+)\]:")
_PG_RANK = re.compile(r"\[(?:PG ID \S+ PG GUID \S+(?: ?\([^)]*\))? )?Rank (\d+)\]")
_SEQ = re.compile(r"SeqNum=(\d+)")
_OP = re.compile(r"OpType=(\w+)")
_TIMEOUT = re.compile(r"Timeout\(ms\)=(\d+)")
_RAN_FOR = re.compile(r"ran for (\d+) milliseconds")
_WORK_SEQ = re.compile(r"failure detected by watchdog at work sequence id: (\d+)")
_GLOG_PREFIX = re.compile(r"^(?:\[rank\d+\]:)?\[[EWIF]\d{3,4} [^\]]*\]\s*")


@dataclass
class WatchdogFailure:
    """What torch's lines say about the failed collective (None where they do not say)."""

    cause: str  # the most telling line torch wrote (timeout > async error > any other signature), log prefix cut
    timed_out: bool = False  # the watchdog's timeout (dist.timeout_s), not an error NCCL reported
    collective: str | None = None  # OpType, e.g. ALLREDUCE
    seq: int | None = None  # the collective's sequence number in its process group
    timeout_ms: int | None = None
    ran_ms: int | None = None
    rank: int | None = None  # the global rank torch names ([rankN]:), else the process group's rank
    nccl_warning: str | None = None  # NCCL's own first WARN line, which may name the peer (host / address)


class StderrScanner:
    """Splits a byte stream into lines (at \\n and \\r), keeps the last :data:`TAIL_LINES` and what the NCCL
    signatures among them say. Memory stays bounded whatever the child writes."""

    def __init__(self, tail_lines: int = TAIL_LINES):
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._partial = b""
        self._lines: list[str] = []  # signature lines, first ones only (bounded)
        self._timeout: str | None = None
        self._async: str | None = None
        self._seq: int | None = None
        self._nccl_warning: str | None = None

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *lines, self._partial = re.split(rb"[\r\n]", data)
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            if raw:
                self._line(raw.decode("utf-8", "replace")[:MAX_LINE])

    def close(self) -> None:
        if self._partial:
            self._line(self._partial.decode("utf-8", "replace")[:MAX_LINE])
            self._partial = b""

    def _line(self, line: str) -> None:
        self.tail.append(line)
        if "NCCL WARN" in line and self._nccl_warning is None:
            self._nccl_warning = line.strip()
        if not (any(s in line for s in SIGNATURES) or _PG_ERROR_LINE.search(line)):
            return
        if len(self._lines) < 32:
            self._lines.append(line)
        if self._timeout is None and "Watchdog caught collective operation timeout" in line:
            self._timeout = line
        if self._async is None and "raised the following async exception" in line:
            self._async = line
        if self._seq is None and (found := _WORK_SEQ.search(line)):
            self._seq = int(found.group(1))

    def failure(self) -> WatchdogFailure | None:
        """The NCCL failure the stderr shows, or None."""
        if not self._lines:
            return None
        line = self._timeout or self._async or self._lines[0]
        seq, op, timeout, ran = (_SEQ.search(line), _OP.search(line), _TIMEOUT.search(line), _RAN_FOR.search(line))
        rank = next((m for m in (_GLOBAL_RANK.search(line), _PG_RANK.search(line)) if m), None)
        if rank is None:
            rank = next((m for m in map(_GLOBAL_RANK.search, self._lines) if m), None)
        return WatchdogFailure(
            cause=_GLOG_PREFIX.sub("", line).strip(),
            timed_out=line is self._timeout,
            collective=op.group(1) if op else None,
            seq=int(seq.group(1)) if seq else self._seq,
            timeout_ms=int(timeout.group(1)) if timeout else None,
            ran_ms=int(ran.group(1)) if ran else None,
            rank=int(rank.group(1)) if rank else None,
            nccl_warning=self._nccl_warning,
        )


# --- when ------------------------------------------------------------------------------------------------------


def has_gpu_driver() -> bool:
    """An NVIDIA (or ROCm) driver is loaded and GPUs are not hidden: NCCL (or RCCL) will be the backend."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/kfd").exists()


def should_supervise(environ: Mapping[str, str] = os.environ, gpu: Callable[[], bool] = has_gpu_driver) -> bool:
    """``MEDFM_SUPERVISE``: 1 forces, 0 opts out; ``auto`` (default): several processes on a GPU machine."""
    if environ.get(SUPERVISED) == "1":
        return False
    mode = environ.get(SUPERVISE, "auto").strip().lower()
    if mode in ("1", "true", "yes", "on"):
        return True
    if mode in ("0", "false", "no", "off"):
        return False
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    return world > 1 and gpu()


# --- the child's side --------------------------------------------------------------------------------------------


def report_run_dir(run_dir: str | os.PathLike[str], environ: Mapping[str, str] = os.environ) -> None:
    """Called by the training process once its config is loaded: tells the supervisor (if any) its run directory."""
    target = environ.get(RUN_DIR_FILE)
    if not target:
        return
    with contextlib.suppress(OSError):  # the supervisor falls back to the command line; never fail a run for this
        Path(target).write_text(str(Path(run_dir).resolve()))


# --- exit records ------------------------------------------------------------------------------------------------


def record_exit(code: int, environ: Mapping[str, str] = os.environ) -> None:
    """With ``MEDFM_EXIT_RECORD_DIR`` set: write ``code`` to ``DIR/rank-RANK`` (atomically)."""
    folder = environ.get(EXIT_RECORD_DIR)
    if not folder:
        return
    path = Path(folder) / f"rank-{environ.get('RANK', '0')}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{code}\n")
        os.replace(tmp, path)
    except OSError as err:
        print(f"medfm pretrain: warning: cannot record the exit code in {path}: {err}", file=sys.stderr)


# --- the supervisor ----------------------------------------------------------------------------------------------


def child_command(environ: Mapping[str, str] = os.environ) -> list[str]:
    """``MEDFM_SUPERVISE_CHILD`` (shell words) or ``python -m medfm.pretrain.main``; the arguments are appended."""
    custom = environ.get(CHILD, "").strip()
    return shlex.split(custom) if custom else [sys.executable, "-m", "medfm.pretrain.main"]


def _child_setup(parent: int) -> Callable[[], None]:
    """In the child before exec: its own process group, and SIGKILL when the supervisor dies (Linux)."""
    try:  # resolved here, before the fork: the forked child only calls it
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the launcher has to kill the training process itself
        prctl = None

    def setup() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the supervisor died before prctl took effect
                os._exit(EXIT_FAILED)

    return setup


def supervise(
    args: Sequence[str],
    command: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run ``command + args`` (default :func:`child_command`) supervised; returns the exit code to end with."""
    environ = dict(os.environ if environ is None else environ)
    command = list(command) if command is not None else child_command(environ)
    rank = _int(environ.get("RANK"), 0)
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)
        elif child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        with tempfile.TemporaryDirectory(prefix="medfm-supervise-") as tmp:
            run_dir_file = Path(tmp) / "run_dir"
            child_env = {**environ, SUPERVISED: "1", RUN_DIR_FILE: str(run_dir_file)}
            # NCCL writes its NCCL_DEBUG lines (the WARN that may name the failed peer) to stdout unless told
            # otherwise: to stderr, where the scanner reads them.
            child_env.setdefault("NCCL_DEBUG_FILE", "/dev/stderr")
            child_env.pop(EXIT_RECORD_DIR, None)  # the supervisor records the task's exit, not the child
            started = time.time()
            child = subprocess.Popen(
                [*command, *args], env=child_env, stderr=subprocess.PIPE, preexec_fn=_child_setup(os.getpid())
            )
            for signum in pending:
                os.kill(child.pid, signum)
            scanner = pass_stderr(child, sys.stderr)
            returncode = child.wait()
            run_dir = run_dir_file.read_text().strip() if run_dir_file.is_file() else run_dir_from_args(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failure = scanner.failure() if returncode in (-signal.SIGABRT, 128 + signal.SIGABRT) else None
    if failure is None:
        return returncode if returncode >= 0 else 128 - returncode
    message = failure_message(failure, rank, run_dir)
    print(f"medfm pretrain: {message}", file=sys.stderr, flush=True)
    if rank == 0 and run_dir:
        append_event(Path(run_dir), failure, rank, message, since=started)
    return EXIT_DISTRIBUTED


def pass_stderr(child: subprocess.Popen[bytes], out, linger_s: float = 2.0) -> StderrScanner:
    """Copy the child's stderr to ``out`` as it comes, scanning it; returns at EOF, or ``linger_s`` after the child
    exited (a process it started, a loader worker or a tracker's service, may hold the pipe open much longer)."""
    scanner = StderrScanner()
    target = getattr(out, "buffer", None)
    fd = child.stderr.fileno()
    deadline = None
    while True:
        if deadline is None and child.poll() is not None:
            deadline = time.monotonic() + linger_s
        wait = 0.5 if deadline is None else deadline - time.monotonic()
        if wait < 0:
            break
        if not select.select([fd], [], [], wait)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        scanner.feed(chunk)
        try:
            if target is not None:
                target.write(chunk)
            else:
                out.write(chunk.decode("utf-8", "replace"))
            out.flush()
        except (OSError, ValueError):  # our stderr is gone: keep draining the pipe so that the child never blocks
            pass
    child.stderr.close()
    scanner.close()
    return scanner


def failure_message(failure: WatchdogFailure, rank: int, run_dir: str | None) -> str:
    """One line naming what failed, in the words of ``medfm.pretrain.distributed.failure_message``."""
    who = f"rank {failure.rank if failure.rank is not None else rank}"
    what = f"collective {failure.collective}" if failure.collective else "a collective"
    details = [f"SeqNum={failure.seq}"] if failure.seq is not None else []
    if failure.timeout_ms is not None:
        details.append(f"timeout {failure.timeout_ms / 1000:g} s")
    what += f" ({', '.join(details)})" if details else ""
    how = "did not complete within its timeout" if failure.timed_out else "failed"
    resume = f" Relaunching resumes from the last checkpoint in {run_dir}." if run_dir else ""
    peer = f" NCCL: {failure.nccl_warning}." if failure.nccl_warning else ""
    return (
        f"distributed failure on {who}: {what} {how} and the NCCL watchdog aborted the process: another process "
        f"died, was killed or stopped answering (see its log for the first error).{resume}{peer} "
        f"Cause: {failure.cause}"
    )


def append_event(run_dir: Path, failure: WatchdogFailure, rank: int, message: str, since: float) -> None:
    """Append the ``distributed_failure`` event to ``run_dir/metrics.jsonl``, unless the child wrote one itself
    after ``since`` (it caught the error in Python before the watchdog aborted it)."""
    path = run_dir / "metrics.jsonl"
    if any(e.get("event") == "distributed_failure" and e.get("time", 0) >= since for e in _tail_events(path)):
        return
    event = {
        "time": round(time.time(), 3),
        "event": "distributed_failure",
        "message": message,
        "rank": failure.rank if failure.rank is not None else rank,
        "collective": failure.collective,
        "seq": failure.seq,
        "timeout_ms": failure.timeout_ms,
        "timed_out": failure.timed_out,
        "ran_ms": failure.ran_ms,
        "cause": failure.cause,
        "detected_by": "supervisor",
    }
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as file:
            file.write(json.dumps(event) + "\n")
    except OSError as err:
        print(f"medfm pretrain: warning: cannot write the event to {path}: {err}", file=sys.stderr)


def _tail_events(path: Path, size: int = 65536) -> Iterable[dict]:
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - size))
            lines = file.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            events.append(record)
    return events


def run_dir_from_args(args: Sequence[str]) -> str | None:
    """The run directory the command line names: the last ``train.run_dir=`` override, else the config file's."""
    overrides = [a.split("=", 1)[1] for a in args if a.startswith("train.run_dir=")]
    if overrides:
        return overrides[-1]
    config = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"), None)
    config = config or next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if config is None:
        return None
    import yaml  # PyYAML, which omegaconf needs anyway; no torch

    try:
        value = (yaml.safe_load(Path(config).read_text()) or {}).get("train", {}).get("run_dir")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return str(value) if isinstance(value, str) and value and "${" not in value else None


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


# --- the command ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, train: Callable[[], int]) -> int:
    """The ``medfm pretrain`` wrapper (``medfm.pretrain.cli``; ``train`` runs its handler, ``medfm.pretrain.main.run``, in this
    process): supervised (see the module docstring) or not; the exit code is recorded when
    ``MEDFM_EXIT_RECORD_DIR`` is set. This module never imports ``medfm.pretrain.main``, which imports it."""
    if should_supervise():
        code = supervise(["--config", args.config, *args.overrides])
    else:
        try:
            code = train()
        except BaseException:
            record_exit(EXIT_FAILED)
            raise
    record_exit(code)
    return code
