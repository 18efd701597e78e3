"""Descriptor chains of a split virtqueue: walking, validating, translating.

A chain is a linked list of 16-byte descriptors ``u64 addr | u32 len | u16 flags |
u16 next`` in the descriptor table, optionally redirected through one *indirect* table.
The walk turns it into two lists of memoryviews onto guest memory: the device-readable
buffers (the request) and, after them, the device-writable ones (room for the reply).

The driver is hostile, so the walk enforces:

* the head and every ``next`` index lie inside the table they index;
* a chain visits at most as many descriptors as its table holds, which catches loops
  without remembering visited indices;
* an indirect descriptor only as the sole descriptor of the direct chain (the form Linux
  and QEMU use), with a length that is a non-zero multiple of 16 and at most
  :data:`MAX_INDIRECT` entries, only when the feature was negotiated, and never inside an
  indirect table;
* readable buffers never follow writable ones;
* every buffer lies inside guest memory (several views when it spans adjacent regions).

Any violation raises :class:`InvalidChain` carrying the head, so the caller can log it
and return the chain with used length 0.

While the front-end migrates the guest, the device must log every page it writes, by
guest-physical address: the walk then also keeps the address and length of each writable
buffer (``gpas``), and :meth:`Chain.written` says which ranges a reply of so many bytes
covered. Otherwise (``gpas`` None, the usual case) it keeps nothing more.
"""

from __future__ import annotations

import functools
import operator
import struct
from typing import Final

from pyvirtiofsd.virtio.memory import GuestMemory, GuestMemoryError

__all__ = [
    "DESC_SIZE",
    "MAX_INDIRECT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "Chain",
    "InvalidChain",
    "read_chain",
]

VRING_DESC_F_NEXT: Final = 1
VRING_DESC_F_WRITE: Final = 2
VRING_DESC_F_INDIRECT: Final = 4

DESC: Final = struct.Struct("<QIHH")
DESC_SIZE: Final = DESC.size

# QEMU accepts indirect tables up to its 1024-entry VIRTQUEUE_MAX_SIZE whatever the queue
# size; Linux never builds a bigger one. Larger tables are only a way to make us spin.
MAX_INDIRECT: Final = 1024


class InvalidChain(Exception):
    """A chain that can't be served; ``head`` is the descriptor to return unused.

    When the chain is well formed but some buffers lie outside guest memory (a guest
    buffer inside a DAX window, say), ``partial`` holds the buffers that could be reached,
    each list cut at its first unreachable buffer: enough, often, to answer with an error.
    """

    def __init__(self, head: int, reason: str, partial: Chain | None = None) -> None:
        super().__init__(f"descriptor chain at head {head}: {reason}")
        self.head = head
        self.reason = reason
        self.partial = partial


class Chain:
    """One request: its head index and the buffers it carries.

    ``owner`` is whoever serves the chain (the transport's queue worker), which a device asks
    to answer it later (:func:`pyvirtiofsd.virtio.device.later`); None outside of that.
    """

    __slots__ = ("gpas", "head", "owner", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        writable_len: int | None = None,
        readable_len: int | None = None,
        gpas: list[tuple[int, int]] | None = None,
    ) -> None:
        self.head = head
        self.owner: object | None = None
        self.readable = readable
        self.writable = writable
        #: Bytes the buffers hold (counted during the walk, not summed again).
        self.writable_len = sum(map(len, writable)) if writable_len is None else writable_len
        self.readable_len = sum(map(len, readable)) if readable_len is None else readable_len
        #: The writable buffers' guest-physical ``(address, length)``, in order, when the walk
        #: was asked to keep them (dirty logging); None otherwise.
        self.gpas = gpas

    def written(self, used: int) -> list[tuple[int, int]]:
        """The guest-physical ranges the first ``used`` bytes of the writable buffers occupy
        (the walk must have kept ``gpas``)."""
        assert self.gpas is not None
        out = []
        for addr, length in self.gpas:
            if used <= 0:
                break
            n = min(length, used)
            out.append((addr, n))
            used -= n
        return out

    def release(self) -> None:
        """Drop the chain's views now. They are the only references to them unless a handler
        kept one (a bug), so they go at once; a kept one still pins its mapping, which is then
        unmapped only when it goes (see :class:`~.memory.MappedRegion`). Releasing each view
        by hand would cost a call per descriptor, 259 for a 1 MiB READ, for no more safety."""
        self.readable = []
        self.writable = []

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, readable={[len(v) for v in self.readable]}, "
            f"writable={[len(v) for v in self.writable]})"
        )


_unpack_desc = DESC.unpack_from

#: Tables this long or longer are decoded in bulk; below, walking them costs less.
_BULK: Final = 16


@functools.lru_cache(maxsize=1024)
def _linux_words(entries: int, readable: int) -> list[int]:
    """The flags and next fields (as one 32-bit word each) of a table Linux builds with
    ``entries`` descriptors, the first ``readable`` of them device-readable."""
    words = [
        (VRING_DESC_F_NEXT | (VRING_DESC_F_WRITE if i >= readable else 0)) | (i + 1) << 16
        for i in range(entries)
    ]
    words[-1] &= ~VRING_DESC_F_NEXT
    return words


