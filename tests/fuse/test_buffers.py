"""Scatter-gather reads and writes across buffer boundaries."""

import ctypes
import errno
import os
import struct
from collections.abc import Sequence
from typing import Any

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse import buffers as buffers_module
from pyvirtiofsd.fuse.buffers import ReplyWriter, RequestReader, ShortBuffer, WriteData
from pyvirtiofsd.iovec import IOVEC, Iovecs


def _split(data: bytes, cuts: list[int]) -> list[memoryview]:
    out, last = [], 0
    for c in [*cuts, len(data)]:
        out.append(memoryview(bytearray(data[last:c])))
        last = c
    return out


def test_reader_contiguous_and_split() -> None:
    data = bytes(range(100))
    r = RequestReader(_split(data, [10, 11, 50]))
    assert bytes(r.read(5)) == data[:5]
    assert bytes(r.read(10)) == data[5:15]  # crosses two boundaries
    views = r.views(40)
    assert b"".join(views) == data[15:55]
    assert r.remaining == 45
    with pytest.raises(ShortBuffer):
        r.read(46)
    assert bytes(r.read(45)) == data[55:]


@pytest.mark.parametrize("cuts", [[], [40], [10, 11, 50], [40, 40, 56], [1, 2, 3, 99]])
def test_skip_moves_the_cursor_as_reading_does(cuts: list[int]) -> None:
    data = bytes(range(100))
    for first in range(0, 101, 7):
        skipped = RequestReader(_split(data, cuts))
        skipped.skip(first)
        assert skipped.remaining == 100 - first
        assert bytes(skipped.read(100 - first)) == data[first:]
    # An empty buffer it has not stepped into stays ahead, as after take().
    stepped = RequestReader(_split(data, [40, 40]))
    stepped.skip(40)
    taken = RequestReader(_split(data, [40, 40]))
    taken.take(40)
    assert (stepped._index, stepped._offset) == (taken._index, taken._offset)
    r = RequestReader(_split(data, cuts), length=60)
    r.skip(50)
    with pytest.raises(ShortBuffer):
        r.skip(11)
    assert bytes(r.read(10)) == data[50:60]


def test_reader_length_limit() -> None:
    r = RequestReader([memoryview(b"abcdef")], length=3)
    with pytest.raises(ShortBuffer):
        r.read(4)


def test_writer_scatters_and_finishes_header() -> None:
    bufs = [memoryview(bytearray(n)) for n in (7, 16, 3, 100)]
    w = ReplyWriter(bufs)
    w.write(b"A" * 20)
    w.pack(abi.WRITE_OUT.struct, 5, 0)
    n = w.finish(0, 42)
    flat = b"".join(bytes(b) for b in bufs)[:n]
    assert abi.OUT_HEADER.unpack(flat) == (16 + 20 + 8, 0, 42)
    assert flat[16:36] == b"A" * 20
    assert abi.WRITE_OUT.unpack(flat, 36).size == 5


def test_writer_overflow() -> None:
    w = ReplyWriter([memoryview(bytearray(20))])
    with pytest.raises(ShortBuffer):
        w.write(b"x" * 5)


def test_writer_reads_from_fd(tmp_path) -> None:
    path = tmp_path / "f"
    payload = os.urandom(10000)
    path.write_bytes(payload)
    bufs = [memoryview(bytearray(n)) for n in (16, 4096, 4096, 4096)]
    w = ReplyWriter(bufs)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert w.read_from_fd(fd, 100, 9000) == 9000
    finally:
        os.close(fd)
    n = w.finish(0, 1)
    assert b"".join(bytes(b) for b in bufs)[16:n] == payload[100:9100]


def _read_from_file(
    tmp_path, bufs: Sequence[memoryview], offset: int, size: int
) -> tuple[bytes, ReplyWriter, int]:
    """A 10,000-byte file's ``size`` bytes from ``offset`` read into a reply over ``bufs``:
    the file's bytes, the writer, and what read_from_fd returned."""
    path = tmp_path / "f"
    payload = os.urandom(10000)
    path.write_bytes(payload)
    w = ReplyWriter(bufs)
    fd = os.open(path, os.O_RDONLY)
    try:
        return payload, w, w.read_from_fd(fd, offset, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "cut",
    [
        [1 << 20],  # /dev/fuse: one buffer for the whole reply
        [16, 4096, 4096, 4096],  # a guest: the out header, then its pages
        [20, 4092, 4096, 100],  # a header shared with data, pages cut anywhere
        [16, 3000],  # less room than asked
    ],
)
@pytest.mark.parametrize(("offset", "size"), [(0, 4096), (100, 9000), (9990, 4096), (20000, 10)])
def test_writer_reads_from_fd_however_the_buffers_are_cut(
    tmp_path, cut: list[int], offset: int, size: int
) -> None:
    """A READ gets the file's bytes (clipped to the room, short at the end of the file), and
    the reply goes on after them, whatever views hold it and whichever build reads."""
    bufs = [memoryview(bytearray(n)) for n in cut]
    payload, w, got = _read_from_file(tmp_path, bufs, offset, size)
    want = payload[offset : offset + min(size, sum(cut) - 16)]
    assert got == len(want)
    if w.space() >= 3:
        w.write(b"end")
        want += b"end"
    n = w.finish(0, 1)
    assert n == 16 + len(want)
    assert b"".join(bytes(b) for b in bufs)[16:n] == want


