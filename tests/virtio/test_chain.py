from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyvirtiofsd.virtio.chain as chain_module
from pyvirtiofsd.iovec import Iovecs
from pyvirtiofsd.virtio.chain import (
    DESC,
    MAX_INDIRECT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Chain,
    InvalidChain,
    read_chain,
)
from pyvirtiofsd.virtio.memory import GuestMemory, MappedRegion

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
    assert chain.readable == [] and chain.writable == []


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
        g.desc(i, DATA + i, 1, NEXT if i + 1 < SIZE else 0, i + 1)
    assert len(g.read().readable) == SIZE


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
    assert [len(v) for v in c.readable] == [40, 40]
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
