"""The object-storage backend's inode table (:mod:`pyvirtiofsd.backends.opendal.inodes`) through
the file system's calls: only what the kernel holds a reference to is kept, a forgotten name
comes back with a new number, and READDIRPLUS entries count as lookups."""

from __future__ import annotations

from pathlib import Path

import opendal

from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.dirents import DirentWriter
from pyvirtiofsd.fuse.filesystem import ROOT
from tests.backends.opendal.conftest import CTX, make_fs


def test_forgotten_inodes_are_freed(tmp_path: Path) -> None:
    op = opendal.Operator("memory")
    for i in range(3000):
        op.write(f"d/f{i}", b"x")
    fs = make_fs(tmp_path, op)
    d = fs.lookup(CTX, ROOT, b"d")
    inos = [fs.lookup(CTX, d.ino, f"f{i}".encode()).ino for i in range(3000)]
    assert len(set(inos)) == 3000
    # A second lookup of the same name is the same inode, one more reference.
    again = fs.lookup(CTX, d.ino, b"f7")
    assert again.ino == inos[7]
    assert len(fs.inodes) == 3002
    fs.forget(inos[7], 1)
    fs.batch_forget((ino, 1) for ino in inos)
    assert len(fs.inodes) == 2
    fs.forget(d.ino, 1)
    assert len(fs.inodes) == 1
    # A forgotten name comes back with a new number: numbers are never reused.
    d2 = fs.lookup(CTX, ROOT, b"d")
    assert d2.ino != d.ino
    assert fs.lookup(CTX, d2.ino, b"f7").ino not in inos
    fs.shutdown()


def test_readdirplus_entries_count_as_lookups(tmp_path: Path) -> None:
    op = opendal.Operator("memory")
    for i in range(50):
        op.write(f"f{i:02d}", b"x" * i)
    fs = make_fs(tmp_path, op)
    opened = fs.opendir(CTX, ROOT, 0)
    names = []
    offset = 0
    while True:
        buf = bytearray(4096)
        out = ReplyWriter([memoryview(buf)])
        dirbuf = DirentWriter(out, 4096, plus=True)
        fs.readdir(CTX, ROOT, opened.fh, offset, dirbuf)
        if out.length == ReplyWriter.HEADER:
            break
        # Walk the entries to find the next offset (fuse_direntplus: 128-byte entry_out
        # + dirent header of 24 bytes + name, padded to 8).
        pos = ReplyWriter.HEADER
        while pos < out.length:
            namelen = int.from_bytes(buf[pos + 128 + 16 : pos + 128 + 20], "little")
            offset = int.from_bytes(buf[pos + 128 + 8 : pos + 128 + 16], "little")
            names.append(bytes(buf[pos + 152 : pos + 152 + namelen]).decode())
            pos += (152 + namelen + 7) & ~7
    fs.releasedir(CTX, ROOT, opened.fh, 0)
    assert names == [".", ".."] + [f"f{i:02d}" for i in range(50)]
    # memory has no user metadata: a listing is complete, every entry was a lookup.
    assert len(fs.inodes) == 51
    node = fs.inodes.find("f10")
    assert node is not None and node.meta.size == 10
    fs.forget(node.ino, 1)
    assert fs.inodes.find("f10") is None
    fs.shutdown()
