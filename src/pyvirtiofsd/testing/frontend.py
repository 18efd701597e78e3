"""A small vhost-user front-end: our own VMM and guest driver, in Python (not the product).

Tests, fuzzers and benchmarks use it to drive a daemon the way QEMU and a guest kernel
would, without either:

* :class:`Frontend` speaks the front-end side of the protocol over the daemon's socket:
  typed helpers for every request, plus :meth:`Frontend.send_raw` and
  :meth:`Frontend.send` for hand-made (malformed) messages;
* :class:`GuestRam` is guest RAM in a memfd, split into one or more regions with
  front-end addresses distinct from guest-physical ones, as QEMU's are;
* :class:`DriverQueue` is the driver half of a split virtqueue in that RAM, with kick and
  call eventfds: :meth:`DriverQueue.request` submits one chain (device-readable bytes and
  device-writable buffer sizes, optionally through an indirect table) and waits for its
  used entry. Lower-level methods write arbitrary descriptors for hostile tests.

The back-end channel (SET_BACKEND_REQ_FD) is served by a thread that hands each request
to a hook (:data:`BackendRequestHandler`); a DAX test fills the hook with a SHMEM_MAP /
SHMEM_UNMAP implementation (:mod:`.dax_window`).

Messages are encoded by :mod:`pyvirtiofsd.vhost_user.messages` and move through
:mod:`pyvirtiofsd.vhost_user.wire`, the daemon's own codec: each operation on the socket waits
at most the front-end's ``timeout``.

A :class:`DriverQueue` is meant for one thread; different queues can be driven from
different threads at once, and control requests are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvirtiofsd.vhost_user.messages import (
    OWN_REPLY,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    DeviceStateRequest,
    FrontendReq,
    LogDescription,
    MemoryRegionDesc,
    Message,
    MessageError,
    ProtocolFeature,
    ShmemConfig,
    VringAddr,
    VringState,
    decode_u64,
    encode_mem_table,
    encode_reply,
    encode_single_region,
    encode_u64,
    request_flags,
)
from pyvirtiofsd.vhost_user.wire import (
    ClosedMidMessage,
    deadline_after,
    recv_message,
    send_with_fds,
)
from pyvirtiofsd.virtio.chain import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from pyvirtiofsd.virtio.queue import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VRING_USED_F_NO_NOTIFY,
    full_fence,
    ring_sizes,
)

__all__ = [
    "BackendRequestHandler",
    "DriverQueue",
    "Frontend",
    "FrontendError",
    "GuestRam",
]

log = logging.getLogger(__name__)

BackendRequestHandler = Callable[[Message], int]
"""``hook(msg) -> status``: serve one back-end request (e.g. SHMEM_MAP); the hook owns
``msg.fds``. The status is sent back when the request asked for a reply."""


class FrontendError(Exception):
    """The daemon refused a request, answered wrongly, or did not answer in time."""


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- guest RAM -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RamRegion:
    guest_addr: int
    size: int
    user_addr: int
    offset: int  # in the memfd

    def desc(self) -> MemoryRegionDesc:
        return MemoryRegionDesc(self.guest_addr, self.size, self.user_addr, self.offset)


class _Arena:
    """First-fit allocator over a guest-physical range (buffers for one queue)."""

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.size = size
        self._free: list[tuple[int, int]] = [(start, size)]
        self._sizes: dict[int, int] = {}

    def alloc(self, size: int, align: int = 8) -> int:
        size = max(size, 1)
        size = (size + 7) & ~7
        for i, (start, length) in enumerate(self._free):
            addr = (start + align - 1) & ~(align - 1)
            pad = addr - start
            if pad + size <= length:
                rest = [(start, pad)] if pad else []
                if pad + size < length:
                    rest.append((addr + size, length - pad - size))
                self._free[i : i + 1] = rest
                self._sizes[addr] = size
                return addr
        raise FrontendError(f"queue arena of {self.size} bytes is full")

    def free(self, addr: int) -> None:
        size = self._sizes.pop(addr)
        self._free.append((addr, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged


class GuestRam:
    """Guest RAM backed by a sealed memfd, split into ``regions`` equal regions.

    Region ``i`` starts at guest address ``base + i * (chunk + gap)``; with ``gap=0`` the
    regions are adjacent, so a buffer can straddle two of them. Front-end addresses are
    ``user_base`` plus a different stride, so a daemon that mixed up the two address
    spaces would fail.
    """

    def __init__(
        self,
        size: int,
        *,
        regions: int = 1,
        gap: int = 0,
        base: int = 0,
        user_base: int = 0x7F12_3400_0000,
    ) -> None:
        page = mmap.PAGESIZE
        chunk = size // regions // page * page
        if chunk == 0:
            raise ValueError("guest RAM too small for that many regions")
        self.size = chunk * regions
        self.fd = os.memfd_create("pyvirtiofsd-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.size)
        # The daemon maps this file; sealing its size means nobody can make those
        # mappings fault by truncating it.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self._map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
        self._view = memoryview(self._map)
        self.regions = [
            RamRegion(
                base + i * (chunk + gap), chunk, user_base + i * (chunk + 0x20_0000), i * chunk
            )
            for i in range(regions)
        ]
        self._carve_region = 0
        self._carve_next = self.regions[0].guest_addr
        self._lock = threading.Lock()

    def descs(self) -> list[MemoryRegionDesc]:
        return [r.desc() for r in self.regions]

    def _region(self, gpa: int, length: int) -> RamRegion:
        for r in self.regions:
            if r.guest_addr <= gpa and gpa + length <= r.guest_addr + r.size:
                return r
        raise ValueError(f"{gpa:#x}+{length:#x} is not inside one RAM region")

    def view(self, gpa: int, length: int) -> memoryview:
        r = self._region(gpa, length)
        off = r.offset + gpa - r.guest_addr
        return self._view[off : off + length]

    def user_addr(self, gpa: int) -> int:
        r = self._region(gpa, 0)
        return r.user_addr + gpa - r.guest_addr

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read(self, gpa: int, length: int) -> bytes:
        return self.view(gpa, length).tobytes()

    def carve(self, size: int, align: int = 4096) -> int:
        """Reserve ``size`` bytes inside one region (rings, queue arenas)."""
        with self._lock:
            while self._carve_region < len(self.regions):
                r = self.regions[self._carve_region]
                addr = (self._carve_next + align - 1) & ~(align - 1)
                if addr + size <= r.guest_addr + r.size:
                    self._carve_next = addr + size
                    return addr
                self._carve_region += 1
                if self._carve_region < len(self.regions):
                    self._carve_next = self.regions[self._carve_region].guest_addr
            raise FrontendError(f"guest RAM has no room for {size} more bytes")

    def close(self) -> None:
        self._view.release()
        with contextlib.suppress(BufferError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


# -- driver side of a split virtqueue --------------------------------------------------------


@dataclass
class _Pending:
    descs: list[int]
    buffers: list[tuple[int, int, bool]]  # (guest address, length, device-writable)
    block: int | None  # the arena block holding the buffers and any indirect table


class DriverQueue:
    """The driver half of one split virtqueue, placed in :class:`GuestRam`."""

    def __init__(
        self,
        ram: GuestRam,
        index: int,
        size: int,
        *,
        event_idx: bool,
        arena_size: int = 4 << 20,
    ) -> None:
        self.ram = ram
        self.index = index
        self.size = size
        self.event_idx = event_idx
        desc_len, avail_len, used_len = ring_sizes(size)
        self.desc_addr = ram.carve(desc_len, 16)
        self.avail_addr = ram.carve(avail_len, 2)
        self.used_addr = ram.carve(used_len, 4)
        for addr, length in (
            (self.desc_addr, desc_len),
            (self.avail_addr, avail_len),
            (self.used_addr, used_len),
        ):
            ram.view(addr, length)[:] = bytes(length)
        self._desc = ram.view(self.desc_addr, desc_len)
        self._avail = ram.view(self.avail_addr, avail_len).cast("H")
        self._used = ram.view(self.used_addr, used_len).cast("H")
        self._used32 = ram.view(self.used_addr, 4 + 8 * size).cast("I")
        self.arena = _Arena(ram.carve(arena_size, 4096), arena_size)
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._call_poll = select.poll()
        self._call_poll.register(self.call_fd, select.POLLIN)
        self._free_desc = list(range(size - 1, -1, -1))
        self.avail_idx = 0
        self.last_used = 0
        self._added_since_kick = 0
        self._pending: dict[int, _Pending] = {}
        self.completed: dict[int, int] = {}
        self.stray_used: list[tuple[int, int]] = []
        self.kicks = 0

    # -- building chains ---------------------------------------------------------------------

    def _alloc_chain(
        self, readable: Sequence[bytes], writable: Sequence[int], table_entries: int
    ) -> tuple[int, list[tuple[int, int, bool]], int | None]:
        """One arena block for a chain's buffers (and indirect table): (block, buffers, table)."""
        sizes = [len(d) for d in readable] + list(writable)
        total = sum((n + 15) & ~15 for n in sizes) + 16 * table_entries
        block = self.arena.alloc(total, 16)
        view = self.ram.view(block, max(total, 1))
        buffers = []
        off = 0
        for i, n in enumerate(sizes):
            if i < len(readable):
                view[off : off + n] = readable[i]
            buffers.append((block + off, n, i >= len(readable)))
            off += (n + 15) & ~15
        view.release()
        return block, buffers, (block + off if table_entries else None)

    def submit(
        self, readable: Sequence[bytes], writable: Sequence[int] = (), *, indirect: bool = False
    ) -> int:
        """Make one chain available (without kicking); return its head."""
        if not readable and not writable:
            raise ValueError("a chain needs at least one buffer")
        count = len(readable) + len(writable)
        block, buffers, table = self._alloc_chain(readable, writable, count if indirect else 0)
        if table is not None:
            view = self.ram.view(table, 16 * count)
            for i, (gpa, n, w) in enumerate(buffers):
                more = i + 1 < count
                flags = (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if more else 0)
                DESC.pack_into(view, 16 * i, gpa, n, flags, i + 1 if more else 0)
            view.release()
            head = self._take_descs(1)[0]
            descs = [head]
            self.write_desc(head, table, 16 * count, VRING_DESC_F_INDIRECT, 0)
        else:
            descs = self._take_descs(count)
            for i, (gpa, n, w) in enumerate(buffers):
                last = i + 1 == count
                flags = (VRING_DESC_F_WRITE if w else 0) | (0 if last else VRING_DESC_F_NEXT)
                self.write_desc(descs[i], gpa, n, flags, 0 if last else descs[i + 1])
            head = descs[0]
        self._pending[head] = _Pending(descs, buffers, block)
        self.publish(head)
        return head

    def _take_descs(self, n: int) -> list[int]:
        if n > len(self._free_desc):
            raise FrontendError(f"queue {self.index}: no {n} free descriptors")
        return [self._free_desc.pop() for _ in range(n)]

    def reserve_descs(self, n: int) -> list[int]:
        """Take ``n`` descriptor slots for hand-written (possibly malformed) chains."""
        return self._take_descs(n)

    def write_desc(self, i: int, addr: int, length: int, flags: int, next_: int) -> None:
        DESC.pack_into(self._desc, 16 * i, addr, length, flags, next_)

    def publish(self, head: int, *, track: bool = True) -> None:
        """Put ``head`` on the available ring and bump ``avail->idx``."""
        if track and head not in self._pending:
            self._pending[head] = _Pending([head], [], None)
        self._avail[2 + self.avail_idx % self.size] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        # One 16-bit store: the device must never see a half-written index.
        self._avail[1] = self.avail_idx
        self._added_since_kick += 1

    def publish_raw(self, head: int, descs: Sequence[int]) -> None:
        """Publish a hand-written chain whose slots came from :meth:`reserve_descs`."""
        self._pending[head] = _Pending(list(descs), [], None)
        self.publish(head)

    def restart_at(self, index: int) -> None:
        """Before the device starts: put both rings at ``index`` (to test wrap-around)."""
        self.avail_idx = self.last_used = index & 0xFFFF
        self._avail[1] = self.avail_idx
        self._used[1] = self.avail_idx

    def set_avail_idx(self, value: int) -> None:
        """Write ``avail->idx`` directly (to corrupt the ring on purpose)."""
        self.avail_idx = value & 0xFFFF
        self._avail[1] = self.avail_idx

    def wait_taken(self, timeout: float = 5.0) -> None:
        """Wait until the device has taken every chain made available and asks for a kick at
        the next one (its ``avail_event`` is ``avail->idx``); needs EVENT_IDX."""
        self._wait_avail_event(lambda ahead: ahead == 0, timeout)

    def wait_armed(self, timeout: float = 5.0) -> None:
        """Wait until the device has taken every chain made available and asks for a kick at
        a later one, as far ahead as it likes (its ``avail_event`` is at or past
        ``avail->idx``); needs EVENT_IDX."""
        self._wait_avail_event(lambda ahead: ahead < self.size, timeout)

    def _wait_avail_event(self, done: Callable[[int], bool], timeout: float) -> None:
        """Wait until ``done`` holds for how far past ``avail->idx`` the device's
        ``avail_event`` lies (mod 2**16: one behind is 0xFFFF)."""
        if not self.event_idx:
            raise FrontendError("without EVENT_IDX the device does not say what it took")
        deadline = time.monotonic() + timeout
        while not done((self._used[2 + 4 * self.size] - self.avail_idx) & 0xFFFF):
            if time.monotonic() >= deadline:
                raise FrontendError("the device did not take the available chains in time")
            time.sleep(0.001)

    # -- notifications ------------------------------------------------------------------------

    def kick(self, *, force: bool = False) -> bool:
        """Notify the device if its notification state asks for it (or ``force``)."""
        added, self._added_since_kick = self._added_since_kick, 0
        if not force:
            if not added:
                return False
            full_fence()
            if self.event_idx:
                new = self.avail_idx
                old = (new - added) & 0xFFFF
                avail_event = self._used[2 + 4 * self.size]
                if ((new - avail_event - 1) & 0xFFFF) >= ((new - old) & 0xFFFF):
                    return False
            elif self._used[0] & VRING_USED_F_NO_NOTIFY:
                return False
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1
        return True

    def replace_call_fd(self, fd: int) -> int:
        """Wait on ``fd`` for interrupts from now on; return the old call fd (caller's)."""
        self._call_poll.unregister(self.call_fd)
        old, self.call_fd = self.call_fd, fd
        self._call_poll.register(fd, select.POLLIN)
        return old

    def reap(self) -> int:
        """Collect used entries into :attr:`completed`; return how many."""
        count = 0
        used_idx = self._used[1]
        while self.last_used != used_idx:
            slot = self.last_used % self.size
            head = self._used32[1 + 2 * slot]
            length = self._used32[2 + 2 * slot]
            self.last_used = (self.last_used + 1) & 0xFFFF
            count += 1
            pending = self._pending.get(head)
            if pending is None or head in self.completed:
                self.stray_used.append((head, length))
                continue
            self.completed[head] = length
        if self.event_idx:
            self._avail[2 + self.size] = self.last_used
        return count

    def wait(self, head: int, timeout: float = 5.0) -> int:
        """Wait for ``head``'s used entry; return its used length."""
        deadline = time.monotonic() + timeout
        while head not in self.completed:
            self.reap()
            if head in self.completed:
                break
            full_fence()
            if self._used[1] != self.last_used:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrontendError(f"queue {self.index}: no used entry for head {head}")
            if self._call_poll.poll(remaining * 1000):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call_fd)
        return self.completed[head]

    def result(self, head: int) -> tuple[int, bytes]:
        """Used length and written bytes of a completed chain; frees its buffers."""
        used = self.completed.pop(head)
        pending = self._pending.pop(head)
        out = bytearray()
        remaining = used
        for gpa, n, writable in pending.buffers:
            if writable and remaining > 0:
                take = min(n, remaining)
                out += self.ram.read(gpa, take)
                remaining -= take
        if pending.block is not None:
            self.arena.free(pending.block)
        self._free_desc.extend(reversed(pending.descs))
        return used, bytes(out)

    def request(
        self,
        readable: Sequence[bytes],
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        timeout: float = 5.0,
    ) -> bytes:
        """Submit one chain, kick, wait, and return what the device wrote."""
        head = self.submit(readable, writable, indirect=indirect)
        self.kick()
        self.wait(head, timeout)
        return self.result(head)[1]

    def close(self) -> None:
        for v in (self._used32, self._used, self._avail, self._desc):
            v.release()
        _close_all([self.kick_fd, self.call_fd])


