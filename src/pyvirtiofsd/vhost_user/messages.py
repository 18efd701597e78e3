"""The vhost-user wire format, sans I/O: request ids, feature bits, payload codecs.

Every message is a 12-byte header ``u32 request | u32 flags | u32 size`` followed by
``size`` bytes of payload, in the host's byte order; file descriptors travel alongside as
SCM_RIGHTS ancillary data with the first byte of the header. Flags hold the protocol
version (1) in bits 0-1, REPLY in bit 2 and NEED_REPLY in bit 3.

This module only turns bytes into values and back: :meth:`Message.encode` (and its
shorthands :func:`encode_message`, :func:`encode_reply`) writes a message, the one place a
header is packed; :class:`MessageParser` reassembles messages from a byte stream and checks
each announced size before taking the payload; the payload classes decode and encode the fixed
layouts. Decoding errors raise :class:`MessageError`. Moving messages and their fds over a
socket is :mod:`.wire`'s job.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEVICE_STATE_LOAD",
    "DEVICE_STATE_NO_FD",
    "DEVICE_STATE_PHASE_STOPPED",
    "DEVICE_STATE_SAVE",
    "HEADER",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD",
    "OWN_REPLY",
    "VHOST_F_LOG_ALL",
    "VHOST_USER_FLAG_NEED_REPLY",
    "VHOST_USER_FLAG_REPLY",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "VRING_NOFD",
    "BackendReq",
    "ConfigSpace",
    "DeviceStateRequest",
    "FrontendReq",
    "LogDescription",
    "MMapRequest",
    "MemoryRegionDesc",
    "Message",
    "MessageError",
    "MessageParser",
    "MessageTooLarge",
    "ProtocolFeature",
    "ShmemConfig",
    "VringAddr",
    "VringState",
    "decode_mem_table",
    "decode_single_region",
    "decode_u64",
    "decode_vring_fd",
    "encode_mem_table",
    "encode_message",
    "encode_reply",
    "encode_single_region",
    "encode_u64",
    "protocol_mask",
    "request_flags",
]

log = logging.getLogger(__name__)

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_FLAG_REPLY = 0x4
VHOST_USER_FLAG_NEED_REPLY = 0x8

# Virtio feature bits that vhost-user itself uses.
VHOST_F_LOG_ALL = 26
VHOST_USER_F_PROTOCOL_FEATURES = 30

# SET_VRING_KICK/CALL/ERR: bits 0-7 are the ring index, bit 8 says "no fd attached".
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100

# SET_DEVICE_STATE_FD: the direction of the transfer, the phase the device is in, and the
# reply's "no fd in this reply" bit (bits 0-7 of the reply are the status, 0 = success).
DEVICE_STATE_SAVE = 0
DEVICE_STATE_LOAD = 1
DEVICE_STATE_PHASE_STOPPED = 0
DEVICE_STATE_NO_FD = 0x100

MAX_MEM_REGIONS = 8  # regions in one SET_MEM_TABLE
MAX_FDS = 32  # more than any message carries; extra fds are closed
#: The largest payload a message may announce. The biggest member of the protocol's payload
#: union is the shared memory config (GET_SHMEM_CONFIG's reply: u32 nregions, u32 padding,
#: u64 sizes[256] = 2056 bytes); the requests a front-end sends are smaller still (a memory
#: table is 8 + 8 * 32 = 264 bytes, a config space access 12 + 256 = 268). 4096 leaves room for
#: messages the protocol may grow. A header announcing more is not a vhost-user message: the
#: stream can't be trusted past it, so the connection is closed (see :class:`MessageParser`).
MAX_PAYLOAD = 4096
MAX_CONFIG_SIZE = 256  # QEMU's VHOST_USER_MAX_CONFIG_SIZE


class FrontendReq(enum.IntEnum):
    """Requests the front-end sends to the back-end."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    GET_VRING_BASE_SKIP_DRAIN = 45


