"""Small requests with hostile descriptor chains, sent by hand to a real daemon.

The compiled build walks a short chain lying in the main region of guest memory in C and leaves
every other chain to the walk in Python; whichever walk takes a chain, the guest must see the
same outcome. Here guest RAM is two adjacent regions (the main one, which holds the rings, and
one above it) and a guest sends GETATTRs whose buffers straddle the main region's end, lie in the
other region, lie over the descriptor tables, or break a rule of the chain; it also rewrites a
descriptor while the daemon walks it, and keeps two queues busy at once. Each row states the
outcome the walk in Python gives (served, returned unused, or answered EFAULT through the
buffers it could reach), so the suite holds the compiled build to it and runs unchanged on the
pure one.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.testing.frontend import DriverQueue
from pyvirtiofsd.testing.fuse_client import encode_request
from pyvirtiofsd.virtio.chain import DESC
from tests.attack.tools import INDIRECT, NEXT, ROOT, TOP, WRITE, AttackDaemon, start_daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")

MiB = 1 << 20
#: Guest RAM: two adjacent regions of 32 MiB; the main one (the first of the largest) at 0.
MAIN_END = 32 * MiB
RAM_END = 64 * MiB
HIGH = MAIN_END + MiB  # room in the other region
REQUEST = abi.IN_HEADER.size + abi.GETATTR_IN.size
HEADER = abi.OUT_HEADER.size
REPLY = HEADER + abi.ATTR_OUT.size
SLOTS = 8


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttackDaemon]:
    work = tmp_path_factory.mktemp("short")
    share, outside = work / "share", work / "outside"
    share.mkdir()
    outside.mkdir()
    d = start_daemon(work, share, outside, queues=2, regions=2)
    try:
        regions = [(r.guest_addr, r.size) for r in d.guest.q.ram.regions]
        assert regions == [(0, MAIN_END), (MAIN_END, RAM_END - MAIN_END)]
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def attr(daemon: AttackDaemon) -> bytes:
    """The root's attributes, as a plain GETATTR gets them."""
    r = daemon.guest.getattr(ROOT)
    assert r.ok
    return r.payload


Desc = tuple[int, int, int, int]
#: A buffer of a chain: guest address, length, and whether it is device-writable.
Piece = tuple[int, int, bool]


class Hand:
    """Hand-written chains on one queue, with an area of their own in the main region."""

    def __init__(self, q: DriverQueue) -> None:
        self.q = q
        self.ram = q.ram
        self.area = self.ram.carve(1 << 16)
        self.slots = q.reserve_descs(SLOTS)
        self.unique = 100_000 * (q.index + 1)

    def write(self, addr: int, data: bytes) -> None:
        """Write guest RAM, across the regions' boundary if need be."""
        while data:
            n = min(len(data), MAIN_END - addr) if addr < MAIN_END else len(data)
            self.ram.write(addr, data[:n])
            addr, data = addr + n, data[n:]

    def read(self, addr: int, length: int) -> bytes:
        out = b""
        while length:
            n = min(length, MAIN_END - addr) if addr < MAIN_END else length
            out += self.ram.read(addr, n)
            addr, length = addr + n, length - n
        return out

    def lay(self, pieces: list[Piece]) -> None:
        """A GETATTR of the root over the readable pieces (those in RAM), the writable zeroed."""
        self.unique += 1
        req = encode_request(abi.Opcode.GETATTR, ROOT, abi.GETATTR_IN.pack(0, 0, 0), self.unique)
        # Out of RAM, nothing is laid; the request last, as it may lie over the reply.
        inside = [(a, n, w) for a, n, w in pieces if a + min(n, MiB) <= RAM_END]
        for addr, n, _ in (p for p in inside if p[2]):
            self.write(addr, bytes(n))
        at = 0
        for addr, n, _ in (p for p in inside if not p[2]):
            self.write(addr, req[at : at + n])
            at += n

    def chain(self, pieces: list[Piece], table: int | None) -> tuple[list[Desc], list[Desc]]:
        """The descriptors of the chain of ``pieces``: (ring entries, one per slot in order;
        indirect table entries, none for a direct chain)."""
        last = len(pieces) - 1
        entries = [
            (a, n, (WRITE if w else 0) | (NEXT if i < last else 0), i + 1)
            for i, (a, n, w) in enumerate(pieces)
        ]
        if table is not None:
            return [(table, 16 * len(entries), INDIRECT, 0)], entries
        slots = self.slots
        return [
            (a, n, f, slots[i + 1] if i < last else 0) for i, (a, n, f, _) in enumerate(entries)
        ], []

    def send(self, ring: list[Desc], entries: list[Desc], table: int | None) -> int:
        """Publish ``ring`` (in the slots, in order) with ``entries`` at ``table``; the used
        length."""
        if table is not None and table + 16 * len(entries) <= RAM_END:
            self.write(table, b"".join(DESC.pack(*e) for e in entries))
        for slot, e in zip(self.slots, ring, strict=False):
            self.q.write_desc(slot, *e)
        return self.publish()

    def publish(self) -> int:
        head = self.slots[0]
        self.q.publish_raw(head, [])
        self.q.kick()
        used = self.q.wait(head, 10)
        self.q.completed.pop(head)
        self.q._pending.pop(head, None)
        return used

    def reply(self, pieces: list[Piece], used: int) -> bytes:
        out = b"".join(self.read(a, n) for a, n, w in pieces if w and a + n <= RAM_END)
        return out[:used]


