"""The DAX window end to end without a guest: the daemon as a real process, the project's
Python front-end as the VMM (with a window it really maps files into), FUSE requests sent
through a virtqueue. Every rule is checked on the bytes the window shows."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.transport.dax import MAX_REGIONS, SPARE_MAPPINGS
from tests.e2e.frontend_daemon import WINDOW, Setup, finish, start

K = 4096
R = abi.SETUPMAPPING_FLAG_READ
W = abi.SETUPMAPPING_FLAG_WRITE | abi.SETUPMAPPING_FLAG_READ


def page(tag: bytes, n: int) -> bytes:
    """A page whose bytes say which file and page they are."""
    return (tag + b"%05d" % n).ljust(K, b".")


def write_pages(path: Path, tag: bytes, count: int) -> None:
    path.write_bytes(b"".join(page(tag, i) for i in range(count)))


@pytest.fixture
def dax(tmp_path: Path) -> Iterator[Setup]:
    s = start(tmp_path, "--dax-window", "64M")
    yield s
    finish(s)


def setup(
    s: Setup,
    name: str,
    foffset: int,
    length: int,
    moffset: int,
    flags: int = R,
    fh: int = abi.INVALID_FH,
) -> None:
    s.fuse.setupmapping(s.lookup(name), fh, foffset * K, length * K, flags, moffset * K)


def window_pages(s: Setup, moffset: int, count: int) -> list[bytes]:
    data = s.window.read(moffset * K, count * K)
    return [data[i * K : i * K + 10] for i in range(count)]


def tags(tag: bytes, *pages: int) -> list[bytes]:
    return [page(tag, n)[:10] for n in pages]


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def test_init_offers_alignment_and_the_window(dax: Setup) -> None:
    assert dax.init.flags & abi.InitFlag.MAP_ALIGNMENT  # type: ignore[attr-defined]
    assert dax.init.map_alignment == 12  # type: ignore[attr-defined]
    assert dax.frontend.get_shmem_config()[0] == WINDOW


def test_map_shows_the_file(dax: Setup) -> None:
    write_pages(dax.src / "a", b"A", 8)
    setup(dax, "a", 2, 4, 0)
    assert window_pages(dax, 0, 4) == tags(b"A", 2, 3, 4, 5)


def test_perfect_overlap_replaces(dax: Setup) -> None:
    write_pages(dax.src / "a", b"A", 8)
    write_pages(dax.src / "b", b"B", 8)
    setup(dax, "a", 0, 4, 16)
    setup(dax, "b", 4, 4, 16)
    assert window_pages(dax, 16, 4) == tags(b"B", 4, 5, 6, 7)
    assert dax.window.mappings == {16 * K: (4 * K, False)}


def test_partial_overlap_splits(dax: Setup) -> None:
    write_pages(dax.src / "a", b"A", 8)
    write_pages(dax.src / "b", b"B", 8)
    setup(dax, "a", 0, 8, 0)
    setup(dax, "b", 0, 2, 3)
    assert window_pages(dax, 0, 8) == [
        *tags(b"A", 0, 1, 2),
        *tags(b"B", 0, 1),
        *tags(b"A", 5, 6, 7),
    ]
    assert sorted(dax.window.mappings) == [0, 3 * K, 5 * K]
    # an overlap of two mappings at once
    setup(dax, "b", 4, 4, 2)
    assert window_pages(dax, 0, 8) == [
        *tags(b"A", 0, 1),
        *tags(b"B", 4, 5, 6, 7),
        *tags(b"A", 6, 7),
    ]


def test_remove_part_splits(dax: Setup) -> None:
    write_pages(dax.src / "a", b"A", 8)
    setup(dax, "a", 0, 8, 0)
    dax.fuse.removemapping([(2 * K, 3 * K)])
    assert window_pages(dax, 0, 2) == tags(b"A", 0, 1)
    assert window_pages(dax, 5, 3) == tags(b"A", 5, 6, 7)
    with pytest.raises(OSError):
        dax.window.read(2 * K, K)
    dax.fuse.removemapping([(0, 2 * K), (5 * K, 3 * K), (40 * K, K)])
    assert dax.window.mappings == {}


@pytest.mark.parametrize(
    "foffset,length,moffset",
    [(0, K, WINDOW), (0, 2 * K, WINDOW - K), (0, 0, 0), (1, K, 0), (0, K, 7), (0, 1 << 63, 0)],
)
def test_rejections(dax: Setup, foffset: int, length: int, moffset: int) -> None:
    write_pages(dax.src / "a", b"A", 2)
    ino = dax.lookup("a")
    assert errno_of(dax.fuse.setupmapping, ino, abi.INVALID_FH, foffset, length, R, moffset) == (
        errno.EINVAL
    )
    if foffset % K == 0:  # the window range itself is wrong: REMOVEMAPPING refuses it too
        assert errno_of(dax.fuse.removemapping, [(moffset, length)]) == errno.EINVAL
    assert dax.window.mappings == {}


def test_directories_are_not_mapped(dax: Setup) -> None:
    (dax.src / "d").mkdir()
    ino = dax.lookup("d")
    assert errno_of(dax.fuse.setupmapping, ino, abi.INVALID_FH, 0, K, R, 0) == errno.EINVAL


def test_runs_out_of_slots_until_something_is_removed(dax: Setup) -> None:
    write_pages(dax.src / "a", b"A", 1)
    ino = dax.lookup("a")
    slots = min(MAX_REGIONS, WINDOW // (2 << 20) + SPARE_MAPPINGS)
    for i in range(slots):
        dax.fuse.setupmapping(ino, abi.INVALID_FH, 0, K, R, 2 * i * K)
    err = errno_of(dax.fuse.setupmapping, ino, abi.INVALID_FH, 0, K, R, 2 * slots * K)
    assert err == errno.ENOSPC
    dax.fuse.removemapping([(0, K)])
    dax.fuse.setupmapping(ino, abi.INVALID_FH, 0, K, R, 2 * slots * K)
    assert len(dax.window.mappings) == slots


def test_writes_through_the_window_reach_the_file(dax: Setup) -> None:
    write_pages(dax.src / "a", b"A", 4)
    ino = dax.lookup("a")
    opened = dax.fuse.open(ino, os.O_RDWR)
    dax.fuse.setupmapping(ino, opened.fh, 0, 4 * K, W, 0)
    dax.window.write(K + 10, b"written by the guest")
    dax.fuse.fsync(ino, opened.fh)
    dax.fuse.release(ino, opened.fh)
    data = (dax.src / "a").read_bytes()
    assert data[K + 10 : K + 30] == b"written by the guest"
    # a read-only mapping can't be written
    setup(dax, "a", 0, 1, 8)
    with pytest.raises(OSError):
        dax.window.write(8 * K, b"x")


def test_mapping_after_release_goes_by_inode(dax: Setup) -> None:
    write_pages(dax.src / "a", b"A", 2)
    ino = dax.lookup("a")
    opened = dax.fuse.open(ino)
    dax.fuse.release(ino, opened.fh)
    dax.fuse.setupmapping(ino, abi.INVALID_FH, 0, 2 * K, W, 0)
    assert window_pages(dax, 0, 2) == tags(b"A", 0, 1)


def test_no_stale_data_after_truncate(dax: Setup) -> None:
    write_pages(dax.src / "a", b"A", 4)
    ino = dax.lookup("a")
    setup(dax, "a", 0, 4, 0)
    dax.fuse.setattr(ino, valid=abi.FATTR_SIZE, size=K)
    assert window_pages(dax, 0, 1) == tags(b"A", 0)
    dax.fuse.setattr(ino, valid=abi.FATTR_SIZE, size=4 * K)
    assert dax.window.read(K, 3 * K) == b"\0" * 3 * K


def test_unlinked_file_stays_mapped(dax: Setup) -> None:
    write_pages(dax.src / "a", b"A", 2)
    setup(dax, "a", 0, 2, 0)
    dax.fuse.unlink(ROOT, b"a")
    assert window_pages(dax, 0, 2) == tags(b"A", 0, 1)
    dax.fuse.removemapping([(0, 2 * K)])


def test_read_into_a_buffer_outside_guest_memory_is_efault(dax: Setup) -> None:
    """A READ whose data buffer lies where guest RAM is not (inside a DAX window, as the
    guest sees it): the reply is EFAULT, and the daemon goes on serving."""
    write_pages(dax.src / "a", b"A", 2)
    ino = dax.lookup("a")
    opened = dax.fuse.open(ino)
    q = dax.frontend.queues[1]
    req = abi.IN_HEADER.pack(80, abi.Opcode.READ, 999, ino, 0, 0, 0, 0, 0) + abi.READ_IN.pack(
        opened.fh, 0, K, 0, 0, 0, 0
    )
    ram = dax.frontend.ram
    assert ram is not None
    req_addr = ram.carve(K)
    hdr_addr = ram.carve(K)
    ram.write(req_addr, req)
    d = q.reserve_descs(3)
    q.write_desc(d[0], req_addr, len(req), 1, d[1])  # NEXT
    q.write_desc(d[1], hdr_addr, 16, 1 | 2, d[2])  # NEXT | WRITE
    q.write_desc(d[2], 1 << 40, K, 2, 0)  # WRITE, far outside guest RAM
    q.publish(d[0])
    q.kick()
    assert q.wait(d[0]) == 16
    length, error, unique = abi.OUT_HEADER.unpack(ram.read(hdr_addr, 16))
    assert (length, error, unique) == (16, -errno.EFAULT, 999)
    assert dax.fuse.read(ino, opened.fh, 0, 10) == page(b"A", 0)[:10]


def test_counters_in_the_exit_log(tmp_path: Path) -> None:
    s = start(tmp_path, "--dax-window", "64M")
    write_pages(s.src / "a", b"A", 2)
    setup(s, "a", 0, 2, 0)
    s.fuse.removemapping([(0, 2 * K)])
    os.kill(s.proc.pid, signal.SIGUSR1)
    text = finish(s)
    assert "SETUPMAPPING=1" in text and "REMOVEMAPPING=1" in text
    assert "shmem_map=1" in text and "shmem_unmap=1" in text


def test_without_a_window_mapping_is_enosys(tmp_path: Path) -> None:
    s = start(tmp_path)
    try:
        assert not s.init.flags & abi.InitFlag.MAP_ALIGNMENT  # type: ignore[attr-defined]
        write_pages(s.src / "a", b"A", 1)
        ino = s.lookup("a")
        assert errno_of(s.fuse.setupmapping, ino, abi.INVALID_FH, 0, K, R, 0) == errno.ENOSYS
    finally:
        finish(s)


def test_dax_per_inode_by_size(tmp_path: Path) -> None:
    s = start(tmp_path, "--dax-window", "64M", "--dax-file-size", "8K")
    try:
        assert (s.init.flags | s.init.flags2 << 32) & abi.InitFlag.HAS_INODE_DAX  # type: ignore[attr-defined]
        write_pages(s.src / "small", b"S", 1)
        write_pages(s.src / "big", b"B", 2)
        assert not s.fuse.lookup(ROOT, b"small").flags & abi.ATTR_DAX
        assert s.fuse.lookup(ROOT, b"big").flags & abi.ATTR_DAX
    finally:
        finish(s)


def test_mapping_past_the_end_of_the_file_is_clipped(dax: Setup) -> None:
    """The guest maps whole ranges past a file's end; the front-end maps the whole pages the
    file backs, plus a shadow of its partial last page, and maps again as the file grows or
    shrinks (before the request that changed it is answered)."""
    (dax.src / "a").write_bytes(b"x" * (2 * K + 100))
    ino = dax.lookup("a")
    setup(dax, "a", 0, 8, 0)
    assert dax.window.mappings == {0: (2 * K, False), 2 * K: (K, False)}
    assert dax.window.read(0, 3 * K) == b"x" * (2 * K + 100) + b"\0" * (K - 100)
    opened = dax.fuse.open(ino, os.O_RDWR)
    dax.fuse.write(ino, opened.fh, 5 * K, b"grown")
    assert dax.window.mappings == {0: (5 * K, False), 5 * K: (K, False)}
    assert dax.window.read(5 * K, 6) == b"grown\0"
    dax.fuse.setattr(ino, valid=abi.FATTR_SIZE, size=K)
    assert dax.window.mappings == {0: (K, False)}
    dax.fuse.setattr(ino, valid=abi.FATTR_SIZE, size=0)
    assert dax.window.mappings == {}
    dax.fuse.write(ino, opened.fh, 0, b"back")
    assert dax.window.read(0, 5) == b"back\0"
    dax.fuse.removemapping([(0, 8 * K)])
    assert dax.window.mappings == {}


def test_guest_writes_to_a_shadowed_last_page_reach_the_file(dax: Setup) -> None:
    (dax.src / "a").write_bytes(b"y" * (K + 10))
    ino = dax.lookup("a")
    opened = dax.fuse.open(ino, os.O_RDWR)
    dax.fuse.setupmapping(ino, opened.fh, 0, 4 * K, W, 0)
    dax.window.write(K + 2, b"ZZ")
    dax.window.write(K + 50, b"past the end: dropped, as a page cache would")
    assert (dax.src / "a").read_bytes()[K:] == b"y" * 10  # not yet: the guest has not synced
    dax.fuse.fsync(ino, opened.fh)
    assert (dax.src / "a").read_bytes() == b"y" * (K + 2) + b"ZZ" + b"y" * 6
    # host-side change of the last page shows at the next getattr
    with open(dax.src / "a", "r+b") as f:
        f.seek(K + 8)
        f.write(b"HH")
    dax.fuse.getattr(ino)
    assert dax.window.read(K, 10) == b"yyZZyyyyHH"
    dax.window.write(K, b"Q")
    dax.fuse.release(ino, opened.fh)
    assert (dax.src / "a").read_bytes()[K : K + 10] == b"QyZZyyyyHH"


def test_host_side_growth_is_seen_at_getattr(dax: Setup) -> None:
    (dax.src / "a").write_bytes(b"x" * K)
    ino = dax.lookup("a")
    setup(dax, "a", 0, 4, 0)
    with open(dax.src / "a", "ab") as f:
        f.write(b"y" * K)
    assert dax.fuse.getattr(ino).size == 2 * K
    assert dax.window.read(K, K) == b"y" * K


def test_split_pieces_are_clipped_too(dax: Setup) -> None:
    (dax.src / "a").write_bytes(b"a" * (3 * K))
    write_pages(dax.src / "b", b"B", 4)
    setup(dax, "a", 0, 8, 0)
    setup(dax, "b", 0, 1, 1)
    assert sorted(dax.window.mappings.items()) == [
        (0, (K, False)),
        (K, (K, False)),
        (2 * K, (K, False)),
    ]
    assert window_pages(dax, 1, 1) == tags(b"B", 0)
