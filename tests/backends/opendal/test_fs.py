"""The object-storage file system called directly, as the FUSE server calls it, on a real
OpenDAL memory Operator: the inode table's memory bound, the DAX hook, the read cache, errno
mapping, and that a slow store does not hold up what the cache can answer."""

from __future__ import annotations

import errno
import mmap
import os
import random
import stat
import threading
from pathlib import Path
from typing import Any

import opendal
import pytest
from opendal import exceptions as ex

from pyvirtiofsd.backends.opendal import OpendalConfig, OpendalFs
from pyvirtiofsd.backends.opendal.errors import errno_of
from pyvirtiofsd.backends.opendal.ranges import Ranges
from pyvirtiofsd.fuse.buffers import ReplyWriter, WriteData
from pyvirtiofsd.fuse.dirents import DirentWriter
from pyvirtiofsd.fuse.filesystem import ROOT, Context
from pyvirtiofsd.fuse.policy import CachePolicy

CTX = Context(uid=0, gid=0, pid=1)


class CountingOperator:
    """A real Operator that counts the reads it serves, and can hold them: with `hold` set, a
    read announces itself on `held` and waits until `hold` is cleared."""

    def __init__(self, op: Any) -> None:
        self._op = op
        self.reads = 0
        self.hold = False
        self.held = threading.Event()
        self._release = threading.Event()

    def release(self) -> None:
        self.hold = False
        self._release.set()

    def read(self, path: str, **kwargs: Any) -> bytes:
        self.reads += 1
        if self.hold:
            self.held.set()
            self._release.wait(60)
        return self._op.read(path, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._op, name)


def make_fs(tmp_path: Path, op: Any = None, **cfg: Any) -> OpendalFs:
    config = OpendalConfig("memory", cache_dir=str(tmp_path / "cache"), **cfg)
    return OpendalFs(config, op if op is not None else opendal.Operator("memory"))


def write(fs: OpendalFs, ino: int, fh: int, offset: int, data: bytes) -> int:
    return fs.write(CTX, ino, fh, offset, WriteData([memoryview(data)], len(data)), 0)


def read(fs: OpendalFs, ino: int, fh: int, offset: int, size: int) -> bytes:
    buf = bytearray(size + ReplyWriter.HEADER)
    out = ReplyWriter([memoryview(buf)])
    fs.read(CTX, ino, fh, offset, size, out)
    return bytes(buf[ReplyWriter.HEADER : out.length])


def create(fs: OpendalFs, name: str, data: bytes = b"") -> int:
    entry, opened = fs.create(CTX, ROOT, name.encode(), 0o644, os.O_RDWR, 0, False)
    if data:
        write(fs, entry.ino, opened.fh, 0, data)
    fs.release(CTX, entry.ino, opened.fh, os.O_RDWR, 0, True, False)
    return entry.ino


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


def test_dax_fd_refused_when_readonly(tmp_path: Path) -> None:
    op = opendal.Operator("memory")
    op.write("f", b"x")
    fs = make_fs(tmp_path, op, readonly=True)
    e = fs.lookup(CTX, ROOT, b"f")
    with pytest.raises(OSError) as err:
        fs.dax_fd(e.ino, None, 0, 4096, True)
    assert err.value.errno == errno.EROFS
    fd = fs.dax_fd(e.ino, None, 0, 4096, False)
    assert os.pread(fd, 10, 0) == b"x"
    os.close(fd)
    fs.shutdown()


def test_write_commit_and_fsync(tmp_path: Path) -> None:
    op = opendal.Operator("memory")
    fs = make_fs(tmp_path, op)
    entry, opened = fs.create(CTX, ROOT, b"new", 0o600, os.O_WRONLY, 0, False)
    # In the store from the start (empty: CREATE claims the name), its data at the commit.
    assert bytes(op.read("new")) == b""
    assert fs.lookup(CTX, ROOT, b"new").ino == entry.ino
    write(fs, entry.ino, opened.fh, 0, b"hello")
    write(fs, entry.ino, opened.fh, 10, b"world")
    fs.fsync(CTX, entry.ino, opened.fh, False)
    assert bytes(op.read("new")) == b"hello\0\0\0\0\0world"
    attr, _ = fs.getattr(CTX, entry.ino, None)
    assert attr.size == 15 and stat.S_IMODE(attr.mode) == 0o600
    fs.release(CTX, entry.ino, opened.fh, 0, 0, True, False)
    fs.shutdown()


