"""The wire encoding of directory entries (READDIR and READDIRPLUS replies).

A file system's ``readdir`` fills a :class:`~.filesystem.DirBuffer`; this is the one the server
hands it. Entries are ``fuse_dirent`` or ``fuse_direntplus`` records, each name padded to 8
bytes, and no entry is written in part: one that does not fit the size the kernel asked for (or
the reply's room) is refused whole, so the next READDIR continues from it.
"""

from __future__ import annotations

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.filesystem import Entry
from pyvirtiofsd.fuse.records import split_timeout

__all__ = ["DirentWriter"]


class DirentWriter:
    """Encodes READDIR/READDIRPLUS entries into the reply, up to the size the kernel asked."""

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
        need = (abi.direntplus_size if self._plus else abi.dirent_size)(len(name))
        return self._out.length - self._start + need <= self._size

    def add(self, ino: int, offset: int, dtype: int, name: bytes) -> bool:
        """Add one entry; ``offset`` is where the next READDIR continues after it. Returns
        False (adding nothing) when it does not fit. In a READDIRPLUS it is an entry without a
        lookup, which the kernel then looks up itself."""
        if self._plus:
            return self.add_plus(None, offset, dtype, name, ino)
        if not self.fits(name):
            return False
        out = self._out
        out.pack(abi.DIRENT.struct, ino, offset, len(name), dtype)
        out.write(name)
        pad = -len(name) & 7
        if pad:
            out.write(b"\0" * pad)
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
        out = self._out
        if entry is None:
            out.pack(abi.DIRENTPLUS.struct, *((0,) * 22), ino, offset, len(name), dtype)
        else:
            ev, evn = split_timeout(entry.entry_timeout)
            av, avn = split_timeout(entry.attr_timeout)
            attr = entry.attr
            head = (entry.ino, entry.generation, ev, av, evn, avn)
            out.pack_then(abi.ENTRY_OUT_HEAD.struct, head, attr.raw)
            out.pack(abi.DIRENT.struct, attr.ino, offset, len(name), dtype)
        out.write(name)
        pad = -len(name) & 7
        if pad:
            out.write(b"\0" * pad)
        return True