def test_write_data_to_fd(tmp_path) -> None:
    path = tmp_path / "f"
    payload = os.urandom(5000)
    views = _split(payload, [1, 4096])
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert WriteData(views, len(payload)).to_fd(fd, 10) == 5000
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 10 + payload


def _as_iovecs(sizes: list[int]) -> tuple[bytearray, Iovecs]:
    """Buffers of ``sizes`` bytes laid out back to front in one bytearray, as an Iovecs."""
    memory = bytearray(sum(sizes) + 64 * len(sizes))
    view = memoryview(memory)
    host = ctypes.addressof(ctypes.c_char.from_buffer(view))
    raw, at = b"", len(memory)
    for n in sizes:
        at -= n + 64
        raw += IOVEC.pack(host + at, n)
    return memory, Iovecs(raw, ((host, view[:]),))


@pytest.mark.parametrize(("offset", "size"), [(100, 3 * 4096), (0, 3 * 4096), (7000, 3 * 4096)])
def test_writer_reads_from_fd_into_an_iovec_array(tmp_path, offset: int, size: int) -> None:
    """A READ's pages held as an Iovecs get the same bytes as views would, short at the end
    of the file too."""
    _, bufs = _as_iovecs([16, 4096, 4096, 4096])
    payload, w, got = _read_from_file(tmp_path, bufs, offset, size)
    assert got == len(payload[offset : offset + size])
    n = w.finish(0, 1)
    assert n == 16 + got
    assert b"".join(bytes(b) for b in bufs)[16:n] == payload[offset : offset + size]


def test_write_data_from_an_iovec_array(tmp_path) -> None:
    path = tmp_path / "f"
    payload = os.urandom(5000)
    _, bufs = _as_iovecs([40, 1, 4096, 863])
    for view, part in zip(bufs, _split(payload, [40, 41, 4137]), strict=True):
        view[:] = part
    reader = RequestReader(bufs)
    assert bytes(reader.read(40)) == payload[:40]
    data = reader.views(4960)
    assert isinstance(data, Iovecs)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert WriteData(data, 4960).to_fd(fd, 10) == 4960
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 10 + payload[40:]


def _entry_reply(views: list[memoryview]) -> bytes:
    """A LOOKUP-like reply (a head packed, then attribute bytes copied, then a dirent) into
    ``views``; the bytes the views hold, header included."""
    attr = bytes(range(1, abi.ATTR.size + 1))
    w = ReplyWriter(views)
    w.pack_then(abi.ENTRY_OUT_HEAD.struct, (7, 1, 2, 3, 4, 5), attr)
    w.pack(abi.DIRENT.struct, 9, 10, 3, 4)
    n = w.finish(0, 42)
    return b"".join(bytes(v) for v in views)[:n]


def test_pack_then_is_the_same_bytes_however_the_buffers_are_cut() -> None:
    """The head and the attributes land in place when both fit the current buffer, else go
    through the scattering path: every cut (and an empty buffer at it) gives the same reply."""
    whole = _entry_reply([memoryview(bytearray(512))])
    size = len(whole)
    assert size == 16 + abi.ENTRY_OUT.size + abi.DIRENT.size
    assert abi.ENTRY_OUT.unpack(whole, 16)[:6] == (7, 1, 2, 3, 4, 5)
    assert whole[16 + abi.ENTRY_OUT_HEAD.size : 16 + abi.ENTRY_OUT.size] == bytes(
        range(1, abi.ATTR.size + 1)
    )
    for cut in range(1, size):
        for sizes in ((cut, 512), (cut, 0, 512), (cut, 1, 2, 512)):
            views = [memoryview(bytearray(n)) for n in sizes]
            assert _entry_reply(views) == whole, sizes


