"""The saved-state format (:mod:`pyvirtiofsd.fuse.state`): what is written reads back, and
whatever is wrong with a state is a StateError saying what, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtiofsd.fuse.state import StateError, StateReader, StateWriter


@given(st.lists(st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=300)), max_size=30))
def test_what_is_written_reads_back(items: list[int | bytes]) -> None:
    w = StateWriter()
    for item in items:
        if isinstance(item, int):
            w.uint(item)
        else:
            w.bytes(item)
    r = StateReader(w.getvalue())
    for item in items:
        assert (r.uint() if isinstance(item, int) else r.bytes()) == item
    r.end()


def test_small_numbers_take_a_byte() -> None:
    assert StateWriter().uint(0).getvalue() == b"\0"
    assert StateWriter().uint(127).getvalue() == b"\x7f"
    assert StateWriter().uint(128).getvalue() == b"\x80\x01"
    assert len(StateWriter().uint(2**64 - 1)) == 10
    with pytest.raises(ValueError):
        StateWriter().uint(-1)
    with pytest.raises(ValueError):
        StateWriter().uint(2**64)


def test_sections() -> None:
    body = StateWriter().uint(5).bytes(b"name")
    data = StateWriter().section(b"inodes", 2, body).getvalue()
    version, r = StateReader(data).section(b"inodes", (1, 2))
    assert version == 2 and r.uint() == 5 and r.bytes() == b"name"
    r.end()
    with pytest.raises(StateError, match="section b'inodes' where b'handles' belongs"):
        StateReader(data).section(b"handles", (1,))
    with pytest.raises(StateError, match=r"version 2; this daemon reads version 1 \(a newer"):
        StateReader(data).section(b"inodes", (1,))


@pytest.mark.parametrize(
    ("data", "read", "message"),
    [
        (b"", lambda r: r.uint(), "truncated"),
        (b"\x80\x80", lambda r: r.uint(), "truncated"),
        (b"\xff" * 11, lambda r: r.uint(), "longer than 64 bits"),
        (b"\xff" * 9 + b"\x7f", lambda r: r.uint(), "longer than 64 bits"),
        (b"\x05abc", lambda r: r.bytes(), "a field of 5 bytes, 3 left"),
        (b"\x05abcde", lambda r: r.bytes(limit=4), "at most 4"),
        (b"\xff\xff\xff\xff\x0f", lambda r: r.count(), "items announced"),
        (b"\x03\x00\x00\x00", lambda r: r.count(limit=2, name="owners"), r"owners: 3 \(at most 2"),
        (b"\x0a", lambda r: r.uint_below(10, "pid"), r"pid 10 out of range \(below 10\)"),
        (b"\x01\x02", lambda r: (r.uint(), r.end()), "1 bytes past the end"),
    ],
)
def test_a_bad_state_is_a_state_error(data: bytes, read: object, message: str) -> None:
    with pytest.raises(StateError, match=message) as e:
        read(StateReader(data, "the test state"))  # type: ignore[operator]
    assert str(e.value).startswith("the test state: ")


@given(st.binary(max_size=200))
def test_garbage_is_only_ever_a_state_error(data: bytes) -> None:
    r = StateReader(data)
    try:
        _, body = r.section(b"x", (1,))
        for _ in range(body.count()):
            body.bytes()
            body.uint()
        body.end()
    except StateError:
        pass


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=20))
def test_many_numbers_at_once_read_as_one_by_one(values: list[int]) -> None:
    data = StateWriter().items(values).getvalue()
    r = StateReader(data)
    assert r.uints(len(values)) == values
    r.end()
    with pytest.raises(StateError, match="truncated"):
        StateReader(data).uints(len(values) + 1)