@pytest.fixture(scope="module")
def hand(daemon: AttackDaemon) -> Hand:
    h = Hand(daemon.guest.q)
    # The rows that lay a reply over the ring's descriptors lay it over these slots only.
    assert sorted(h.slots) == list(range(min(h.slots), min(h.slots) + SLOTS))
    return h


Damage = Callable[[Hand, list[Desc], list[Desc]], None]


@dataclass(frozen=True)
class Row:
    """A GETATTR's chain and what the walk in Python makes of it: ``served``, ``unused``
    (refused, returned with nothing written) or ``efault`` (refused, answered EFAULT through
    the buffers it could reach). ``pieces`` and ``table`` are given the Hand; ``damage``
    changes the well-formed descriptors, given the ring and table entries."""

    pieces: Callable[[Hand], list[Piece]]
    table: Callable[[Hand, int], int | None]
    outcome: str
    damage: Damage | None = None


def direct(h: Hand, n: int) -> int | None:
    return None


def in_area(h: Hand, n: int) -> int | None:
    return h.area


def plain(h: Hand) -> list[Piece]:
    """A GETATTR as Linux lays it out: header and arguments, reply header and attributes."""
    a = h.area
    return [
        (a + 0x100, 40, False),
        (a + 0x140, 16, False),
        (a + 0x200, 16, True),
        (a + 0x300, 104, True),
    ]


def edit(
    index: int, field: int, value: Callable[[Hand], int] | int, *, ring: bool = False
) -> Damage:
    """A damage that sets one field of one entry (of the table, or of the ring)."""

    def damage(h: Hand, ring_entries: list[Desc], table_entries: list[Desc]) -> None:
        target = ring_entries if ring or not table_entries else table_entries
        e = list(target[index])
        e[field] = value(h) if callable(value) else value
        target[index] = (e[0], e[1], e[2], e[3])

    return damage