class BackendReq(enum.IntEnum):
    """Requests the back-end sends on the channel from SET_BACKEND_REQ_FD."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntEnum):
    """Protocol feature *bit numbers* (use :func:`protocol_mask` for masks)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    GPA_ADDRESSES = 21
    # The shared-memory (DAX window) feature has had three numbers: 20 in the first QEMU
    # patches, 21 in rust-vmm/vhost and alioth, 22 in QEMU's spec and in QEMU 11.1, which
    # is the front-end we target. Everything that means "SHMEM" uses this one member.
    SHMEM = 22
    GET_VRING_BASE_SKIP_DRAIN = 23


#: Requests whose reply carries a payload of its own: the back-end sends it even when the
#: request fails, and never a REPLY_ACK status in its place.
OWN_REPLY = frozenset(
    {
        FrontendReq.GET_FEATURES,
        FrontendReq.GET_PROTOCOL_FEATURES,
        FrontendReq.GET_VRING_BASE,
        FrontendReq.GET_QUEUE_NUM,
        FrontendReq.GET_CONFIG,
        FrontendReq.GET_MAX_MEM_SLOTS,
        FrontendReq.GET_STATUS,
        FrontendReq.GET_SHMEM_CONFIG,
        FrontendReq.SET_DEVICE_STATE_FD,
        FrontendReq.CHECK_DEVICE_STATE,
    }
)


def protocol_mask(*bits: int) -> int:
    mask = 0
    for b in bits:
        mask |= 1 << b
    return mask


class MessageError(ValueError):
    """A payload that does not have the layout its request needs."""


class MessageTooLarge(MessageError):
    """A header announces a payload larger than any message of the protocol."""


HEADER = struct.Struct("=III")
_U64 = struct.Struct("=Q")
_VRING_STATE = struct.Struct("=II")
_VRING_ADDR = struct.Struct("=IIQQQQ")
_MEM_REGION = struct.Struct("=QQQQ")
_MEM_TABLE_HDR = struct.Struct("=II")
_CONFIG_HDR = struct.Struct("=III")
_MMAP = struct.Struct("=B7xQQQQ")
_SHMEM_CONFIG = struct.Struct("=II256Q")
_LOG = struct.Struct("=QQ")


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise MessageError(f"{what}: payload of {len(payload)} bytes, need {size}")


@dataclass(slots=True)
class Message:
    """One message as read from (or to be written to) the socket."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_FLAG_REPLY)

    @property
    def version(self) -> int:
        return self.flags & VHOST_USER_VERSION_MASK

    def name(self, kind: type[enum.IntEnum] = FrontendReq) -> str:
        try:
            return kind(self.request).name
        except ValueError:
            return f"request {self.request}"

    def take_fds(self) -> list[int]:
        """Hand the fds over to the caller, who must close them."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            try:
                os.close(fd)
            except OSError:
                pass

    def encode(self) -> bytes:
        return HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload


def request_flags(*, need_reply: bool = False) -> int:
    """The flags of a request (version 1), asking for a REPLY_ACK status with ``need_reply``."""
    return VHOST_USER_VERSION | (VHOST_USER_FLAG_NEED_REPLY if need_reply else 0)


def encode_message(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """A request, asking for a REPLY_ACK status with ``need_reply``."""
    return Message(request, request_flags(need_reply=need_reply), payload).encode()


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    """The reply to ``request``."""
    return Message(request, VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY, payload).encode()


def encode_u64(value: int) -> bytes:
    return _U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF)


def decode_u64(payload: bytes) -> int:
    _need(payload, 8, "u64")
    return int(_U64.unpack_from(payload)[0])


