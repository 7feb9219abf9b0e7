"""One agent per data dir.

Two agents on one data dir would both recover its unfinished jobs and run them
twice, and write each other's records. The agent holds an exclusive ``flock`` on
``DIR/agent.lock`` for as long as it runs; the kernel drops it when the process
ends, however it ends, so a crashed agent never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from p2psched.agent.errors import StartupError

log = logging.getLogger("p2psched.agent")

LOCK_FILE = "agent.lock"


def data_dir_error(data_dir: Path, e: OSError) -> StartupError:
    """The data dir (or a file in it) cannot be made or written, and what to do."""
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(data_dir) else ""
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        fix = "a file is in the way of the directory; give --data-dir a directory path"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "give --data-dir a directory this user can write, or change its owner or mode"
    elif e.errno == errno.ENOSPC:
        fix = "free space on its file system"
    else:
        fix = "check the path and its file system"
    return StartupError(f"--data-dir {data_dir}: cannot use it{where}: {e.strerror or e}; {fix}")


class DataDirLock:
    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, data_dir: Path, node_id: str) -> DataDirLock:
        """Lock ``data_dir`` for this agent, or raise StartupError naming the agent that holds it."""
        path = data_dir / LOCK_FILE
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise data_dir_error(data_dir, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StartupError(
                f"data dir {data_dir} is in use by another agent ({holder}); stop that agent, or give this one "
                "its own --data-dir (two agents on one data dir would run its jobs twice)"
            ) from None
        except OSError as e:  # a file system without flock (some network mounts)
            os.close(fd)
            log.warning("cannot lock data dir %s (%s): make sure no other agent uses it", data_dir, e)
            return cls(None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, node {node_id}\n".encode(), 0)
        return cls(fd)

    @staticmethod
    def holder(data_dir: Path) -> str | None:
        """Which agent holds ``data_dir`` now (its "pid N, node X"), or None when none
        does; creates and writes nothing. An agent creates ``agent.lock`` before it locks
        it, so a data dir without one is held by none."""
        try:
            fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)  # flock needs no write access
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        except OSError:  # a file system without flock: acquire() only warns there
            return None
        finally:
            os.close(fd)  # closing the descriptor drops a lock taken here
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