SERVED: dict[str, Row] = {
    "in the main region": Row(plain, direct, "served"),
    "in the main region, indirect": Row(plain, in_area, "served"),
    "request straddling the main region's end": Row(
        lambda h: [(MAIN_END - 20, REQUEST, False), (h.area + 0x200, REPLY, True)],
        direct,
        "served",
    ),
    "reply straddling the main region's end": Row(
        lambda h: [(h.area + 0x100, REQUEST, False), (MAIN_END - 17, REPLY, True)],
        in_area,
        "served",
    ),
    "a one-byte piece at the main region's end": Row(
        lambda h: [
            (h.area + 0x100, REQUEST - 1, False),
            (MAIN_END - 1, 1, False),
            (h.area + 0x200, REPLY, True),
        ],
        direct,
        "served",
    ),
    "a one-byte piece at the other region's start": Row(
        lambda h: [
            (h.area + 0x100, REQUEST - 1, False),
            (MAIN_END, 1, False),
            (h.area + 0x200, REPLY, True),
        ],
        in_area,
        "served",
    ),
    "all in the other region": Row(
        lambda h: [(HIGH, REQUEST, False), (HIGH + 0x100, REPLY, True)], direct, "served"
    ),
    "table in the other region": Row(plain, lambda h, n: HIGH + 0x8000, "served"),
    "table ending at the main region's end": Row(plain, lambda h, n: MAIN_END - 16 * n, "served"),
    "table starting the other region": Row(plain, lambda h, n: MAIN_END, "served"),
    "reply over its own indirect table": Row(
        lambda h: [(h.area + 0x100, REQUEST, False), (h.area, REPLY, True)], in_area, "served"
    ),
    "reply over the ring's descriptors": Row(
        lambda h: [
            (h.area + 0x100, REQUEST, False),
            (h.q.desc_addr + 16 * min(h.slots), REPLY, True),
        ],
        direct,
        "served",
    ),
    "request and reply in one place": Row(
        lambda h: [(h.area + 0x100, REQUEST, False), (h.area + 0x100, REPLY, True)],
        direct,
        "served",
    ),
    # An empty buffer is no buffer to the walk in Python, even between the sides.
    "an empty readable piece": Row(
        lambda h: [
            (h.area + 0x100, 40, False),
            (h.area + 0x400, 0, False),
            (h.area + 0x140, 16, False),
            (h.area + 0x200, REPLY, True),
        ],
        direct,
        "served",
    ),
    "a readable piece after an empty writable one": Row(
        lambda h: [
            (h.area + 0x100, 40, False),
            (h.area + 0x400, 0, True),
            (h.area + 0x140, 16, False),
            (h.area + 0x200, REPLY, True),
        ],
        in_area,
        "served",
    ),
}

REFUSED: dict[str, Row] = {
    "table straddling the main region's end": Row(
        plain, lambda h, n: MAIN_END - 16 * n + 16, "unused"
    ),
    "table at the top of the address space": Row(plain, lambda h, n: TOP - 16 * n, "unused"),
    "reply past the end of RAM": Row(
        lambda h: [(h.area + 0x100, REQUEST, False), (RAM_END - REPLY + 1, REPLY, True)],
        direct,
        "unused",
    ),
    "request past the end of RAM": Row(
        lambda h: [
            (h.area + 0x100, 40, False),
            (RAM_END - 8, 16, False),
            (h.area + 0x200, REPLY, True),
        ],
        direct,
        "efault",
    ),
    "request at the top of the address space": Row(
        lambda h: [
            (h.area + 0x100, 40, False),
            (TOP - 16, 16, False),
            (h.area + 0x200, REPLY, True),
        ],
        in_area,
        "efault",
    ),
    "a 4 GiB request piece": Row(plain, direct, "efault", edit(1, 1, (1 << 32) - 1)),
    "a 4 GiB request piece, indirect": Row(plain, in_area, "efault", edit(1, 1, (1 << 32) - 1)),
    "readable after writable": Row(plain, direct, "unused", edit(3, 2, 0)),
    "readable after writable, indirect": Row(plain, in_area, "unused", edit(3, 2, 0)),
    "a loop in the ring": Row(plain, direct, "unused", edit(1, 3, lambda h: h.slots[0])),
    "a loop in the table": Row(plain, in_area, "unused", edit(1, 3, 0)),
    "next past the ring": Row(plain, direct, "unused", edit(0, 3, 128)),
    "next past the table": Row(plain, in_area, "unused", edit(2, 3, 4)),
    "indirect further down the ring": Row(plain, direct, "unused", edit(1, 2, INDIRECT | NEXT)),
    "indirect inside the table": Row(plain, in_area, "unused", edit(1, 2, INDIRECT | NEXT)),
    "indirect chained on": Row(plain, in_area, "unused", edit(0, 2, INDIRECT | NEXT, ring=True)),
    "indirect table of 15 bytes": Row(plain, in_area, "unused", edit(0, 1, 15, ring=True)),
}