def decode_vring_fd(payload: bytes) -> tuple[int, bool]:
    """SET_VRING_KICK/CALL/ERR: (ring index, an fd is attached)."""
    value = decode_u64(payload)
    if value & ~(VRING_INDEX_MASK | VRING_NOFD):
        raise MessageError(f"vring fd message with reserved bits set: {value:#x}")
    return value & VRING_INDEX_MASK, not value & VRING_NOFD


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int

    @classmethod
    def decode(cls, payload: bytes) -> VringState:
        _need(payload, _VRING_STATE.size, "vring state")
        return cls(*_VRING_STATE.unpack_from(payload))

    def encode(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """SET_VRING_ADDR; note the wire order descriptor, used, available, log."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    LOG_FLAG = 0x1

    @classmethod
    def decode(cls, payload: bytes) -> VringAddr:
        _need(payload, _VRING_ADDR.size, "vring address")
        return cls(*_VRING_ADDR.unpack_from(payload))

    def encode(self) -> bytes:
        return _VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True, slots=True)
class LogDescription:
    """SET_LOG_BASE (with LOG_SHMFD): ``u64 mmap_size | u64 mmap_offset`` of the log's fd. The
    back-end's reply echoes it (QEMU reads and ignores whatever the reply carries)."""

    size: int
    offset: int

    @classmethod
    def decode(cls, payload: bytes) -> LogDescription:
        _need(payload, _LOG.size, "log description")
        return cls(*_LOG.unpack_from(payload))

    def encode(self) -> bytes:
        return _LOG.pack(self.size, self.offset)


@dataclass(frozen=True, slots=True)
class DeviceStateRequest:
    """SET_DEVICE_STATE_FD: ``u32 direction | u32 phase`` (and the pipe's fd)."""

    direction: int
    phase: int

    @classmethod
    def decode(cls, payload: bytes) -> DeviceStateRequest:
        _need(payload, _VRING_STATE.size, "device state transfer")
        return cls(*_VRING_STATE.unpack_from(payload))

    def encode(self) -> bytes:
        return _VRING_STATE.pack(self.direction, self.phase)


@dataclass(frozen=True, slots=True)
class MemoryRegionDesc:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def encode(self) -> bytes:
        return _MEM_REGION.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)


def decode_mem_table(payload: bytes) -> list[MemoryRegionDesc]:
    _need(payload, _MEM_TABLE_HDR.size, "memory table")
    nregions, _padding = _MEM_TABLE_HDR.unpack_from(payload)
    if nregions > MAX_MEM_REGIONS:
        raise MessageError(f"memory table with {nregions} regions (max {MAX_MEM_REGIONS})")
    _need(payload, _MEM_TABLE_HDR.size + nregions * _MEM_REGION.size, "memory table")
    return [
        MemoryRegionDesc(*_MEM_REGION.unpack_from(payload, 8 + 32 * i)) for i in range(nregions)
    ]


def encode_mem_table(regions: Sequence[MemoryRegionDesc]) -> bytes:
    return _MEM_TABLE_HDR.pack(len(regions), 0) + b"".join(r.encode() for r in regions)


def decode_single_region(payload: bytes) -> MemoryRegionDesc:
    """ADD_MEM_REG / REM_MEM_REG: ``u64 padding | region``."""
    _need(payload, 8 + _MEM_REGION.size, "single memory region")
    return MemoryRegionDesc(*_MEM_REGION.unpack_from(payload, 8))


