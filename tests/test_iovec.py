from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from pyvirtiofsd.iovec import IOVEC, Iovecs
from pyvirtiofsd.virtio.memory import MappedRegion, RegionSpec, _address_of

PAGE = 4096
#: (offset, length) of the buffers in the mapping: scattered, out of order, odd sizes.
LAYOUT = [(5 * PAGE, PAGE), (PAGE, PAGE), (9 * PAGE + 7, 100), (3 * PAGE, 1), (12 * PAGE, PAGE)]


@pytest.fixture
def mapping() -> mmap.mmap:
    return mmap.mmap(-1, 16 * PAGE)


def _iovecs(view: memoryview, layout: list[tuple[int, int]] = LAYOUT) -> Iovecs:
    host = _address_of(view)
    raw = b"".join(IOVEC.pack(host + off, n) for off, n in layout)
    return Iovecs(raw, ((host, view[:]),))


def _views(view: memoryview, layout: list[tuple[int, int]] = LAYOUT) -> list[memoryview]:
    return [view[off : off + n] for off, n in layout]


def test_it_is_the_sequence_of_views_it_stands_for(mapping: mmap.mmap) -> None:
    view = memoryview(mapping)
    for i in range(len(mapping)):
        mapping[i] = i % 251
    iov, views = _iovecs(view), _views(view)
    assert len(iov) == len(views)
    assert [bytes(v) for v in iov] == [bytes(v) for v in views]
    assert [bytes(iov[i]) for i in range(-5, 5)] == [bytes(views[i]) for i in range(-5, 5)]
    for piece in (slice(1, None), slice(0, 2), slice(3, 1), slice(None, None, 2), slice(-2, None)):
        assert [bytes(v) for v in iov[piece]] == [bytes(v) for v in views[piece]]
    assert isinstance(iov[1:], Iovecs)
    assert iov.nbytes == sum(map(len, views)) and iov[5:].nbytes == 0
    with pytest.raises(IndexError):
        iov[5]
    with pytest.raises(IndexError):
        iov[-6]
    iov[2][:3] = b"abc"
    assert mapping[9 * PAGE + 7 : 9 * PAGE + 10] == b"abc"
    assert repr(iov) == "Iovecs([4096, 4096, 100, 1, 4096])"


def test_preadv_and_pwritev_do_what_os_does(mapping: mmap.mmap, tmp_path: Path) -> None:
    data = os.urandom(3 * PAGE)
    path = tmp_path / "f"
    path.write_bytes(data)
    view = memoryview(mapping)
    total = sum(n for _, n in LAYOUT)
    fd = os.open(path, os.O_RDWR)
    try:
        # Reads: whole, from an offset, short at the end of the file, nothing past it.
        for offset in (0, 10, len(data) - 5000, len(data) - 1, len(data), len(data) + 9):
            mapping[:] = bytes(len(mapping))
            got = _iovecs(view).preadv(fd, offset)
            seen = b"".join(bytes(v) for v in _views(view))
            mapping[:] = bytes(len(mapping))
            want = os.preadv(fd, _views(view), offset)
            assert got == want == max(0, min(total, len(data) - offset))
            assert seen == b"".join(bytes(v) for v in _views(view))
        # Writes land where os.pwritev puts them.
        mapping[:] = os.urandom(len(mapping))
        assert _iovecs(view).pwritev(fd, 77) == total
        assert path.read_bytes()[77 : 77 + total] == b"".join(bytes(v) for v in _views(view))
    finally:
        os.close(fd)


def test_errors_are_those_of_os(mapping: mmap.mmap) -> None:
    iov = _iovecs(memoryview(mapping))
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(OSError) as e:
            iov.preadv(r, 0)  # a pipe can't be read at an offset
        assert e.value.errno == errno.ESPIPE
        with pytest.raises(OSError) as e:
            iov.pwritev(r, -1)
        assert e.value.errno in (errno.EINVAL, errno.EBADF)
    finally:
        os.close(r)
    with pytest.raises(OSError) as e:
        iov.preadv(-1, 0)
    assert e.value.errno == errno.EBADF
    for offset in (2**63, -(2**63) - 1):
        with pytest.raises(OverflowError):
            iov.preadv(0, offset)
        with pytest.raises(OverflowError):
            iov.pwritev(0, offset)


def test_the_mapping_stays_mapped_while_it_lives(tmp_path: Path) -> None:
    """Its owner closing the region does not unmap it under a call in flight: the unmapping
    waits for the Iovecs to go."""
    fd = os.memfd_create("guest")
    os.ftruncate(fd, 16 * PAGE)
    region = MappedRegion.map_fd(RegionSpec(0, 16 * PAGE, 0x7000_0000, 0), fd)
    os.close(fd)
    iov = _iovecs(region.view)
    assert region.close(quiet=True) is False
    path = tmp_path / "f"
    path.write_bytes(b"x" * PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert iov.preadv(fd, 0) == PAGE
    finally:
        os.close(fd)
    assert bytes(iov[0][:4]) == b"xxxx"
