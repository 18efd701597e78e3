"""The file-system interface the FUSE server calls: subclass :class:`Filesystem`.

It is inode based, like libfuse's low-level API. Every method gets a :class:`Context` (who asks)
and inode numbers chosen by the file system; it returns plain values or raises ``OSError`` with
the errno the caller should see. Every method not overridden answers ``ENOSYS``, which tells the
kernel the operation is not supported (for some, such as FLUSH or FSYNCDIR, the kernel then
stops sending it).

The lookup count contract
-------------------------
The kernel keeps a reference count on every inode number it has been given. Each successful
``lookup``, ``mknod``, ``mkdir``, ``symlink``, ``link``, ``create`` and ``tmpfile``, and every
entry of ``readdirplus`` with a non-zero inode number except "." and "..", adds one to the count
of the inode it returns. ``forget(ino, n)`` (also delivered as a batch) subtracts ``n``. The file
system must keep an inode number valid, and never reuse it for another object, until its count
drops to zero; only then may it free its state. Unlink and rmdir do not end an inode: an unlinked
file that is still open or still known to the kernel stays reachable by inode number. The root
inode (:data:`ROOT`) is never forgotten. When the connection ends, no forgets arrive for what is
left; ``destroy`` is called instead.

File handles returned by ``open``/``opendir``/``create`` are opaque 64-bit numbers that come back
in later calls on the same open file until ``release``/``releasedir``.

Live migration
--------------
A file system that can move to another daemon with its guest sets ``migratable`` and implements
``save_state`` and ``load_state``: what the guest holds (its inode numbers and their lookup
counts, its open file handles, its locks) as bytes, and the same taken over on the other side,
where the guest goes on with the numbers it has. Both run while no request does. ``load_state``
runs after ``init`` (the server replays the source's INIT first) and raises with a message
saying what could not be found. A file system that is not migratable makes the transport offer
no migration at all.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.records import Attr, Context, Entry, SecurityContext

if TYPE_CHECKING:
    from pyvirtiofsd.fuse.buffers import ReplyWriter, WriteData

try:
    # Read by mypyc when it compiles this module (see pyvirtiofsd.accel); a no-op otherwise.
    from mypy_extensions import mypyc_attr
except ImportError:

    def mypyc_attr(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        return lambda cls: cls


__all__ = [
    "NOW",
    "ROOT",
    "Attr",
    "ConnectionInfo",
    "Context",
    "DaxWindow",
    "DirBuffer",
    "Entry",
    "Filesystem",
    "Lock",
    "Opened",
    "SecurityContext",
    "SetAttr",
    "StatVfs",
    "dtype_of_mode",
]

ROOT = abi.ROOT_ID


def _enosys() -> OSError:
    return OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


class Opened:
    """What open, opendir and create return besides the entry.

    A plain class rather than a named tuple: a compiled build makes a named tuple through its
    Python ``__new__``, which cost as much as the rest of an OPEN's Python work."""

    __slots__ = ("backing_id", "fh", "flags")

    def __init__(self, fh: int, flags: int = 0, backing_id: int = 0) -> None:
        self.fh = fh
        #: FOPEN_* flags (direct I/O, keep cache, passthrough, ...).
        self.flags = flags
        #: Backing id registered with :attr:`ConnectionInfo.backing_open` (FUSE_PASSTHROUGH).
        self.backing_id = backing_id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Opened):
            return NotImplemented
        return (self.fh, self.flags, self.backing_id) == (other.fh, other.flags, other.backing_id)

    def __repr__(self) -> str:
        return f"Opened(fh={self.fh}, flags={self.flags:#x}, backing_id={self.backing_id})"


class StatVfs(NamedTuple):
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int

    @classmethod
    def from_os(cls, st: os.statvfs_result) -> StatVfs:
        return cls(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize,
            st.f_namemax,
            st.f_frsize,
        )


class Lock(NamedTuple):
    """A POSIX record lock range; ``end`` is inclusive (OFFSET_MAX for "to the end")."""

    start: int
    end: int
    type: int
    pid: int


#: The time a SETATTR sets to "now": below any time one can carry (seconds are signed 64-bit,
#: nanoseconds below one second), so that no time, 1969 ones included, passes for it.
NOW: Final = -(1 << 100)


