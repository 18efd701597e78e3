"""The values requests carry (:mod:`pyvirtiofsd.fuse.records`), made and read on every request
and compiled in a compiled build: they keep the behaviour they had as plain dataclasses and
classes of :mod:`pyvirtiofsd.fuse.filesystem`, and the server packs them field for field,
whatever timeouts a file system answers with."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi, filesystem, records
from pyvirtiofsd.fuse.filesystem import ROOT, Attr, Context, Entry, Filesystem, SecurityContext
from pyvirtiofsd.fuse.records import split_timeout
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, direct


def test_filesystem_still_exports_them() -> None:
    for name in ("Attr", "Context", "Entry", "SecurityContext"):
        assert getattr(filesystem, name) is getattr(records, name)


def test_context_defaults_equality_and_repr() -> None:
    ctx = Context(1, 2, 3)
    assert (ctx.uid, ctx.gid, ctx.pid, ctx.unique) == (1, 2, 3, 0)
    assert (ctx.groups, ctx.secctx, ctx.interrupted) == ((), None, False)
    label = SecurityContext(b"security.selinux", b"label")
    full = Context(1, 2, 3, unique=9, groups=(4, 5), secctx=label, interrupted=True)
    assert full == Context(1, 2, 3, 9, (4, 5), label, True)
    assert full != Context(1, 2, 3, 9, (4, 5), label, False)
    assert ctx != (1, 2, 3)
    assert repr(ctx) == (
        "Context(uid=1, gid=2, pid=3, unique=0, groups=(), secctx=None, interrupted=False)"
    )
    ctx.interrupted = True  # the server sets it on an INTERRUPT
    ctx.groups = (7,)
    assert ctx.interrupted and ctx.groups == (7,)


class _Timeouts(Filesystem):
    """Answers GETATTR and LOOKUP with the timeout the test sets."""

    def __init__(self) -> None:
        self.timeout = 1.0
        self.attr = Attr(
            ino=7, size=1 << 40, blocks=3, atime=4, mtime=5, ctime=6, atimensec=7,
            mtimensec=8, ctimensec=9, mode=stat.S_IFREG | 0o640, nlink=2, uid=11, gid=12,
            rdev=13, blksize=512, flags=abi.ATTR_SUBMOUNT,
        )  # fmt: skip

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> tuple[Attr, float]:
        return self.attr, self.timeout

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        return Entry(7, self.attr, self.timeout, self.timeout / 2, generation=3)


@pytest.mark.parametrize("timeout", [0.0, -1.0, 0.25, 1, 1.5, 86400.000000001, 1e9])
def test_replies_carry_every_field_and_the_timeout(timeout: float) -> None:
    fs = _Timeouts()
    client = FuseClient(direct(Server(fs)))
    client.init()
    fs.timeout = timeout

    def split(t: float) -> tuple[int, int]:
        return (0, 0) if t <= 0 else (int(t), int((t - int(t)) * 1_000_000_000))

    fields = (7, 1 << 40, 3, 4, 5, 6, 7, 8, 9, stat.S_IFREG | 0o640, 2, 11, 12, 13, 512)
    attr = client.getattr(ROOT)
    assert (attr.attr_valid, attr.attr_valid_nsec) == split(timeout)
    assert tuple(attr)[3:] == (*fields, abi.ATTR_SUBMOUNT)
    entry = client.lookup(ROOT, b"x")
    assert (entry.nodeid, entry.generation) == (7, 3)
    assert (entry.entry_valid, entry.entry_valid_nsec) == split(timeout)
    assert (entry.attr_valid, entry.attr_valid_nsec) == split(timeout / 2)
    assert tuple(entry)[6:] == (*fields, abi.ATTR_SUBMOUNT)


def test_many_distinct_timeouts_stay_exact() -> None:
    """The server splits each timeout it sees once and keeps a bounded number of them: a file
    system that computes its timeouts gets every one exact, past that bound too."""
    fs = _Timeouts()
    client = FuseClient(direct(Server(fs)))
    client.init()
    for i in range(200):
        fs.timeout = 2 + i / 8
        attr = client.getattr(ROOT)
        assert (attr.attr_valid, attr.attr_valid_nsec) == (2 + i // 8, (i % 8) * 125_000_000)


def test_attr_from_stat_takes_the_ids_it_is_given_and_packs_in_fuse_attr_order() -> None:
    st = os.stat("/")
    own = Attr.from_stat(st)
    other = Attr.from_stat(st, 7, 1, uid=1234, gid=5678)
    assert (own.uid, own.gid) == (st.st_uid, st.st_gid)
    assert (other.ino, other.flags, other.uid, other.gid) == (7, 1, 1234, 5678)

    fields = (other.ino, other.size, other.blocks, other.atime, other.mtime, other.ctime)
    fields += (other.atimensec, other.mtimensec, other.ctimensec, other.mode, other.nlink)
    fields += (other.uid, other.gid, other.rdev, other.blksize, other.flags)
    assert other.raw == abi.ATTR.pack(*fields)
    assert Attr(*fields) == other and Attr(raw=other.raw) == other
    assert Attr(*fields[:-1]) != other and hash(Attr(*fields)) == hash(other)


def test_attr_is_laid_out_as_the_abi_says() -> None:
    assert records._ATTR.format == abi.ATTR.struct.format
    assert records._ATTR_SIZE == abi.ATTR.size == 88


def test_times_before_1970_are_the_kernels_signed_seconds(tmp_path: Path) -> None:
    """A file from before 1970 has "negative" times: whole seconds below 0 and nanoseconds
    above them, as a timespec has it, which fuse_attr carries in two's complement. (They once
    made the reply's packing fail: such a file could not even be looked up.)"""
    f = tmp_path / "old"
    f.touch()
    os.utime(f, ns=(-5_500_000_000, -1))
    attr = Attr.from_stat(os.stat(f))
    assert (attr.atime, attr.atimensec) == (-6, 500_000_000)
    assert (attr.mtime, attr.mtimensec) == (-1, 999_999_999)
    atime, mtime = abi.ATTR.unpack(attr.raw)[3:5]
    assert (atime, mtime) == (2**64 - 6, 2**64 - 1)


def test_the_link_count_and_device_are_cut_to_the_32_bits_the_kernel_reads() -> None:
    attr = Attr(nlink=2**32 + 5, rdev=(7 << 32) | 0x1234_5678)
    assert (attr.nlink, attr.rdev) == (5, 0x1234_5678)
    with pytest.raises(ValueError):
        Attr(raw=bytes(87))


def test_split_timeout() -> None:
    assert split_timeout(0) == (0, 0) and split_timeout(-1) == (0, 0)
    assert split_timeout(1.5) == (1, 500_000_000)
    assert split_timeout(86400.25) == (86400, 250_000_000)