def run(hand: Hand, row: Row, attr: bytes) -> None:
    pieces = row.pieces(hand)
    table = row.table(hand, len(pieces))
    hand.lay(pieces)
    ring, entries = hand.chain(pieces, table)
    if row.damage is not None:
        row.damage(hand, ring, entries)
    used = hand.send(ring, entries, table)
    reply = hand.reply(pieces, used)
    if row.outcome == "served":
        assert used == REPLY, (used, reply)
        head = abi.OUT_HEADER.struct.unpack_from(reply)
        assert head == (REPLY, 0, hand.unique)
        assert reply[HEADER:] == attr
    elif row.outcome == "unused":
        assert used == 0, reply
    else:
        assert used == HEADER, (used, reply)
        assert abi.OUT_HEADER.struct.unpack(reply) == (HEADER, -errno.EFAULT, hand.unique)


@pytest.mark.parametrize("name", sorted(SERVED))
def test_a_well_formed_short_chain_is_served_wherever_it_lies(
    daemon: AttackDaemon, hand: Hand, attr: bytes, name: str
) -> None:
    """Short chains in the main region, across its end, in the other region, with the table
    anywhere and the reply over the tables: the reply is the one a plain GETATTR gets."""
    run(hand, SERVED[name], attr)
    assert daemon.serves() is None


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_broken_short_chain_ends_as_the_python_walk_ends_it(
    daemon: AttackDaemon, hand: Hand, attr: bytes, name: str
) -> None:
    """Short chains breaking a rule or leaving guest memory: refused as the walk in Python
    refuses them (unused, or EFAULT through the reachable buffers), and the daemon goes on."""
    run(hand, REFUSED[name], attr)
    assert daemon.serves() is None


def test_a_descriptor_rewritten_while_it_is_walked(
    daemon: AttackDaemon, hand: Hand, attr: bytes
) -> None:
    """A vCPU moves the reply's buffer over and over (one 8-byte store each time) between the
    main region, across its end and past the end of RAM while the daemon walks chains naming
    it: each GETATTR is answered in full in exactly one of the buffers, or returned unused."""
    q = hand.q
    request = hand.area + 0x100
    places = [hand.area + 0x200, MAIN_END - 50, RAM_END - 60]
    slot = hand.slots[1]
    q.write_desc(slot, places[0], REPLY, WRITE, 0)
    addr_word = q._desc.cast("Q")  # the address field of descriptor i is word 2 * i
    stop = threading.Event()

    def move() -> None:
        i = 0
        while not stop.is_set():
            addr_word[2 * slot] = places[i % 3]
            i += 1
            time.sleep(0)  # hand the GIL to the driver's thread now and then

    served = unused = 0
    mover = threading.Thread(target=move, daemon=True)
    mover.start()
    try:
        for _ in range(150):
            for where in places[:2]:
                hand.write(where, bytes(REPLY))
            hand.lay([(request, REQUEST, False)])
            q.write_desc(hand.slots[0], request, REQUEST, NEXT, slot)
            used = hand.publish()
            if not used:
                unused += 1
                continue
            assert used == REPLY
            got = [hand.read(where, REPLY) for where in places[:2]]
            mine = [g for g in got if g == got_reply(hand.unique, attr)]
            assert len(mine) == 1, got
            served += 1
    finally:
        stop.set()
        mover.join()
        addr_word.release()
    assert served + unused == 150
    assert daemon.serves() is None


def got_reply(unique: int, attr: bytes) -> bytes:
    return abi.OUT_HEADER.struct.pack(REPLY, 0, unique) + attr


def test_two_queues_walk_at_once(daemon: AttackDaemon, attr: bytes) -> None:
    """Both request queues carry short chains at once, one in the main region, the other
    alternately there and across its end: every GETATTR is answered in full on both."""
    done: dict[int, int] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def serve(q: DriverQueue, straddle: bool) -> None:
        try:
            h = Hand(q)
            start.wait(30)
            for i in range(100):
                at = MAIN_END - 30 if straddle and i % 2 else h.area + 0x100
                pieces = [(at, REQUEST, False), (h.area + 0x200, REPLY, True)]
                h.lay(pieces)
                ring, _ = h.chain(pieces, None)
                used = h.send(ring, [], None)
                assert h.reply(pieces, used) == got_reply(h.unique, attr)
            done[q.index] = 100
        except BaseException as e:  # reported from the test's own thread
            errors.append(e)

    queues = [daemon.guests[1].q, daemon.guests[2].q]
    threads = [threading.Thread(target=serve, args=(q, i == 1)) for i, q in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert done == {q.index: 100 for q in queues}
    assert daemon.serves() is None
