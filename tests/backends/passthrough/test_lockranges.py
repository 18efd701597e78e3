"""The record of one owner's POSIX locks (:mod:`pyvirtiofsd.backends.passthrough.lockranges`):
after any sequence of locks and unlocks it holds exactly what the kernel holds for that owner's
open file."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofsd.backends.passthrough.lockranges import LockRanges

OFFSET_MAX = 0x7FFF_FFFF_FFFF_FFFF
_FLOCK = struct.Struct("=hh4xqqi4x")
R, W, U = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK


def test_a_lock_replaces_what_it_overlaps_and_an_unlock_removes_it() -> None:
    r = LockRanges()
    r.set(10, 19, W)
    r.set(0, 4, R)
    assert r.ranges == [(0, 4, R), (10, 19, W)]
    r.set(12, 14, R)  # splits the write lock
    assert r.ranges == [(0, 4, R), (10, 11, W), (12, 14, R), (15, 19, W)]
    r.set(3, 16, U)
    assert r.ranges == [(0, 2, R), (17, 19, W)]
    r.set(0, OFFSET_MAX, W)
    assert r.ranges == [(0, OFFSET_MAX, W)]
    r.set(100, OFFSET_MAX, U)
    assert r.ranges == [(0, 99, W)]
    r.set(0, OFFSET_MAX, U)
    assert not r and r.ranges == []
    r.set(5, 4, W)  # an empty range changes nothing
    assert r.ranges == []


OPS = st.lists(
    st.tuples(
        st.integers(0, 40),
        st.one_of(st.integers(0, 24), st.just(None)),  # None: to the end of the file
        st.sampled_from([R, W, U]),
    ),
    max_size=25,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_the_record_is_what_the_kernel_holds(tmp_path: Path, ops: list) -> None:  # type: ignore[type-arg]
    path = tmp_path / "file"
    path.write_bytes(b"")
    mine = os.open(path, os.O_RDWR)
    probe = os.open(path, os.O_RDWR)
    try:
        record = LockRanges()
        for start, length, ltype in ops:
            end = OFFSET_MAX if length is None else start + length
            size = 0 if length is None else length + 1
            fcntl.fcntl(mine, fcntl.F_OFD_SETLK, _FLOCK.pack(ltype, os.SEEK_SET, start, size, 0))
            record.set(start, end, ltype)
        for offset in range(80):
            held = fcntl.fcntl(probe, fcntl.F_OFD_GETLK, _FLOCK.pack(W, os.SEEK_SET, offset, 1, 0))
            kernel = _FLOCK.unpack(held)[0]
            ours = next((t for s, e, t in record.ranges if s <= offset <= e), U)
            assert kernel == ours, (offset, record)
    finally:
        os.close(mine)
        os.close(probe)