def _linux_table(
    memory: GuestMemory,
    table: memoryview,
    entries: int,
    head: int,
    gpas: list[tuple[int, int]] | None,
) -> Chain | None:
    """The chain of an indirect table laid out as Linux (and QEMU) lay them out, decoded in
    bulk: entries in order (``next`` is i + 1 in every entry but the last, whose ``next`` means
    nothing without NEXT: Linux writes i + 1 there, other drivers 0), NEXT on all but the last,
    readable before writable, no empty buffer, all in one guest memory region. None for any
    other table: the general walk then decides, so both give the same chain or the same
    refusal."""
    words = table.cast("I")
    flags_next = words[3::4].tolist()
    flags_next[-1] = (flags_next[-1] & 0xFFFF) | entries << 16
    if flags_next[-1] & VRING_DESC_F_WRITE:
        # The first writable entry, by bisection; a table of another shape fails the
        # comparison below whatever this finds.
        lo, hi = 0, entries - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if flags_next[mid] & VRING_DESC_F_WRITE:
                hi = mid
            else:
                lo = mid + 1
        readable = lo
    else:
        readable = entries
    if flags_next != _linux_words(entries, readable):
        return None
    lens = words[2::4].tolist()
    if 0 in lens:
        return None
    addrs = table.cast("Q")[0::2].tolist()
    region = memory.region_of(min(addrs), max(map(operator.add, addrs, lens)))
    if region is None:
        return None
    view = region.view
    base = region.guest_addr
    views = [view[a - base : a - base + n] for a, n in zip(addrs, lens, strict=True)]
    if gpas is not None:
        gpas.extend(zip(addrs[readable:], lens[readable:], strict=True))
    return Chain(
        head, views[:readable], views[readable:], sum(lens[readable:]), sum(lens[:readable]), gpas
    )


def read_chain(
    memory: GuestMemory,
    table: memoryview,
    queue_size: int,
    head: int,
    *,
    indirect: bool,
    gpas: list[tuple[int, int]] | None = None,
) -> Chain:
    """Walk the chain starting at ``head`` of ``table`` (``queue_size`` descriptors).

    ``head`` must already be known to be below ``queue_size``. With ``gpas`` (an empty list)
    the walk keeps the writable buffers' guest-physical ranges there (:attr:`Chain.gpas`).
    """
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    addr, length, flags, nxt = _unpack_desc(table, head * 16)
    limit = queue_size
    if flags & VRING_DESC_F_INDIRECT:
        if not indirect:
            raise InvalidChain(head, "indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")
        if flags & VRING_DESC_F_NEXT:
            raise InvalidChain(head, "indirect descriptor chained to another descriptor")
        if length == 0 or length % DESC_SIZE:
            raise InvalidChain(head, f"indirect table length {length} is not a multiple of 16")
        limit = length // DESC_SIZE
        if limit > MAX_INDIRECT:
            raise InvalidChain(head, f"indirect table of {limit} entries (max {MAX_INDIRECT})")
        try:
            table = memory.translate(addr, length)
        except GuestMemoryError as e:
            raise InvalidChain(head, f"indirect table: {e}") from None
        if limit >= _BULK:
            chain = _linux_table(memory, table, limit, head, gpas)
            if chain is not None:
                return chain
        addr, length, flags, nxt = _unpack_desc(table, 0)
        if flags & VRING_DESC_F_INDIRECT:
            raise InvalidChain(head, "indirect descriptor inside an indirect table")
    count = 1
    # Buffers outside guest memory don't stop the walk (the rest of the chain is still
    # checked); each list just stops growing at its first one.
    fault: str | None = None
    rfault = wfault = False
    wlen = rlen = 0
    # Most buffers lie in the largest region (guest RAM): they are sliced here, the rest go
    # through the general translation.
    main = memory.main
    if main is not None:
        base, size, view = main.guest_addr, main.size, main.view
    else:
        base, size, view = 0, -1, None
    while True:
        off = addr - base
        if flags & VRING_DESC_F_WRITE:
            if not wfault:
                if length and off >= 0 and off + length <= size:
                    writable.append(view[off : off + length])  # type: ignore[index]
                    wlen += length
                    if gpas is not None:
                        gpas.append((addr, length))
                else:
                    try:
                        memory.translate_into(addr, length, writable)
                        wlen += length
                        if gpas is not None and length:
                            gpas.append((addr, length))
                    except GuestMemoryError as e:
                        fault = fault or str(e)
                        wfault = True
        elif writable or wfault:
            raise InvalidChain(head, "device-readable descriptor after a writable one")
        elif not rfault:
            if length and off >= 0 and off + length <= size:
                readable.append(view[off : off + length])  # type: ignore[index]
                rlen += length
            else:
                try:
                    memory.translate_into(addr, length, readable)
                    rlen += length
                except GuestMemoryError as e:
                    fault = fault or str(e)
                    rfault = True
        if not flags & VRING_DESC_F_NEXT:
            if fault is not None:
                raise InvalidChain(head, fault, Chain(head, readable, writable, wlen, rlen, gpas))
            return Chain(head, readable, writable, wlen, rlen, gpas)
        if nxt >= limit:
            raise InvalidChain(head, f"next index {nxt} outside a table of {limit}")
        count += 1
        if count > limit:
            raise InvalidChain(head, f"chain longer than its table ({limit}): a loop")
        addr, length, flags, nxt = _unpack_desc(table, nxt * 16)
        if flags & VRING_DESC_F_INDIRECT:
            raise InvalidChain(head, "indirect flag on a descriptor that is not the head")
