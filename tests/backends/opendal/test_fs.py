"""The object-storage file system (:mod:`pyvirtiofsd.backends.opendal.fs`) called directly, as the
FUSE server calls it, on a real OpenDAL memory Operator: commit at fsync, the DAX hook of a
read-only share, a slow store that does not hold up what the cache can answer, and handles that
end only with their own release."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import opendal
import pytest

from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.dirents import DirentWriter
from pyvirtiofsd.fuse.filesystem import ROOT, SetAttr
from pyvirtiofsd.fuse.policy import CachePolicy
from tests.backends.opendal.conftest import CTX, CountingOperator, make_fs, read, write
from tests.backends.windows import OwnerWindow, dax_client, owners_told


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


class _FailingList:
    """A real Operator whose listings fail after ``good`` entries while ``failing`` is set,
    as a store that drops the connection between two pages of a listing."""

    def __init__(self, op: Any, good: int) -> None:
        self._op = op
        self.good = good
        self.failing = True

    def list(self, path: str, **kwargs: Any) -> Iterator[Any]:
        for i, entry in enumerate(self._op.list(path, **kwargs)):
            if self.failing and i >= self.good:
                raise OSError(errno.ECONNRESET, "listing broke off")
            yield entry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._op, name)


def _readdirplus(fs: Any, fh: int, offset: int) -> list[tuple[str, int]]:
    """One READDIRPLUS reply: (name, d_off) of each entry."""
    buf = bytearray(65536)
    out = ReplyWriter([memoryview(buf)])
    fs.readdir(CTX, ROOT, fh, offset, DirentWriter(out, len(buf), plus=True))
    got = []
    pos = ReplyWriter.HEADER
    while pos < out.length:
        d_off = int.from_bytes(buf[pos + 136 : pos + 144], "little")
        namelen = int.from_bytes(buf[pos + 144 : pos + 148], "little")
        got.append((bytes(buf[pos + 152 : pos + 152 + namelen]).decode(), d_off))
        pos += (152 + namelen + 7) & ~7
    return got


def test_a_listing_that_fails_part_way_answers_what_it_has_and_goes_on_later(
    tmp_path: Path,
) -> None:
    """A listing the store breaks off after some entries: the READDIRPLUS answers the entries it
    looked up (answering the error instead threw their lookups away, which the kernel could
    then never forget); the next one gets the error; once the store answers again, the one after
    goes on from there to the end (the broken listing was kept and read as the end before)."""
    op = _FailingList(opendal.Operator("memory"), good=4)
    for i in range(10):
        op.write(f"f{i}", b"x")
    fs = make_fs(tmp_path, op)
    fh = fs.opendir(CTX, ROOT, 0).fh
    first = _readdirplus(fs, fh, 0)
    assert [n for n, _ in first] == [".", ".."] + [f"f{i}" for i in range(4)]
    assert len(fs.inodes) == 1 + 4  # the root, and a lookup the kernel holds for each
    with pytest.raises(OSError) as got:
        _readdirplus(fs, fh, first[-1][1])
    assert got.value.errno == errno.ECONNRESET
    assert len(fs.inodes) == 1 + 4
    op.failing = False
    rest = _readdirplus(fs, fh, first[-1][1])
    assert [n for n, _ in rest] == [f"f{i}" for i in range(4, 10)]
    assert len(fs.inodes) == 1 + 10
    fs.releasedir(CTX, ROOT, fh, 0)
    fs.shutdown()


def test_requests_on_a_handle_keep_the_dax_window_of_the_handles_file(tmp_path: Path) -> None:
    """READ, WRITE, FLUSH, FSYNC and RELEASE act on the handle's object, whatever inode the
    guest names with it: its window pages go into it first (else an fsync would upload without
    them) and its mappings follow its size; the named inode's are left alone."""
    op = opendal.Operator("memory")
    op.write("named", b"n" * 10)
    op.write("other", b"o" * 10)
    fs = make_fs(tmp_path, op)
    window = OwnerWindow()
    c = dax_client(fs, window)
    try:
        named = c.lookup(ROOT, b"named").nodeid
        other = c.lookup(ROOT, b"other").nodeid
        fh = c.open(other, os.O_RDWR).fh
        requests = {
            "read": lambda: c.read(named, fh, 0, 4096),
            "write": lambda: c.write(named, fh, 0, b"x" * 8192),
            "fsync": lambda: c.fsync(named, fh),
            "flush": lambda: c.flush(named, fh),
            "release": lambda: c.release(named, fh),
        }
        assert owners_told(window, requests) == {name: {other} for name in requests}
        assert bytes(op.read("named")) == b"n" * 10
    finally:
        fs.shutdown()


@pytest.mark.parametrize("change", ["truncate", "chmod"])
def test_a_change_through_a_handle_whose_copy_was_replaced_goes_to_the_file(
    tmp_path: Path, change: str
) -> None:
    """A read-only handle keeps its copy when another client changes the object and a later
    open takes a fresh one. A SETATTR through that handle (ftruncate, fchmod) changes the file
    the name holds, as on any file system, and reaches the store; it was made on the handle's
    detached copy, acknowledged, and lost."""
    op = opendal.Operator("memory")
    # No attribute cache: the open after the other client revalidates at once.
    fs = make_fs(tmp_path, op, cache=CachePolicy.NEVER)
    entry, opened = fs.create(CTX, ROOT, b"a", 0o644, os.O_RDWR, 0, False)
    write(fs, entry.ino, opened.fh, 0, b"\xa8" * 11)
    fs.release(CTX, entry.ino, opened.fh, 0, 0, True, False)
    old = fs.open(CTX, entry.ino, os.O_RDONLY, False)
    op.write("a", b"XXXXX")  # another client
    fs.getattr(CTX, entry.ino, None)
    fresh = fs.open(CTX, entry.ino, os.O_RDONLY, False)
    assert read(fs, entry.ino, fresh.fh, 0, 20) == b"XXXXX"
    if change == "truncate":
        attr, _ = fs.setattr(CTX, entry.ino, SetAttr(size=1, fh=old.fh))
        assert attr.size == 1
        assert bytes(op.read("a")) == b"X"
        assert read(fs, entry.ino, fresh.fh, 0, 20) == b"X"
    else:
        attr, _ = fs.setattr(CTX, entry.ino, SetAttr(mode=0o600, fh=old.fh))
        assert stat.S_IMODE(attr.mode) == 0o600
        assert stat.S_IMODE(fs.getattr(CTX, entry.ino, None)[0].mode) == 0o600
        assert bytes(op.read("a")) == b"XXXXX"
    for h in (old, fresh):
        fs.release(CTX, entry.ino, h.fh, 0, 0, False, False)
    assert bytes(op.read("a")) == (b"X" if change == "truncate" else b"XXXXX")
    fs.shutdown()
