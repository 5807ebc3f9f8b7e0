"""The state filesystem's reserve: a preallocated file in the state directory, given back the
moment a write of the audit log or the state store fails, so that on a full disk the kill
path's rows and the runs' records still fit. Needs write access to the state directory.

A filled disk must never leave a kill unaudited or a killed run recorded as running: the
writers retry until they succeed, and the reserve makes the first retry succeed. Released, it
is an alarm (health, metrics, logs) until `ensure` can take it back with room to spare."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


_SQLITE_IOERR, _SQLITE_FULL = 10, 13


def out_of_space(cause: BaseException | None) -> bool:
    """A failure that room on the disk could cure (not a lock timeout, not a bug)."""
    if cause is None:
        return True
    if isinstance(cause, OSError):
        return cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)
    code = getattr(cause, "sqlite_errorcode", None)
    return code is None or code & 0xFF in (_SQLITE_IOERR, _SQLITE_FULL)


class DiskReserve:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.released_at: float | None = None
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        try:
            return self.size == 0 or self.path.stat().st_blocks * 512 >= self.size
        except FileNotFoundError:
            return False

    def ensure(self) -> bool:
        """Take the reserve (back) if the filesystem has room for it twice over."""
        if self.size == 0:
            return True
        with self._lock:
            if self.held:
                return True
            stats = os.statvfs(self.path.parent)
            if stats.f_bavail * stats.f_frsize < 2 * self.size:
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            except OSError as exc:
                log.error("cannot preallocate the disk reserve %s: %s", self.path, exc)
                os.ftruncate(fd, 0)
                return False
            finally:
                os.close(fd)
            if self.released_at is not None:
                log.warning("disk reserve %s taken back (%d bytes)", self.path, self.size)
            self.released_at = None
            return True

    def discard(self) -> None:
        """The state directory's life is over (an embedded CI run's, once its run has ended):
        the file goes, without the alarm of a release."""
        with self._lock:
            self.path.unlink(missing_ok=True)

    def release(self, cause: BaseException | None = None) -> bool:
        """Give the space back; True if there was any to give."""
        if not out_of_space(cause):
            return False
        with self._lock:
            try:
                had = self.path.stat().st_blocks > 0
                self.path.unlink()
            except FileNotFoundError:
                had = False
            if had:
                self.released_at = time.time()
                log.critical("a write to the state filesystem failed (%s): released the disk "
                             "reserve %s so the kill path's records still fit; free space on "
                             "%s now", cause, self.path, self.path.parent)
            return had
