from __future__ import annotations

import contextlib
import gc
import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pyvirtiofsd.virtio.chain as chain_module
from pyvirtiofsd.iovec import IOVEC, Iovecs
from pyvirtiofsd.virtio.chain import (
    DESC,
    MAX_INDIRECT,
    SMALL_REQUEST,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Chain,
    InvalidChain,
    read_chain,
)
from pyvirtiofsd.virtio.memory import GuestMemory, MappedRegion, RegionSpec, _address_of

MiB = 1 << 20
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
TABLE = 0x0
DATA = 0x10000
SIZE = 8


class Guest:
    """Two adjacent 1 MiB regions of plain bytes with a descriptor table at 0."""

    def __init__(self) -> None:
        self.lo = bytearray(MiB)
        self.hi = bytearray(MiB)
        self.memory = GuestMemory(
            [
                MappedRegion.from_buffer(0, self.lo, name="lo"),
                MappedRegion.from_buffer(MiB, self.hi, name="hi"),
            ]
        )
        self.table = self.memory.translate(TABLE, 16 * SIZE)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.lo, TABLE + 16 * i, addr, length, flags, nxt)

    def indirect(self, at: int, entries: list[tuple[int, int, int, int]]) -> None:
        for i, entry in enumerate(entries):
            DESC.pack_into(self.lo, at + 16 * i, *entry)

    def read(
        self,
        head: int = 0,
        *,
        indirect: bool = True,
        size: int = SIZE,
        gpas: list[tuple[int, int]] | None = None,
    ) -> Chain:
        return read_chain(self.memory, self.table, size, head, indirect=indirect, gpas=gpas)


@pytest.fixture
def g() -> Guest:
    return Guest()


def test_readable_then_writable(g: Guest) -> None:
    g.lo[DATA : DATA + 5] = b"hello"
    g.desc(0, DATA, 5, NEXT, 3)
    g.desc(3, DATA + 5, 0, NEXT, 1)  # zero-length descriptors carry nothing
    g.desc(1, DATA + 100, 7, NEXT | WRITE, 2)
    g.desc(2, DATA + 200, 9, WRITE)
    chain = g.read()
    assert chain.head == 0
    assert [bytes(v) for v in chain.readable] == [b"hello"]
    assert [len(v) for v in chain.writable] == [7, 9]
    assert chain.writable_len == 16 and chain.readable_len == 5
    chain.writable[0][:] = b"written"
    assert g.lo[DATA + 100 : DATA + 107] == b"written"
    chain.release()
    assert not chain.readable and not chain.writable


def test_buffer_spanning_regions_gives_two_views(g: Guest) -> None:
    g.desc(0, MiB - 2, 4, WRITE)
    chain = g.read()
    assert [len(v) for v in chain.writable] == [2, 2]


def test_readable_after_writable_is_refused(g: Guest) -> None:
    g.desc(0, DATA, 4, NEXT | WRITE, 1)
    g.desc(1, DATA, 4)
    with pytest.raises(InvalidChain, match="after a writable") as e:
        g.read()
    assert e.value.head == 0


def test_loop_is_caught(g: Guest) -> None:
    g.desc(2, DATA, 4, NEXT, 5)
    g.desc(5, DATA, 4, NEXT, 2)
    with pytest.raises(InvalidChain, match="loop") as e:
        g.read(2)
    assert e.value.head == 2


def test_self_loop_is_caught(g: Guest) -> None:
    g.desc(0, DATA, 4, NEXT, 0)
    with pytest.raises(InvalidChain, match="loop"):
        g.read()


def test_chain_as_long_as_the_table_is_fine(g: Guest) -> None:
    for i in range(SIZE):
        g.desc(i, DATA + i, 1, WRITE | (NEXT if i + 1 < SIZE else 0), i + 1)
    assert len(g.read().writable) == SIZE


def test_next_outside_table(g: Guest) -> None:
    g.desc(0, DATA, 4, NEXT, SIZE)
    with pytest.raises(InvalidChain, match="outside"):
        g.read()


@pytest.mark.parametrize(
    ("addr", "length"),
    [(2 * MiB, 4), (2 * MiB - 2, 4), (2**64 - 8, 16), (DATA, 2**32 - 1), (3 * MiB, 0xFFFF_FFFF)],
)
def test_buffer_outside_memory(g: Guest, addr: int, length: int) -> None:
    g.desc(0, DATA, 4, NEXT, 1)
    g.desc(1, addr, length, WRITE)
    with pytest.raises(InvalidChain, match=r"not in guest memory|runs off"):
        g.read()


def test_indirect(g: Guest) -> None:
    table = 0x8000
    g.lo[DATA : DATA + 3] = b"req"
    g.indirect(
        table, [(DATA, 3, NEXT, 1), (DATA + 64, 32, WRITE | NEXT, 2), (MiB + 8, 8, WRITE, 0)]
    )
    g.desc(4, table, 48, INDIRECT)
    chain = g.read(4)
    assert chain.head == 4
    assert [bytes(v) for v in chain.readable] == [b"req"]
    assert [len(v) for v in chain.writable] == [32, 8]


def test_indirect_needs_the_feature(g: Guest) -> None:
    g.indirect(0x8000, [(DATA, 3, 0, 0)])
    g.desc(0, 0x8000, 16, INDIRECT)
    with pytest.raises(InvalidChain, match="INDIRECT_DESC"):
        g.read(indirect=False)


@pytest.mark.parametrize(
    ("flags", "length", "match"),
    [
        (INDIRECT | NEXT, 16, "chained"),
        (INDIRECT, 0, "multiple of 16"),
        (INDIRECT, 24, "multiple of 16"),
        (INDIRECT, 16 * (MAX_INDIRECT + 1), "entries"),
    ],
)
def test_bad_indirect_descriptors(g: Guest, flags: int, length: int, match: str) -> None:
    g.indirect(0x8000, [(DATA, 3, 0, 0)])
    g.desc(0, 0x8000, length, flags, 1)
    with pytest.raises(InvalidChain, match=match):
        g.read()


@pytest.mark.parametrize("addr", [2 * MiB, 2 * MiB - 16, 2**64 - 16, MiB - 8])
def test_indirect_table_outside_memory(g: Guest, addr: int) -> None:
    # MiB - 8: the table spans two regions; a table must be contiguous in one.
    g.desc(0, addr, 32, INDIRECT)
    with pytest.raises(InvalidChain, match="indirect table"):
        g.read()


def test_nested_indirect_is_refused(g: Guest) -> None:
    g.indirect(0x8000, [(0x9000, 16, INDIRECT, 0)])
    g.desc(0, 0x8000, 16, INDIRECT)
    with pytest.raises(InvalidChain, match="inside an indirect"):
        g.read()
    g.indirect(0x8000, [(DATA, 4, NEXT, 1), (0x9000, 16, INDIRECT, 0)])
    g.desc(0, 0x8000, 32, INDIRECT)
    with pytest.raises(InvalidChain, match="not the head"):
        g.read()


def test_indirect_flag_in_the_middle_of_a_direct_chain(g: Guest) -> None:
    g.desc(0, DATA, 4, NEXT, 1)
    g.desc(1, 0x8000, 16, INDIRECT)
    with pytest.raises(InvalidChain, match="not the head"):
        g.read()


def test_loop_inside_indirect_table(g: Guest) -> None:
    g.indirect(0x8000, [(DATA, 4, NEXT, 1), (DATA, 4, NEXT, 0)])
    g.desc(0, 0x8000, 32, INDIRECT)
    with pytest.raises(InvalidChain, match="loop"):
        g.read()


def test_indirect_next_outside_its_table(g: Guest) -> None:
    g.indirect(0x8000, [(DATA, 4, NEXT, 2), (DATA, 4, 0, 0), (DATA, 4, 0, 0)])
    g.desc(0, 0x8000, 32, INDIRECT)  # two entries: index 2 is past the end
    with pytest.raises(InvalidChain, match="outside"):
        g.read()