def test_slow_store_does_not_block_cached_reads(tmp_path: Path) -> None:
    op = CountingOperator(opendal.Operator("memory"))
    op.write("hot", b"h" * 100_000)
    op.write("cold", b"c" * 100_000)
    fs = make_fs(tmp_path, op, cache=CachePolicy.ALWAYS)
    hot = fs.lookup(CTX, ROOT, b"hot")
    cold = fs.lookup(CTX, ROOT, b"cold")
    oh = fs.open(CTX, hot.ino, os.O_RDONLY, False)
    oc = fs.open(CTX, cold.ino, os.O_RDONLY, False)
    assert read(fs, hot.ino, oh.fh, 0, 10) == b"h" * 10
    # The store hangs on the cold read; everything the cache can answer still gets through.
    op.hold = True
    slow = threading.Thread(target=read, args=(fs, cold.ino, oc.fh, 0, 10))
    slow.start()
    assert op.held.wait(30)
    assert read(fs, hot.ino, oh.fh, 50_000, 10) == b"h" * 10
    fs.getattr(CTX, hot.ino, None)
    fs.lookup(CTX, ROOT, b"hot")
    fs.forget(hot.ino, 1)
    assert slow.is_alive()
    op.release()
    slow.join(60)
    assert not slow.is_alive()
    for ino, fh in ((hot.ino, oh.fh), (cold.ino, oc.fh)):
        fs.release(CTX, ino, fh, 0, 0, True, False)
    fs.shutdown()


def test_errno_map() -> None:
    cases = {
        ex.NotFound: errno.ENOENT,
        ex.PermissionDenied: errno.EACCES,
        ex.AlreadyExists: errno.EEXIST,
        ex.IsADirectory: errno.EISDIR,
        ex.NotADirectory: errno.ENOTDIR,
        ex.Unsupported: errno.EOPNOTSUPP,
        ex.RateLimited: errno.EAGAIN,
        ex.Unexpected: errno.EIO,
    }
    for kind, code in cases.items():
        assert errno_of(kind("x")) == code
    assert errno_of(RuntimeError("x")) == errno.EIO


def test_store_errors_are_oserrors(tmp_path: Path) -> None:
    fs = make_fs(tmp_path)
    with pytest.raises(OSError) as e:
        fs.store.read("nothing", 0, 10)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(OSError) as e:
        fs.lookup(CTX, ROOT, b"x" * 300)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        fs.lookup(CTX, ROOT, b"\xff\xfe")
    assert e.value.errno == errno.EINVAL
    fs.shutdown()


def test_ranges_against_a_model() -> None:
    rng = random.Random(9)
    for _ in range(2000):
        r = Ranges()
        model: set[int] = set()
        for _ in range(rng.randint(1, 12)):
            a = rng.randint(0, 60)
            b = a + rng.randint(0, 20)
            op = rng.random()
            if op < 0.6:
                assert r.add(a, b) == len(set(range(a, b)) - model)
                model |= set(range(a, b))
            elif op < 0.8:
                gone = {x for x in model if x >= a}
                assert r.cut(a) == len(gone)
                model -= gone
            else:
                gone = model & set(range(a, b))
                assert r.remove(a, b) == len(gone)
                model -= gone
            assert r.total() == len(model)
            s, e = sorted((rng.randint(0, 90), rng.randint(0, 90)))
            got: set[int] = set()
            for x, y in r.missing(s, e):
                got |= set(range(x, y))
            assert got == set(range(s, e)) - model


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


def test_releasedir_of_a_file_handle_leaves_it_to_release(tmp_path: Path) -> None:
    """RELEASEDIR with a file's handle took it out of the table as if it were a directory's:
    the later RELEASE was EBADF and what the file held (its writer count, its open local copy
    and inode) was never let go. Each kind of handle ends only with its own release."""
    op = opendal.Operator("memory")
    fs = make_fs(tmp_path, op)
    entry, opened = fs.create(CTX, ROOT, b"f", 0o644, os.O_RDWR, 0, False)
    write(fs, entry.ino, opened.fh, 0, b"data")
    fs.releasedir(CTX, ROOT, opened.fh, 0)
    assert read(fs, entry.ino, opened.fh, 0, 4) == b"data"
    fs.release(CTX, entry.ino, opened.fh, os.O_RDWR, 0, True, False)
    assert bytes(op.read("f")) == b"data"
    blob = fs.cache.peek("f")
    assert blob is None or (blob.writers == 0 and blob.opens == 0)
    # And a directory's handle is no file's: RELEASE of it is EBADF and leaves it usable.
    d = fs.opendir(CTX, ROOT, 0)
    with pytest.raises(OSError) as e:
        fs.release(CTX, ROOT, d.fh, 0, 0, False, False)
    assert e.value.errno == errno.EBADF
    out = ReplyWriter([memoryview(bytearray(4096))])
    fs.readdir(CTX, ROOT, d.fh, 0, DirentWriter(out, 4096, plus=False))
    assert out.length > ReplyWriter.HEADER
    fs.releasedir(CTX, ROOT, d.fh, 0)
    fs.shutdown()