def test_pack_then_that_does_not_fit_raises_and_writes_nothing_past_the_room() -> None:
    for room in range(16, 16 + abi.ENTRY_OUT.size):
        buf = bytearray(room + 8)
        w = ReplyWriter([memoryview(buf)[: room // 2], memoryview(buf)[room // 2 : room]])
        with pytest.raises(ShortBuffer):
            w.pack_then(abi.ENTRY_OUT_HEAD.struct, (7, 1, 2, 3, 4, 5), b"\xff" * abi.ATTR.size)
        assert buf[room:] == bytes(8)


def test_the_out_header_is_the_abis() -> None:
    assert buffers_module.OUT_HEADER.format == abi.OUT_HEADER.struct.format


@pytest.mark.parametrize("cut", [None, 16, 10, 3])
def test_finish_writes_the_out_header_wherever_the_buffers_cut_it(cut: int | None) -> None:
    room = bytearray(64)
    views = [memoryview(room)] if cut is None else [memoryview(room)[:cut], memoryview(room)[cut:]]
    w = ReplyWriter(views)
    w.write(b"payload")
    assert w.finish(-2, 1 << 63) == 23
    assert abi.OUT_HEADER.struct.unpack_from(room) == (23, -2, 1 << 63)
    assert room[16:23] == b"payload"


native_stores = pytest.mark.skipif(
    buffers_module._native_put is None, reason="pure build: no C stores (they come with mypyc's)"
)


@native_stores
def test_the_c_stores_store_what_slicing_and_struct_store() -> None:
    put, put_header = buffers_module._native_put, buffers_module._native_put_header
    for offset in range(0, 9):
        for data in (b"", b"x", b"0123456789", bytearray(b"ab"), memoryview(b"abcdef")[1:4]):
            room, expect = bytearray(16), bytearray(16)
            if offset + len(data) <= 16:
                put(memoryview(room), offset, data)
                expect[offset : offset + len(data)] = data
                assert room == expect
            else:
                with pytest.raises(ValueError):
                    put(memoryview(room), offset, data)
                assert room == bytes(16)
    room = bytearray(20)
    put_header(memoryview(room), 20, -5, 7)
    assert abi.OUT_HEADER.struct.unpack_from(room) == (20, -5, 7)


@native_stores
@pytest.mark.parametrize(
    "target",
    [
        lambda: memoryview(bytes(32)),
        lambda: memoryview(bytearray(32))[::2],
        lambda: memoryview(bytearray(32)).cast("I"),
        lambda: memoryview(bytearray(32)).cast("B", (4, 8)),
        lambda: memoryview(bytearray(8)),
        lambda: object(),
    ],
)
def test_the_c_stores_refuse_what_slicing_and_struct_refuse(target: Any) -> None:
    view = target()
    with pytest.raises((TypeError, BufferError, ValueError)):
        buffers_module._native_put_header(view, 16, 0, 1)
    with pytest.raises((TypeError, BufferError, ValueError)):
        buffers_module._native_put(view, 4, b"0123456789")
    for length, error, unique in ((1 << 32, 0, 0), (0, 1 << 31, 0), (0, 0, 1 << 64), (-1, 0, 0)):
        with pytest.raises((OverflowError, ValueError)):
            buffers_module._native_put_header(memoryview(bytearray(16)), length, error, unique)


@pytest.mark.parametrize("cuts", [[16], [8, 8], [0, 16], [16, 0], [1] * 16])
def test_an_empty_payload_fits_however_the_header_is_cut(cuts: list[int]) -> None:
    """Nothing written at the very end of the buffers (a READ of 0 bytes, an empty xattr list)
    stores nothing, wherever the views end: it once looked for a view past the last one."""
    views = [memoryview(bytearray(n)) for n in cuts]
    w = ReplyWriter(views)
    w.write(b"")
    w.pack(struct.Struct("<0s"), b"")
    assert w.finish(0, 5) == 16
    assert abi.OUT_HEADER.struct.unpack(b"".join(bytes(v) for v in views)) == (16, 0, 5)


@native_stores
def test_the_c_store_refuses_data_of_wider_items_as_slicing_does() -> None:
    room = memoryview(bytearray(16))
    wide = memoryview(b"\1" * 8).cast("I")
    with pytest.raises(ValueError):
        room[0:8] = wide
    with pytest.raises(ValueError):
        buffers_module._native_put(room, 0, wide)
    assert bytes(room) == bytes(16)


@native_stores
def test_the_c_read_reads_what_pread_reads(tmp_path) -> None:
    pread_into = buffers_module._native_pread_into
    path = tmp_path / "f"
    payload = os.urandom(5000)
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, size, offset in [(0, 5000, 0), (16, 100, 4990), (3, 0, 0), (0, 10, 6000)]:
            room = bytearray(5016)
            assert pread_into(memoryview(room), start, size, fd, offset) == len(
                os.pread(fd, size, offset)
            )
            assert room[start : start + size].rstrip(b"\0") == os.pread(fd, size, offset).rstrip(
                b"\0"
            )
        room = bytearray(16)
        for bad in [(-1, 1), (0, 17), (16, 1), (17, 0), (0, -1)]:
            with pytest.raises(ValueError):
                pread_into(room, *bad, fd, 0)
        for bad_fd, bad_offset in [(-1, 0), (fd, -1), (1 << 40, 0)]:
            with pytest.raises((ValueError, OverflowError)):
                pread_into(room, 0, 1, bad_fd, bad_offset)
        with pytest.raises((TypeError, BufferError)):
            pread_into(b"read-only", 0, 1, fd, 0)
        with pytest.raises(ValueError):
            pread_into(memoryview(bytearray(16)).cast("I"), 0, 1, fd, 0)
        assert room == bytes(16)  # the refusals stored nothing
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        pread_into(room, 0, 1, fd, 0)  # closed
    assert e.value.errno == errno.EBADF
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(IsADirectoryError):
            pread_into(room, 0, 1, dfd, 0)
    finally:
        os.close(dfd)
