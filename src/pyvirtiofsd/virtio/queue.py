"""The device side of a split virtqueue (virtio 1.x, section 2.7).

Layout in guest memory, ``N`` = queue size (a power of two, at most 32768):

* descriptor table: ``N`` x 16 bytes (see :mod:`pyvirtiofsd.virtio.chain`);
* available ring (driver -> device): ``u16 flags | u16 idx | u16 ring[N] | u16 used_event``;
* used ring (device -> driver): ``u16 flags | u16 idx | {u32 id, u32 len}[N] | u16
  avail_event``.

:class:`SplitQueue` pops chains from the available ring and pushes used entries. It does
no I/O and knows nothing of vhost-user or FUSE; the caller waits for kicks and signals
interrupts when :meth:`SplitQueue.needs_notification` says so.

Shared fields are read and written as single 16/32-bit loads and stores through
``memoryview.cast`` (never ``struct.pack_into``, which can store byte-wise and let the
other side see a torn index). The used ring entry is written before ``used->idx``; x86
keeps stores in order, so no barrier is needed there. Where a store must be visible
before a following load (publishing ``avail_event`` then re-reading ``avail->idx``, or
``used->idx`` then ``used_event``), :func:`full_fence` provides one. The compiled build does
these stores and the fence in C (``_ring.c``), the same way. The code assumes a
little-endian host, like the rest of the daemon.

A queue is not thread-safe: pop from one thread; serialise :meth:`push_used` and
:meth:`needs_notification` (the device runner holds a per-queue lock).

Dirty logging (live migration, :mod:`.dirtylog`): :meth:`SplitQueue.set_logging` may switch it
on and off while the queue runs. With a data log, chains are walked keeping their writable
buffers' guest-physical ranges, and :meth:`push_used` marks the ranges of the reply it returns;
with a used-ring log, every store to the used ring (entries, index, flags, ``avail_event``) is
marked after it is made, by the ring's guest-physical address. Off, neither costs more than a
test of one attribute.

Packed virtqueues (VIRTIO_F_RING_PACKED, section 2.8) are a later step: they would get
their own class with the same pop/push_used/needs_notification surface, and the
vhost-user layer would choose between the two at ring start.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, Final

from pyvirtiofsd.virtio.chain import DESC_SIZE, Chain, read_chain
from pyvirtiofsd.virtio.dirtylog import DirtyLog
from pyvirtiofsd.virtio.memory import GuestMemory, GuestMemoryError

__all__ = [
    "MAX_QUEUE_SIZE",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_RING_EVENT_IDX",
    "VIRTIO_F_RING_INDIRECT_DESC",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_VERSION_1",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY",
    "QueueBroken",
    "SplitQueue",
    "full_fence",
]

# Virtio feature bits that concern the transport and rings (virtio 1.x, section 6).
VIRTIO_F_RING_INDIRECT_DESC: Final = 28
VIRTIO_F_RING_EVENT_IDX: Final = 29
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_F_ACCESS_PLATFORM: Final = 33
VIRTIO_F_RING_PACKED: Final = 34

VRING_USED_F_NO_NOTIFY: Final = 1
VRING_AVAIL_F_NO_INTERRUPT: Final = 1

MAX_QUEUE_SIZE: Final = 32768

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("pyvirtiofsd's virtqueue code needs a little-endian host")

try:
    from pyvirtiofsd.virtio._ring import fence as _c_fence
    from pyvirtiofsd.virtio._ring import push as _c_push
except ImportError:  # a pure build: no C at all
    _c_fence = None
    _c_push = None
#: Final: a compiled build reads them as C variables, not from the module's dictionary.
_native_fence: Final = _c_fence
_native_push: Final = _c_push

_fence_lock: Final = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: one fence instruction in the compiled build (``_ring.c``);
    otherwise taking a lock, an atomic read-modify-write on x86. The lock is tried first without
    blocking, which spares computing a deadline; a try that fails because another queue holds
    it may not order anything, so that one waits for the lock."""
    if _native_fence is not None:
        _native_fence()
        return
    if not _fence_lock.acquire(False):
        _fence_lock.acquire()
    _fence_lock.release()


