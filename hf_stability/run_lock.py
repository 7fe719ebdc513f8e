"""One training run per output directory: a lock taken when training begins, on the main process.

Two runs started into one ``output_dir`` at once (a job requeued while its first copy still runs) would
interleave their events, overwrite each other's checkpoints and look like one run in the report. The main
process therefore holds an exclusive `fcntl.flock` on ``<output_dir>/_hf_stability.lock`` from the start of
training to its end; the file names the owner (host, pid, start time) for the refusal message. A second run
into the directory stops at once with `OutputDirInUseError`, before it touches any file there.

The lock belongs to the process, not to the file: the kernel drops it when the process dies, however it dies
(``kill -9`` included), so a resume after a crash takes it over (with a warning naming the dead owner) and no
stale lock ever blocks a run. On NFS the lock is an NFS lock (Linux maps `flock` onto it). Where the file
system has no locks at all, training goes on with a warning that a second run would not be detected.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from hf_stability._logging import get_logger

logger = get_logger(__name__)

LOCK_FILENAME = "_hf_stability.lock"  # "_*": never uploaded by Trainer's push to the Hub during training

# Output directories (resolved) whose lock this process holds -> the open lock file descriptor.
_HELD: dict[Path, int] = {}


class OutputDirInUseError(RuntimeError):
    """Another live training run holds the output directory."""


def _owner(fd: int) -> str:
    """The owner recorded in an open lock file, in words."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"host {record['host']}, pid {record['pid']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner not recorded"


def acquire_run_lock(output_dir: str | os.PathLike) -> None:
    """Take ``output_dir``'s run lock for this process, or raise `OutputDirInUseError` naming its owner.

    Taking it again from the process that holds it is a no-op (a second ``train()`` call).
    """
    directory = Path(output_dir).resolve()
    if directory in _HELD:
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILENAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise OutputDirInUseError(
                f"{directory} is in use by another training run ({owner}; lock {path}): refusing to start a second "
                "run into it, as their events and checkpoints would mix. Wait for it to end or use another output_dir."
            ) from None
        except OSError as error:  # no locks on this file system (e.g. NFS without a lock service)
            os.close(fd)
            logger.warning("Could not lock %s (%s): a second run into %s would not be detected.", path, error,
                           directory)
            return
        # The previous holder removes the file when it ends: if it did after our open, lock the file there now.
        try:
            current = os.stat(path)
            opened = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    previous = _owner(fd)
    if os.fstat(fd).st_size:  # a holder that ended normally removes the file: this one died
        logger.warning("Taking over the run lock of %s, which ended without releasing it (killed?).", previous)
    _HELD[directory] = fd
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}).encode("utf-8")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except OSError as error:  # full disk, file-size limit: the lock holds all the same, only its owner is unnamed
        logger.warning("Could not record the owner in %s (%s); the run lock is held all the same.", path, error)


def release_run_lock(output_dir: str | os.PathLike) -> None:
    """Release ``output_dir``'s run lock if this process holds it, removing the lock file."""
    fd = _HELD.pop(Path(output_dir).resolve(), None)
    if fd is None:
        return
    try:
        (Path(output_dir).resolve() / LOCK_FILENAME).unlink(missing_ok=True)  # while still held: no one else's file
    finally:
        os.close(fd)  # drops the lock


@atexit.register
def _release_all() -> None:
    """A run that raised (under a plain `Trainer`, nothing else releases it) leaves no lock file at exit."""
    for directory in list(_HELD):
        release_run_lock(directory)
