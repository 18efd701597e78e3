"""POSIX record locks and flock() for the passthrough file system.

The daemon is one process acting for many lock owners (the guest's processes), and plain POSIX
locks belong to the process, so they would never conflict with each other here. Open file
description (OFD) locks belong to an open file instead: each lock owner gets its own open file of
the inode, and the host kernel then sees the same conflicts, merges and splits the guest expects,
and host processes see the guest's locks. Closing that open file drops the owner's locks, which is
what POSIX asks of close().

Those open files belong to the inode and live by its rules (:mod:`.inodes`): each attempt pins
the inode, so FORGET or the owner's close() on another queue never closes a lock file while
fcntl runs on its number, and a lock file made while the guest forgets the inode is closed with
it. The caller opens them (only regular files and directories ever are).

Waiting for a lock polls with a growing sleep rather than blocking in the kernel, so that an
INTERRUPT from the guest (a signal to the waiting process) or the end of the connection can stop
the wait. The inode is pinned for each attempt, not across the sleeps.

Each granted lock or unlock is recorded (:meth:`InodeStore.record_lock`, under the store's
``lock_book`` together with the call, so the record follows the kernel's order): a live
migration carries the ranges to the destination, which takes them again (:func:`retake`). Until
it has, a range still to take again is *pending*; the guest's own later call on that owner's
range settles it (what the guest asks last is what holds).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable

from pyvirtiofsd.backends.passthrough.inodes import Inode, InodeStore
from pyvirtiofsd.fuse.filesystem import Context, Lock

__all__ = [
    "OFFSET_MAX",
    "flock",
    "flock_op",
    "getlk",
    "release_owner",
    "retake",
    "setlk",
]

#: struct flock on 64-bit Linux: short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = struct.Struct("=hh4xqqi4x")
OFFSET_MAX = 0x7FFF_FFFF_FFFF_FFFF
_POLL_MAX = 0.05
_UNLOCK_ALL = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)


def _flock_bytes(lock: Lock, ltype: int | None = None) -> bytes:
    length = 0 if lock.end >= OFFSET_MAX else lock.end - lock.start + 1
    return _FLOCK.pack(lock.type if ltype is None else ltype, os.SEEK_SET, lock.start, length, 0)


def getlk(
    store: InodeStore, inode: Inode, owner: int, lock: Lock, opener: Callable[[], int]
) -> Lock:
    store.pin(inode)
    try:
        fd = store.owner_fd(inode, owner, opener)
        assert fd is not None
        ltype, _, start, length, _ = _FLOCK.unpack(
            fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_bytes(lock))
        )
        if ltype == fcntl.F_UNLCK:
            return Lock(lock.start, lock.end, fcntl.F_UNLCK, 0)
        end = OFFSET_MAX if length == 0 else start + length - 1
        held = Lock(start, end, ltype, 0)
        return Lock(start, end, ltype, _holder_pid(store, inode, owner, held))
    finally:
        store.unpin(inode)


def _holder_pid(store: InodeStore, inode: Inode, asking: int, held: Lock) -> int:
    """The pid of the guest owner holding ``held``: an owner whose own open file sees no
    conflict there is the one holding it. 0 when it is held outside the guest."""
    owners, pids = store.lock_owners(inode)
    for owner, fd in owners.items():
        if owner == asking:
            continue
        ltype, *_ = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_bytes(held)))
        if ltype == fcntl.F_UNLCK:
            return pids.get(owner, 0)
    return 0


def setlk(
    ctx: Context,
    store: InodeStore,
    inode: Inode,
    owner: int,
    lock: Lock,
    sleep: bool,
    opener: Callable[[], int],
    stopping: Callable[[], bool],
) -> None:
    arg = _flock_bytes(lock)
    unlock = lock.type == fcntl.F_UNLCK

    def attempt() -> None:
        store.pin(inode)
        try:
            fd = store.owner_fd(inode, owner, None if unlock else opener)
            if fd is None:
                return  # nothing of this owner's to unlock
            with store.lock_book:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
                store.record_lock(inode, owner, lock.start, lock.end, lock.type)
                pending = store.pending_locks.get((inode.nodeid, owner))
                if pending is not None:
                    pending.set(lock.start, lock.end, fcntl.F_UNLCK)
            if not unlock:
                store.set_lock_pid(inode, owner, lock.pid)
        finally:
            store.unpin(inode)

    _retry(attempt, ctx, sleep and not unlock, stopping)


def flock_op(ltype: int) -> int:
    """The flock() operation for a lock type (F_RDLCK, F_WRLCK, F_UNLCK)."""
    if ltype == fcntl.F_UNLCK:
        return fcntl.LOCK_UN
    return fcntl.LOCK_EX if ltype == fcntl.F_WRLCK else fcntl.LOCK_SH


def flock(ctx: Context, fd: int, lock: Lock, sleep: bool, stopping: Callable[[], bool]) -> None:
    """flock() on ``fd``, an open file the caller keeps open for the span of the call."""
    op = flock_op(lock.type)
    if op == fcntl.LOCK_UN:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    _retry(lambda: fcntl.flock(fd, op | fcntl.LOCK_NB), ctx, sleep, stopping)


def retake(store: InodeStore, inode: Inode, owner: int) -> bool:
    """Try once, without waiting, to take again the pending ranges of ``owner`` on ``inode``
    (a migration brought them); True when nothing is left pending (taken, or settled by the
    guest, or the owner or inode gone)."""
    key = (inode.nodeid, owner)
    try:
        store.pin(inode)
    except OSError:
        with store.lock_book:
            store.pending_locks.pop(key, None)
        return True
    try:
        fd = store.owner_fd(inode, owner, None)
        with store.lock_book:
            pending = store.pending_locks.get(key)
            if pending is None or fd is None:
                store.pending_locks.pop(key, None)
                return True
            for start, end, ltype in list(pending.ranges):
                try:
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock_bytes(Lock(start, end, ltype, 0)))
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    continue
                store.record_lock(inode, owner, start, end, ltype)
                pending.set(start, end, fcntl.F_UNLCK)
            if pending:
                return False
            del store.pending_locks[key]
            return True
    finally:
        store.unpin(inode)


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


def release_owner(store: InodeStore, inode: Inode, owner: int) -> None:
    """Drop every POSIX lock ``owner`` holds on ``inode`` (a close() in the guest)."""
    try:
        store.pin(inode)
    except OSError:
        return  # forgotten: its lock files are closed, or will be with its last user
    try:
        fd = store.retire_owner(inode, owner)
        if fd is not None:
            # The locks go now; the open file itself when no request uses it any more.
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _UNLOCK_ALL)
    finally:
        store.unpin(inode)