class QueueBroken(Exception):
    """The driver broke the ring itself; the queue can't go on until it is reset."""


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring (with event fields)."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


class SplitQueue:
    """Device side of one split virtqueue over views of guest memory."""

    __slots__ = (
        "_avail",
        "_avail_event_i",
        "_avail_mv",
        "_desc",
        "_mask",
        "_signalled_used",
        "_used",
        "_used32",
        "_used_event_i",
        "_used_gpa",
        "_used_log",
        "_used_mv",
        "data_log",
        "event_idx",
        "indirect",
        "logging",
        "memory",
        "next_avail",
        "next_used",
        "size",
    )

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        next_avail: int = 0,
    ) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        desc_len, avail_len, used_len = ring_sizes(size)
        if len(desc) != desc_len or len(avail) != avail_len or len(used) != used_len:
            raise ValueError("ring views do not match the queue size")
        self.memory = memory
        self.size = size
        self._mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc = desc
        self._avail_mv = avail
        self._used_mv = used
        self._avail = avail.cast("H")
        self._used = used.cast("H")
        self._used32 = used[: 4 + 8 * size].cast("I")
        self._used_event_i = 2 + size
        self._avail_event_i = 2 + 4 * size
        self.next_avail = next_avail & 0xFFFF
        # The used index lives in guest memory; after a restart it is what the driver has
        # seen, so it is the place to continue from.
        self.next_used = self._used[1]
        self._signalled_used = self.next_used
        #: Dirty logging (see the module's rules): the log of reply data, the log of used-ring
        #: stores and the used ring's guest-physical address, and whether either is on.
        self.data_log: DirtyLog | None = None
        self._used_log: DirtyLog | None = None
        self._used_gpa = 0
        self.logging = False

    def set_logging(
        self, data_log: DirtyLog | None, used_log: DirtyLog | None, used_gpa: int = 0
    ) -> None:
        """Log reply data in ``data_log`` and used-ring stores in ``used_log`` at the used
        ring's guest-physical address ``used_gpa`` (None: don't). Safe while the queue runs:
        a chain popped before the data log was set has no ranges of its own, and its
        completer finds them from its views (:meth:`GuestMemory.guest_ranges`)."""
        self._used_gpa = used_gpa
        self._used_log = used_log
        self.data_log = data_log
        self.logging = data_log is not None or used_log is not None

    @classmethod
    def from_guest(
        cls,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        **kwargs: Any,
    ) -> SplitQueue:
        """A queue whose rings are given as guest-physical addresses."""
        return cls._locate(
            memory, memory.translate, size, desc_addr, avail_addr, used_addr, **kwargs
        )

    @classmethod
    def from_user(
        cls,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        **kwargs: Any,
    ) -> SplitQueue:
        """A queue whose rings are given as front-end addresses (vhost-user's convention)."""
        return cls._locate(
            memory, memory.translate_user, size, desc_addr, avail_addr, used_addr, **kwargs
        )

    @classmethod
    def _locate(
        cls,
        memory: GuestMemory,
        translate: Callable[[int, int], memoryview],
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        **kwargs: Any,
    ) -> SplitQueue:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise ValueError(
                f"misaligned ring: desc {desc_addr:#x}, avail {avail_addr:#x}, used {used_addr:#x}"
            )
        desc_len, avail_len, used_len = ring_sizes(size)
        try:
            desc = translate(desc_addr, desc_len)
            avail = translate(avail_addr, avail_len)
            used = translate(used_addr, used_len)
        except GuestMemoryError as e:
            raise ValueError(f"ring outside shared memory: {e}") from None
        return cls(memory, size, desc, avail, used, **kwargs)

    # -- driver -> device ------------------------------------------------------------------

    def available(self) -> int:
        """How many chains the driver has made available and we haven't popped."""
        return (self._avail[1] - self.next_avail) & 0xFFFF

    def pop(self) -> Chain | None:
        """The next available chain, or None.

        Raises :class:`~pyvirtiofsd.virtio.chain.InvalidChain` for a chain that must be
        returned with used length 0, and :class:`QueueBroken` when the ring itself is
        corrupt (then nothing can be returned safely).
        """
        avail = self._avail
        next_avail = self.next_avail
        pending = (avail[1] - next_avail) & 0xFFFF
        if not pending:
            return None
        if pending > self.size:
            raise QueueBroken(
                f"available index moved {pending} entries ahead in a queue of {self.size}"
            )
        head = avail[2 + (next_avail & self._mask)]
        self.next_avail = (next_avail + 1) & 0xFFFF
        if head >= self.size:
            raise QueueBroken(f"available ring names head {head} in a queue of {self.size}")
        if self.data_log is None:
            return read_chain(self.memory, self._desc, self.size, head, indirect=self.indirect)
        return read_chain(self.memory, self._desc, self.size, head, indirect=self.indirect, gpas=[])

    # -- device -> driver ------------------------------------------------------------------

    def push_used(
        self, head: int, length: int, written: list[tuple[int, int]] | None = None
    ) -> None:
        """Return chain ``head`` with ``length`` bytes written; ``written`` are the
        guest-physical ranges of those bytes, for the dirty log."""
        idx = self.next_used
        slot = 1 + 2 * (idx & self._mask)
        new = (idx + 1) & 0xFFFF
        if _native_push is not None:
            _native_push(self._used_mv, slot, head, length, new)
        else:
            used32 = self._used32
            used32[slot] = head
            used32[slot + 1] = length
            self._used[1] = new
        self.next_used = new
        if self.logging:
            self._log_push(slot, written)

    def _log_push(self, slot: int, written: list[tuple[int, int]] | None) -> None:
        """Mark what a push stored: the reply's bytes, the used entry and the used index."""
        data_log, used_log = self.data_log, self._used_log
        ranges = list(written) if written and data_log is not None else []
        if used_log is not None:
            used = [(self._used_gpa + 4 * slot, 8), (self._used_gpa + 2, 2)]
            if used_log is data_log or data_log is None:
                ranges += used
            else:
                used_log.mark(used)
        if ranges:
            (data_log or used_log).mark(ranges)  # type: ignore[union-attr]

    def _log_used_field(self, index: int) -> None:
        """Mark the 16-bit used-ring field ``index`` (flags 0, avail_event), just stored."""
        used_log = self._used_log
        if used_log is not None:
            used_log.mark([(self._used_gpa + 2 * index, 2)])

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call."""
        new = self.next_used
        old = self._signalled_used
        self._signalled_used = new
        if new == old:
            return False
        if not self.event_idx:
            return not self._avail[0] & VRING_AVAIL_F_NO_INTERRUPT
        full_fence()
        used_event = self._avail[self._used_event_i]
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def disable_notification(self) -> None:
        """Ask the driver not to kick while we are draining the ring anyway."""
        if not self.event_idx:
            self._used[0] = VRING_USED_F_NO_NOTIFY
            if self.logging:
                self._log_used_field(0)

    def enable_notification(self, ahead: int = 1) -> bool:
        """Ask for a kick on the next available chain; True if one is already there.

        Call it when the ring looks empty; if it returns True, keep popping, since the
        driver may have added a chain before it could see the request. With EVENT_IDX,
        ``ahead`` > 1 asks for the kick only once that many chains are available: the caller
        then looks at the ring by itself for fewer (without EVENT_IDX every chain kicks).
        """
        if self.event_idx:
            self._used[self._avail_event_i] = (self.next_avail + ahead - 1) & 0xFFFF
            if self.logging:
                self._log_used_field(self._avail_event_i)
        else:
            self._used[0] = 0
            if self.logging:
                self._log_used_field(0)
        full_fence()
        return self._avail[1] != self.next_avail

    def release(self) -> None:
        """Release the ring views so the memory under them can be unmapped."""
        for v in (self._used32, self._used, self._avail, self._desc, self._avail_mv, self._used_mv):
            v.release()

    def __repr__(self) -> str:
        return (
            f"SplitQueue(size={self.size}, next_avail={self.next_avail}, "
            f"next_used={self.next_used}, event_idx={self.event_idx})"
        )