# --- the bulk decoding of Linux-shaped indirect tables ----------------------------------------

LINUX_SHAPES = st.tuples(st.integers(1, 300), st.integers(0, 300)).map(
    lambda rw: (rw[0], rw[1]) if rw[0] + rw[1] <= MAX_INDIRECT else (1, 1)
)


def _walk_only(g: Guest, monkeypatch: pytest.MonkeyPatch, head: int = 0) -> Chain | InvalidChain:
    with monkeypatch.context() as m:
        m.setattr(chain_module, "_linux_table", lambda *args: None)
        try:
            return g.read(head, gpas=[])
        except InvalidChain as e:
            return e


def _same(a: Chain | InvalidChain, b: Chain | InvalidChain) -> None:
    if isinstance(a, InvalidChain) or isinstance(b, InvalidChain):
        assert isinstance(a, InvalidChain) and isinstance(b, InvalidChain), (a, b)
        assert a.reason == b.reason
        return
    assert [bytes(v) for v in a.readable] == [bytes(v) for v in b.readable]
    assert [bytes(v) for v in a.writable] == [bytes(v) for v in b.writable]
    assert a.writable_len == b.writable_len and a.head == b.head
    assert a.gpas == b.gpas


@pytest.mark.pure_python
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=LINUX_SHAPES,
    page=st.sampled_from([1, 40, 4096]),
    scatter=st.booleans(),
    damage=st.lists(
        st.tuples(st.integers(0, 1023), st.integers(0, 3), st.integers(0, 2**64 - 1)), max_size=3
    ),
)
def test_bulk_table_decoding_is_the_walk(
    g: Guest,
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, int],
    page: int,
    scatter: bool,
    damage: list[tuple[int, int, int]],
) -> None:
    """An indirect table as Linux builds it (readable, then writable, in order), maybe with
    some fields overwritten by a hostile driver: the bulk decoding gives the same chain as the
    descriptor-by-descriptor walk, or the same refusal."""
    readable, writable = shape
    n = readable + writable
    at = DATA
    table = [
        (
            0x40000 + (i * 2 * page if scatter else i * page) % (MiB - 0x40000 - page),
            page,
            (WRITE if i >= readable else 0) | (NEXT if i + 1 < n else 0),
            i + 1,
        )
        for i in range(n)
    ]
    for index, field, value in damage:
        if index < n:
            entry = list(table[index])
            limits = (2**64 - 1, 2**32 - 1, 2**16 - 1, 2**16 - 1)
            entry[field] = value & limits[field]
            table[index] = tuple(entry)  # type: ignore[assignment]
    g.indirect(at, table)
    g.desc(0, at, 16 * n, INDIRECT)
    try:
        fast: Chain | InvalidChain = g.read(gpas=[])
    except InvalidChain as e:
        fast = e
    _same(fast, _walk_only(g, monkeypatch))


def _linux_read(g: Guest, base: int, pages: int = 256, page: int = 1024) -> list[list[int]]:
    """A READ shaped as Linux sends it: in header, read_in | out header, ``pages`` pages from
    ``base`` on (every other slot: scattered), the headers after them."""
    at = base + 2 * page * pages
    entries = [[at, 40, NEXT, 1], [at + 0x40, 40, NEXT, 2], [at + 0x80, 16, NEXT | WRITE, 3]]
    entries += [[base + 2 * page * i, page, NEXT | WRITE, 4 + i] for i in range(pages)]
    entries[-1][2] = WRITE
    return entries


@pytest.mark.pure_python
@pytest.mark.parametrize(
    ("entry", "addr", "length"),
    [
        (100, 2**64 - 1, 2),  # past the end of the address space: a carry out of the lane
        (100, 2**64 - 1, 2**32 - 1),
        (258, 2**64 - 4096, 4096),
        (5, 2**63, 4096),
        (3, MiB - 1, 2),  # across the two regions: two views from the walk
        (200, 2 * MiB - 1024, 1024),  # ends at the end of memory exactly
        (200, 2 * MiB - 1023, 1024),  # one byte past it
        (7, 0, 1024),  # in the other region than the rest
        (0, 0, 1),
        (9, 0x40000, 0),  # empty
        (258, MiB, 0),
    ],
)
@pytest.mark.parametrize("base", [0x40000, MiB])
def test_bulk_decoding_of_buffers_at_the_edges(
    g: Guest, monkeypatch: pytest.MonkeyPatch, base: int, entry: int, addr: int, length: int
) -> None:
    """Buffers at the edges of the regions and of the address space, where the bulk check's
    arithmetic could carry from one descriptor into the next: the same chain as the walk, or
    the same refusal, whether the rest lies in the first region or the second."""
    entries = _linux_read(g, base, page=1024 if base == MiB else 512)
    entries[entry][:2] = [addr, length]
    g.indirect(0x20000, [tuple(e) for e in entries])  # type: ignore[misc]
    g.desc(0, 0x20000, 16 * len(entries), INDIRECT)
    try:
        fast: Chain | InvalidChain = g.read(gpas=[])
    except InvalidChain as e:
        fast = e
    _same(fast, _walk_only(g, monkeypatch))


