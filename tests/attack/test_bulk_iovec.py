"""Big READs and WRITEs with hostile indirect tables, sent by hand to a real daemon.

A table of 16 or more descriptors shaped as Linux builds them is decoded in bulk and its pages go
to preadv/pwritev as host addresses (``pyvirtiofsd.iovec``). Here a guest hands such tables with
one page moved past the end of guest RAM, to the top of the address space, made 4 GiB long,
flagged INDIRECT, or laid over the table itself, and with pages of odd sizes out of order. What
is judged is guest RAM around the pages (a canary that must stay as it was), the file on the
host, and the daemon: it answers the next request and exits cleanly.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.testing.fuse_client import encode_request
from pyvirtiofsd.virtio.chain import DESC
from tests.attack.tools import (
    INDIRECT,
    NEXT,
    ROOT,
    TOP,
    WRITE,
    AttackDaemon,
    entry_of,
    open_of,
    start_daemon,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")

PAGE = 4096
PAGES = 256
CANARY = 0xA5
FILE = os.urandom(2 * PAGES * PAGE)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AttackDaemon, Path]]:
    work = tmp_path_factory.mktemp("bulk")
    share, outside = work / "share", work / "outside"
    share.mkdir()
    outside.mkdir()
    (share / "f").write_bytes(FILE)
    d = start_daemon(work, share, outside, queues=2)
    try:
        yield d, share
    finally:
        d.close()


class Hand:
    """Hand-written chains in an area of guest RAM of their own."""

    def __init__(self, d: AttackDaemon) -> None:
        self.q = d.guest.q
        self.ram = self.q.ram
        self.area = self.ram.carve(4 * PAGES * PAGE + (1 << 16))
        self.table = self.area
        self.request = self.area + 0x4000
        self.header = self.area + 0x5000
        # Pages in reverse order, a page apart: the gaps hold the canary.
        self.pages = [self.area + (1 << 16) + 2 * PAGE * (PAGES - 1 - i) for i in range(PAGES)]
        self.slot = self.q.reserve_descs(1)[0]
        self.unique = 1000

    def canary(self) -> None:
        self.ram.write(self.area + (1 << 16), bytes([CANARY]) * (2 * PAGES * PAGE))

    def send(
        self, opcode: int, nodeid: int, payload: bytes, pages: list[list[int]], writable: bool
    ) -> tuple[int, int]:
        """Send one request whose pages are the descriptors ``pages``; its used length and
        the error of its reply (None if none)."""
        self.unique += 1
        req = encode_request(opcode, nodeid, payload, self.unique)
        if not writable:  # the request goes on in the pages
            total = len(req) + sum(n for _, n, _ in pages)
            req = struct.pack("<I", total % (1 << 32)) + req[4:]
        self.ram.write(self.request, req)
        entries = [[self.request, len(req), NEXT, 1]]
        if writable:
            entries.append([self.header, 16, NEXT | WRITE, 2])
        for page in pages:
            addr, length, flags = page
            entries.append(
                [addr, length, flags | (WRITE if writable else 0) | NEXT, len(entries) + 1]
            )
        if not writable:
            entries.append([self.header, 64, WRITE, 0])  # room for a WRITE's reply
        entries[-1][2] &= ~NEXT
        table = b"".join(DESC.pack(*e) for e in entries)
        self.ram.write(self.table, table)
        self.ram.write(self.header, bytes(16))
        self.q.write_desc(self.slot, self.table, len(table), INDIRECT, 0)
        self.q.publish_raw(self.slot, [])
        self.q.kick()
        used = self.q.wait(self.slot, 10)
        self.q.completed.pop(self.slot)
        self.q._pending.pop(self.slot, None)
        length, error, unique = abi.OUT_HEADER.struct.unpack(self.ram.read(self.header, 16))
        if used == 0:
            return used, 0
        assert unique == self.unique and length == used
        return used, error


@pytest.fixture(scope="module")
def hand(daemon: tuple[AttackDaemon, Path]) -> Hand:
    return Hand(daemon[0])


def _open(d: AttackDaemon) -> tuple[int, int]:
    node = entry_of(d.guest.lookup(ROOT, b"f")).nodeid
    return node, open_of(d.guest.open(node, os.O_RDWR)).fh


def _pages(hand: Hand, lengths: list[int]) -> list[list[int]]:
    return [[hand.pages[i], n, 0] for i, n in enumerate(lengths)]


def _canary_intact(hand: Hand, pages: list[list[int]]) -> None:
    """Guest RAM between the pages is as it was: nothing written outside them."""
    start = hand.area + (1 << 16)
    seen = hand.ram.read(start, 2 * PAGES * PAGE)
    mask = bytearray(len(seen))
    for addr, n, _ in pages:
        if start <= addr < start + len(seen):
            mask[addr - start : addr - start + n] = b"\1" * n
    outside = bytes(b for b, m in zip(seen, mask, strict=True) if not m)
    assert outside == bytes([CANARY]) * len(outside)


@pytest.mark.parametrize("shape", ["whole", "odd"])
def test_a_big_read_lands_in_its_pages_only(daemon, hand: Hand, shape: str) -> None:
    """256 pages, whole or of odd sizes (one empty), out of order: the file's bytes in them, in
    order, and nothing around them."""
    d, _ = daemon
    node, fh = _open(d)
    lengths = (
        [PAGE] * PAGES if shape == "whole" else [i * 37 % PAGE for i in range(PAGES)]
    )  # the first empty
    pages = _pages(hand, lengths)
    hand.canary()
    size, offset = sum(lengths), 3
    used, error = hand.send(
        abi.Opcode.READ, node, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), pages, True
    )
    assert (used, error) == (16 + size, 0)
    got = b"".join(hand.ram.read(addr, n) for addr, n, _ in pages)
    assert got == FILE[offset : offset + size]
    _canary_intact(hand, pages)
    assert d.serves() is None


HOSTILE = {
    "past the end of RAM": lambda hand: [hand.ram.size - PAGE + 1, PAGE, 0],
    "at the top": lambda hand: [TOP - PAGE, PAGE, 0],
    "the last byte": lambda hand: [TOP - 1, 2, 0],
    "4 GiB long": lambda hand: [hand.pages[100], (1 << 32) - 1, 0],
    "flagged indirect": lambda hand: [hand.pages[100], PAGE, INDIRECT],
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
@pytest.mark.parametrize("opcode", [abi.Opcode.READ, abi.Opcode.WRITE])
def test_one_hostile_page_in_a_big_request(daemon, hand: Hand, what: str, opcode: int) -> None:
    """A READ or WRITE whose table holds one hostile page among 256: nothing is read into or
    written from the other pages, RAM around them is untouched, the file stays as it was, and
    the daemon answers (an error or nothing) and goes on."""
    d, share = daemon
    node, fh = _open(d)
    pages = _pages(hand, [PAGE] * PAGES)
    pages[100] = HOSTILE[what](hand)
    hand.canary()
    size = sum(n for _, n, _ in pages)
    if opcode == abi.Opcode.READ:
        payload = abi.READ_IN.pack(fh, 0, PAGES * PAGE, 0, 0, 0, 0)
    else:
        payload = abi.WRITE_IN.pack(fh, 0, size % (1 << 32), 0, 0, 0, 0)
    used, error = hand.send(opcode, node, payload, pages, opcode == abi.Opcode.READ)
    assert used in (0, 16), (used, error)
    if used:
        assert error in (-errno.EFAULT, -errno.EINVAL, -errno.EIO) and error != -errno.EIO
    _canary_intact(hand, [])  # the pages too: nothing was read into any of them
    assert (share / "f").read_bytes() == FILE
    assert d.serves() is None


def test_a_big_write_takes_its_pages_and_a_read_over_the_table(daemon, hand: Hand) -> None:
    """A WRITE's 256 odd-sized pages reach the file in order; a READ whose pages lie over its
    own table and request (decoded from a copy) fills them, nothing else."""
    d, share = daemon
    node, fh = _open(d)
    lengths = [1 + i * 53 % PAGE for i in range(PAGES)]
    pages = _pages(hand, lengths)
    data = os.urandom(sum(lengths))
    at = 0
    for addr, n, _ in pages:
        hand.ram.write(addr, data[at : at + n])
        at += n
    offset = len(FILE) + 5
    used, error = hand.send(
        abi.Opcode.WRITE, node, abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0), pages, False
    )
    assert error == 0 and used == 16 + abi.WRITE_OUT.size
    assert struct.unpack_from("<I", hand.ram.read(hand.header + 16, 4))[0] == len(data)
    with open(share / "f", "rb") as f:
        f.seek(offset)
        assert f.read() == data
    os.truncate(share / "f", len(FILE))
    # Pages over the table and the request: 16 of them, then the usual ones.
    pages = [[hand.table + 256 * i, 256, 0] for i in range(16)] + _pages(hand, [PAGE] * 64)
    hand.canary()
    size = sum(n for _, n, _ in pages)
    used, error = hand.send(
        abi.Opcode.READ, node, abi.READ_IN.pack(fh, 7, size, 0, 0, 0, 0), pages, True
    )
    assert (used, error) == (16 + size, 0)
    assert b"".join(hand.ram.read(a, n) for a, n, _ in pages) == FILE[7 : 7 + size]
    _canary_intact(hand, pages)
    assert d.serves() is None
