"""The wire encoding of directory entries (:mod:`pyvirtiofsd.fuse.dirents`): fuse_dirent and
fuse_direntplus records with names padded to 8 bytes, the size the kernel asked for (or the
reply's room) as the bound, and an entry that does not fit refused whole."""

from __future__ import annotations

import stat

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.dirents import DirentWriter
from pyvirtiofsd.fuse.filesystem import Attr, Entry

DT_REG, DT_DIR = 8, 4


def writer(room: int, size: int, plus: bool) -> tuple[bytearray, ReplyWriter, DirentWriter]:
    buf = bytearray(ReplyWriter.HEADER + room)
    out = ReplyWriter([memoryview(buf)])
    return buf, out, DirentWriter(out, size, plus)


def payload(buf: bytearray, out: ReplyWriter) -> bytes:
    return bytes(buf[ReplyWriter.HEADER : out.length])


def test_dirents_are_padded_to_eight_bytes() -> None:
    buf, out, dirents = writer(4096, 4096, plus=False)
    assert not dirents.plus
    names = [b"a", b"exactly8", b"ninechars", b""]
    for i, name in enumerate(names):
        assert dirents.add(100 + i, i + 1, DT_REG, name)
    raw, pos = payload(buf, out), 0
    for i, name in enumerate(names):
        ino, off, namelen, dtype = abi.DIRENT.struct.unpack_from(raw, pos)
        assert (ino, off, namelen, dtype) == (100 + i, i + 1, len(name), DT_REG)
        start = pos + abi.DIRENT.size
        assert raw[start : start + namelen] == name
        pos += abi.dirent_size(len(name))
        assert pos % 8 == 0 and raw[start + namelen : pos] == b"\0" * (pos - start - namelen)
    assert pos == len(raw)


def test_an_entry_that_does_not_fit_is_refused_whole() -> None:
    first = abi.dirent_size(len(b"first"))
    # Room for the first entry and one byte short of the second (a shorter one fits).
    size = first + abi.dirent_size(len(b"ninechars")) - 1
    buf, out, dirents = writer(4096, size, plus=False)
    assert dirents.fits(b"first")
    assert dirents.add(1, 1, DT_REG, b"first")
    length = out.length
    assert not dirents.fits(b"ninechars")
    assert not dirents.add(2, 2, DT_REG, b"ninechars")
    assert out.length == length  # nothing of it written
    assert dirents.add(3, 3, DT_REG, b"s")  # a shorter one still fits
    assert len(payload(buf, out)) == first + abi.dirent_size(1)


def test_the_reply_room_bounds_the_size_too() -> None:
    """A READDIR asking for more than its chain can hold gets what the chain holds."""
    room = abi.dirent_size(4)
    _, out, dirents = writer(room, 1 << 20, plus=False)
    assert dirents.add(1, 1, DT_REG, b"abcd")
    assert not dirents.add(2, 2, DT_REG, b"e")
    assert out.length == ReplyWriter.HEADER + room


def test_direntplus_carries_the_lookup_or_none() -> None:
    attr = Attr(ino=42, size=1234, mode=stat.S_IFREG | 0o640, nlink=1, uid=7, gid=8)
    entry = Entry(42, attr, entry_timeout=1.5, attr_timeout=0.25, generation=3)
    buf, out, dirents = writer(4096, 4096, plus=True)
    assert dirents.plus
    assert dirents.add_plus(None, 1, DT_DIR, b".", ino=1)
    assert dirents.add_plus(entry, 2, DT_REG, b"file")
    assert dirents.add(99, 3, DT_REG, b"nolookup")  # in READDIRPLUS: an entry without lookup
    raw, pos, seen = payload(buf, out), 0, []
    while pos < len(raw):
        e = abi.DIRENTPLUS.unpack(raw, pos)
        start = pos + abi.DIRENTPLUS.size
        seen.append((e, raw[start : start + e.d_namelen]))
        pos += abi.direntplus_size(e.d_namelen)
    (dot, dot_name), (f, f_name), (bare, bare_name) = seen
    assert dot_name == b"." and (dot.nodeid, dot.d_ino, dot.d_off) == (0, 1, 1)
    assert f_name == b"file"
    assert (f.nodeid, f.generation, f.d_ino, f.d_off, f.d_type) == (42, 3, 42, 2, DT_REG)
    assert (f.entry_valid, f.entry_valid_nsec) == (1, 500_000_000)
    assert (f.attr_valid, f.attr_valid_nsec) == (0, 250_000_000)
    assert (f.size, f.mode, f.uid, f.gid) == (1234, stat.S_IFREG | 0o640, 7, 8)
    # No lookup: nodeid 0, so the kernel takes no reference and looks the name up itself.
    assert bare_name == b"nolookup" and (bare.nodeid, bare.d_ino) == (0, 99)


def test_direntplus_that_does_not_fit_is_refused_whole() -> None:
    attr = Attr(ino=5, mode=stat.S_IFREG | 0o644)
    size = abi.direntplus_size(3) + abi.direntplus_size(8) - 1
    buf, out, dirents = writer(4096, size, plus=True)
    assert dirents.add_plus(Entry(5, attr), 1, DT_REG, b"one")
    length = out.length
    assert not dirents.fits(b"eightchr")
    assert not dirents.add_plus(Entry(6, attr), 2, DT_REG, b"eightchr")
    assert out.length == length
    assert len(payload(buf, out)) == abi.direntplus_size(3)
