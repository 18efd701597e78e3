"""Attacks on the bulk decoding of big indirect tables (``chain._linux_table``).

The bulk path hands the kernel host addresses it computed itself, so comparing the bytes a chain
shows is not enough (a wrong address over equal bytes would pass): these tests compare where
every buffer lies, read from the iovec array the kernel would get, with the chain the
descriptor-by-descriptor walk gives for the same descriptors laid out as a direct ring (which
never takes the bulk path, so the comparison also holds on the compiled build, where the walk
can't be forced by replacing a function).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofsd.iovec import IOVEC, Iovecs
from pyvirtiofsd.virtio.chain import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Chain,
    InvalidChain,
    read_chain,
)
from pyvirtiofsd.virtio.memory import GuestMemory, MappedRegion, RegionSpec, _address_of

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
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


def places(side: Sequence[memoryview]) -> list[tuple[int, int]]:
    """Where each buffer lies in our address space, as the kernel will be told."""
    if isinstance(side, Iovecs):
        raw = side._raw
        view, host = side._view, side._host
        out = [(base, n) for base, n in IOVEC.iter_unpack(raw)]
        for base, n in out:
            # Inside the Iovecs' own view of the mapping: the rule the kernel relies on.
            assert n > 0 and host <= base and base + n <= host + len(view), (base, n)
        # The views it makes stand exactly where the array says.
        assert [(_address_of(v), len(v)) for v in side] == out
        return out
    return [(_address_of(v), len(v)) for v in side]


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
    for kind, index, value, length in damage:
        if index >= n:
            continue
        entry = entries[index]
        if kind == "addr":
            candidates = special_addresses(mem, max(length, 1))
            entry[0], entry[1] = candidates[value % len(candidates)], length
        elif kind == "raw":
            entry[0], entry[1] = value, length
        elif kind == "flags":
            entry[2] = value
        else:
            entry[3] = (index + value) % 0x10000
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
            m[at + i : at + i + 7] = a[i : i + 7]
        for i in range(0, len(b), 5):
            m[at + i : at + i + 5] = b[i : i + 5]
    """
)


def test_a_table_rewritten_while_it_is_decoded() -> None:
    """Another process (a vCPU) rewrites the table byte by byte while it is decoded, between a
    table in the region and one far outside it: whatever mixture the copy catches, every buffer
    handed out lies inside guest memory, where its guest address says."""
    size = 1 << 20
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
    child = subprocess.Popen(
        [sys.executable, "-c", _FLIPPER, str(fd), str(size), "0", inside.hex(), outside.hex()],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "go\n"
        served = 0
        low, high = region.host_addr, region.host_addr + size
        for _ in range(3000):
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
    finally:
        child.kill()
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
        os.close(fd)
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
    from pyvirtiofsd.fuse import abi
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
            length = out.finish(abi.OUT_HEADER.struct, 0, 9)
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
