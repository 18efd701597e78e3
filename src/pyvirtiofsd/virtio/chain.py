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
and return the chain with used length 0. So does a chain walked on a snapshot of guest memory
one of whose regions was retired meanwhile (its view released), when the walk touches it.

An indirect table of 16 or more entries laid out as Linux lays them out (a big READ or WRITE:
headers, then a page per descriptor) is decoded in bulk instead, with the same outcome as the
walk: one private copy of the table is checked as a whole, and the long side of the chain
becomes an :class:`~pyvirtiofsd.iovec.Iovecs`, the pages as a ``struct iovec`` array the kernel
reads directly. Any other table, or one failing a check, goes through the walk, which then
decides, so a table's outcome never depends on the path it took.

A chain whose readable buffers add up to :data:`SMALL_REQUEST` bytes or fewer (a request's
headers, arguments and names; never a bulk of file data) gets them as one bytes object, copied
out of guest memory, whatever path decoded it: a view per buffer costs more to make than the
copy, and a copy can't change under the reader.

The compiled variant also walks the everyday chain in C (``_walk.c``): a direct chain or a
table shorter than the bulk threshold, whose buffers all lie in the main region. The C walk
answers only what this module's walk would answer the same way, and leaves everything else
(an empty buffer, another region, any violation) to it.

