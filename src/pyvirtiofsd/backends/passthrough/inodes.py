"""The inodes the kernel knows, with their lookup counts and a way back to the host file.

Each inode is identified by what the host says it is — (st_dev, st_ino), or its file handle — so
two names of one file share one inode number. It reaches the host file either through an O_PATH
file descriptor it keeps open, or through a file handle (``name_to_handle_at``) that is opened
again for each use. Handles keep the descriptor count flat however many inodes the guest holds,
which is what large trees need; they need CAP_DAC_READ_SEARCH and a file system that supports
them.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import deque

from ... import linux
from .config import FileHandles

log = logging.getLogger(__name__)

#: The root's lookup count: the kernel never forgets the root.
_PINNED = 1 << 62
#: Seconds an O_PATH fd of a forgotten inode stays open, so that a request racing with the
#: forget (only a misbehaving guest sends one) finds a closed-late fd rather than a reused one.
_CLOSE_DELAY = 2.0


class Inode:
    __slots__ = (
        "dev",
        "fd",
        "handle",
        "ino",
        "key",
        "lock_fds",
        "lock_pids",
        "mode",
        "mount_id",
        "nodeid",
        "refcount",
    )

    def __init__(
        self,
        nodeid: int,
        key: object,
        fd: int,
        handle: bytes | None,
        mount_id: int,
        st: os.stat_result,
    ) -> None:
        self.nodeid = nodeid
        self.key = key
        #: O_PATH fd, or -1 when the inode is reached through its file handle.
        self.fd = fd
        self.handle = handle
        self.mount_id = mount_id
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.mode = stat.S_IFMT(st.st_mode)
        self.refcount = 1
        #: POSIX lock owner -> the open file description holding that owner's locks.
        self.lock_fds: dict[int, int] | None = None
        self.lock_pids: dict[int, int] | None = None

    def is_dir(self) -> bool:
        return self.mode == stat.S_IFDIR

    def is_symlink(self) -> bool:
        return self.mode == stat.S_IFLNK


class PathFd:
    """An O_PATH fd of an inode for the span of a ``with`` block."""

    __slots__ = ("fd", "owned")

    def __init__(self, fd: int, owned: bool) -> None:
        self.fd = fd
        self.owned = owned

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            os.close(self.fd)


class InodeStore:
    def __init__(self, root_dir: str, mode: FileHandles) -> None:
        self._mode = mode
        self._lock = threading.Lock()
        self._by_id: dict[int, Inode] = {}
        self._by_key: dict[object, Inode] = {}
        self._next_id = 2
        #: mount id -> an fd on that mount, which open_by_handle_at needs.
        self._mount_fds: dict[int, int] = {}
        self._graveyard: deque[tuple[float, int]] = deque()
        fd = os.open(root_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        handle, mount_id = self._handle_of(fd)
        if handle is not None and not self._remember_mount(fd, st, mount_id):
            handle = None
        root = Inode(1, self._key(st, handle, mount_id), fd, handle, mount_id, st)
        root.refcount = _PINNED
        self._by_id[1] = root
        self._by_key[root.key] = root
        self.root = root

    # --- identity --------------------------------------------------------------------------

    def _handle_of(self, fd: int) -> tuple[bytes | None, int]:
        if self._mode is FileHandles.NEVER:
            return None, 0
        try:
            return linux.name_to_handle_at(fd, b"", linux.AT_EMPTY_PATH)
        except OSError as e:
            if self._mode is FileHandles.MANDATORY:
                raise
            log.debug("no file handle (%s); keeping an fd", e)
            return None, 0

    def _remember_mount(self, fd: int, st: os.stat_result, mount_id: int) -> bool:
        """Keep an fd on a newly seen mount, which open_by_handle_at needs (a real fd: it
        refuses O_PATH ones). False when this inode can't give one."""
        if mount_id in self._mount_fds:
            return True
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return False
        try:
            self._mount_fds[mount_id] = os.open(
                f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError as e:
            log.debug("no fd on mount %d: %s", mount_id, e)
            return False
        return True

    @staticmethod
    def _key(st: os.stat_result, handle: bytes | None, mount_id: int) -> object:
        # A handle carries the inode generation, so a recycled inode number gets a new key.
        if handle is not None:
            return (mount_id, handle)
        return (st.st_dev, st.st_ino)

    # --- lookups ---------------------------------------------------------------------------

    def get(self, nodeid: int) -> Inode:
        try:
            return self._by_id[nodeid]
        except KeyError:
            raise OSError(errno.EBADF, f"unknown inode {nodeid}") from None

    def add(self, fd: int, st: os.stat_result) -> Inode:
        """Take one reference on the inode behind ``fd`` (an O_PATH fd this call consumes)."""
        handle, mount_id = self._handle_of(fd)
        with self._lock:
            if handle is not None and not self._remember_mount(fd, st, mount_id):
                handle = None
            key = self._key(st, handle, mount_id)
            inode = self._by_key.get(key)
            if inode is not None:
                inode.refcount += 1
            else:
                keep_fd = handle is None
                inode = Inode(self._next_id, key, fd if keep_fd else -1, handle, mount_id, st)
                self._next_id += 1
                self._by_id[inode.nodeid] = inode
                self._by_key[key] = inode
                if keep_fd:
                    return inode
        os.close(fd)
        return inode

    def ref(self, inode: Inode) -> None:
        with self._lock:
            inode.refcount += 1

    def forget(self, nodeid: int, count: int) -> None:
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None or inode.refcount >= _PINNED:
                return
            inode.refcount -= min(count, inode.refcount)
            if inode.refcount:
                return
            del self._by_id[nodeid]
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
            now = time.monotonic()
            if inode.fd >= 0:
                self._graveyard.append((now, inode.fd))
                inode.fd = -1
            lock_fds = inode.lock_fds
            inode.lock_fds = None
            graveyard = self._graveyard
            expired = []
            while graveyard and now - graveyard[0][0] > _CLOSE_DELAY:
                expired.append(graveyard.popleft()[1])
        for fd in expired:
            os.close(fd)
        for fd in (lock_fds or {}).values():
            os.close(fd)

    def forget_all(self) -> None:
        """Drop every inode but the root (the kernel that held them is gone)."""
        with self._lock:
            nodeids = [n for n in self._by_id if n != self.root.nodeid]
        for nodeid in nodeids:
            self.forget(nodeid, _PINNED)

    def count(self) -> int:
        return len(self._by_id)

    # --- reaching the file -----------------------------------------------------------------

    def path(self, inode: Inode) -> PathFd:
        """An O_PATH fd of ``inode`` for a ``with`` block."""
        fd = inode.fd
        if fd >= 0:
            return PathFd(fd, False)
        return PathFd(self.open_handle(inode, os.O_PATH | os.O_NOFOLLOW), True)

    def open_handle(self, inode: Inode, flags: int) -> int:
        if inode.handle is None:
            raise OSError(errno.EBADF, "inode has neither fd nor handle")
        try:
            mount_fd = self._mount_fds[inode.mount_id]
        except KeyError:
            raise OSError(errno.ESTALE, "mount of inode is gone") from None
        return linux.open_by_handle_at(mount_fd, inode.handle, flags)

    def open(self, inode: Inode, flags: int) -> int:
        """A new fd of ``inode`` with ``flags`` (never follows: the inode is the file itself)."""
        flags |= os.O_CLOEXEC
        if inode.fd >= 0:
            # The magic link resolves to the inode itself, even for a symlink, and so can
            # never lead out of the shared directory.
            return os.open(f"/proc/self/fd/{inode.fd}", flags & ~os.O_NOFOLLOW)
        return self.open_handle(inode, flags & ~os.O_NOFOLLOW)

    def close_all(self) -> None:
        with self._lock:
            fds = [i.fd for i in self._by_id.values() if i.fd >= 0]
            for inode in self._by_id.values():
                fds.extend((inode.lock_fds or {}).values())
                inode.lock_fds = None
                inode.fd = -1
            fds.extend(fd for _, fd in self._graveyard)
            fds.extend(self._mount_fds.values())
            self._graveyard.clear()
            self._mount_fds.clear()
            self._by_id.clear()
            self._by_key.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
