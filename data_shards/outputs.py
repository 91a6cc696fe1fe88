"""Writing outputs safely: one writer per output folder, a full disk reported with what is intact, and temp files
cleaned up when a stop signal lands mid-write.

:func:`lock_folder`: an exclusive ``fcntl.flock`` on a lock file. The kernel drops a flock when its holder exits
in any way (SIGKILL and the OOM killer included), so a lock is never stale: a lock file left by a killed holder is
only a file, and the next writer takes it. The holder writes its pid, host and start time into the file,
and a second writer is refused with :class:`FolderInUse` naming them; the holder removes the file when it lets go.
A forked child (a reader or DataLoader worker) closes its copy of the lock at once (``os.register_at_fork``):
otherwise a worker outliving a killed holder by a few seconds would keep the folder locked.
Used on a pretraining run directory (``RUN_DIR/.medfm.lock``, taken by the main process only), a shard set's
``--out`` and a release folder (a sibling ``.NAME.lock``: the release folder itself is swapped whole).

Shared file systems: since Linux 2.6.12 an NFS client emulates flock with a whole-file NFS byte-range lock, which
other hosts see (NFSv4, or v3 with lockd). A mount without a lock manager answers ENOLCK: the lock is then not
held (``FolderLock.held`` False) and ``warning`` says that two writers are not prevented, for the caller to show.
A mount with ``local_lock=flock`` keeps locks on one host and cannot be detected from here.

:func:`is_disk_full` and :func:`disk_full`: ENOSPC / EDQUOT turned into one line saying what is intact.
:func:`interrupting_signals`: SIGTERM / SIGHUP raise inside a block (instead of killing the process on the spot)
so that its ``finally`` clauses remove temp files; the signal is then delivered again and ends the process as
it would have.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from medfm.data_shards.errors import DiskFull, FolderInUse

LOCK_NAME = ".medfm.lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds (closed in forked children)
# flock answers these where the file system cannot lock (NFS without lockd, some FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class FolderLock:
    """A held (or, where the file system cannot lock, an unheld) lock; ``release()`` or ``with`` lets go."""

    def __init__(self, path: Path, fd: int | None, warning: str | None = None):
        self.path, self.fd, self.warning = path, fd, warning
        self.owner = os.getpid()

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: a writer that opened the file meanwhile
        sees that it was removed and takes a new one; see :func:`lock_folder`)."""
        if self.fd is None or os.getpid() != self.owner:  # a forked child holds nothing (see _forget_in_child)
            return
        with contextlib.suppress(OSError):
            if _same_file(self.path, self.fd):
                os.unlink(self.path)
        _HELD.discard(self.fd)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_folder(folder: str | Path, what: str, lock_file: str | Path | None = None) -> FolderLock:
    """Take the exclusive lock of ``folder`` (``folder/.medfm.lock`` unless ``lock_file`` is given; its parent is
    created) for ``what`` (e.g. ``"medfm pretrain"``, for the message another writer gets).

    Raises :class:`FolderInUse` naming the folder and the holder's pid, host and start time."""
    folder = Path(folder)
    path = Path(lock_file) if lock_file is not None else folder / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return FolderLock(path, None, f"cannot lock {folder} on this platform: two writers are not prevented")
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(20):  # bounded: a file system whose inode numbers are not stable must not spin here
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # a read-only folder, a full disk: the writes that follow will say so
            return FolderLock(
                path, None, f"cannot create the lock file {path} ({err.strerror}): two writers are not prevented"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            os.close(fd)
            raise FolderInUse(
                f"{folder} is being written by another {what} ({holder}): wait for it to end, or write elsewhere"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKS:
                raise
            return FolderLock(
                path,
                None,
                f"cannot lock {folder} (the file system does not support flock: {err.strerror}): two writers are not prevented",
            )
        # A holder that let go between our open and our flock removed the file: we would hold the lock of a file
        # nobody else can see. Then take the lock of the file that is there now.
        if _same_file(path, fd) or attempt == 19:
            break
        os.close(fd)
    # No command line: its paths can name patients (see medfm.data_shards.writer), and the message goes to another user.
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    with contextlib.suppress(OSError):  # a full disk: the lock is held all the same, the message lacks details
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD.add(fd)
    return FolderLock(path, fd)


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock descriptors (the parent's lock stays held by the parent)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _same_file(path: Path, fd: int) -> bool:
    try:
        on_disk, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: its lock file is being written"


# --- a full disk ---------------------------------------------------------------------------------------------


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How writers that do not raise OSError say it: safetensors' Rust I/O error ("... (os error 28)").
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", *(f"os error {n})" for n in _DISK_FULL_ERRNOS))


def is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC (no space left on the device) or EDQUOT (quota exceeded), the same remedy: an ``OSError`` with that
    errno, or an error of a writer that reports it in its message, anywhere in the chain of causes."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return True
        if not isinstance(err, OSError) and any(text in str(err) for text in _DISK_FULL_TEXT):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def disk_full(what: str | Path, intact: str, then: str) -> DiskFull:
    """``disk full writing WHAT: INTACT; free space and THEN`` (one line)."""
    return DiskFull(f"disk full writing {what}: {intact}; free space and {then}")


# --- stop signals --------------------------------------------------------------------------------------------


class _Interrupted(BaseException):  # a BaseException: a signal on its way passes `except Exception`
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interrupting_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Inside the block, each of ``signums`` whose action is the default one (end the process on the spot) raises
    instead, so that the block's ``finally`` clauses run (temp files removed); on the way out the signal is raised
    again with its default action, and the process ends as the sender meant. A signal that has a handler (a
    training loop's stop request) is left to it. Main thread only (elsewhere: no effect)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted(signum)

    changed = [s for s in signums if signal.getsignal(s) == signal.SIG_DFL]
    for signum in changed:
        signal.signal(signum, interrupt)
    try:
        yield
    except _Interrupted as stop:
        _restore(changed)
        signal.raise_signal(stop.signum)  # the default action: the process ends here
        raise SystemExit(128 + stop.signum) from None  # only if the action changed meanwhile
    finally:
        _restore(changed)


def _restore(signums: list[int]) -> None:
    for signum in signums:
        signal.signal(signum, signal.SIG_DFL)
