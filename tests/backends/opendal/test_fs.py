"""The object-storage file system (:mod:`pyvirtiofsd.backends.opendal.fs`) called directly, as the
FUSE server calls it, on a real OpenDAL memory Operator: commit at fsync, the DAX hook of a
read-only share, a slow store that does not hold up what the cache can answer, and handles that
end only with their own release."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import opendal
import pytest

from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.dirents import DirentWriter
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.policy import CachePolicy
from tests.backends.opendal.conftest import CTX, CountingOperator, make_fs, read, write


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
