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
"""

from __future__ import annotations

import struct

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

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size

# QEMU accepts indirect tables up to its 1024-entry VIRTQUEUE_MAX_SIZE whatever the queue
# size; Linux never builds a bigger one. Larger tables are only a way to make us spin.
MAX_INDIRECT = 1024


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

    __slots__ = ("head", "owner", "readable", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        writable_len: int | None = None,
    ) -> None:
        self.head = head
        self.owner: object | None = None
        self.readable = readable
        self.writable = writable
        #: Bytes the writable buffers hold (counted during the walk, not summed again).
        self.writable_len = sum(len(v) for v in writable) if writable_len is None else writable_len

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    def release(self) -> None:
        """Release every view now rather than when the chain is garbage collected."""
        for v in self.readable:
            v.release()
        for v in self.writable:
            v.release()
        self.readable = []
        self.writable = []

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, readable={[len(v) for v in self.readable]}, "
            f"writable={[len(v) for v in self.writable]})"
        )


_unpack_desc = DESC.unpack_from


def read_chain(
    memory: GuestMemory,
    table: memoryview,
    queue_size: int,
    head: int,
    *,
    indirect: bool,
) -> Chain:
    """Walk the chain starting at ``head`` of ``table`` (``queue_size`` descriptors).

    ``head`` must already be known to be below ``queue_size``.
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
        addr, length, flags, nxt = _unpack_desc(table, 0)
        if flags & VRING_DESC_F_INDIRECT:
            raise InvalidChain(head, "indirect descriptor inside an indirect table")
    count = 1
    # Buffers outside guest memory don't stop the walk (the rest of the chain is still
    # checked); each list just stops growing at its first one.
    fault: str | None = None
    rfault = wfault = False
    wlen = 0
    while True:
        if flags & VRING_DESC_F_WRITE:
            if not wfault:
                try:
                    memory.translate_into(addr, length, writable)
                    wlen += length
                except GuestMemoryError as e:
                    fault = fault or str(e)
                    wfault = True
        elif writable or wfault:
            raise InvalidChain(head, "device-readable descriptor after a writable one")
        elif not rfault:
            try:
                memory.translate_into(addr, length, readable)
            except GuestMemoryError as e:
                fault = fault or str(e)
                rfault = True
        if not flags & VRING_DESC_F_NEXT:
            if fault is not None:
                raise InvalidChain(head, fault, Chain(head, readable, writable, wlen))
            return Chain(head, readable, writable, wlen)
        if nxt >= limit:
            raise InvalidChain(head, f"next index {nxt} outside a table of {limit}")
        count += 1
        if count > limit:
            raise InvalidChain(head, f"chain longer than its table ({limit}): a loop")
        addr, length, flags, nxt = _unpack_desc(table, nxt * 16)
        if flags & VRING_DESC_F_INDIRECT:
            raise InvalidChain(head, "indirect flag on a descriptor that is not the head")