def encode_single_region(region: MemoryRegionDesc) -> bytes:
    return bytes(8) + region.encode()


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: ``u32 offset | u32 size | u32 flags | payload``."""

    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def decode(cls, payload: bytes, *, with_data: bool = True) -> ConfigSpace:
        """Decode; ``with_data=False`` for GET_CONFIG, whose data bytes carry nothing."""
        _need(payload, _CONFIG_HDR.size, "config space")
        offset, size, flags = _CONFIG_HDR.unpack_from(payload)
        if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
            raise MessageError(f"config access {offset}+{size} beyond {MAX_CONFIG_SIZE} bytes")
        data = bytes(payload[_CONFIG_HDR.size :])
        if not with_data:
            return cls(offset, size, flags, b"")
        if len(data) != size:
            raise MessageError(f"config payload of {len(data)} bytes, header says {size}")
        return cls(offset, size, flags, data)

    def encode(self) -> bytes:
        return _CONFIG_HDR.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True, slots=True)
class MMapRequest:
    """VhostUserMMap (40 bytes): SHMEM_MAP / SHMEM_UNMAP. ``flags`` bit 0 = writable."""

    shmid: int
    fd_offset: int
    shm_offset: int
    length: int
    flags: int

    WRITABLE = 0x1
    SIZE = _MMAP.size

    @classmethod
    def decode(cls, payload: bytes) -> MMapRequest:
        _need(payload, _MMAP.size, "shmem map request")
        return cls(*_MMAP.unpack_from(payload))

    def encode(self) -> bytes:
        return _MMAP.pack(self.shmid, self.fd_offset, self.shm_offset, self.length, self.flags)


@dataclass(frozen=True, slots=True)
class ShmemConfig:
    """GET_SHMEM_CONFIG reply: region sizes indexed by shmid (256 slots, 0 = unused)."""

    sizes: tuple[int, ...]

    SLOTS = 256

    def __post_init__(self) -> None:
        if len(self.sizes) > self.SLOTS:
            raise MessageError(f"{len(self.sizes)} shared memory regions (max {self.SLOTS})")

    @classmethod
    def decode(cls, payload: bytes) -> ShmemConfig:
        _need(payload, _SHMEM_CONFIG.size, "shmem config")
        values = _SHMEM_CONFIG.unpack_from(payload)
        sizes = list(values[2:])
        while sizes and not sizes[-1]:
            sizes.pop()
        return cls(tuple(sizes))

    def encode(self) -> bytes:
        padded = list(self.sizes) + [0] * (self.SLOTS - len(self.sizes))
        return _SHMEM_CONFIG.pack(sum(1 for s in self.sizes if s), 0, *padded)


class MessageParser:
    """Reassembles messages from a byte stream plus the fds that arrived with it.

    Feed it what the socket returned (:meth:`feed`), then take complete messages with
    :meth:`next_message`. :meth:`bytes_wanted` tells the reader how much to ask for so
    one read never spans two messages, which keeps each message's fds with it; it is never
    more than ``max_payload``. A header announcing a larger payload can't start a message of
    the protocol: :meth:`feed` closes the fds that came with it and raises
    :class:`MessageTooLarge`, and the parser takes nothing more (the stream is out of step
    for good, so the reader should hang up).
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: tuple[int, int, int] | None = None
        self._ready: list[Message] = []
        self._broken: MessageTooLarge | None = None

    def bytes_wanted(self) -> int:
        if self._header is None:
            return HEADER.size - len(self._buf)
        return self._header[2] - len(self._buf)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self._fds.extend(fds)
        if self._broken is not None:
            self._drop_fds()
            raise self._broken
        view = memoryview(data)
        while view:
            want = self.bytes_wanted()
            take = view[:want]
            self._buf += take
            view = view[len(take) :]
            if len(take) < want:
                break
            if self._header is None:
                request, flags, size = HEADER.unpack(self._buf)
                self._buf.clear()
                if size > self._max_payload:
                    self._drop_fds()
                    self._broken = MessageTooLarge(
                        f"request {request} announces a {size}-byte payload; no message of "
                        f"the protocol has more than {self._max_payload}"
                    )
                    raise self._broken
                self._header = (request, flags, size)
                if size:
                    continue
            assert self._header is not None
            request, flags, _size = self._header
            self._ready.append(Message(request, flags, bytes(self._buf), self._fds))
            self._fds = []
            self._buf.clear()
            self._header = None

    def next_message(self) -> Message | None:
        if self._ready:
            return self._ready.pop(0)
        return None

    @property
    def idle(self) -> bool:
        """No partial message is buffered (a clean point for the peer to disconnect)."""
        return self._header is None and not self._buf

    def _drop_fds(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def close(self) -> None:
        """Close fds of an incomplete message and of messages never taken."""
        self._drop_fds()
        for m in self._ready:
            m.close_fds()
        self._ready.clear()
