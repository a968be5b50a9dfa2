"""``fcntl.flock`` as the Linux NFS client gives it, for tests on a local disk.

flock(2), NOTES: "Since Linux 2.6.12, NFS clients support flock() locks by emulating them as
fcntl(2) byte-range locks on the entire file. [...] in order to place an exclusive lock, the file
must be opened for writing."  A byte-range read lock likewise needs a descriptor open for reading
(fcntl(2), F_SETLK: EBADF "if the file descriptor is not open for reading/writing"), and a
conflicting non-blocking request fails with EACCES or EAGAIN (fcntl(2), F_SETLK), where a local
flock says EWOULDBLOCK.  :func:`install` puts this behaviour in place of ``fcntl.flock`` in the
calling process, so code that locks through wrongly opened descriptors fails here as it would on
an NFS-backed ReadWriteMany volume.
"""
from __future__ import annotations

import errno
import fcntl
import os

_local_flock = fcntl.flock


def _needs(operation: int) -> tuple[str, int] | None:
    """The access a lock operation needs on NFS: (name, O_ flag that must not be the mode)."""
    if operation & fcntl.LOCK_EX:
        return "writing", os.O_RDONLY
    if operation & fcntl.LOCK_SH:
        return "reading", os.O_WRONLY
    return None  # LOCK_UN


def nfs_flock(fd, operation: int, conflict: int = errno.EACCES) -> None:
    """``fcntl.flock(fd, operation)`` with NFS' rules: EBADF on a descriptor whose mode cannot
    carry the lock type, ``conflict`` (an errno) where the lock is held by another description."""
    number = fd if isinstance(fd, int) else fd.fileno()
    needs = _needs(operation)
    if needs and fcntl.fcntl(number, fcntl.F_GETFL) & os.O_ACCMODE == needs[1]:
        raise OSError(errno.EBADF, f"{os.strerror(errno.EBADF)} (NFS: this lock needs a descriptor open for "
                                   f"{needs[0]})")
    try:
        _local_flock(number, operation)
    except BlockingIOError:
        raise OSError(conflict, os.strerror(conflict)) from None


def install(conflict: int = errno.EACCES) -> None:
    """Make ``fcntl.flock`` behave as on NFS in this process (modules calling ``fcntl.flock``
    look it up at call time)."""
    fcntl.flock = lambda fd, operation: nfs_flock(fd, operation, conflict)