While the front-end migrates the guest, the device must log every page it writes, by
guest-physical address: the walk then also keeps the address and length of each writable
buffer (``gpas``), and :meth:`Chain.written` says which ranges a reply of so many bytes
covered. Otherwise (``gpas`` None, the usual case) it keeps nothing more.
"""

from __future__ import annotations

import array
import functools
import itertools
import struct
from collections.abc import Sequence
from typing import Final

from pyvirtiofsd.carried import Carried
from pyvirtiofsd.iovec import Iovecs
from pyvirtiofsd.virtio.memory import GuestMemory, GuestMemoryError, MappedRegion

try:
    from pyvirtiofsd.virtio._walk import SMALL as _c_small
    from pyvirtiofsd.virtio._walk import walk as _c_walk
except ImportError:  # a pure build: no C at all
    _c_walk = None
    _c_small = None
#: Final: a compiled build reads it as a C variable rather than looking it up in the module's
#: dictionary for every chain.
_native_walk: Final = _c_walk

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

#: Readable bytes a chain gets as one copy rather than as views (see the module's docstring).
SMALL_REQUEST: Final = 512
if _c_small is not None and _c_small != SMALL_REQUEST:  # pragma: no cover - a build mismatch
    raise ImportError(f"_walk copies up to {_c_small} readable bytes, chain {SMALL_REQUEST}")

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


#: What a released chain's buffer lists become: one empty tuple for all, nothing allocated.
_RELEASED: Final[tuple[memoryview, ...]] = ()


class Chain(Carried):
    """One request: its head index and the buffers it carries.

    ``owner`` is whoever serves the chain (the transport's queue worker), which a device asks
    to answer it later (:func:`pyvirtiofsd.virtio.device.later`); None outside of that.
    """

    __slots__ = ("gpas", "head", "owner")

    def __init__(
        self,
        head: int,
        readable: Sequence[memoryview | bytes],
        writable: Sequence[memoryview],
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
        self.readable = _RELEASED
        self.writable = _RELEASED

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, readable={[len(v) for v in self.readable]}, "
            f"writable={[len(v) for v in self.writable]})"
        )


_unpack_desc = DESC.unpack_from

#: Tables this long or longer are decoded in bulk; below, walking them costs less.
_BULK: Final = 16
#: A side of a bulk-decoded chain with at most this many buffers gets a list of views (looked at
#: piece by piece: headers, arguments); a longer one (pages of file data) gets an Iovecs.
_AS_VIEWS: Final = 8

_U64: Final = 1 << 64
_LOW64: Final = _U64 - 1
_LOW32: Final = (1 << 32) - 1


@functools.lru_cache(maxsize=1024)
def _linux_words(entries: int, readable: int) -> memoryview:
    """The flags and next fields (as one 32-bit word each) of all but the last entry of a table
    Linux builds with ``entries`` descriptors, the first ``readable`` of them device-readable."""
    words = array.array(
        "I",
        [
            (VRING_DESC_F_NEXT | (VRING_DESC_F_WRITE if i >= readable else 0)) | (i + 1) << 16
            for i in range(entries - 1)
        ],
    )
    return memoryview(words)


#: Guest memory of more regions than this is not decoded in bulk (QEMU gives a guest's RAM in
#: one to three).
_BULK_REGIONS: Final = 8
#: Added to every lane while guest addresses become host ones, so that a step down (a region
#: mapped below its guest address) never borrows from the next lane.
_BIAS: Final = 1 << 80


class _Lanes:
    """Constants for reading a table of ``entries`` descriptors as one integer.

    ``int.from_bytes(table, "little")`` puts descriptor i in bits 128i..128i+127: its address
    in the low 64, its length in the next 32. Sums, masks and comparisons of that integer with
    the same value repeated in every 128-bit lane act on all descriptors at once, in C, as long
    as no lane carries into the next or borrows from it: each use below keeps every lane between
    0 and 2**82.
    """

    __slots__ = ("_layout", "_memory", "addr", "bias", "carry", "iovec", "length", "one", "top")

    def __init__(self, entries: int) -> None:
        #: 1 in every lane; ``v * one`` repeats v (< 2**128) in every lane.
        one = int.from_bytes((b"\1" + bytes(15)) * entries, "little")
        self.one = one
        self.addr = _LOW64 * one
        self.length = _LOW32 * one
        #: The address and length of every lane: the bits of a ``struct iovec``.
        self.iovec = ((1 << 96) - 1) * one
        #: Bit 64 of every lane: where "at least 2**64" shows after an addition.
        self.top = _U64 * one
        #: Bits 64 and 65 of every lane: a sum of three 64-bit values reaches either.
        self.carry = 3 * _U64 * one
        self.bias = _BIAS * one
        self._memory: GuestMemory | None = None
        self._layout: _Layout | None = None

    def layout(self, memory: GuestMemory) -> _Layout | None:
        """The lanes for ``memory``'s regions (the last memory's are kept: it changes only with
        the front-end's memory table); None if it can't be decoded in bulk."""
        if self._memory is not memory:
            regions = memory.regions
            layout = None
            if 0 < len(regions) <= _BULK_REGIONS and regions[-1].guest_end <= _LOW64:
                layout = _Layout(self.one, regions)
            self._layout = layout
            self._memory = memory
        return self._layout


class _Layout:
    """The lanes that place every buffer of a table in guest memory of a few regions.

    A buffer belongs to the last region starting at or below its address (the regions are in
    guest address order): one carry bit per region past the first says, for every lane at once,
    whether the address is at or past that region's start, and each such bit moves the lane's
    end limit and its guest-to-host shift from one region's to the next one's. A buffer must
    then end by its region's end, which also refuses one starting in a gap between regions or
    running from one region into the next (the walk splits that one in two views).
    """

    __slots__ = ("at_start", "past_end", "spans", "steps", "to_host")

    def __init__(self, one: int, regions: tuple[MappedRegion, ...]) -> None:
        first = regions[0]
        #: Lanes that make bit 64 say "at or past the first region's start".
        self.at_start = (_U64 - first.guest_addr) * one
        #: Lanes that make bits 64-65 of address + length + this say "past the region's end".
        self.past_end = (_LOW64 - first.guest_end) * one
        #: Lanes that turn a guest address of the first region into a host one (plus _BIAS).
        self.to_host = (_BIAS + first.host_addr - first.guest_addr) * one
        #: Per further region: its at_start lanes, and how far the end and the shift move.
        self.steps = tuple(
            (
                (_U64 - r.guest_addr) * one,
                r.guest_end - prev.guest_end,
                (r.host_addr - r.guest_addr) - (prev.host_addr - prev.guest_addr),
            )
            for prev, r in itertools.pairwise(regions)
        )
        #: The regions' host addresses and views, in order.
        self.spans = tuple((r.host_addr, r.view) for r in regions)

    def host_lanes(self, lanes: _Lanes, addrs: int, lens: int) -> int | None:
        """What to add to each lane to turn its guest address into a host one (with _BIAS
        more), if every buffer lies inside one region; None if one does not."""
        top = lanes.top
        if (addrs + self.at_start) & top != top:
            return None
        past_end = self.past_end
        to_host = self.to_host
        for at_start, end_step, host_step in self.steps:
            above = ((addrs + at_start) & top) >> 64
            past_end -= above * end_step
            to_host += above * host_step
        if (addrs + lens + past_end) & lanes.carry:
            return None
        return to_host


@functools.lru_cache(maxsize=64)
def _lanes(entries: int) -> _Lanes:
    return _Lanes(entries)


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
    readable before writable, no empty buffer, each buffer inside one region of guest memory.
    None for any other table: the general walk then decides, so both give the same chain or the
    same refusal.

    Everything is decided on one private copy of the table, so the guest can't change a buffer
    between its check and its use; the long side of the chain (a READ's or WRITE's pages) is an
    :class:`~pyvirtiofsd.iovec.Iovecs` built from that copy without a Python step per buffer.
    """
    lanes = _lanes(entries)
    layout = lanes.layout(memory)
    if layout is None:
        return None
    raw = bytes(table)
    words = memoryview(raw).cast("I")
    last = words[-1] & 0xFFFF  # the flags of the last entry
    if last & VRING_DESC_F_WRITE:
        # The first writable entry, by bisection; a table of another shape fails the
        # comparison below whatever this finds.
        lo, hi = 0, entries - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if words[4 * mid + 3] & VRING_DESC_F_WRITE:
                hi = mid
            else:
                lo = mid + 1
        readable = lo
    else:
        readable = entries
    if last != (VRING_DESC_F_WRITE if readable < entries else 0):
        return None
    if words[3:-4:4] != _linux_words(entries, readable):
        return None
    whole = int.from_bytes(raw, "little")
    addrs = whole & lanes.addr
    lens = (whole >> 64) & lanes.length
    if (lens + lanes.addr) & lanes.top != lanes.top:  # an empty buffer
        return None
    to_host = layout.host_lanes(lanes, addrs, lens)
    if to_host is None:
        return None
    # The address moved to the host's, the flags and next gone: the lane is a struct iovec.
    iov = ((whole & lanes.iovec) + to_host - lanes.bias).to_bytes(16 * entries, "little")
    lengths = words[2::4].tolist()
    total = sum(lengths)
    if gpas is not None:
        addresses = memoryview(raw).cast("Q")[2 * readable :: 2].tolist()
        gpas.extend(zip(addresses, lengths[readable:], strict=True))
    if 2 * readable <= entries:
        readable_len = sum(lengths[:readable])
        writable_len = total - readable_len
    else:
        writable_len = sum(lengths[readable:])
        readable_len = total - writable_len
    split = 16 * readable
    request: Sequence[memoryview | bytes] = _buffers(iov[:split], layout.spans)
    if readable and readable_len <= SMALL_REQUEST:
        request = [b"".join(request)]
    return Chain(
        head,
        request,
        _buffers(iov[split:], layout.spans),
        writable_len,
        readable_len,
        gpas,
    )


def _buffers(iov: bytes, spans: tuple[tuple[int, memoryview], ...]) -> Sequence[memoryview]:
    """The buffers of an iovec array inside the mappings ``spans`` (host address, view): a list
    of views when they are few, else an Iovecs (with views of its own, so the mappings stay)."""
    if len(iov) <= 16 * _AS_VIEWS:
        return list(Iovecs(iov, spans))
    return Iovecs(iov, tuple((host, view[:]) for host, view in spans))


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
    try:
        return _read_chain(memory, table, queue_size, head, indirect, gpas)
    except ValueError as e:
        # A worker may walk on the snapshot it read just before the front-end retired a region
        # no ring lives in (the session then swaps snapshots without stopping the rings): the
        # region's view, released meanwhile, refuses to be sliced. Memory gone is memory the
        # chain can't use, not a failure of the queue.
        if not _retired(memory):
            raise
        raise InvalidChain(head, f"guest memory retired under the walk ({e})") from None


def _retired(memory: GuestMemory) -> bool:
    """Whether a region of ``memory`` was closed (its view released)."""
    for region in memory.regions:
        try:
            len(region.view)
        except ValueError:
            return True
    return False


def _read_chain(
    memory: GuestMemory,
    table: memoryview,
    queue_size: int,
    head: int,
    indirect: bool,
    gpas: list[tuple[int, int]] | None,
) -> Chain:
    main = memory.main
    if _native_walk is not None and gpas is None and main is not None:
        found: tuple[list[memoryview], list[memoryview], int, int] | None = _native_walk(
            table, queue_size, head, indirect, main.guest_addr, main.size, main.view, _BULK
        )
        if found is not None:
            return Chain(head, found[0], found[1], found[2], found[3])
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
            if readable and rlen <= SMALL_REQUEST:
                return Chain(head, [b"".join(readable)], writable, wlen, rlen, gpas)
            return Chain(head, readable, writable, wlen, rlen, gpas)
        if nxt >= limit:
            raise InvalidChain(head, f"next index {nxt} outside a table of {limit}")
        count += 1
        if count > limit:
            raise InvalidChain(head, f"chain longer than its table ({limit}): a loop")
        addr, length, flags, nxt = _unpack_desc(table, nxt * 16)
        if flags & VRING_DESC_F_INDIRECT:
            raise InvalidChain(head, "indirect flag on a descriptor that is not the head")