# -- the front-end ---------------------------------------------------------------------------


class Frontend:
    """The front-end end of one vhost-user connection."""

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._lock = threading.RLock()
        self.features = 0
        self.protocol_features = 0
        self.ram: GuestRam | None = None
        self.queues: dict[int, DriverQueue] = {}
        self._retired_queues: list[DriverQueue] = []
        self._channel_thread: threading.Thread | None = None
        self._channel_sock: socket.socket | None = None
        self.backend_requests: list[Message] = []

    @classmethod
    def connect(cls, path: str, *, timeout: float = 10.0) -> Frontend:
        """Connect to a daemon's socket, waiting for it to appear."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock, timeout=timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self._channel_sock is not None:
            with contextlib.suppress(OSError):
                self._channel_sock.shutdown(socket.SHUT_RDWR)
            if self._channel_thread is not None:
                self._channel_thread.join(5)
            self._channel_sock.close()
        for q in [*self.queues.values(), *self._retired_queues]:
            q.close()
        self.queues.clear()
        self._retired_queues.clear()
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    # -- raw messages ----------------------------------------------------------------------

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are (a message, part of one, or garbage), ``fds`` with the first."""
        with self._lock:
            try:
                send_with_fds(self.sock, data, fds, deadline=deadline_after(self.timeout))
            except OSError as e:
                raise FrontendError(f"sending to the daemon failed: {e}") from None

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        flags: int | None = None,
    ) -> None:
        """Send one request as given; ``flags`` (version bits included) replaces the usual."""
        if flags is None:
            flags = request_flags(need_reply=need_reply)
        self.send_raw(Message(request, flags, payload).encode(), fds)

    def recv(self) -> Message:
        """Read one message from the daemon."""
        with self._lock:
            try:
                msg = recv_message(self.sock, deadline=deadline_after(self.timeout))
            except TimeoutError:
                raise FrontendError("the daemon did not answer") from None
            except (ClosedMidMessage, MessageError) as e:
                raise FrontendError(f"unreadable answer from the daemon: {e}") from None
            if msg is None:
                raise FrontendError("the daemon closed the connection")
            return msg

    def call(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
    ) -> Message | None:
        """Send a request and read its reply if one is due.

        ``need_reply=None`` asks for a REPLY_ACK status whenever REPLY_ACK is negotiated.
        """
        own_reply = request in OWN_REPLY
        if need_reply is None:
            need_reply = not own_reply and self.has_protocol(ProtocolFeature.REPLY_ACK)
        with self._lock:
            self.send(request, payload, fds, need_reply=need_reply)
            if not own_reply and not need_reply:
                return None
            reply = self.recv()
        if reply.request != request or not reply.is_reply:
            raise FrontendError(
                f"reply to {request} came as request {reply.request}, flags {reply.flags:#x}"
            )
        return reply

    def checked(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send a request; with REPLY_ACK, raise :class:`FrontendError` if it failed."""
        status = self.status_of(request, payload, fds)
        if status:
            raise FrontendError(f"{FrontendReq(request).name} failed with status {status}")

    def status_of(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """The REPLY_ACK status of a request (0 if REPLY_ACK is not negotiated)."""
        reply = self.call(request, payload, fds)
        return 0 if reply is None else decode_u64(reply.payload)

    def has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    # -- typed requests ----------------------------------------------------------------------

    def _u64(self, request: int) -> int:
        reply = self.call(request)
        assert reply is not None
        return decode_u64(reply.payload)

    def get_features(self) -> int:
        return self._u64(FrontendReq.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.checked(FrontendReq.SET_FEATURES, encode_u64(features))
        self.features = features

    def get_protocol_features(self) -> int:
        return self._u64(FrontendReq.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        # The acknowledgement of this very request follows the new set.
        self.protocol_features = features
        self.checked(FrontendReq.SET_PROTOCOL_FEATURES, encode_u64(features))

    def set_owner(self) -> None:
        self.checked(FrontendReq.SET_OWNER)

    def get_queue_num(self) -> int:
        return self._u64(FrontendReq.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._u64(FrontendReq.GET_MAX_MEM_SLOTS)

    def get_status(self) -> int:
        return self._u64(FrontendReq.GET_STATUS)

    def set_status(self, status: int) -> None:
        self.checked(FrontendReq.SET_STATUS, encode_u64(status))

    def reset_device(self) -> None:
        self.checked(FrontendReq.RESET_DEVICE)

    def get_config(self, offset: int, size: int) -> bytes:
        reply = self.call(
            FrontendReq.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)).encode()
        )
        assert reply is not None
        if not reply.payload:
            raise FrontendError("GET_CONFIG failed")
        return ConfigSpace.decode(reply.payload).data

    def get_shmem_config(self) -> list[int]:
        reply = self.call(FrontendReq.GET_SHMEM_CONFIG)
        assert reply is not None
        if not reply.payload:
            raise FrontendError("GET_SHMEM_CONFIG failed")
        return list(ShmemConfig.decode(reply.payload).sizes)

    def set_mem_table(self, ram: GuestRam) -> None:
        descs = ram.descs()
        self.checked(FrontendReq.SET_MEM_TABLE, encode_mem_table(descs), [ram.fd] * len(descs))

    def add_mem_reg(self, desc: MemoryRegionDesc, fd: int) -> None:
        self.checked(FrontendReq.ADD_MEM_REG, encode_single_region(desc), [fd])

    def rem_mem_reg(self, desc: MemoryRegionDesc) -> None:
        self.checked(FrontendReq.REM_MEM_REG, encode_single_region(desc))

    def set_vring_num(self, index: int, num: int) -> None:
        self.checked(FrontendReq.SET_VRING_NUM, VringState(index, num).encode())

    def set_vring_base(self, index: int, base: int) -> None:
        self.checked(FrontendReq.SET_VRING_BASE, VringState(index, base).encode())

    def set_vring_addr(
        self, index: int, desc: int, avail: int, used: int, flags: int = 0, log: int = 0
    ) -> None:
        """Ring addresses in the front-end's address space (user addresses); ``log`` is the
        used ring's guest-physical address, for dirty logging (``flags`` VringAddr.LOG_FLAG)."""
        self.checked(
            FrontendReq.SET_VRING_ADDR, VringAddr(index, flags, desc, used, avail, log).encode()
        )

    def get_vring_base(self, index: int) -> int:
        reply = self.call(FrontendReq.GET_VRING_BASE, VringState(index, 0).encode())
        assert reply is not None
        if not reply.payload:
            raise FrontendError(f"GET_VRING_BASE {index} failed")
        return VringState.decode(reply.payload).num

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(FrontendReq.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(FrontendReq.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(FrontendReq.SET_VRING_ERR, index, fd)

    def _vring_fd(self, request: int, index: int, fd: int | None) -> None:
        value = index | (0x100 if fd is None else 0)
        self.checked(request, encode_u64(value), [] if fd is None else [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.checked(FrontendReq.SET_VRING_ENABLE, VringState(index, int(enable)).encode())

    # -- live migration ------------------------------------------------------------------------

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> bytes:
        """SET_LOG_BASE with LOG_SHMFD: share the dirty log; QEMU waits for the reply (whatever
        its flags said), and so do we. Returns the reply's payload."""
        with self._lock:
            self.send(FrontendReq.SET_LOG_BASE, LogDescription(size, offset).encode(), [fd])
            reply = self.recv()
        if reply.request != FrontendReq.SET_LOG_BASE or not reply.is_reply:
            raise FrontendError(f"SET_LOG_BASE answered with request {reply.request}")
        return reply.payload

    def set_device_state_fd(self, direction: int, fd: int, phase: int = 0) -> int:
        """SET_DEVICE_STATE_FD; the reply's u64 (status in bits 0-7, bit 8: no fd back)."""
        reply = self.call(
            FrontendReq.SET_DEVICE_STATE_FD, DeviceStateRequest(direction, phase).encode(), [fd]
        )
        assert reply is not None
        return decode_u64(reply.payload)

    def check_device_state(self) -> int:
        """CHECK_DEVICE_STATE: 0 when the transfer succeeded."""
        return self._u64(FrontendReq.CHECK_DEVICE_STATE)

    # -- the back-end channel ----------------------------------------------------------------

    def open_backend_channel(self, hook: BackendRequestHandler | None = None) -> None:
        """Send SET_BACKEND_REQ_FD and serve back-end requests on a thread with ``hook``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.checked(FrontendReq.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        finally:
            theirs.close()
        self._channel_sock = ours
        self._channel_thread = threading.Thread(
            target=self._serve_channel,
            args=(ours, hook or self._refuse_backend_request),
            name="frontend-backend-channel",
            daemon=True,
        )
        self._channel_thread.start()

    def _refuse_backend_request(self, msg: Message) -> int:
        """Default hook: record the request and report failure (no DAX window here)."""
        msg.close_fds()
        return 1

    def _serve_channel(self, sock: socket.socket, hook: BackendRequestHandler) -> None:
        while True:
            try:
                msg = recv_message(sock)
            except (OSError, MessageError):
                return
            if msg is None:
                return
            self.backend_requests.append(Message(msg.request, msg.flags, msg.payload, []))
            try:
                status = hook(msg)
            except Exception:
                log.exception("back-end request %d hook failed", msg.request)
                msg.close_fds()
                status = 1
            if msg.need_reply:
                with contextlib.suppress(OSError):
                    send_with_fds(sock, encode_reply(msg.request, encode_u64(status)))

    # -- whole-device setup ------------------------------------------------------------------

    def negotiate(
        self, *, event_idx: bool = True, indirect: bool = True, protocol_features: int | None = None
    ) -> None:
        """GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER."""
        offered = self.get_features()
        wanted = 1 << VIRTIO_F_VERSION_1 | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        if event_idx:
            wanted |= 1 << VIRTIO_F_RING_EVENT_IDX
        if indirect:
            wanted |= 1 << VIRTIO_F_RING_INDIRECT_DESC
        if wanted & ~offered:
            raise FrontendError(f"daemon lacks features {wanted & ~offered:#x}")
        if offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered_proto = self.get_protocol_features()
            proto = offered_proto if protocol_features is None else protocol_features
            self.set_protocol_features(proto & offered_proto)
        self.set_owner()
        self.set_features(wanted)

    def setup(
        self,
        *,
        queues: Sequence[int] = (0, 1),
        queue_size: int = 256,
        ram_size: int = 64 << 20,
        regions: int = 1,
        mem_slots: bool = False,
        event_idx: bool = True,
        indirect: bool = True,
        protocol_features: int | None = None,
        arena_size: int = 4 << 20,
    ) -> dict[int, DriverQueue]:
        """Negotiate, share guest RAM and start ``queues``; return their drivers.

        ``mem_slots`` shares RAM region by region with ADD_MEM_REG (as QEMU does once
        CONFIGURE_MEM_SLOTS is negotiated) instead of one SET_MEM_TABLE.
        """
        self.negotiate(event_idx=event_idx, indirect=indirect, protocol_features=protocol_features)
        self.ram = GuestRam(ram_size, regions=regions)
        self.share_ram(self.ram, mem_slots=mem_slots)
        for index in queues:
            self.start_queue(index, queue_size, arena_size=arena_size)
        return dict(self.queues)

    def share_ram(self, ram: GuestRam, *, mem_slots: bool = False) -> None:
        if mem_slots:
            for desc in ram.descs():
                self.add_mem_reg(desc, ram.fd)
        else:
            self.set_mem_table(ram)

    def start_queue(
        self, index: int, size: int = 256, *, arena_size: int = 4 << 20, enable: bool = True
    ) -> DriverQueue:
        """Lay out a ring in guest RAM and start it (num, base, addr, call, kick, enable)."""
        assert self.ram is not None
        q = DriverQueue(
            self.ram,
            index,
            size,
            event_idx=bool(self.features >> VIRTIO_F_RING_EVENT_IDX & 1),
            arena_size=arena_size,
        )
        if index in self.queues:
            # The caller may still hold the old driver; it is closed with the front-end.
            self._retired_queues.append(self.queues[index])
        self.queues[index] = q
        self.set_vring_num(index, size)
        self.set_vring_base(index, 0)
        self.set_vring_addr(
            index,
            self.ram.user_addr(q.desc_addr),
            self.ram.user_addr(q.avail_addr),
            self.ram.user_addr(q.used_addr),
        )
        self.set_vring_call(index, q.call_fd)
        self.set_vring_kick(index, q.kick_fd)
        if enable and self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.set_vring_enable(index, True)
        return q

    def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring; return the next available index it reports."""
        return self.get_vring_base(index)


def benchmark(
    q: DriverQueue,
    requests: int,
    *,
    depth: int = 1,
    readable: Sequence[bytes] = (bytes(40), bytes(24)),
    writable: Sequence[int] = (16, 48),
) -> float:
    """Send ``requests`` chains, ``depth`` at a time per kick; return requests per second."""
    done = 0
    start = time.perf_counter()
    while done < requests:
        batch = min(depth, requests - done)
        heads = [q.submit(readable, writable) for _ in range(batch)]
        q.kick()
        for head in heads:
            q.wait(head)
            q.result(head)
        done += batch
    return requests / (time.perf_counter() - start)


def _main(argv: list[str] | None = None) -> int:
    """``python -m pyvirtiofsd.testing.frontend SOCKET``: drive a test-device daemon."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pyvirtiofsd.testing.frontend")
    p.add_argument("socket_path")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--depth", type=int, action="append", help="chains per kick (repeatable)")
    p.add_argument("--queue-size", type=int, default=1024)
    p.add_argument("--no-event-idx", action="store_true")
    args = p.parse_args(argv)
    with Frontend.connect(args.socket_path) as fe:
        q = fe.setup(
            queues=(0, 1),
            queue_size=args.queue_size,
            event_idx=not args.no_event_idx,
            arena_size=16 << 20,
        )[1]
        benchmark(q, 2000)  # warm-up
        for depth in args.depth or [1]:
            rate = benchmark(q, args.requests, depth=depth)
            print(f"depth {depth}: {rate:,.0f} requests/s ({1e6 / rate:.1f} us each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