class SetAttr:
    """What a SETATTR asks to change; ``None`` leaves a field alone.

    A plain class rather than a dataclass, as :class:`Opened` is: a compiled build makes a
    dataclass through its generated Python ``__init__``, and its keyword arguments through a
    dictionary."""

    __slots__ = (
        "atime",
        "ctime",
        "fh",
        "gid",
        "kill_suidgid",
        "lock_owner",
        "mode",
        "mtime",
        "size",
        "uid",
    )

    def __init__(
        self,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime: int | None = None,
        mtime: int | None = None,
        ctime: int | None = None,
        fh: int | None = None,
        lock_owner: int | None = None,
        kill_suidgid: bool = False,
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        #: Nanoseconds since the epoch, or :data:`NOW` for the current time.
        self.atime = atime
        self.mtime = mtime
        self.ctime = ctime
        #: The open file the change comes through (ftruncate, fchmod, ...).
        self.fh = fh
        self.lock_owner = lock_owner
        #: Drop set-user-ID and set-group-ID bits (HANDLE_KILLPRIV_V2).
        self.kill_suidgid = kill_suidgid

    def _fields(self) -> tuple[object, ...]:
        return (
            self.mode,
            self.uid,
            self.gid,
            self.size,
            self.atime,
            self.mtime,
            self.ctime,
            self.fh,
            self.lock_owner,
            self.kill_suidgid,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SetAttr):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        names = ("mode", "uid", "gid", "size", "atime", "mtime", "ctime", "fh", "lock_owner")
        shown = [f"{n}={v!r}" for n, v in zip(names, self._fields(), strict=False) if v is not None]
        if self.kill_suidgid:
            shown.append("kill_suidgid=True")
        return f"SetAttr({', '.join(shown)})"


class DaxWindow(Protocol):
    """The DAX window a transport offers (virtio-fs shared memory region 0).

    ``setup`` maps ``length`` bytes of ``fd`` (borrowed: the window keeps its own copy)
    from ``foffset`` at ``moffset`` in the window; ``owner`` names the file (an inode) for
    bookkeeping. ``remove`` unmaps (moffset, length) ranges. Both raise ``OSError``. A file
    system tells the window when a mapped file changes size (``resized``), before it answers
    the request that changed it.
    """

    size: int

    def setup(
        self, fd: int, foffset: int, moffset: int, length: int, writable: bool, owner: object
    ) -> None: ...

    def remove(self, ranges: Iterable[tuple[int, int]]) -> None: ...

    def holds(self, owner: object) -> bool:
        """Whether ``owner`` has mappings: worth calling :meth:`resized` when its size
        changes."""
        ...

    def resized(self, owner: object, size: int) -> None:
        """``owner``'s file is now ``size`` bytes long, or its contents changed."""
        ...

    def flush(self, owner: object) -> None:
        """Put into ``owner``'s file whatever the guest wrote through the window that is not
        there yet (before the file is synced, closed, or read or written another way)."""
        ...


@dataclass(slots=True)
class ConnectionInfo:
    """What the kernel offered at INIT, and what the transport can do beyond FUSE itself."""

    major: int = abi.KERNEL_VERSION
    minor: int = abi.KERNEL_MINOR_VERSION
    #: INIT flags the kernel offered (flags | flags2 << 32).
    capable: int = 0
    #: INIT flags that will be in force once init returns (the file system may add or remove).
    want: int = 0
    max_readahead: int = 0
    max_write: int = 1 << 20
    #: log2 of the alignment asked of DAX mappings (when the transport has a DAX window).
    map_alignment: int = 0
    #: Register an fd as a FUSE_PASSTHROUGH backing file; returns the backing id. /dev/fuse only.
    backing_open: Callable[[int], int] | None = None
    backing_close: Callable[[int], None] | None = None
    #: The DAX window of the virtio-fs device, if it has one.
    dax_window: DaxWindow | None = None
    extra: dict[str, object] = field(default_factory=dict)


def dtype_of_mode(mode: int) -> int:
    """The DT_* value readdir reports for a file mode."""
    return stat.S_IFMT(mode) >> 12


class DirBuffer(Protocol):
    """What ``readdir`` fills: entries in order, each with the offset a later READDIR
    continues from after it, until one does not fit."""

    @property
    def plus(self) -> bool:
        """READDIRPLUS: each entry carries its lookup (see :meth:`add_plus`)."""
        ...

    def fits(self, name: bytes) -> bool:
        """Whether an entry named ``name`` still fits."""
        ...

    def add(self, ino: int, offset: int, dtype: int, name: bytes) -> bool:
        """Add one entry; ``offset`` is where the next READDIR continues after it. Returns
        False (adding nothing) when it does not fit. In a READDIRPLUS it is an entry without a
        lookup, which the kernel then looks up itself."""
        ...

    def add_plus(
        self, entry: Entry | None, offset: int, dtype: int, name: bytes, ino: int = 0
    ) -> bool:
        """Add one READDIRPLUS entry. ``entry`` None means "no lookup" (as for "." and ".."),
        and the kernel then takes no reference; ``ino`` is then the inode number readdir
        shows. Otherwise the entry counts as a lookup, so call :meth:`fits` first and only look
        the name up when it will fit."""
        ...


@mypyc_attr(allow_interpreted_subclasses=True)
class Filesystem:
    """Base class of file systems served over FUSE; every operation defaults to ENOSYS.

    Methods may be called from several threads at once; implementations do their own locking.
    """

    #: Whether :meth:`save_state` and :meth:`load_state` are implemented (live migration).
    migratable: bool = False

    # --- connection ----------------------------------------------------------------------

    def init(self, conn: ConnectionInfo) -> None:
        """Called once at INIT; may adjust ``conn.want`` (only within ``conn.capable``)."""

    def destroy(self) -> None:
        """The connection ended (DESTROY, unmount, or the front-end went away)."""

    def shutdown(self) -> None:
        """The daemon is exiting: make what was written durable and give back every resource
        (descriptors, staging files). Called once, after the transport has ended; requests
        stuck in the file system may still be running (the daemon waits a grace period for
        this call, then exits without it)."""

    def save_state(self) -> bytes:
        """What the guest holds, for another daemon to take over (no request runs); the file
        system keeps it all (the source may go on serving)."""
        raise NotImplementedError(f"{type(self).__name__} cannot save its state")

    def load_state(self, data: bytes) -> None:
        """Take over what :meth:`save_state` gave on the source (after :meth:`init`); raise,
        with a message naming what could not be restored, when it can't."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a saved state")

    # --- names and inodes ----------------------------------------------------------------

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry | None:
        """``name`` in the directory ``parent``, with one more lookup of what it names. None
        says that no such name is there (ENOENT) without raising: the cheap way for the answer
        that path walks and searches get most."""
        raise _enosys()

    def forget(self, ino: int, nlookup: int) -> None:
        """Drop ``nlookup`` references (see the lookup count contract). Never fails."""

    def batch_forget(self, items: Iterable[tuple[int, int]]) -> None:
        for ino, nlookup in items:
            self.forget(ino, nlookup)

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> tuple[Attr, float]:
        """The attributes and how long the kernel may cache them (seconds)."""
        raise _enosys()

    def setattr(self, ctx: Context, ino: int, changes: SetAttr) -> tuple[Attr, float]:
        raise _enosys()

    def readlink(self, ctx: Context, ino: int) -> bytes:
        raise _enosys()

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        raise _enosys()

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        raise _enosys()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        raise _enosys()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    def rename(
        self,
        ctx: Context,
        parent: int,
        name: bytes,
        new_parent: int,
        new_name: bytes,
        flags: int,
    ) -> None:
        """``flags`` are renameat2's RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT."""
        raise _enosys()

    def link(self, ctx: Context, ino: int, new_parent: int, new_name: bytes) -> Entry:
        raise _enosys()

    # --- files ---------------------------------------------------------------------------

    def open(self, ctx: Context, ino: int, flags: int, kill_suidgid: bool) -> Opened:
        raise _enosys()

    def create(
        self,
        ctx: Context,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        umask: int,
        kill_suidgid: bool,
    ) -> tuple[Entry, Opened]:
        raise _enosys()

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int
    ) -> tuple[Entry, Opened]:
        raise _enosys()

    def read(
        self, ctx: Context, ino: int, fh: int, offset: int, size: int, out: ReplyWriter
    ) -> None:
        """Put up to ``size`` bytes from ``offset`` into ``out``: ``out.read_from_fd(fd, offset,
        size)`` fills it straight from a file descriptor, ``out.write(data)`` copies bytes."""
        raise _enosys()

    def write(
        self,
        ctx: Context,
        ino: int,
        fh: int,
        offset: int,
        data: WriteData,
        flags: int,
    ) -> int:
        """Write ``data`` (``data.to_fd(fd, offset)`` or ``data.tobytes()``); returns bytes
        written. ``flags`` are the WRITE_* flags (WRITE_KILL_SUIDGID, ...)."""
        raise _enosys()

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        raise _enosys()

    def release(
        self,
        ctx: Context,
        ino: int,
        fh: int,
        flags: int,
        lock_owner: int,
        flush: bool,
        flock_release: bool,
    ) -> None:
        pass

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    def fallocate(
        self, ctx: Context, ino: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        raise _enosys()

    def lseek(self, ctx: Context, ino: int, fh: int, offset: int, whence: int) -> int:
        raise _enosys()

    def copy_file_range(
        self,
        ctx: Context,
        ino_in: int,
        fh_in: int,
        off_in: int,
        ino_out: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
    ) -> int:
        raise _enosys()

    # --- directories ---------------------------------------------------------------------

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        raise _enosys()

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, out: DirBuffer) -> None:
        """Add entries from ``offset`` until ``out.add``/``out.add_plus`` returns False or the
        directory ends. ``out.plus`` tells READDIRPLUS, where each entry counts as a lookup."""
        raise _enosys()

    def releasedir(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        pass

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    # --- file system ---------------------------------------------------------------------

    def statfs(self, ctx: Context, ino: int) -> StatVfs:
        return StatVfs(0, 0, 0, 0, 0, 512, 255, 0)

    def syncfs(self, ctx: Context, ino: int) -> None:
        raise _enosys()

    def access(self, ctx: Context, ino: int, mask: int) -> None:
        raise _enosys()

    # --- extended attributes -------------------------------------------------------------

    def setxattr(
        self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int, setxattr_flags: int
    ) -> None:
        raise _enosys()

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        """The whole value; the server answers size queries and ERANGE itself."""
        raise _enosys()

    def listxattr(self, ctx: Context, ino: int) -> list[bytes]:
        raise _enosys()

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        raise _enosys()

    # --- locks ---------------------------------------------------------------------------

    def getlk(self, ctx: Context, ino: int, fh: int, owner: int, lock: Lock) -> Lock:
        raise _enosys()

    def setlk(
        self,
        ctx: Context,
        ino: int,
        fh: int,
        owner: int,
        lock: Lock,
        sleep: bool,
        flock: bool,
    ) -> None:
        """Take or release a lock. With ``sleep`` it waits for a conflicting lock to go and
        must give up with EINTR once ``ctx.interrupted`` is set."""
        raise _enosys()

    # --- DAX window ----------------------------------------------------------------------

    def setupmapping(
        self,
        ctx: Context,
        ino: int,
        fh: int,
        foffset: int,
        length: int,
        flags: int,
        moffset: int,
    ) -> None:
        raise _enosys()

    def removemapping(self, ctx: Context, ranges: list[tuple[int, int]]) -> None:
        raise _enosys()

    # --- everything else -----------------------------------------------------------------

    def ioctl(
        self,
        ctx: Context,
        ino: int,
        fh: int,
        flags: int,
        cmd: int,
        arg: int,
        data: bytes,
        out_size: int,
    ) -> tuple[int, bytes]:
        raise _enosys()

    def bmap(self, ctx: Context, ino: int, blocksize: int, block: int) -> int:
        raise _enosys()

    def poll(self, ctx: Context, ino: int, fh: int, kh: int, flags: int, events: int) -> int:
        raise _enosys()

    def statx(
        self, ctx: Context, ino: int, fh: int | None, flags: int, mask: int
    ) -> tuple[dict[str, int], float]:
        raise _enosys()
