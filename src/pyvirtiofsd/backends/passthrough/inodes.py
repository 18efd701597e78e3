"""The inodes the kernel knows, with their lookup counts and a way back to the host file.

Each inode is identified by what the host says it is — (st_dev, st_ino), or its file handle — so
two names of one file share one inode number. It reaches the host file either through an O_PATH
file descriptor it keeps open, or through a file handle (``name_to_handle_at``) that is opened
again for each use. Handles keep the descriptor count flat however many inodes the guest holds,
which is what large trees need; they need CAP_DAC_READ_SEARCH and a file system that supports
them.

Rules:

* Opening. :meth:`InodeStore.open` is the one way the passthrough opens an inode (other than
  O_PATH), and it opens only regular files and directories: a symlink gets ELOOP, a FIFO,
  socket or device ENXIO. It reopens the inode itself (through its O_PATH fd's link, the name
  ``N`` in the process's one descriptor of ``/proc/self/fd``, or ``open_by_handle_at``), never
  a name in the share, and an inode's type is fixed for its lifetime while the O_PATH fd or
  handle pins it, so the check can't be raced.
* Lifetime. One lock (the store's) governs an inode's lookup count, its O_PATH fd and the open
  files holding its POSIX locks. A request that uses any of those descriptors *pins* the inode
  for the span of the use (:meth:`InodeStore.path`, :meth:`InodeStore.open`,
  :meth:`InodeStore.pin`); FORGET only takes the inode out of the tables, and its descriptors
  are closed, under the lock, when the last pin goes. No descriptor is ever closed while a
  request may still use its number, and none outlives its last user: once the guest has
  forgotten everything, the daemon is back to the descriptors it started with.
* Live migration. A destination takes over the source's inode numbers and lookup counts
  (:meth:`InodeStore.restore`); an inode it could not find is *lost*: its number stays the
  guest's until forgotten, and every request naming it gets EIO. The POSIX lock ranges each
  owner holds are recorded as they are granted (:meth:`InodeStore.record_lock`), so that a
  destination can take them again; ``lock_book`` serialises each lock call with its record.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable
from typing import Final, TypeVar

from pyvirtiofsd import linux
from pyvirtiofsd.backends.passthrough.config import FileHandles
from pyvirtiofsd.backends.passthrough.lockranges import LockRanges
from pyvirtiofsd.fuse.filesystem import Attr
from pyvirtiofsd.mutex import Mutex, acquire, new_mutex, release

try:
    from pyvirtiofsd.backends.passthrough._stat import dir_entries as _c_dir_entries
    from pyvirtiofsd.backends.passthrough._stat import fstat_attr as _c_fstat_attr
    from pyvirtiofsd.backends.passthrough._stat import fstat_entry as _c_fstat_entry
    from pyvirtiofsd.backends.passthrough._stat import open_at as _c_open_at
    from pyvirtiofsd.backends.passthrough._stat import reopen as _c_reopen
except ImportError:  # a pure build: no C at all
    _c_fstat_attr = None
    _c_fstat_entry = None
    _c_open_at = None
    _c_reopen = None
    _c_dir_entries = None
#: Final: a compiled build reads them as C variables, not from the module's dictionary.
_native_fstat_attr: Final = _c_fstat_attr
_native_fstat_entry: Final = _c_fstat_entry
_native_open_at: Final = _c_open_at
_native_reopen: Final = _c_reopen
_native_dir_entries: Final = _c_dir_entries
#: Bound Final: a compiled build would look it up among the os module's attributes each time.
_close: Final = os.close
_open: Final = os.open
_O_PATH: Final = os.O_PATH
_O_NOFOLLOW: Final = os.O_NOFOLLOW
_O_CLOEXEC: Final = os.O_CLOEXEC
#: What open_at never does: make a file.
_MAKING: Final = os.O_CREAT | (os.O_TMPFILE & ~os.O_DIRECTORY)
#: A linux_dirent64's fixed head: d_ino, d_off, d_reclen, d_type; the name follows.
_DIRENT_HEAD: Final = struct.Struct("=QqHB")
#: Bytes one getdents64 asks for.
DIR_READ_SIZE: Final = 64 * 1024
#: One directory entry as getdents64 gives it: (d_ino, d_off, d_type, name).
DirEntry = tuple[int, int, int, bytes]

__all__ = [
    "Ident",
    "Inode",
    "InodeStore",
    "PathFd",
    "attr_of_fd",
    "check_openable",
    "dir_entries",
    "entry_of_fd",
    "ident_of",
    "open_at",
]

log = logging.getLogger(__name__)

#: The root's lookup count: the kernel never forgets the root.
_PINNED: Final = 1 << 62
#: The only inode types the daemon opens (other than with O_PATH).
_OPENABLE: Final = (stat.S_IFREG, stat.S_IFDIR)


_T = TypeVar("_T")
#: What fstat() says identifies an inode: (st_dev, st_ino, S_IFMT(st_mode)).
Ident = tuple[int, int, int]


def ident_of(st: os.stat_result) -> Ident:
    return st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)


def entry_of_fd(fd: int) -> tuple[Attr, Ident]:
    """What a lookup needs of fstat(``fd``): the attributes as they are (flags 0, no id
    translated) and the inode's identity; made in C in the compiled build, as
    :func:`attr_of_fd` is."""
    if _native_fstat_entry is not None:
        # Typed, so that a compiled build takes the tuple apart by index, not by iterating.
        found: tuple[bytes, int, int, int] = _native_fstat_entry(fd)
        return Attr(raw=found[0]), (found[1], found[2], found[3])
    st = os.fstat(fd)
    return Attr.from_stat(st), ident_of(st)


def attr_of_fd(fd: int, flags: int = 0) -> Attr:
    """The attributes fstat(``fd``) gives, as they are (no id translated): the compiled build
    makes them in C without an ``os.stat_result`` (``_stat.c``), the same bytes."""
    if _native_fstat_attr is not None:
        return Attr(raw=_native_fstat_attr(fd, flags))
    return Attr.from_stat(os.fstat(fd), None, flags)


def open_at(dir_fd: int, name: bytes, flags: int) -> int:
    """``os.open(name, flags, dir_fd=dir_fd)`` that answers a failure with minus its errno
    rather than an OSError: for a lookup, a name that is not there is an everyday answer, and
    an exception costs more than the rest of the lookup once it passes through compiled
    frames. Never makes a file (ValueError for O_CREAT or O_TMPFILE); arguments os.open
    refuses before the call raise as it does. In C in the compiled build (``_stat.c``)."""
    if _native_open_at is not None:
        fd: int = _native_open_at(dir_fd, name, flags)
        return fd
    if flags & _MAKING:
        raise ValueError("open_at never makes a file")
    try:
        return _open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        return -(e.errno or errno.EIO)


def dir_entries(fd: int, size: int = DIR_READ_SIZE) -> list[DirEntry]:
    """One getdents64 of the open directory ``fd`` (up to ``size`` bytes), its records taken
    apart: an empty list at the end. Fails as getdents64 fails (OSError). In C in the
    compiled build (``_stat.c``), without a ctypes buffer or a copy of it."""
    if _native_dir_entries is not None:
        found: list[DirEntry] = _native_dir_entries(fd, size)
        return found
    buf = ctypes.create_string_buffer(size)
    n = linux.getdents64(fd, buf)
    raw = buf.raw[:n]
    out: list[DirEntry] = []
    pos = 0
    while pos < n:
        d_ino, d_off, reclen, dtype = _DIRENT_HEAD.unpack_from(raw, pos)
        if reclen <= _DIRENT_HEAD.size or pos + reclen > n:
            break  # never from a sound kernel; the C path stops there too
        out.append(
            (d_ino, d_off, dtype, raw[pos + _DIRENT_HEAD.size : pos + reclen].split(b"\0", 1)[0])
        )
        pos += reclen
    return out


def check_openable(mode: int) -> None:
    """Raise what OPEN answers for an inode of type ``mode`` that the daemon never opens."""
    if mode not in _OPENABLE:
        code = errno.ELOOP if mode == stat.S_IFLNK else errno.ENXIO
        raise OSError(code, os.strerror(code))


class _ProcFds:
    """The process's fd of /proc/self/fd, shared by its open stores: opened by the first,
    closed with the last. "self" is resolved as it is opened, so a forked child replaces it
    with its own (under the same number), or its reopens would open the parent's files."""

    def __init__(self) -> None:
        self.fd = -1
        self.users = 0
        self.lock = threading.Lock()

    @staticmethod
    def _open() -> int:
        return os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def take(self) -> int:
        with self.lock:
            if self.users == 0:
                self.fd = self._open()
            self.users += 1
            return self.fd

    def give(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                fd, self.fd = self.fd, -1
                os.close(fd)

    def after_fork_in_child(self) -> None:
        # Only the forking thread runs here. The lock is made anew: another thread may have
        # held it at the fork, and would never release it in this process. Only a descriptor
        # some store uses is replaced (users), never a number already given back, which
        # another thread of the parent may have reused by the time of the fork.
        self.lock = threading.Lock()
        old = self.fd
        if self.users > 0 and old >= 0:
            new = self._open()
            os.dup2(new, old, inheritable=False)
            os.close(new)


_PROC_FDS: Final = _ProcFds()
os.register_at_fork(after_in_child=_PROC_FDS.after_fork_in_child)


def _reopen(proc_fds: int, fd: int, mode: int, flags: int) -> int:
    """A new open file of what the O_PATH ``fd`` (of an inode of type ``mode``) refers to,
    through its link in ``proc_fds`` (an fd of /proc/self/fd: a name of one component, where a
    whole path would walk /proc and /proc/self each time). In C in the compiled build."""
    if not flags & _O_PATH:
        check_openable(mode)
    # The magic link resolves to the inode itself, even for a symlink, and so can never lead
    # out of the shared directory.
    flags &= ~_O_NOFOLLOW
    if _native_reopen is not None:
        new: int = _native_reopen(proc_fds, fd, flags)
    else:
        if flags & _MAKING:
            raise ValueError("reopen never makes a file")
        if fd < 0:
            new = -errno.EBADF
        else:
            try:
                new = _open(str(fd), flags | _O_CLOEXEC, dir_fd=proc_fds)
            except OSError as e:
                new = -(e.errno or errno.EIO)
    if new < 0:
        raise OSError(-new, os.strerror(-new))
    return new


class Inode:
    __slots__ = (
        "dead",
        "dev",
        "fd",
        "handle",
        "ino",
        "key",
        "lock_fds",
        "lock_pids",
        "lock_ranges",
        "mode",
        "mount_id",
        "nodeid",
        "pins",
        "refcount",
        "retired",
    )

    def __init__(
        self,
        nodeid: int,
        key: object,
        fd: int,
        handle: bytes | None,
        mount_id: int,
        ident: Ident,
    ) -> None:
        self.nodeid = nodeid
        self.key = key
        #: O_PATH fd, or -1 when the inode is reached through its file handle.
        self.fd = fd
        self.handle = handle
        self.mount_id = mount_id
        self.dev, self.ino, self.mode = ident
        #: Lookups the guest holds.
        self.refcount = 1
        #: Requests using the inode's descriptors now.
        self.pins = 0
        #: Forgotten: out of the tables, its descriptors closed with the last pin.
        self.dead = False
        #: POSIX lock owner -> the open file description holding that owner's locks.
        self.lock_fds: dict[int, int] | None = None
        self.lock_pids: dict[int, int] | None = None
        #: POSIX lock owner -> the ranges it holds (for live migration).
        self.lock_ranges: dict[int, LockRanges] | None = None
        #: Lock files of owners that are gone, closed with the last pin.
        self.retired: list[int] | None = None

    def is_dir(self) -> bool:
        return self.mode == stat.S_IFDIR

    def is_symlink(self) -> bool:
        return self.mode == stat.S_IFLNK

    def openable(self) -> bool:
        return self.mode in _OPENABLE


class PathFd:
    """An O_PATH fd of an inode, pinned for the span of a ``with`` block."""

    __slots__ = ("fd", "inode", "owned", "store")

    def __init__(self, store: InodeStore, inode: Inode) -> None:
        self.store = store
        self.inode = inode
        self.fd = -1
        self.owned = False

    def __enter__(self) -> int:
        self.fd, self.owned = self.store.path_fd(self.inode)
        return self.fd

    def __exit__(self, *exc: object) -> None:
        self.store.done_path(self.inode, self.fd, self.owned)


class InodeStore:
    def __init__(self, root_dir: str, mode: FileHandles) -> None:
        self._mode = mode
        # Asked on every lookup: plain flags rather than an enum member read off its class.
        self._no_handles = mode is FileHandles.NEVER
        self._handles_mandatory = mode is FileHandles.MANDATORY
        self._lock: Mutex = new_mutex()
        self._by_id: dict[int, Inode] = {}
        self._by_key: dict[object, Inode] = {}
        self._next_id = 2
        #: mount id -> an fd on that mount, which open_by_handle_at needs.
        self._mount_fds: dict[int, int] = {}
        #: Pins of all inodes: the mount fds are closed (at shutdown) once none is left.
        self._pins = 0
        self._closed = False
        #: st_dev -> a regular file or directory the guest holds there, for SYNCFS.
        self._on_dev: dict[int, Inode] = {}
        #: Inodes a migration could not find on this side: nodeid -> lookups the guest holds.
        self._lost: dict[int, int] = {}
        #: Held around a lock call and its record, so that records follow the kernel's order.
        self.lock_book = threading.Lock()
        #: (nodeid, owner) -> lock ranges a migration brought that are not taken again yet
        #: (guarded by ``lock_book``).
        self.pending_locks: dict[tuple[int, int], LockRanges] = {}
        #: /proc/self/fd, which every reopen goes through (shared, see _ProcFds); given back
        #: by close_all() once no request uses the store.
        self._proc_fds = _PROC_FDS.take()
        fd = -1
        try:
            fd = os.open(root_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            ident = ident_of(os.fstat(fd))
            handle, mount_id = self._handle_of(fd)
            if handle is not None and not self._remember_mount(fd, ident[2], mount_id):
                handle = None
        except BaseException:
            self._close_own_fds()
            if fd >= 0:
                os.close(fd)
            raise
        root = Inode(1, self._key(ident, handle, mount_id), fd, handle, mount_id, ident)
        root.refcount = _PINNED
        self._by_id[1] = root
        self._by_key[root.key] = root
        self.root = root

    # --- identity --------------------------------------------------------------------------

    def _handle_of(self, fd: int) -> tuple[bytes | None, int]:
        if self._no_handles:
            return None, 0
        try:
            return linux.name_to_handle_at(fd, b"", linux.AT_EMPTY_PATH)
        except OSError as e:
            if self._handles_mandatory:
                raise
            log.debug("no file handle (%s); keeping an fd", e)
            return None, 0

    def _remember_mount(self, fd: int, mode: int, mount_id: int) -> bool:
        """Keep an fd on a newly seen mount, which open_by_handle_at needs (a real fd: it
        refuses O_PATH ones). False when this inode can't give one."""
        if mount_id in self._mount_fds:
            return True
        if mode not in _OPENABLE:
            return False
        try:
            self._mount_fds[mount_id] = _reopen(
                self._proc_fds, fd, mode, os.O_RDONLY | os.O_NONBLOCK
            )
        except OSError as e:
            log.debug("no fd on mount %d: %s", mount_id, e)
            return False
        return True

    @staticmethod
    def _key(ident: Ident, handle: bytes | None, mount_id: int) -> object:
        # A handle carries the inode generation, so a recycled inode number gets a new key.
        if handle is not None:
            return (mount_id, handle)
        return (ident[0], ident[1])

    # --- lookups ---------------------------------------------------------------------------

    def get(self, nodeid: int) -> Inode:
        try:
            return self._by_id[nodeid]
        except KeyError:
            if nodeid in self._lost:
                raise OSError(errno.EIO, f"inode {nodeid} was lost in a migration") from None
            raise OSError(errno.EBADF, f"unknown inode {nodeid}") from None

    def add(self, fd: int, ident: Ident) -> Inode:
        """Take one reference on the inode behind ``fd`` (an O_PATH fd this call consumes),
        which fstat() says is ``ident``."""
        handle, mount_id = self._handle_of(fd)
        # The lock's methods as functions, as in pin(): every LOOKUP adds.
        lock = self._lock
        acquire(lock)
        try:
            if handle is not None and not self._remember_mount(fd, ident[2], mount_id):
                handle = None
            key = self._key(ident, handle, mount_id)
            inode = self._by_key.get(key)
            if inode is not None:
                inode.refcount += 1
            else:
                keep_fd = handle is None
                inode = Inode(self._next_id, key, fd if keep_fd else -1, handle, mount_id, ident)
                self._next_id += 1
                self._by_id[inode.nodeid] = inode
                self._by_key[key] = inode
                if inode.openable():
                    self._on_dev.setdefault(inode.dev, inode)
                if keep_fd:
                    return inode
        finally:
            release(lock)
        _close(fd)
        return inode

    def ref(self, inode: Inode) -> None:
        with self._lock:
            if inode.dead:
                raise OSError(errno.EBADF, f"inode {inode.nodeid} was forgotten")
            inode.refcount += 1

    def forget(self, nodeid: int, count: int) -> None:
        # The lock's methods as functions, as in pin(): the kernel forgets what it looked up.
        lock = self._lock
        acquire(lock)
        try:
            self._forget(nodeid, count)
        finally:
            release(lock)

    def _forget(self, nodeid: int, count: int) -> None:
        """forget() with the store's lock held."""
        inode = self._by_id.get(nodeid)
        if inode is None:
            lost = self._lost.get(nodeid)
            if lost is not None:
                if lost > count:
                    self._lost[nodeid] = lost - count
                else:
                    del self._lost[nodeid]
            return
        if inode.refcount >= _PINNED:
            return
        inode.refcount -= min(count, inode.refcount)
        if inode.refcount:
            return
        self._bury(inode)

    def _bury(self, inode: Inode) -> None:
        """Take ``inode`` out of the tables; its descriptors go with its last pin (lock held)."""
        if self._by_id.get(inode.nodeid) is inode:
            del self._by_id[inode.nodeid]
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        if self._on_dev.get(inode.dev) is inode:
            del self._on_dev[inode.dev]
        inode.dead = True
        if inode.pins == 0:
            self._close_fds(inode)

    def _close_fds(self, inode: Inode) -> None:
        """Close what a dead, unpinned inode holds (lock held)."""
        if not inode.lock_fds and not inode.retired:
            # Most inodes: their own fd at most, and no list made for it.
            inode.lock_fds = inode.lock_pids = inode.retired = inode.lock_ranges = None
            fd = inode.fd
            if fd >= 0:
                inode.fd = -1
                _close(fd)
            return
        fds = list((inode.lock_fds or {}).values())
        fds += inode.retired or ()
        inode.lock_fds = inode.lock_pids = inode.retired = inode.lock_ranges = None
        if inode.fd >= 0:
            fds.append(inode.fd)
            inode.fd = -1
        for fd in fds:
            os.close(fd)

    def forget_all(self) -> None:
        """Drop every inode but the root (the kernel that held them is gone)."""
        with self._lock:
            for inode in [i for i in self._by_id.values() if i is not self.root]:
                self._bury(inode)
            self._lost.clear()

    def count(self) -> int:
        return len(self._by_id)

    def syncable(self, inode: Inode) -> Inode:
        """A regular file or directory on the file system that holds ``inode``: itself, one
        the guest holds there, or else the root."""
        if inode.openable():
            return inode
        return self._on_dev.get(inode.dev, self.root)

    # --- using the descriptors -------------------------------------------------------------

    def pin(self, inode: Inode) -> None:
        """Keep ``inode``'s descriptors open until :meth:`unpin` (EBADF once forgotten)."""
        # acquire() and release() rather than ``with``, here and in unpin(): every request
        # pins an inode, and a compiled build calls a ``with``'s methods (and any method of
        # the lock) the generic way. Only the exception of the try can come between the two:
        # none of the daemon's signal handlers raises, so nothing arrives between acquire()
        # and the try.
        lock = self._lock
        acquire(lock)
        try:
            dead = inode.dead
            if not dead:
                inode.pins += 1
                self._pins += 1
        finally:
            release(lock)
        if dead:
            raise OSError(errno.EBADF, f"inode {inode.nodeid} was forgotten")

    def unpin(self, inode: Inode) -> None:
        lock = self._lock
        acquire(lock)
        try:
            inode.pins -= 1
            self._pins -= 1
            if inode.pins == 0:
                if inode.dead:
                    self._close_fds(inode)
                elif inode.retired:
                    for fd in inode.retired:
                        os.close(fd)
                    inode.retired = None
            if self._closed and self._pins == 0:
                self._close_own_fds()
        finally:
            release(lock)

    def path(self, inode: Inode) -> PathFd:
        """An O_PATH fd of ``inode`` for a ``with`` block."""
        return PathFd(self, inode)

    def path_fd(self, inode: Inode) -> tuple[int, bool]:
        """:meth:`path` without the ``with`` block (whose methods a compiled build calls the
        generic way; LOOKUP asks this): an O_PATH fd of ``inode``, pinned, and whether it was
        opened for the purpose. Give both back to :meth:`done_path`."""
        self.pin(inode)
        fd = inode.fd
        if fd >= 0:
            return fd, False
        try:
            return self.open_handle(inode, os.O_PATH | os.O_NOFOLLOW), True
        except BaseException:
            self.unpin(inode)
            raise

    def done_path(self, inode: Inode, fd: int, owned: bool) -> None:
        """The end of a :meth:`path_fd`."""
        try:
            if owned:
                _close(fd)
        finally:
            self.unpin(inode)

    def stat(self, inode: Inode) -> os.stat_result:
        """``inode``'s fstat(), pinned as :meth:`path` pins it (without the ``with`` block's
        object: GETATTR asks this for every request)."""
        return self._pinned(inode, os.fstat)

    def attr(self, inode: Inode) -> Attr:
        """``inode``'s attributes as its fstat() gives them (:func:`attr_of_fd`), pinned as
        :meth:`stat` is. Every GETATTR without a handle asks this, so the usual case (the
        inode has its fd) calls :func:`attr_of_fd` itself, which a compiled build calls
        directly rather than as any callable."""
        self.pin(inode)
        try:
            fd = inode.fd
            if fd >= 0:
                return attr_of_fd(fd)
        finally:
            self.unpin(inode)
        return self._pinned(inode, attr_of_fd)

    def _pinned(self, inode: Inode, use: Callable[[int], _T]) -> _T:
        self.pin(inode)
        try:
            fd = inode.fd
            if fd >= 0:
                return use(fd)
            fd = self.open_handle(inode, os.O_PATH | os.O_NOFOLLOW)
            try:
                return use(fd)
            finally:
                os.close(fd)
        finally:
            self.unpin(inode)

    def open_handle(self, inode: Inode, flags: int) -> int:
        if inode.handle is None:
            raise OSError(errno.EBADF, "inode has neither fd nor handle")
        try:
            mount_fd = self._mount_fds[inode.mount_id]
        except KeyError:
            raise OSError(errno.ESTALE, "mount of inode is gone") from None
        return linux.open_by_handle_at(mount_fd, inode.handle, flags)

    def open(self, inode: Inode, flags: int) -> int:
        """A new fd of ``inode`` with ``flags``: only a regular file or a directory, unless
        ``flags`` has O_PATH (never follows: the inode is the file itself)."""
        if not flags & _O_PATH:
            check_openable(inode.mode)
        self.pin(inode)
        try:
            if inode.fd >= 0:
                return _reopen(self._proc_fds, inode.fd, inode.mode, flags)
            return self.open_handle(inode, (flags & ~_O_NOFOLLOW) | _O_CLOEXEC)
        finally:
            self.unpin(inode)

    # --- POSIX lock files ------------------------------------------------------------------

    def owner_fd(self, inode: Inode, owner: int, opener: Callable[[], int] | None) -> int | None:
        """The open file holding ``owner``'s locks on ``inode``, which the caller has pinned;
        made with ``opener`` if there is none yet (None when there is none and no opener)."""
        with self._lock:
            fds = inode.lock_fds
            if fds is not None and owner in fds:
                return fds[owner]
        if opener is None:
            return None
        fd = opener()
        with self._lock:
            if inode.lock_fds is None:
                inode.lock_fds = {}
                inode.lock_pids = {}
            existing = inode.lock_fds.setdefault(owner, fd)
            if existing != fd:
                # Another request of the same owner made one first.
                os.close(fd)
            return existing

    def lock_owners(self, inode: Inode) -> tuple[dict[int, int], dict[int, int]]:
        """Each owner's lock file and pid (the caller has pinned ``inode``)."""
        with self._lock:
            return dict(inode.lock_fds or {}), dict(inode.lock_pids or {})

    def set_lock_pid(self, inode: Inode, owner: int, pid: int) -> None:
        with self._lock:
            if inode.lock_pids is not None and inode.lock_fds and owner in inode.lock_fds:
                inode.lock_pids[owner] = pid

    def record_lock(self, inode: Inode, owner: int, start: int, end: int, ltype: int) -> None:
        """The kernel granted ``owner`` a lock (or an unlock) of [start, end] on ``inode``."""
        with self._lock:
            if inode.lock_fds is None or owner not in inode.lock_fds:
                return  # the owner's lock file is gone, and its locks with it
            if inode.lock_ranges is None:
                inode.lock_ranges = {}
            ranges = inode.lock_ranges.get(owner)
            if ranges is None:
                ranges = inode.lock_ranges[owner] = LockRanges()
            ranges.set(start, end, ltype)
            if not ranges:
                del inode.lock_ranges[owner]

    def held_locks(self, inode: Inode) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
        """Every owner's lock ranges on ``inode``: (owner, pid, [(start, end, type)])."""
        with self._lock:
            pids = inode.lock_pids or {}
            return [
                (owner, pids.get(owner, 0), list(ranges.ranges))
                for owner, ranges in (inode.lock_ranges or {}).items()
            ]

    def retire_owner(self, inode: Inode, owner: int) -> int | None:
        """Detach ``owner``'s lock file (the caller has pinned ``inode``): it is closed with the
        last pin, as another request may be using it. Returns it, still open, or None."""
        with self._lock:
            fd = inode.lock_fds.pop(owner, None) if inode.lock_fds else None
            if inode.lock_pids:
                inode.lock_pids.pop(owner, None)
            if inode.lock_ranges:
                inode.lock_ranges.pop(owner, None)
            if fd is not None:
                if inode.retired is None:
                    inode.retired = []
                inode.retired.append(fd)
            return fd

    # --- live migration --------------------------------------------------------------------

    def snapshot(self) -> tuple[list[Inode], list[tuple[int, int]], int]:
        """The inodes the guest holds (the root first), the lost ones (nodeid, lookups), and
        the next inode number."""
        with self._lock:
            inodes = sorted(self._by_id.values(), key=lambda i: i.nodeid)
            return inodes, sorted(self._lost.items()), self._next_id

    def handle_of(self, inode: Inode) -> tuple[bytes, int] | None:
        """``inode``'s file handle and mount id, when its file system gives one."""
        if inode.handle is not None:
            return inode.handle, inode.mount_id
        try:
            with self.path(inode) as fd:
                return linux.name_to_handle_at(fd, b"", linux.AT_EMPTY_PATH)
        except OSError:
            return None

    def restore(self, nodeid: int, fd: int, ident: Ident, refcount: int) -> Inode:
        """Take over the source's inode ``nodeid``, with the guest's ``refcount`` lookups,
        found here as ``fd`` (an O_PATH fd this call consumes, which fstat() says is
        ``ident``). ValueError when that file is already another number's."""
        handle, mount_id = self._handle_of(fd)
        with self._lock:
            if handle is not None and not self._remember_mount(fd, ident[2], mount_id):
                handle = None
            key = self._key(ident, handle, mount_id)
            other = self._by_key.get(key)
            if other is not None or nodeid in self._by_id or nodeid in self._lost:
                os.close(fd)
                name = other.nodeid if other is not None else nodeid
                raise ValueError(f"inode {nodeid} is the same file here as inode {name}")
            keep_fd = handle is None
            inode = Inode(nodeid, key, fd if keep_fd else -1, handle, mount_id, ident)
            inode.refcount = refcount
            self._by_id[nodeid] = inode
            self._by_key[key] = inode
            if inode.openable():
                self._on_dev.setdefault(inode.dev, inode)
            self._next_id = max(self._next_id, nodeid + 1)
        if not keep_fd:
            os.close(fd)
        return inode

    def mark_lost(self, nodeid: int, refcount: int) -> None:
        """The guest holds ``nodeid`` (``refcount`` lookups), which could not be found here:
        every request naming it gets EIO until it is forgotten."""
        with self._lock:
            if nodeid not in self._by_id:
                self._lost[nodeid] = self._lost.get(nodeid, 0) + refcount
                self._next_id = max(self._next_id, nodeid + 1)

    def reserve_ids(self, next_id: int) -> None:
        """New inode numbers start at ``next_id`` or later (never one the source gave out)."""
        with self._lock:
            self._next_id = max(self._next_id, next_id)

    def register_mount(self, fd: int) -> int | None:
        """Keep a descriptor on the mount of ``fd`` (O_PATH) for opening handles; its id."""
        try:
            _, mount_id = linux.name_to_handle_at(fd, b"", linux.AT_EMPTY_PATH)
            mode = stat.S_IFMT(os.fstat(fd).st_mode)
        except OSError:
            return None
        with self._lock:
            return mount_id if self._remember_mount(fd, mode, mount_id) else None

    def drop_borrowed_mounts(self) -> None:
        """A store that keeps no handles keeps no mount descriptors either: close those a
        migration opened its handles with."""
        if self._mode is FileHandles.NEVER:
            with self._lock:
                self._close_mount_fds()

    def open_on_mount(self, mount_id: int, handle: bytes, flags: int) -> int:
        """``open_by_handle_at`` on a mount this store keeps a descriptor of."""
        try:
            mount_fd = self._mount_fds[mount_id]
        except KeyError:
            raise OSError(errno.ESTALE, "no descriptor on that mount") from None
        return linux.open_by_handle_at(mount_fd, handle, flags)

    # --- the end ---------------------------------------------------------------------------

    def _close_mount_fds(self) -> None:
        for fd in self._mount_fds.values():
            os.close(fd)
        self._mount_fds.clear()

    def _close_own_fds(self) -> None:
        """The store's own descriptors closed, once it is closed and no request uses them."""
        self._close_mount_fds()
        if self._proc_fds >= 0:
            self._proc_fds = -1
            _PROC_FDS.give()

    def close_all(self) -> None:
        """The daemon is exiting: every inode goes, the root too; what requests still use is
        closed when they are done."""
        with self._lock:
            for inode in list(self._by_id.values()):
                self._bury(inode)
            self._closed = True
            if self._pins == 0:
                self._close_own_fds()
