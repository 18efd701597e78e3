"""Local staging files (:mod:`pyvirtiofsd.backends.opendal.staging`) through the file system's
calls, on a real OpenDAL memory Operator that counts its reads: re-reads are local, a random
read fetches little, DAX maps the staged file (one copy of the data), and the cache keeps a
bounded number of files."""

from __future__ import annotations

import errno
import mmap
import os
import random
from pathlib import Path

import opendal
import pytest

from pyvirtiofsd.fuse.filesystem import ROOT
from tests.backends.opendal.conftest import CTX, CountingOperator, make_fs, read


def test_rereads_are_local(tmp_path: Path) -> None:
    op = CountingOperator(opendal.Operator("memory"))
    data = random.Random(1).randbytes(5 << 20)
    op.write("big", data)
    fs = make_fs(tmp_path, op)
    e = fs.lookup(CTX, ROOT, b"big")
    o = fs.open(CTX, e.ino, os.O_RDONLY, False)
    for off in range(0, len(data), 128 << 10):
        assert read(fs, e.ino, o.fh, off, 128 << 10) == data[off : off + (128 << 10)]
    first = op.reads
    # Front to back: a few large ranged reads, not one per request.
    assert 1 <= first <= 5
    assert read(fs, e.ino, o.fh, 0, 1 << 20) == data[: 1 << 20]
    # Reads never go past the end (OpenDAL refuses a range beyond it).
    assert read(fs, e.ino, o.fh, len(data) - 10, 4096) == data[-10:]
    assert read(fs, e.ino, o.fh, len(data) + 10, 4096) == b""
    fs.release(CTX, e.ino, o.fh, 0, 0, True, False)
    # Closed and opened again (attributes still fresh): served from the same local file.
    o = fs.open(CTX, e.ino, os.O_RDONLY, False)
    assert read(fs, e.ino, o.fh, 3 << 20, 4096) == data[3 << 20 : (3 << 20) + 4096]
    assert op.reads == first
    fs.release(CTX, e.ino, o.fh, 0, 0, True, False)
    fs.shutdown()


def test_random_read_fetches_little(tmp_path: Path) -> None:
    op = CountingOperator(opendal.Operator("memory"))
    data = random.Random(2).randbytes(64 << 20)
    op.write("huge", data)
    fs = make_fs(tmp_path, op)
    e = fs.lookup(CTX, ROOT, b"huge")
    o = fs.open(CTX, e.ino, os.O_RDONLY, False)
    assert read(fs, e.ino, o.fh, 40 << 20, 4096) == data[40 << 20 : (40 << 20) + 4096]
    blob = fs.cache.peek("huge")
    assert blob is not None and blob.present.total() <= 1 << 20
    fs.release(CTX, e.ino, o.fh, 0, 0, True, False)
    fs.shutdown()


def test_dax_fd_maps_the_staged_file(tmp_path: Path) -> None:
    op = opendal.Operator("memory")
    data = random.Random(3).randbytes(3 << 20)
    op.write("f", data)
    fs = make_fs(tmp_path, op)
    e = fs.lookup(CTX, ROOT, b"f")
    o = fs.open(CTX, e.ino, os.O_RDWR, False)
    # Read-only mapping of the second MiB: filled before the fd is handed out.
    fd = fs.dax_fd(e.ino, o.fh, 1 << 20, 1 << 20, False)
    try:
        with mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ, offset=1 << 20) as m:
            assert m[:] == data[1 << 20 : 2 << 20]
    finally:
        os.close(fd)
    # A writable mapping without an open file handle (the guest maps after release, too).
    fd = fs.dax_fd(e.ino, None, 0, 1 << 20, True)
    try:
        with mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, offset=0) as m:
            m[10:15] = b"DAXed"
    finally:
        os.close(fd)
    # Writes through the mapping are invisible to us: fsync uploads the file regardless.
    fs.fsync(CTX, e.ino, o.fh, False)
    expected = bytearray(data)
    expected[10:15] = b"DAXed"
    assert bytes(op.read("f")) == expected
    # READ sees the mapping's bytes: one copy of the data.
    assert read(fs, e.ino, o.fh, 0, 20) == expected[:20]
    fs.release(CTX, e.ino, o.fh, 0, 0, True, False)
    with pytest.raises(OSError) as err:
        fs.dax_fd(fs.lookup(CTX, ROOT, b".").ino, None, 0, 4096, False)
    assert err.value.errno == errno.EINVAL
    fs.shutdown()


def test_cache_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    op = opendal.Operator("memory")
    for i in range(40):
        op.write(f"s{i}", b"small")
    fs = make_fs(tmp_path, op)
    fs.cache.max_files = 8
    for i in range(40):
        e = fs.lookup(CTX, ROOT, f"s{i}".encode())
        o = fs.open(CTX, e.ino, os.O_RDONLY, False)
        assert read(fs, e.ino, o.fh, 0, 100) == b"small"
        fs.release(CTX, e.ino, o.fh, 0, 0, True, False)
        fs.forget(e.ino, 1)
    assert len(fs.cache.all()) <= 8
    assert len(os.listdir(fs.cache.dir)) <= 8
    assert len(fs.inodes) == 1
    fs.shutdown()
    assert not os.path.exists(fs.cache.dir)
