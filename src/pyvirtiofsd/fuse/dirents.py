"""The wire encoding of directory entries (READDIR and READDIRPLUS replies).

A file system's ``readdir`` fills a :class:`~.filesystem.DirBuffer`; this is the one the server
hands it. Entries are ``fuse_dirent`` or ``fuse_direntplus`` records, each name padded to 8
bytes, and no entry is written in part: one that does not fit the size the kernel asked for (or
the reply's room) is refused whole, so the next READDIR continues from it.
"""

from __future__ import annotations

from typing import Final

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.filesystem import Entry
from pyvirtiofsd.fuse.records import entry_out

__all__ = ["DirentWriter"]

_DIRENT: Final = abi.DIRENT.struct
#: A fuse_direntplus is a fuse_entry_out, then a fuse_dirent; this one's entry_out is all zero,
#: as the kernel reads an entry without a lookup.
_NO_ENTRY: Final = bytes(abi.ENTRY_OUT.size)
#: NUL bytes that pad a name of each length modulo 8 to the next multiple of 8.
_PAD: Final = tuple(b"\0" * (-n & 7) for n in range(8))


class DirentWriter:
    """Encodes READDIR/READDIRPLUS entries into the reply, up to the size the kernel asked.

    Each entry is one write of its whole record: a record's parts written one by one cost a
    compiled build more than the bytes they copy."""

    __slots__ = ("_out", "_plus", "_size", "_start")

    def __init__(self, out: ReplyWriter, size: int, plus: bool) -> None:
        self._out = out
        self._start = out.length
        self._size = min(size, out.space())
        self._plus = plus

    @property
    def plus(self) -> bool:
        return self._plus

    def fits(self, name: bytes) -> bool:
        # Each size called by name: a compiled build calls either directly.
        need = abi.direntplus_size(len(name)) if self._plus else abi.dirent_size(len(name))
        return self._out.length - self._start + need <= self._size

    def add(self, ino: int, offset: int, dtype: int, name: bytes) -> bool:
        """Add one entry; ``offset`` is where the next READDIR continues after it. Returns
        False (adding nothing) when it does not fit. In a READDIRPLUS it is an entry without a
        lookup, which the kernel then looks up itself."""
        if self._plus:
            return self.add_plus(None, offset, dtype, name, ino)
        if not self.fits(name):
            return False
        size = len(name)
        self._out.write(_DIRENT.pack(ino, offset, size, dtype) + name + _PAD[size & 7])
        return True

    def add_plus(
        self, entry: Entry | None, offset: int, dtype: int, name: bytes, ino: int = 0
    ) -> bool:
        """Add one READDIRPLUS entry. ``entry`` None means "no lookup" (as for "." and ".."),
        and the kernel then takes no reference; ``ino`` is then the inode number readdir
        shows (0 would hide the entry: C libraries skip those). Otherwise the entry counts as
        a lookup, so call :meth:`fits` first and only look the name up when it will fit."""
        if not self.fits(name):
            return False
        if entry is None:
            head = _NO_ENTRY
        else:
            head = entry_out(entry)
            ino = entry.attr.ino
        size = len(name)
        self._out.write(head + _DIRENT.pack(ino, offset, size, dtype) + name + _PAD[size & 7])
        return True
