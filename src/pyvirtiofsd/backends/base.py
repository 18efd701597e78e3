"""What every storage backend shares: its file handles, its errors, its use of the DAX window.

File handles
------------
A :class:`HandleTable` maps the 64-bit numbers the guest gets from OPEN, OPENDIR, CREATE and
TMPFILE to the backend's :class:`Handle` objects. The guest may send any number, on any queue,
at the same time as a RELEASE of it, so the table keeps these rules:

* Numbers count up from 1 and are never reused; a number the table does not hold (never given,
  or released) is EBADF, never another file.
* A handle is counted: ``users`` is one for the table while the number is in it, plus one for
  each request using the handle right now. A request brackets every use with :meth:`use` (or
  :meth:`use_if`) and :meth:`done`, in ``try``/``finally``.
* :meth:`remove` (RELEASE, RELEASEDIR) takes the number out of the table, so that no request
  gets the handle any more, and hands the table's count to the caller, who ends it with
  :meth:`done`. Whoever brings the count to zero, the releaser or the last request still using
  the handle, calls the table's ``close`` for it: exactly once, outside the table's lock. A
  release therefore never closes what a request on another queue is using, and never waits
  for one (a request may wait for long, for a lock say).
* A backend whose RELEASE has work to finish before it answers (uploading what was written
  through the handle) uses :meth:`remove_idle`: it takes the number out and returns once no
  request uses the handle any more; the caller then has it alone, tears it down itself, and
  ``close`` is not called for it.
* :meth:`remove_all` empties the table when the session ends, handing over the table's count
  of each handle as :meth:`remove` does.
* Live migration: a destination puts the source's handles in under the source's numbers
  (:meth:`insert`) and never gives out a number the source did (:meth:`reserve`). A number whose
  file could not be opened again is *lost* (:meth:`mark_lost`): using it is EIO, releasing it
  forgets it.
* The table's one lock guards the numbers and the counts only: no I/O and no ``close`` runs
  under it. READ and WRITE pay for two acquisitions of it and nothing more, taken with
  ``acquire``/``release`` rather than ``with`` (on Python 3.11 the context-manager protocol costs
  more than the lock itself).

Errors
------
Backends answer a request's failure by raising ``OSError`` with the errno the guest should see:
:func:`oserror` makes one.

The DAX window
--------------
The ``dax_*`` functions are what a backend does with the transport's window
(:class:`~pyvirtiofsd.fuse.filesystem.DaxWindow`, ``None`` when there is none): map and unmap
for SETUPMAPPING/REMOVEMAPPING, and the two duties towards a file with mappings: put what the
guest wrote through the window into the file before the file is read, written, synced, closed or
uploaded another way (:func:`dax_flush`), and tell the window when the file's size or contents
change (:func:`dax_resized`). :class:`Backend` answers SETUPMAPPING and REMOVEMAPPING with them;
a backend says how to open a file for a mapping in :meth:`Backend.dax_fd`.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ConnectionInfo, Context, Filesystem
from pyvirtiofsd.mutex import Mutex, acquire, new_mutex, release

if TYPE_CHECKING:
    from pyvirtiofsd.fuse.filesystem import DaxWindow

try:
    # Read by mypyc when it compiles this module (see pyvirtiofsd.accel); a no-op otherwise.
    from mypy_extensions import mypyc_attr
except ImportError:

    def mypyc_attr(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        return lambda cls: cls

__all__ = [
    "Backend",
    "Handle",
    "HandleTable",
    "dax_flush",
    "dax_map",
    "dax_resized",
    "dax_unmap",
    "oserror",
]


def oserror(code: int, what: str = "") -> OSError:
    """The error a request fails with: ``code`` is the errno the guest sees, ``what`` a note for
    the log (the errno's own text by default)."""
    return OSError(code, what or os.strerror(code))


# --- file handles ------------------------------------------------------------------------------


# Other backends and tests subclass these in pure Python, even when this module is compiled.
@mypyc_attr(allow_interpreted_subclasses=True)
class Handle:
    """Base class of what a backend keeps for an open file or directory."""

    __slots__ = ("users",)

    #: The table's reference while the handle is in it, plus one for each request using it.
    users: int


H = TypeVar("H", bound=Handle)


class HandleTable(Generic[H]):
    """The open files and directories of one session: see the module's rules."""

    __slots__ = ("_close", "_handles", "_idle", "_lock", "_lost", "_next")

    def __init__(self, close: Callable[[H], None] | None = None) -> None:
        #: Called for a removed handle when its last user is done (not after remove_idle).
        self._close = close
        self._handles: dict[int, H] = {}
        self._lock: Mutex = new_mutex()
        self._next = 1
        #: Handles a remove_idle() waits for, by id(), with what wakes it.
        self._idle: dict[int, threading.Event] = {}
        #: Numbers a migration could not open again (EIO until released).
        self._lost: set[int] = set()

    def add(self, h: H) -> int:
        """Put ``h`` in the table (counted once, for the table); returns its number."""
        h.users = 1
        # The lock's methods as functions, as in use(): every OPEN adds and every RELEASE
        # removes. Nothing between acquire() and release() raises.
        lock = self._lock
        acquire(lock)
        fh = self._next
        self._next += 1
        self._handles[fh] = h
        release(lock)
        return fh

    def use(self, fh: int) -> H:
        """The handle ``fh``, counted as used until :meth:`done`; EBADF when there is none."""
        # The lock's methods as functions (see pyvirtiofsd.mutex), here and in done(): every
        # READ and WRITE uses a handle.
        lock = self._lock
        acquire(lock)
        h = self._handles.get(fh)
        if h is not None:
            h.users += 1
        release(lock)
        if h is None:
            if fh in self._lost:
                raise oserror(errno.EIO, f"file handle {fh} was lost in a migration")
            raise oserror(errno.EBADF, f"unknown file handle {fh}")
        return h

    def use_if(self, fh: int | None) -> H | None:
        """Like :meth:`use`, but None for no number or an unknown one (requests such as GETATTR
        may name a handle that is gone: they then do without)."""
        if fh is None:
            return None
        try:
            return self.use(fh)
        except OSError:
            return None

    def done(self, h: H) -> None:
        """The end of one use (or of the count :meth:`remove` handed over); the last one ends
        the handle."""
        lock = self._lock
        acquire(lock)
        h.users -= 1
        last = not h.users
        release(lock)
        if last:
            self._last_user_left(h)

    def remove(self, fh: int, kind: type | None = None) -> H | None:
        """Take ``fh`` out of the table (only if its handle is a ``kind``, when given); the
        caller ends the count it gets with :meth:`done`. None when there is no such handle."""
        lock = self._lock
        acquire(lock)
        try:
            h = self._handles.get(fh)
            if h is None or (kind is not None and not isinstance(h, kind)):
                self._lost.discard(fh)
                return None
            del self._handles[fh]
        finally:
            release(lock)
        return h

    def remove_idle(self, fh: int, kind: type | None = None) -> H | None:
        """Take ``fh`` out of the table as :meth:`remove` does, and return its handle once no
        request uses it: the caller has it alone and tears it down (``close`` is not called).
        None when there is no such handle."""
        with self._lock:
            h = self._handles.get(fh)
            if h is None or (kind is not None and not isinstance(h, kind)):
                return None
            del self._handles[fh]
            h.users -= 1
            if not h.users:
                return h
            # Registered under the lock, before any user can bring the count to zero.
            idle = self._idle[id(h)] = threading.Event()
        idle.wait()
        return h

    def remove_all(self) -> list[H]:
        """Empty the table; the caller ends each handle's count with :meth:`done` (or drops
        them all when the process is ending)."""
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            self._lost.clear()
        return handles

    def items(self) -> tuple[list[tuple[int, H]], list[int], int]:
        """The handles by number, the lost numbers, and the next number (live migration)."""
        with self._lock:
            return sorted(self._handles.items()), sorted(self._lost), self._next

    def insert(self, fh: int, h: H) -> None:
        """Put ``h`` in under the number ``fh`` the guest already has (live migration)."""
        h.users = 1
        with self._lock:
            if fh in self._handles or fh in self._lost or fh <= 0:
                raise ValueError(f"file handle {fh} is taken")
            self._handles[fh] = h
            self._next = max(self._next, fh + 1)

    def mark_lost(self, fh: int) -> None:
        """The guest holds ``fh``, whose file could not be opened here: EIO until released."""
        with self._lock:
            if fh not in self._handles and fh > 0:
                self._lost.add(fh)
                self._next = max(self._next, fh + 1)

    def reserve(self, next_fh: int) -> None:
        """Numbers given from now on start at ``next_fh`` or later."""
        with self._lock:
            self._next = max(self._next, next_fh)

    def lost(self, fh: int) -> bool:
        return fh in self._lost

    def __contains__(self, fh: object) -> bool:
        return fh in self._handles

    def __len__(self) -> int:
        return len(self._handles)

    def _last_user_left(self, h: H) -> None:
        idle = self._idle.pop(id(h), None) if self._idle else None
        if idle is not None:
            idle.set()
        elif self._close is not None:
            self._close(h)


# --- the DAX window ----------------------------------------------------------------------------


def dax_map(
    window: DaxWindow | None,
    ino: int,
    foffset: int,
    length: int,
    flags: int,
    moffset: int,
    open_fd: Callable[[bool], int],
) -> None:
    """SETUPMAPPING: map ``length`` bytes of ``ino``'s file from ``foffset`` at ``moffset`` in
    the window. ``open_fd(writable)`` checks what it must and opens a descriptor for the mapping
    (the window keeps its own copy; this closes it). ENOSYS without a window."""
    if window is None:
        raise oserror(errno.ENOSYS)
    writable = bool(flags & abi.SETUPMAPPING_FLAG_WRITE)
    fd = open_fd(writable)
    try:
        window.setup(fd, foffset, moffset, length, writable, ino)
    finally:
        os.close(fd)


def dax_unmap(window: DaxWindow | None, ranges: Iterable[tuple[int, int]]) -> None:
    """REMOVEMAPPING of (moffset, length) ranges. ENOSYS without a window."""
    if window is None:
        raise oserror(errno.ENOSYS)
    window.remove(ranges)


def dax_flush(window: DaxWindow | None, ino: int) -> None:
    """What the guest wrote through the window goes to ``ino``'s file first (before the file is
    synced, closed, uploaded, or read or written another way)."""
    if window is not None and window.holds(ino):
        window.flush(ino)


def dax_resized(window: DaxWindow | None, ino: int, size: int | None = None, fd: int = -1) -> None:
    """``ino``'s file is now ``size`` bytes long, or its contents changed: keep its mappings
    within it. With ``size`` None the size is ``fd``'s, asked only when there are mappings."""
    if window is not None and window.holds(ino):
        window.resized(ino, os.fstat(fd).st_size if size is None else size)


@mypyc_attr(allow_interpreted_subclasses=True)
class Backend(Filesystem):
    """Base class of the storage backends: a :class:`Filesystem` that keeps what INIT told it in
    ``self._conn`` and maps its files into the DAX window of the transport, if it has one."""

    _conn: ConnectionInfo

    def dax_fd(self, ino: int, fh: int | None, offset: int, length: int, writable: bool) -> int:
        """A descriptor of ``ino``'s file for a DAX mapping of [offset, offset+length), which
        the caller closes; it refuses what may not be mapped (EINVAL for what is no regular
        file, EROFS for a writable mapping of a read-only share). ``fh`` may be None or stale:
        the guest maps on page faults, also after it released the file."""
        raise oserror(errno.ENOSYS)

    def setupmapping(
        self, ctx: Context, ino: int, fh: int, foffset: int, length: int, flags: int, moffset: int
    ) -> None:
        dax_map(
            self._conn.dax_window, ino, foffset, length, flags, moffset,
            lambda writable: self.dax_fd(ino, fh, foffset, length, writable),
        )  # fmt: skip

    def removemapping(self, ctx: Context, ranges: list[tuple[int, int]]) -> None:
        dax_unmap(self._conn.dax_window, ranges)
