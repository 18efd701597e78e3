"""POSIX record locks and flock() for the passthrough file system.

The daemon is one process acting for many lock owners (the guest's processes), and plain POSIX
locks belong to the process, so they would never conflict with each other here. Open file
description (OFD) locks belong to an open file instead: each lock owner gets its own open file of
the inode, and the host kernel then sees the same conflicts, merges and splits the guest expects,
and host processes see the guest's locks. Closing that open file drops the owner's locks, which is
what POSIX asks of close().

Waiting for a lock polls with a growing sleep rather than blocking in the kernel, so that an
INTERRUPT from the guest (a signal to the waiting process) or the end of the connection can stop
the wait.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable

from ...fuse.filesystem import Context, Lock
from .inodes import Inode

#: struct flock on 64-bit Linux: short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = struct.Struct("=hh4xqqi4x")
OFFSET_MAX = 0x7FFF_FFFF_FFFF_FFFF
_POLL_MAX = 0.05

_lock = threading.Lock()


def _flock_bytes(lock: Lock, ltype: int | None = None) -> bytes:
    length = 0 if lock.end >= OFFSET_MAX else lock.end - lock.start + 1
    return _FLOCK.pack(lock.type if ltype is None else ltype, os.SEEK_SET, lock.start, length, 0)


def _owner_fd(inode: Inode, owner: int, opener: Callable[[int], int], create: bool) -> int | None:
    with _lock:
        fds = inode.lock_fds
        if fds is not None and owner in fds:
            return fds[owner]
        if not create:
            return None
    try:
        fd = opener(os.O_RDWR)
    except OSError:
        fd = opener(os.O_RDONLY)
    with _lock:
        if inode.lock_fds is None:
            inode.lock_fds = {}
            inode.lock_pids = {}
        existing = inode.lock_fds.get(owner)
        if existing is not None:
            os.close(fd)
            return existing
        inode.lock_fds[owner] = fd
        return fd


def getlk(inode: Inode, owner: int, lock: Lock, opener: Callable[[int], int]) -> Lock:
    fd = _owner_fd(inode, owner, opener, True)
    assert fd is not None
    ltype, _, start, length, _ = _FLOCK.unpack(
        fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_bytes(lock))
    )
    if ltype == fcntl.F_UNLCK:
        return Lock(lock.start, lock.end, fcntl.F_UNLCK, 0)
    end = OFFSET_MAX if length == 0 else start + length - 1
    return Lock(start, end, ltype, _holder_pid(inode, owner, Lock(start, end, ltype, 0)))


def _holder_pid(inode: Inode, asking: int, held: Lock) -> int:
    """The pid of the guest owner holding ``held``: an owner whose own open file sees no
    conflict there is the one holding it. 0 when it is held outside the guest."""
    with _lock:
        owners = dict(inode.lock_fds or {})
        pids = dict(inode.lock_pids or {})
    for owner, fd in owners.items():
        if owner == asking:
            continue
        ltype, *_ = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_bytes(held)))
        if ltype == fcntl.F_UNLCK:
            return pids.get(owner, 0)
    return 0


def setlk(
    ctx: Context,
    inode: Inode,
    owner: int,
    lock: Lock,
    sleep: bool,
    opener: Callable[[int], int],
    stopping: Callable[[], bool],
) -> None:
    if lock.type == fcntl.F_UNLCK:
        fd = _owner_fd(inode, owner, opener, False)
        if fd is not None:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock_bytes(lock))
        return
    fd = _owner_fd(inode, owner, opener, True)
    assert fd is not None
    arg = _flock_bytes(lock)
    _retry(lambda: fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg), ctx, sleep, stopping)
    with _lock:
        if inode.lock_pids is not None:
            inode.lock_pids[owner] = lock.pid


def flock(ctx: Context, fd: int, lock: Lock, sleep: bool, stopping: Callable[[], bool]) -> None:
    if lock.type == fcntl.F_UNLCK:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    op = fcntl.LOCK_EX if lock.type == fcntl.F_WRLCK else fcntl.LOCK_SH
    _retry(lambda: fcntl.flock(fd, op | fcntl.LOCK_NB), ctx, sleep, stopping)


def _retry(
    attempt: Callable[[], object], ctx: Context, sleep: bool, stopping: Callable[[], bool]
) -> None:
    delay = 0.001
    while True:
        try:
            attempt()
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK) or not sleep:
                code = errno.EAGAIN if e.errno == errno.EACCES else e.errno
                raise OSError(code, os.strerror(code)) from None
        if ctx.interrupted or stopping():
            raise OSError(errno.EINTR, "lock wait interrupted")
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)


def release_owner(inode: Inode, owner: int) -> None:
    """Drop every POSIX lock ``owner`` holds on ``inode`` (a close() in the guest)."""
    with _lock:
        fds = inode.lock_fds
        fd = fds.pop(owner, None) if fds else None
        if inode.lock_pids:
            inode.lock_pids.pop(owner, None)
    if fd is not None:
        os.close(fd)
