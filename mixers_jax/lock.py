"""The workdir lock: one training run per workdir at a time.

A run holds ``<workdir>/run.lock`` for its whole life: an exclusive ``fcntl.flock`` on the file,
which holds one JSON line ``{"pid", "host", "since"}`` naming the holder. The kernel drops a flock
when its process dies (even by SIGKILL), so a dead run never blocks the next one; the lock file it
leaves is found stale (the lock is free but the file still names a holder) and taken over with a
message. Readers (evaluate, generate, ...) never take the lock and never write into the workdir:
:func:`live_run` tells them whether a run is training there, so that they read the newest
*complete* checkpoint only.

flock works between processes of one machine and, on Linux, over NFS (emulated with POSIX locks).
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable

from mixers_jax.errors import UserError

LOCK_FILE = "run.lock"
# A reader probes the lock for an instant (a shared, non-blocking flock); a run that starts at that
# instant retries for this long before it concludes that the workdir is in use.
_RETRY_S = 1.0
_RETRY_STEP_S = 0.05


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a workdir lock."""
    pid: int | None
    host: str
    since: str  # UTC, ISO 8601 to the second

    def describe(self) -> str:
        return f"pid {self.pid if self.pid is not None else '?'} on {self.host or '?'} since {self.since or '?'}"


def _read_holder(fd: int) -> Holder | None:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8"))
        return Holder(int(info["pid"]), str(info.get("host", "")), str(info.get("since", "")))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _would_block(e: OSError) -> bool:
    return e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class WorkdirLock:
    """``with WorkdirLock(workdir, log=...):`` holds the workdir for a training run.

    The workdir is created if needed (and removed again at release if the run left it empty).

    Raises UserError("workdir W is in use by pid N on HOST since T") when another live process
    holds it. A lock file left by a dead run is taken over and reported through ``log``.
    """

    def __init__(self, workdir: str, log: Callable[[str], None] | None = None):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._log = log or _stderr
        self._fd: int | None = None
        self._created = False  # acquire made the workdir: release removes it again if still empty

    def acquire(self) -> "WorkdirLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        self._created = not os.path.isdir(self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        deadline = time.monotonic() + _RETRY_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if not _would_block(e):
                    raise UserError(f"cannot lock {self.path}: {e.strerror or e}") from None
                if time.monotonic() < deadline:
                    time.sleep(_RETRY_STEP_S)
                    continue
                who = holder.describe() if holder else "another process"
                self._remove_if_created()
                raise UserError(f"workdir {self.workdir} is in use by {who}") from None
            # The file may have been unlinked by a holder that released it between our open and
            # our flock: then we hold a lock on a file nobody else will look at. Start over.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        stale = _read_holder(fd)
        if stale is not None:
            self._log(f"taking over {self.path}: its holder, {stale.describe()}, is no longer running")
        me = Holder(os.getpid(), socket.gethostname(),
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(dataclasses.asdict(me)) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file (while still holding the lock) and lets go."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        """A run that stopped before writing anything leaves no empty workdir behind."""
        if self._created:
            try:
                os.rmdir(self.workdir)
            except OSError:
                pass  # not empty: the run wrote something

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def live_run(workdir: str) -> Holder | None:
    """The holder of ``workdir``'s lock when a run is training there now, else None.

    Read-only: opens the lock file for reading (if it exists) and probes it with a shared,
    non-blocking flock that it drops at once; creates and writes nothing.
    """
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if _would_block(e):
                return _read_holder(fd) or Holder(None, "", "")
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