@pytest.mark.parametrize("base", [0x40000, MiB])
def test_a_bulk_chain_holds_its_pages_as_an_iovec_array(g: Guest, base: int) -> None:
    """The pages of a big request come as an Iovecs (its headers as views), built from a copy
    of the table: a driver rewriting the table afterwards changes nothing."""
    entries = _linux_read(g, base, page=1024 if base == MiB else 512)
    g.indirect(0x20000, [tuple(e) for e in entries])  # type: ignore[misc]
    g.desc(0, 0x20000, 16 * len(entries), INDIRECT)
    chain = g.read()
    assert isinstance(chain.readable, list) and isinstance(chain.writable, Iovecs)
    before = [bytes(v) for v in chain.writable]
    g.indirect(0x20000, [(0, 2**32 - 1, WRITE, 0)] * len(entries))
    assert [len(v) for v in chain.writable] == [16] + [entries[3][1]] * 256
    assert [bytes(v) for v in chain.writable] == before
    region = g.memory.regions[base // MiB]
    page = entries[5]
    chain.writable[3][:4] = b"page"
    at = page[0] - region.guest_addr
    assert region.view[at : at + 4] == b"page"


def test_pages_in_both_regions_are_one_iovec_array(g: Guest) -> None:
    """Guest RAM in several regions (QEMU splits a big guest's RAM around the 4 GiB hole): a
    request whose pages lie in either still comes as one Iovecs, each page where it is."""
    entries = _linux_read(g, 0x40000, page=512)
    for i in range(3, len(entries), 2):
        entries[i][0] += MiB  # every other page in the second region
    g.indirect(0x20000, [tuple(e) for e in entries])  # type: ignore[misc]
    g.desc(0, 0x20000, 16 * len(entries), INDIRECT)
    chain = g.read()
    assert isinstance(chain.writable, Iovecs)
    for i, view in enumerate(chain.writable):
        addr, length = entries[2 + i][:2]
        region = g.memory.regions[addr // MiB]
        view[:] = bytes([i % 251 + 1]) * length
        at = addr - region.guest_addr
        assert region.view[at : at + length] == bytes([i % 251 + 1]) * length


@pytest.mark.pure_python
@pytest.mark.parametrize("last_next", [259, 0, 7])
def test_bulk_decoding_is_used_for_linux_tables(
    g: Guest, monkeypatch: pytest.MonkeyPatch, last_next: int
) -> None:
    """A big READ as Linux sends it (in header, read_in | out header, 256 scattered pages;
    the pages are small here to fit the test's memory) takes the bulk path, whatever the last
    entry's meaningless ``next`` holds (Linux writes 259 there, other drivers 0)."""
    n = 2 + 1 + 256
    hi = MiB
    entries = [(hi, 40, NEXT, 1), (hi + 64, 40, NEXT, 2), (hi + 128, 16, NEXT | WRITE, 3)]
    entries += [
        (hi + 4096 + 2048 * i, 1024, WRITE | (NEXT if i < 255 else 0), 4 + i) for i in range(256)
    ]
    entries[-1] = (*entries[-1][:3], last_next)
    g.indirect(0x20000, entries)
    g.desc(0, 0x20000, 16 * n, INDIRECT)
    bulk = chain_module._linux_table
    decoded: list[Chain | None] = []
    monkeypatch.setattr(
        chain_module, "_linux_table", lambda *args: decoded.append(bulk(*args)) or decoded[-1]
    )
    c = g.read()
    assert decoded == [c]
    assert [len(v) for v in c.readable] == [80]  # header and arguments: one copy
    assert len(c.writable) == 257 and c.writable_len == 16 + 256 * 1024


# --- guest-physical ranges, for the dirty log ---------------------------------------------------


def test_writable_ranges_are_kept_only_when_asked(g: Guest) -> None:
    g.desc(0, DATA, 5, NEXT, 1)
    g.desc(1, DATA + 100, 7, NEXT | WRITE, 2)
    g.desc(2, DATA + 200, 0, NEXT | WRITE, 3)  # empty: nothing to log
    g.desc(3, MiB - 2, 4, WRITE)  # spans two regions: one guest-physical range
    assert g.read().gpas is None
    chain = g.read(gpas=[])
    assert chain.gpas == [(DATA + 100, 7), (MiB - 2, 4)]
    assert chain.written(0) == []
    assert chain.written(5) == [(DATA + 100, 5)]
    assert chain.written(9) == [(DATA + 100, 7), (MiB - 2, 2)]
    assert chain.written(11) == [(DATA + 100, 7), (MiB - 2, 4)]


def test_writable_ranges_of_an_indirect_table(g: Guest) -> None:
    entries = [(DATA, 40, NEXT, 1)] + [
        (MiB + 4096 * i, 1024, WRITE | (NEXT if i < 19 else 0), 2 + i) for i in range(20)
    ]
    g.indirect(0x20000, entries)
    g.desc(0, 0x20000, 16 * len(entries), INDIRECT)
    chain = g.read(gpas=[])  # the bulk path: a Linux-shaped table of 21 entries
    assert chain.gpas == [(MiB + 4096 * i, 1024) for i in range(20)]
    assert chain.written(1500) == [(MiB, 1024), (MiB + 4096, 476)]


def test_a_partly_reachable_chain_keeps_the_ranges_it_reached(g: Guest) -> None:
    g.desc(0, DATA, 40, NEXT, 1)
    g.desc(1, DATA + 64, 16, NEXT | WRITE, 2)
    g.desc(2, 8 * MiB, 4096, WRITE)  # outside guest memory
    with pytest.raises(InvalidChain) as e:
        g.read(gpas=[])
    assert e.value.partial is not None
    assert e.value.partial.gpas == [(DATA + 64, 16)]


# --- attacks on the bulk decoding: where every buffer lies ------------------------------------
#
# Attacks on the bulk decoding of big indirect tables (``chain._linux_table``).
#
# The bulk path hands the kernel host addresses it computed itself, so comparing the bytes a chain
# shows is not enough (a wrong address over equal bytes would pass): these tests compare where
# every buffer lies, read from the iovec array the kernel would get, with the chain the
# descriptor-by-descriptor walk gives for the same descriptors laid out as a direct ring (which
# never takes the bulk path, so the comparison also holds on the compiled build, where the walk
# can't be forced by replacing a function).

KiB = 1024
TOP = 1 << 64

#: Guest memory layouts as (guest address, size) of bytearray-backed regions; the first region
#: holds the tables (in its first 32 KiB, which no generated buffer uses).
LAYOUTS: dict[str, list[tuple[int, int]]] = {
    # RAM in two adjacent pieces, the second the larger (the "main" one).
    "adjacent": [(0, 256 * KiB), (256 * KiB, 512 * KiB)],
    # Tables low, RAM far above with a gap, a DAX-like window higher still.
    "gaps": [(0, 64 * KiB), (0x1000_0000, 512 * KiB), (1 << 40, 128 * KiB)],
    # A region ending at the very top of the address space (guest_end == 2**64) and one at 2**63.
    "top": [(0, 64 * KiB), (1 << 63, 512 * KiB), (TOP - 256 * KiB, 256 * KiB)],
    # The largest region is the one at the top: the bulk check can't use it.
    "top-main": [(0, 64 * KiB), (TOP - 512 * KiB, 512 * KiB)],
    # A region whose last byte is 2**64 - 2: guest_end is 2**64 - 1, the largest end it takes.
    "below-top": [(0, 64 * KiB), (TOP - 1 - 512 * KiB, 512 * KiB)],
}
TABLE_AT = 0x1000
RESERVED = 32 * KiB


class Memory:
    def __init__(self, layout: Sequence[tuple[int, int]]) -> None:
        self.layout = list(layout)
        self.buffers = [bytearray(os.urandom(size)) for _, size in layout]
        self.memory = GuestMemory(
            MappedRegion.from_buffer(at, buf, name=f"r{i}")
            for i, ((at, _), buf) in enumerate(zip(layout, self.buffers, strict=True))
        )
        self.table = self.memory.translate(TABLE_AT, 16 * 1024)

    def put(self, entries: Sequence[tuple[int, int, int, int]]) -> None:
        for i, entry in enumerate(entries):
            DESC.pack_into(self.table, 16 * i, *entry)

    def bulk(self, n: int, gpas: list[tuple[int, int]] | None = None) -> Chain | InvalidChain:
        ring = bytearray(16)
        DESC.pack_into(ring, 0, TABLE_AT, 16 * n, INDIRECT, 0)
        try:
            return read_chain(self.memory, memoryview(ring), 1, 0, indirect=True, gpas=gpas)
        except InvalidChain as e:
            return e

    def walk(self, n: int, gpas: list[tuple[int, int]] | None = None) -> Chain | InvalidChain:
        """The same descriptors as a direct ring of ``n``: the walk, never the bulk path."""
        try:
            return read_chain(self.memory, self.table[: 16 * n], n, 0, indirect=False, gpas=gpas)
        except InvalidChain as e:
            return e


def places(side: Sequence[memoryview | bytes]) -> list[tuple[int, int] | bytes]:
    """Where each buffer lies in our address space, as the kernel will be told; a copy (a small
    request's, see SMALL_REQUEST) by what it holds."""
    if isinstance(side, Iovecs):
        raw = side._raw
        spans = side._spans
        out = [(base, n) for base, n in IOVEC.iter_unpack(raw)]
        for base, n in out:
            # Inside one of the Iovecs' own views of the mappings: the rule the kernel relies on.
            assert n > 0, (base, n)
            assert any(h <= base and base + n <= h + len(v) for h, v in spans), (base, n)
        # The views it makes stand exactly where the array says.
        assert [(_address_of(v), len(v)) for v in side] == out
        return out
    return [bytes(v) if isinstance(v, bytes) else (_address_of(v), len(v)) for v in side]


def same(fast: Chain | InvalidChain, slow: Chain | InvalidChain, *, reasons: bool = True) -> None:
    if isinstance(fast, InvalidChain) or isinstance(slow, InvalidChain):
        assert isinstance(fast, InvalidChain) and isinstance(slow, InvalidChain), (fast, slow)
        if reasons:
            assert fast.reason == slow.reason
        return
    assert places(fast.readable) == places(slow.readable)
    assert places(fast.writable) == places(slow.writable)
    assert fast.readable_len == slow.readable_len
    assert fast.writable_len == slow.writable_len
    assert fast.gpas == slow.gpas


def linux_table(
    mem: Memory, n: int, readable: int, region: int, page: int, stride: int, start: int
) -> list[tuple[int, int, int, int]]:
    at, size = mem.layout[region]
    low = RESERVED if region == 0 else 0
    span = size - low - page
    return [
        (
            at + low + (start + i * stride) % span,
            page,
            (WRITE if i >= readable else 0) | (NEXT if i + 1 < n else 0),
            i + 1,
        )
        for i in range(n)
    ]


def special_addresses(mem: Memory, length: int) -> list[int]:
    out = [0, 1, TABLE_AT, 1 << 63, (1 << 63) - 1, TOP - 1, TOP - 4096, TOP - length, TOP - 2]
    for at, size in mem.layout:
        end = at + size
        out += [at, at - 1, at + 1, end - 1, end, end - length, end - length + 1, end - length - 1]
    return [a % TOP for a in out]


FLAGS = [
    0,
    NEXT,
    WRITE,
    NEXT | WRITE,
    INDIRECT,
    INDIRECT | NEXT,
    INDIRECT | WRITE | NEXT,
    8,
    NEXT | 8,
    NEXT | WRITE | 0x8000,
    0xFFFF,
]
LENGTHS = [0, 1, 2, 4095, 4096, 1 << 31, (1 << 32) - 1]

damage_strategy = st.lists(
    st.one_of(
        st.tuples(
            st.just("addr"), st.integers(0, 1023), st.integers(0, 40), st.sampled_from(LENGTHS)
        ),
        st.tuples(
            st.just("raw"), st.integers(0, 1023), st.integers(0, TOP - 1), st.sampled_from(LENGTHS)
        ),
        st.tuples(st.just("flags"), st.integers(0, 1023), st.sampled_from(FLAGS), st.just(0)),
        st.tuples(st.just("next"), st.integers(0, 1023), st.integers(-2, 3), st.just(0)),
    ),
    max_size=4,
)


def apply_damage(
    mem: Memory,
    entries: list[list[int]],
    damage: list[tuple[str, int, int, int]],
    *,
    wrap: bool = False,
) -> None:
    """Overwrite fields of ``entries`` as a hostile driver would (``damage_strategy``'s items);
    an item for an entry past the table is skipped, or with ``wrap`` applied modulo its length."""
    for kind, index, value, length in damage:
        if index >= len(entries) and not wrap:
            continue
        entry = entries[index % len(entries)]
        if kind == "addr":
            candidates = special_addresses(mem, max(length, 1))
            entry[0], entry[1] = candidates[value % len(candidates)], length
        elif kind == "raw":
            entry[0], entry[1] = value, length
        elif kind == "flags":
            entry[2] = value
        else:
            entry[3] = (index + value) % 0x10000


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layout=st.sampled_from(sorted(LAYOUTS)),
    n=st.one_of(st.sampled_from([16, 17, 24, 259, 260, 1024]), st.integers(16, 1024)),
    readable_part=st.floats(0, 1),
    region=st.integers(0, 2),
    page=st.sampled_from([1, 7, 512, 4096]),
    stride=st.sampled_from([0, 1, 4096, 8192, 12289]),
    start=st.integers(0, 1 << 20),
    damage=damage_strategy,
)
def test_bulk_decoding_puts_every_buffer_where_the_walk_does(
    layout: str,
    n: int,
    readable_part: float,
    region: int,
    page: int,
    stride: int,
    start: int,
    damage: list[tuple[str, int, int, int]],
) -> None:
    """Linux-shaped tables of 16..1024 entries, readable-only, writable-only or both, over
    regions adjacent, with gaps, at 2**63 and at the top of the address space, with fields
    overwritten by a hostile driver (addresses at region edges and address-space extremes,
    lengths 0 to 2**32 - 1, extra flag bits, stray ``next`` fields): the bulk decoding puts
    every buffer at the host address the walk does, or refuses the chain as the walk does."""
    mem = Memory(LAYOUTS[layout])
    region %= len(mem.layout)
    readable = round(readable_part * n)
    entries = [list(e) for e in linux_table(mem, n, readable, region, page, stride, start)]
    apply_damage(mem, entries, damage)
    mem.put([tuple(e) for e in entries])  # type: ignore[misc]
    fast_gpas: list[tuple[int, int]] = []
    slow_gpas: list[tuple[int, int]] = []
    fast = mem.bulk(n, fast_gpas)
    slow = mem.walk(n, slow_gpas)
    # Only the head of a table reads differently as a ring: INDIRECT there is the ring's
    # redirection, not a flag inside an indirect table; both refuse it all the same.
    same(fast, slow, reasons=not entries[0][2] & INDIRECT)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("readable", [0, 3, 1024])
def test_undamaged_tables_over_every_region(layout: str, readable: int) -> None:
    """The plain case over each region of each layout: served (in bulk where it can be), at the
    walk's addresses."""
    mem = Memory(LAYOUTS[layout])
    for region in range(len(mem.layout)):
        mem.put(linux_table(mem, 1024, readable, region, 64, 4096 + 64, 5))
        fast, slow = mem.bulk(1024, []), mem.walk(1024, [])
        assert isinstance(slow, Chain)
        same(fast, slow)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_one_buffer_at_each_edge_of_each_region(layout: str) -> None:
    """One buffer of a table otherwise inside a region moved to each edge of each region (a byte
    before, at, a byte past), and to the extremes of the address space, as the first, a middle
    and the last entry, readable and writable: the same chain as the walk, byte for byte of
    address."""
    mem = Memory(LAYOUTS[layout])
    for home in range(len(mem.layout)):
        plain = linux_table(mem, 40, 20, home, 64, 128, 0)
        for length in (1, 64, (1 << 32) - 1):
            for addr in sorted(set(special_addresses(mem, length))):
                for index in (0, 19, 20, 39):
                    entries = list(plain)
                    entries[index] = (addr, length, *plain[index][2:])
                    mem.put(entries)
                    same(mem.bulk(40, []), mem.walk(40, []))


def test_a_cached_region_never_serves_another_memory() -> None:
    """The lanes of a table size are cached with the last region they were used for: tables of
    the same size decoded in turn over regions of other bases and sizes, and over a new memory
    table with the same guest layout but other host buffers (SET_MEM_TABLE), each get their own
    memory's host addresses."""
    memories = [Memory(LAYOUTS["adjacent"]), Memory(LAYOUTS["gaps"]), Memory(LAYOUTS["adjacent"])]
    for _ in range(3):
        for mem in memories:
            for region in range(1, len(mem.layout)):
                mem.put(linux_table(mem, 300, 2, region, 100, 700, 3))
                fast = mem.bulk(300)
                assert isinstance(fast, Chain) and isinstance(fast.writable, Iovecs)
                same(fast, mem.walk(300))
                host = mem.memory.regions[region].host_addr
                assert all(
                    host <= a < host + mem.layout[region][1] for a, _ in places(fast.writable)
                )


def test_guest_ranges_of_an_iovec_array_are_its_gpas() -> None:
    """A chain popped before dirty logging began is logged from its views: for a bulk chain
    the ranges found from the Iovecs' views are those the walk kept."""
    mem = Memory(LAYOUTS["gaps"])
    mem.put(linux_table(mem, 260, 3, 1, 4096, 4096 * 3, 11))
    chain = mem.bulk(260, [])
    assert isinstance(chain, Chain) and isinstance(chain.writable, Iovecs)
    for used in (0, 1, 4096, 4097, 100_000, chain.writable_len - 1, chain.writable_len):
        assert mem.memory.guest_ranges(chain.writable, used) == chain.written(used)


# --- time: the guest and the front-end acting while the daemon works ---------------------


_FLIPPER = textwrap.dedent(
    """
    import mmap, sys
    fd, size, at, a, b = sys.argv[1:]
    m = mmap.mmap(int(fd), int(size))
    a, b, at = bytes.fromhex(a), bytes.fromhex(b), int(at)
    sys.stdout.write("go\\n"); sys.stdout.flush()
    while True:
        # Byte by byte, so that a copy may catch any mixture of the two tables.
        for i in range(0, len(a), 7):
            piece = a[i : i + 7]
            m[at + i : at + i + len(piece)] = piece
        for i in range(0, len(b), 5):
            piece = b[i : i + 5]
            m[at + i : at + i + len(piece)] = piece
    """
)


@contextlib.contextmanager
def rewriting(fd: int, size: int, at: int, a: bytes, b: bytes) -> Iterator[Callable[[], None]]:
    """Another process (a vCPU) rewriting the memfd ``fd`` at ``at``, byte by byte, between
    ``a`` and ``b`` while the block runs; the block gets a check that it is still at it. The
    memfd is closed afterwards."""
    child = subprocess.Popen(
        [sys.executable, "-c", _FLIPPER, str(fd), str(size), str(at), a.hex(), b.hex()],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "go\n"

        def alive() -> None:
            assert child.poll() is None, "the process rewriting guest memory died"

        yield alive
    finally:
        child.kill()
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
        os.close(fd)


def test_a_table_rewritten_while_it_is_decoded() -> None:
    """Another process (a vCPU) rewrites the table byte by byte while it is decoded, between a
    table in the region and one far outside it: whatever mixture the copy catches, every buffer
    handed out lies inside guest memory, where its guest address says."""
    size = 4 << 20  # the inside table's 260 pages fit
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    region = MappedRegion.map_fd(RegionSpec(1 << 32, size, 0x7000_0000, 0), fd)
    memory = GuestMemory([region])
    n = 260
    inside = b"".join(
        DESC.pack((1 << 32) + 0x10000 + 4096 * i, 4096 - i % 3, NEXT | (WRITE if i else 0), i + 1)
        for i in range(n)
    )
    outside = b"".join(
        DESC.pack(TOP - 4096 * (i + 1), (1 << 32) - 1, NEXT | WRITE, i + 1) for i in range(n)
    )
    # The last entry ends the chain in both.
    inside = inside[:-4] + b"\x02\x00\x00\x00"
    outside = outside[:-4] + b"\x02\x00\x00\x00"
    ring = bytearray(16)
    DESC.pack_into(ring, 0, 1 << 32, 16 * n, INDIRECT, 0)
    with rewriting(fd, size, 0, inside, outside) as alive:
        served = 0
        low, high = region.host_addr, region.host_addr + size
        for _ in range(3000):
            alive()
            gpas: list[tuple[int, int]] = []
            try:
                chain = read_chain(memory, memoryview(ring), 1, 0, indirect=True, gpas=gpas)
            except InvalidChain:
                continue
            served += 1
            where = places(chain.readable) + places(chain.writable)
            assert all(low <= a and a + k <= high for a, k in where), where
            written = places(chain.writable)
            assert [(a - low + (1 << 32), k) for a, k in written] == gpas
            assert sum(k for _, k in written) == chain.writable_len
    assert served


def test_an_iovec_array_outlives_its_region(tmp_path) -> None:
    """A READ still filling an Iovecs when the front-end retires its region (SET_MEM_TABLE) and
    the chain is released: the mapping stays until the Iovecs goes, then is unmapped."""
    size = 1 << 20
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    region = MappedRegion.map_fd(RegionSpec(0, size, 0x7000_0000, 0), fd)
    os.close(fd)
    memory = GuestMemory([region])
    n = 64
    table = b"".join(
        DESC.pack(0x10000 + 4096 * i, 4096, NEXT | WRITE if i + 1 < n else WRITE, i + 1)
        for i in range(n)
    )
    region.view[0x1000 : 0x1000 + len(table)] = table
    ring = bytearray(16)
    DESC.pack_into(ring, 0, 0x1000, len(table), INDIRECT, 0)
    chain = read_chain(memory, memoryview(ring), 1, 0, indirect=True)
    pages = chain.writable
    assert isinstance(pages, Iovecs)
    host = region.host_addr
    chain.release()
    assert region.close(quiet=True) is False  # still mapped: the Iovecs holds it
    del memory, chain
    path = tmp_path / "f"
    path.write_bytes(b"z" * (n * 4096))
    f = os.open(path, os.O_RDONLY)
    try:
        assert pages.preadv(f, 0) == n * 4096
    finally:
        os.close(f)
    assert bytes(pages[n - 1][-3:]) == b"zzz"
    assert _mapped(host)
    del pages
    assert not _mapped(host)


def _mapped(host: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= host < hi:
                return True
    return False


def test_mmap_region_pages_through_the_kernel(tmp_path) -> None:
    """End to end in one process: a bulk chain over a real shared mapping, filled by preadv
    and written out by pwritev, moves the bytes the walk's views hold."""
    from pyvirtiofsd.fuse.buffers import ReplyWriter, RequestReader, WriteData

    size = 1 << 20
    m = mmap.mmap(-1, size)
    region = MappedRegion.from_buffer(1 << 30, m, name="ram")
    memory = GuestMemory([region])
    n = 259
    entries = (
        [(1 << 30) + 0x8000, 16, NEXT | WRITE, 1],
        *([(1 << 30) + 0x10000 + 3000 * i, 3000, NEXT | WRITE, i + 2] for i in range(n - 1)),
    )
    entries = [list(e) for e in entries]
    entries[-1][2] = WRITE
    table = b"".join(DESC.pack(*e) for e in entries)
    region.view[0 : len(table)] = table
    ring = bytearray(16)
    DESC.pack_into(ring, 0, 1 << 30, len(table), INDIRECT, 0)
    payload = os.urandom(2 * n * 3000)
    path = tmp_path / "f"
    path.write_bytes(payload)
    f = os.open(path, os.O_RDONLY)
    w = os.open(tmp_path / "w", os.O_RDWR | os.O_CREAT)
    try:
        for offset, want in ((0, (n - 1) * 3000), (5, 100_000), (len(payload) - 7000, 10**6)):
            chain = read_chain(memory, memoryview(ring), 1, 0, indirect=True)
            assert isinstance(chain.writable, Iovecs)
            out = ReplyWriter(chain.writable, chain.writable_len)
            got = out.read_from_fd(f, offset, want)
            length = out.finish(0, 9)
            expect = payload[offset : offset + min(want, (n - 1) * 3000)]
            assert got == len(expect) and length == 16 + got
            assert b"".join(bytes(v) for v in chain.writable)[16:length] == expect
            # The same pages, as a WRITE's data, go back out whole.
            reader = RequestReader(chain.writable[1:])
            size = reader.remaining
            data = WriteData(reader.views(size), size)
            assert isinstance(data.views(), Iovecs)
            assert data.to_fd(w, offset + 3) == (n - 1) * 3000
            assert os.pread(w, (n - 1) * 3000, offset + 3) == data.tobytes()
            chain.release()
    finally:
        os.close(f)
        os.close(w)
        region.close()


# --- the C walk of the compiled build (``_walk.c``) --------------------------------------------
#
# It must answer only what the walk in Python answers: the same buffers at the same places, or
# nothing (None), leaving the chain to the Python walk. The Python walk is reached on any build by
# asking for the writable ranges (``gpas``), which the C walk never serves.

native = pytest.mark.skipif(
    chain_module._native_walk is None, reason="pure build: no C walk (it comes with mypyc's)"
)


def c_walk(
    mem: Memory, ring: memoryview, size: int, head: int, *, indirect: bool = True
) -> Chain | None:
    main = mem.memory.main
    assert main is not None and chain_module._native_walk is not None
    found = chain_module._native_walk(
        ring, size, head, indirect, main.guest_addr, main.size, main.view, chain_module._BULK
    )
    if found is None:
        return None
    readable, writable, wlen, rlen = found
    assert type(readable) is list and type(writable) is list
    return Chain(head, readable, writable, wlen, rlen)


def python_walk(
    mem: Memory, ring: memoryview, size: int, head: int, *, indirect: bool = True
) -> Chain | InvalidChain:
    try:
        return read_chain(mem.memory, ring, size, head, indirect=indirect, gpas=[])
    except InvalidChain as e:
        return e


SHORT_RING = 8


def main_index(mem: Memory) -> int:
    main = mem.memory.main
    assert main is not None
    return [at for at, _ in mem.layout].index(main.guest_addr)


@native
@settings(max_examples=400, deadline=None)
@given(
    layout=st.sampled_from(sorted(LAYOUTS)),
    as_table=st.integers(0, 17),
    negotiated=st.booleans(),
    n=st.integers(1, SHORT_RING),
    readable=st.integers(0, SHORT_RING),
    region=st.one_of(st.just(-1), st.integers(0, 2)),
    table_at=st.sampled_from(["main", "first", "last"]),
    start=st.integers(0, 1 << 20),
    head=st.integers(0, SHORT_RING - 1),
    damage=st.one_of(st.just([]), damage_strategy),
)
def test_the_c_walk_answers_only_as_the_python_walk_does(
    layout: str,
    as_table: int,
    negotiated: bool,
    n: int,
    readable: int,
    region: int,
    table_at: str,
    start: int,
    head: int,
    damage: list[tuple[str, int, int, int]],
) -> None:
    """Chains a Linux driver sends for small requests, direct or through an indirect table of up
    to 17 entries (across the bulk threshold), in the main region or another (or the last bytes
    of one), over every layout, with fields overwritten by a hostile driver (the bulk attacks'
    damage: addresses at region edges and at the top of the address space, empty and 4 GiB
    lengths, stray flags and ``next`` fields): where the C walk answers, the Python walk gives
    the same buffers at the same places."""
    mem = Memory(LAYOUTS[layout])
    region = main_index(mem) if region < 0 else region % len(mem.layout)
    entries_n = as_table if as_table else n
    shape = linux_table(mem, entries_n, min(readable, entries_n), region, 64, 4160, start)
    entries = [list(e) for e in shape]
    apply_damage(mem, entries, damage, wrap=True)
    ring = memoryview(bytearray(16 * SHORT_RING))
    if as_table:
        # The ring holds the one indirect descriptor; the table lies in the main region (where
        # Linux puts it), in the tables' place, or in the last bytes of the last region.
        at, size = mem.layout[{"main": main_index(mem), "first": 0, "last": -1}[table_at]]
        where = at + 0x2000 if table_at != "last" else at + size - 16 * as_table
        mem.memory.translate(where, 16 * as_table)[:] = b"".join(
            DESC.pack(*e)  # type: ignore[misc]
            for e in entries
        )
        DESC.pack_into(ring, 16 * head, where, 16 * as_table, INDIRECT, 0)
    else:
        # A direct chain: its entries are the ring, starting at the head.
        for i, e in enumerate(entries):
            e[3] = (e[3] + head) % SHORT_RING if e[2] & NEXT else e[3]
            DESC.pack_into(ring, 16 * ((head + i) % SHORT_RING), *e)
    fast = c_walk(mem, ring, SHORT_RING, head, indirect=negotiated)
    slow = python_walk(mem, ring, SHORT_RING, head, indirect=negotiated)
    event("served in C" if fast is not None else "left to Python")
    if fast is None:
        return
    assert isinstance(slow, Chain), slow
    assert places(fast.readable) == places(slow.readable)
    assert places(fast.writable) == places(slow.writable)
    assert (fast.readable_len, fast.writable_len) == (slow.readable_len, slow.writable_len)
    assert fast.gpas is None and fast.head == head


#: Short chains, as (ring entries, indirect table entries placed at ``T``), each breaking one
#: rule or leaving the main region (``M`` is where it starts, ``E`` where it ends): the C walk
#: must leave every one to the Python walk, whatever that then decides.
M, E = 256 * KiB, 768 * KiB  # the "adjacent" layout's main region
T = M + 0x1000
Desc = tuple[int, int, int, int]
LEFT_TO_PYTHON: dict[str, tuple[list[Desc], list[Desc]]] = {
    "readable after writable": ([(M, 16, NEXT | WRITE, 1), (M + 64, 16, 0, 0)], []),
    "next just past the ring": ([(M, 16, NEXT, SHORT_RING)], []),
    "next just past the table": (
        [(T, 32, INDIRECT, 0)],
        [(M, 16, NEXT, 1), (M + 64, 16, NEXT, 2), (M + 128, 16, WRITE, 0)],
    ),
    "a loop": ([(M, 16, NEXT, 1), (M + 64, 16, NEXT, 0)], []),
    "a self loop in a table": ([(T, 16, INDIRECT, 0)], [(M, 16, NEXT, 0)]),
    "an empty buffer": ([(M, 0, NEXT, 1), (M + 64, 16, WRITE, 0)], []),
    "a buffer a byte past the main region": ([(E - 15, 16, WRITE, 0)], []),
    "a buffer a byte before it": ([(M - 1, 16, WRITE, 0)], []),
    "a buffer in another region": ([(0x8000, 16, 0, 0)], []),
    "a buffer at the top of the address space": ([(TOP - 8, 16, 0, 0)], []),
    "a 4 GiB buffer": ([(M, (1 << 32) - 1, 0, 0)], []),
    "indirect not negotiated": ([(T, 16, INDIRECT, 0)], [(M, 16, 0, 0)]),
    "indirect chained on": ([(T, 16, INDIRECT | NEXT, 1), (M, 16, 0, 0)], [(M, 16, 0, 0)]),
    "indirect of 15 bytes": ([(T, 15, INDIRECT, 0)], [(M, 16, 0, 0)]),
    "an empty indirect table": ([(T, 0, INDIRECT, 0)], []),
    "a table a byte past the main region": ([(E - 15, 16, INDIRECT, 0)], []),
    "a table in another region": ([(0x1000, 16, INDIRECT, 0)], []),
    "indirect inside a table": ([(T, 16, INDIRECT, 0)], [(T, 16, INDIRECT, 0)]),
    "indirect further in a table": (
        [(T, 32, INDIRECT, 0)],
        [(M, 16, NEXT, 1), (T, 16, INDIRECT, 0)],
    ),
    "indirect further in the ring": ([(M, 16, NEXT, 1), (T, 16, INDIRECT, 0)], []),
    "a table of 16 entries (the bulk path's)": ([(T, 256, INDIRECT, 0)], [(M, 16, 0, 0)] * 16),
}


@native
@pytest.mark.parametrize("case", sorted(LEFT_TO_PYTHON))
def test_the_c_walk_leaves_every_other_chain_to_python(case: str) -> None:
    ring_entries, table_entries = LEFT_TO_PYTHON[case]
    mem = Memory(LAYOUTS["adjacent"])
    assert mem.memory.main is not None and mem.memory.main.guest_addr == M
    # Past the end of the ring and of the table lies a descriptor that would end the chain
    # well: a walk reading one entry too far would serve it.
    sentinel = DESC.pack(M + 4096, 16, WRITE, 0)
    table = b"".join(DESC.pack(*e) for e in table_entries) + sentinel
    mem.memory.translate(T, len(table))[:] = table
    ring = memoryview(bytearray(16 * SHORT_RING) + sentinel)
    for i, e in enumerate(ring_entries):
        DESC.pack_into(ring, 16 * i, *e)
    negotiated = case != "indirect not negotiated"
    assert c_walk(mem, ring, SHORT_RING, 0, indirect=negotiated) is None
    # The same chain made well shows the C walk would have served it otherwise.
    DESC.pack_into(ring, 0, M, 16, 0, 0)
    assert c_walk(mem, ring, SHORT_RING, 0, indirect=negotiated) is not None


@native
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("direct", [True, False])
def test_the_c_walk_serves_the_everyday_chain(layout: str, direct: bool) -> None:
    """A GETATTR as Linux sends it (header and arguments readable, then two writable buffers),
    direct or as a 4-entry indirect table, in the main region: the C walk serves it (so the
    compiled build gains from it) with the Python walk's buffers; anywhere else it stays out."""
    mem = Memory(LAYOUTS[layout])
    main = mem.memory.main
    assert main is not None
    for region, (at, _) in enumerate(mem.layout):
        entries = linux_table(mem, 4, 2, region, 64, 4160, 3)
        ring = memoryview(bytearray(16 * SHORT_RING))
        if direct:
            for i, e in enumerate(entries):
                DESC.pack_into(ring, 16 * i, *e)
        else:
            mem.put(entries)
            DESC.pack_into(ring, 0, TABLE_AT, 16 * 4, INDIRECT, 0)
        fast = c_walk(mem, ring, SHORT_RING, 0)
        slow = python_walk(mem, ring, SHORT_RING, 0)
        assert isinstance(slow, Chain)
        in_main = at == main.guest_addr and (direct or TABLE_AT in range(at, at + main.size))
        if not in_main:
            assert fast is None
            continue
        assert fast is not None
        assert places(fast.readable) == places(slow.readable)
        assert places(fast.writable) == places(slow.writable)
        # Header and arguments: a small request, one copy.
        assert [type(v) for v in fast.readable] == [bytes]
        assert len(fast.readable[0]) == 128


@native
def test_read_chain_takes_the_c_walk_and_its_views_hold_the_mapping(tmp_path) -> None:
    """read_chain serves the everyday chain through the C walk (a region's views counted as
    its exports), and those views keep the mapping alive as every view of guest memory must:
    the region can't be unmapped under them."""
    fd = os.memfd_create("ram")
    try:
        os.ftruncate(fd, MiB)
        region = MappedRegion.map_fd(RegionSpec(0, MiB, 0, 0), fd)
        memory = GuestMemory([region])
        ring = memoryview(bytearray(16 * SHORT_RING))
        DESC.pack_into(ring, 0, 0x10000, 40, NEXT, 1)
        DESC.pack_into(ring, 16, 0x20000, 16, WRITE, 0)
        assert chain_module._native_walk is not None
        assert chain_module._native_walk(
            ring, SHORT_RING, 0, True, 0, MiB, region.view, chain_module._BULK
        )
        chain = read_chain(memory, ring, SHORT_RING, 0, indirect=True)
        assert chain.readable == [bytes(40)]  # a small request: a copy
        assert [len(v) for v in chain.writable] == [16]
        assert not region.close(quiet=True)  # the chain's views still hold it
        chain.writable[0][:4] = b"abcd"
        chain.release()
        assert region.close(quiet=True)
    finally:
        os.close(fd)


VIEW_ATTRS = [
    "format",
    "itemsize",
    "ndim",
    "shape",
    "strides",
    "suboffsets",
    "readonly",
    "c_contiguous",
    "f_contiguous",
    "contiguous",
    "nbytes",
]


@native
@pytest.mark.parametrize("main_view", ["the region's own", "a view of bytes cast to words"])
def test_the_c_walks_views_are_the_slices_the_python_walk_cuts(main_view: str) -> None:
    """The C walk cuts a byte view of the region by hand, without a slice object: each piece must
    be in every respect the slice ``view[off:off + len]`` (format, shape, strides, flags, bytes,
    the mapping it exports from), reading and writing the same guest bytes. A region view it
    can't cut so (not one dimension of bytes) leaves the chain to the walk in Python."""
    mem = Memory(LAYOUTS["adjacent"])
    main = mem.memory.main
    assert main is not None and chain_module._native_walk is not None
    mem.memory.translate(M, 4096)[:] = bytes(range(256)) * 16
    ring = memoryview(bytearray(16 * SHORT_RING))
    # More readable bytes than a copy takes: views.
    DESC.pack_into(ring, 0, M + 8, SMALL_REQUEST + 1, NEXT, 1)
    DESC.pack_into(ring, 16, M + 1000, 16, NEXT | WRITE, 2)
    DESC.pack_into(ring, 32, M + 4000, 96, WRITE, 0)
    view = main.view if main_view == "the region's own" else main.view.cast("B").cast("H")
    found = chain_module._native_walk(
        ring, SHORT_RING, 0, True, main.guest_addr, main.size, view, chain_module._BULK
    )
    if main_view != "the region's own":
        assert found is None
        return
    assert found is not None
    readable, writable, wlen, rlen = found
    assert (wlen, rlen) == (112, SMALL_REQUEST + 1)
    cuts = [(8, SMALL_REQUEST + 1), (1000, 16), (4000, 96)]
    for piece, (off, n) in zip(readable + writable, cuts, strict=True):
        cut = main.view[off : off + n]
        for attr in VIEW_ATTRS:
            assert getattr(piece, attr) == getattr(cut, attr), attr
        assert piece.obj is cut.obj and piece == cut and bytes(piece) == bytes(cut)
        assert places([piece]) == places([cut])
        piece[0] ^= 0xFF
        assert cut[0] == piece[0]
        assert len(piece[1:]) == n - 1 and piece[-1] == cut[-1]
        with pytest.raises(IndexError):
            piece[n]


@pytest.mark.parametrize("pieces", [1, 3, 16, 17])
@pytest.mark.parametrize("extra", [-1, 0, 1])
@pytest.mark.parametrize("indirect", [False, True])
def test_a_small_request_is_one_copy(pieces: int, extra: int, indirect: bool) -> None:
    """Readable buffers that add up to SMALL_REQUEST bytes or fewer come as one bytes object
    holding what the guest had written there, which the guest can no longer change; one byte
    more and they are views, one per buffer. The same from each walk, in both builds (more
    pieces than the C walk remembers are left to Python, which copies them all the same)."""
    mem = Memory(LAYOUTS["adjacent"])
    total = SMALL_REQUEST + extra
    sizes = [total // pieces] * pieces
    sizes[-1] += total - sum(sizes)
    data = bytes(i * 7 % 251 for i in range(total))
    mem.memory.translate(M, total)[:] = data
    entries, at = [], M
    for i, n in enumerate(sizes):
        entries.append((at, n, NEXT, i + 1))
        at += n
    entries.append((M + 0x8000, 64, WRITE, 0))
    table = b"".join(DESC.pack(*e) for e in entries)
    if indirect:
        mem.memory.translate(M + 0x9000, len(table))[:] = table
        ring = memoryview(bytearray(16 * SHORT_RING))
        DESC.pack_into(ring, 0, M + 0x9000, len(table), INDIRECT, 0)
        size = SHORT_RING
    else:
        ring = memoryview(bytearray(table))
        size = len(entries)
    chain = read_chain(mem.memory, ring, size, 0, indirect=True)
    slow = python_walk(mem, ring, size, 0)
    assert isinstance(slow, Chain) and places(slow.readable) == places(chain.readable)
    assert chain.readable_len == total and b"".join(chain.readable) == data
    if total <= SMALL_REQUEST:
        assert [type(v) for v in chain.readable] == [bytes]
        mem.memory.translate(M, total)[:] = bytes(total)
        assert chain.readable[0] == data
    else:
        assert [len(v) for v in chain.readable] == sizes
        assert all(type(v) is memoryview for v in chain.readable)


def _either(walk: Callable[[], Chain]) -> Chain | InvalidChain | type[BaseException]:
    """A walk's outcome: its chain, its refusal, or the type of anything else it raised."""
    try:
        return walk()
    except InvalidChain as e:
        return e
    except Exception as e:  # the outcome compared, whatever it is
        return type(e)


@pytest.mark.parametrize("where", ["other region", "main region", "indirect in main"])
def test_a_walk_on_a_retired_main_region(where: str) -> None:
    """A worker walking on the snapshot it read before the front-end retired the largest region
    (the rings live elsewhere, so the session swaps snapshots without stopping them): the main
    region's view is released under it. Either walk serves the chain when it lies in the region
    that stays, and refuses it (InvalidChain: returned unused, the ring goes on) when it touches
    the retired one, rather than raising the released view's ValueError, which would end the
    queue's worker."""
    mem = Memory(LAYOUTS["adjacent"])
    main = mem.memory.main
    assert main is not None and main.guest_addr == M
    ring = memoryview(bytearray(16 * SHORT_RING))
    if where == "other region":
        DESC.pack_into(ring, 0, 0x8000, 40, NEXT, 1)
        DESC.pack_into(ring, 16, 0x9000, 16, WRITE, 0)
    elif where == "main region":
        DESC.pack_into(ring, 0, M + 0x8000, 40, NEXT, 1)
        DESC.pack_into(ring, 16, 0x9000, 16, WRITE, 0)
    else:
        DESC.pack_into(ring, 0, T, 32, INDIRECT, 0)
    assert main.close(quiet=True)
    outcome = _either(lambda: read_chain(mem.memory, ring, SHORT_RING, 0, indirect=True))
    python = _either(lambda: read_chain(mem.memory, ring, SHORT_RING, 0, indirect=True, gpas=[]))
    if where == "other region":
        assert isinstance(outcome, Chain) and isinstance(python, Chain), (outcome, python)
        assert places(outcome.readable) == places(python.readable)
        assert places(outcome.writable) == places(python.writable)
    else:
        assert isinstance(outcome, InvalidChain) and isinstance(python, InvalidChain), (
            outcome,
            python,
        )
        assert outcome.partial is None and outcome.reason == python.reason


@pytest.mark.parametrize("direct", [True, False])
def test_a_region_retired_by_code_the_walk_runs_can_go(direct: bool) -> None:
    """The walk allocates, so the garbage collector may run in it, hence Python code, hence
    another thread retiring the main region (a gc callback stands for both here): the region's
    view must be releasable then, as under the Python walk, which holds no export of it; the
    walk then serves the chain or refuses it as the Python walk does on a released view."""
    mem = Memory(LAYOUTS["adjacent"])
    main = mem.memory.main
    assert main is not None
    entries = [(M + 0x8000, 40, NEXT, 1), (M + 0x9000, 16, NEXT | WRITE, 2), (M, 8, WRITE, 0)]
    ring = memoryview(bytearray(16 * SHORT_RING))
    if direct:
        for i, e in enumerate(entries):
            DESC.pack_into(ring, 16 * i, *e)
    else:
        mem.memory.translate(T, 48)[:] = b"".join(DESC.pack(*e) for e in entries)
        DESC.pack_into(ring, 0, T, 48, INDIRECT, 0)
    state: dict[str, object] = {"armed": False}

    def retire(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and state["armed"] and "closed" not in state:
            try:
                state["closed"] = main.close(quiet=True)
            except BufferError as e:
                state["closed"] = e

    # Everything the call needs is made first, so that the first collection after arming falls
    # inside the walk (its first allocation of a tracked object), not before it.
    def walk() -> Chain:
        return read_chain(mem.memory, ring, SHORT_RING, 0, indirect=True)

    threshold = gc.get_threshold()
    gc.callbacks.append(retire)
    gc.set_threshold(1)
    try:
        state["armed"] = True
        outcome = _either(walk)
    finally:
        state["armed"] = False
        gc.set_threshold(*threshold)
        gc.callbacks.remove(retire)
    assert state.get("closed") is True, state
    assert isinstance(outcome, Chain | InvalidChain), outcome


@native
def test_the_c_walk_guards_its_table_whatever_it_is_told() -> None:
    """Arguments no queue passes (a size whose 16-fold overflows, a negative bulk threshold)
    still keep the C walk inside its buffers: it leaves such a chain to the Python walk. Run in
    a child, since a read out of bounds ends the process."""
    code = textwrap.dedent(
        """
        from pyvirtiofsd.virtio.chain import DESC, _native_walk as walk
        ring = bytearray(16)
        mem = memoryview(bytearray(4096))
        print(walk(ring, 1 << 60, (1 << 59) + 1, True, 0, 4096, mem, 16))
        # 16 times this size is 16 modulo 2**64: the one descriptor there would be served.
        DESC.pack_into(ring, 0, 0, 16, 0, 0)
        print(walk(ring, (1 << 62) + 1, 1 << 62, True, 0, 4096, mem, 16))
        # A table of 256 entries, which the walk in Python decodes in bulk.
        DESC.pack_into(ring, 0, 0, 4096, 4, 0)
        for i in range(256):
            DESC.pack_into(mem, 16 * i, 16 * i, 16, 1 if i < 255 else 0, i + 1)
        print(walk(ring, 1, 0, True, 0, 4096, mem, -1))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.split()) == (0, ["None"] * 3), done


@pytest.mark.parametrize("indirect", [False, True])
def test_a_short_chain_rewritten_while_it_is_walked(indirect: bool) -> None:
    """Another process (a vCPU) rewrites a short chain byte by byte while it is walked (the
    ring itself, or a 4-entry indirect table), between a chain in the region and one leaving it,
    looping and putting readable buffers after writable ones: whatever mixture a walk catches,
    every buffer it hands out lies inside guest memory, readable ones first, and once the chains
    are gone the region unmaps (no walk kept a view)."""
    size = 1 << 20
    base = 1 << 32
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    region = MappedRegion.map_fd(RegionSpec(base, size, 0x7000_0000, 0), fd)
    memory = GuestMemory([region])
    n, at = 4, 0x1000
    well = b"".join(
        DESC.pack(
            base + 0x10000 + 4096 * i, 300 + i, (NEXT if i + 1 < n else 0) | WRITE * (i > 1), i + 1
        )
        for i in range(n)
    )
    hostile = b"".join(
        DESC.pack(TOP - 4096 * (i + 1), (1 << 32) - 1, NEXT | WRITE * (i % 2 == 0), (i + 1) % n)
        for i in range(n)
    )
    if indirect:
        ring = memoryview(bytearray(16))
        DESC.pack_into(ring, 0, base + at, 16 * n, INDIRECT, 0)
        queue_size = 1
    else:
        ring = memory.translate(base + at, 16 * n)
        queue_size = n
    served = tries = 0
    with rewriting(fd, size, at, well, hostile) as alive:
        low, high = region.host_addr, region.host_addr + size
        # 3,000 walks, and more until one got a chain: on a loaded machine the rewriter may
        # keep every walk of the first thousands on a broken mixture.
        while tries < 3000 or (not served and tries < 300_000):
            tries += 1
            alive()
            try:
                chain = read_chain(memory, ring, queue_size, 0, indirect=True)
            except InvalidChain:
                continue
            served += 1
            # The well-formed chain's readable buffers are views (too many bytes for a copy);
            # a mixture with fewer readable bytes comes as a copy.
            spans = [p for p in places(chain.readable) + places(chain.writable) if type(p) is tuple]
            assert all(low <= a and a + k <= high for a, k in spans)
            assert sum(map(len, chain.readable)) == chain.readable_len
            assert sum(map(len, chain.writable)) == chain.writable_len
            chain.release()
    assert served
    del chain
    ring.release()
    assert region.close()
