"""Scatter-gather reads and writes across buffer boundaries."""

import os

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.buffers import ReplyWriter, RequestReader, ShortBuffer, WriteData


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


def test_reader_length_limit() -> None:
    r = RequestReader([memoryview(b"abcdef")], length=3)
    with pytest.raises(ShortBuffer):
        r.read(4)


def test_writer_scatters_and_finishes_header() -> None:
    bufs = [memoryview(bytearray(n)) for n in (7, 16, 3, 100)]
    w = ReplyWriter(bufs)
    w.write(b"A" * 20)
    w.pack(abi.WRITE_OUT.struct, 5, 0)
    n = w.finish(abi.OUT_HEADER.struct, 0, 42)
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
    n = w.finish(abi.OUT_HEADER.struct, 0, 1)
    assert b"".join(bytes(b) for b in bufs)[16:n] == payload[100:9100]


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
