"""The vhost-user state machine driven directly, without sockets or worker threads."""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterator, Sequence

import pytest

from pyvirtiofsd.testing.frontend import DriverQueue, GuestRam
from pyvirtiofsd.testing.testdevice import UppercaseDevice
from pyvirtiofsd.vhost_user.messages import (
    DEVICE_STATE_LOAD,
    DEVICE_STATE_SAVE,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    DeviceStateRequest,
    FrontendReq,
    LogDescription,
    MemoryRegionDesc,
    Message,
    MessageParser,
    ProtocolFeature,
    ShmemConfig,
    VringAddr,
    VringState,
    decode_u64,
    encode_mem_table,
    encode_single_region,
    encode_u64,
    request_flags,
)
from pyvirtiofsd.vhost_user.session import Session
from pyvirtiofsd.vhost_user.vring import Vring
from pyvirtiofsd.virtio.device import SharedMemoryMapper
from pyvirtiofsd.virtio.queue import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)

MiB = 1 << 20
R = FrontendReq
STANDARD = (
    1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_F_RING_INDIRECT_DESC
    | 1 << VIRTIO_F_RING_EVENT_IDX
    | 1 << VHOST_USER_F_PROTOCOL_FEATURES
)


class FakeRunner:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def start_queue(self, vring: Vring) -> None:
        assert vring.queue is not None
        self.calls.append(("start", vring.index))

    def stop_queue(self, vring: Vring) -> None:
        self.calls.append(("stop", vring.index))

    def wake_queue(self, vring: Vring) -> None:
        self.calls.append(("wake", vring.index))

    def close(self) -> None:
        self.calls.append(("close", -1))


class FakeChannel:
    def __init__(self, fd: int, features: int) -> None:
        self.fd = fd
        self.features = features
        self.closed = False

    def shmem_map(self, *args: object) -> int:
        return 0

    def shmem_unmap(self, *args: object) -> int:
        return 0

    def close(self) -> None:
        self.closed = True
        os.close(self.fd)


class Harness:
    def __init__(self, device: UppercaseDevice | None = None) -> None:
        self.device = device or UppercaseDevice(num_queues=2, max_queue_size=256)
        self.runner = FakeRunner()
        self.channels: list[FakeChannel] = []
        self.session = Session(self.device, self.runner, channel_factory=self._channel)
        self.ram = GuestRam(4 * MiB, regions=2)
        self.drivers: list[DriverQueue] = []

    def _channel(self, fd: int, features: int) -> SharedMemoryMapper:
        channel = FakeChannel(fd, features)
        self.channels.append(channel)
        return channel

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        flags: int | None = None,
    ) -> Message | None:
        if flags is None:
            flags = request_flags(need_reply=need_reply)
        out = self.session.handle(Message(request, flags, payload, list(fds)))
        if out is None:
            return None
        parser = MessageParser()
        parser.feed(out)
        reply = parser.next_message()
        assert reply is not None and parser.next_message() is None
        assert reply.request == request and reply.is_reply
        return reply

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        reply = self.send(request, payload, fds, need_reply=True)
        assert reply is not None, f"no ack for {request}"
        return decode_u64(reply.payload)

    def u64(self, request: int) -> int:
        reply = self.send(request)
        assert reply is not None
        return decode_u64(reply.payload)

    def negotiate(self, features: int = STANDARD) -> None:
        self.send(R.SET_PROTOCOL_FEATURES, encode_u64(self.session.offered_protocol_features))
        assert self.ack(R.SET_OWNER) == 0
        assert self.ack(R.SET_FEATURES, encode_u64(features)) == 0

    def ram_fds(self, n: int | None = None) -> list[int]:
        return [os.dup(self.ram.fd) for _ in range(len(self.ram.regions) if n is None else n)]

    def share_ram(self) -> None:
        assert self.ack(R.SET_MEM_TABLE, encode_mem_table(self.ram.descs()), self.ram_fds()) == 0

    def start_ring(self, index: int, size: int = 16) -> DriverQueue:
        dq = DriverQueue(self.ram, index, size, event_idx=True, arena_size=64 * 1024)
        self.drivers.append(dq)
        ua = self.ram.user_addr
        assert self.ack(R.SET_VRING_NUM, VringState(index, size).encode()) == 0
        assert self.ack(R.SET_VRING_BASE, VringState(index, 0).encode()) == 0
        addr = VringAddr(index, 0, ua(dq.desc_addr), ua(dq.used_addr), ua(dq.avail_addr), 0)
        assert self.ack(R.SET_VRING_ADDR, addr.encode()) == 0
        assert self.ack(R.SET_VRING_CALL, encode_u64(index), [os.dup(dq.call_fd)]) == 0
        assert self.ack(R.SET_VRING_KICK, encode_u64(index), [os.dup(dq.kick_fd)]) == 0
        return dq

    def close(self) -> None:
        self.session.close()
        for dq in self.drivers:
            dq.close()
        self.ram.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError):
        os.fstat(fd)


# -- features --------------------------------------------------------------------------------


def test_offered_features(h: Harness) -> None:
    assert h.u64(R.GET_FEATURES) == STANDARD
    proto = h.u64(R.GET_PROTOCOL_FEATURES)
    for bit in (
        "MQ",
        "REPLY_ACK",
        "BACKEND_REQ",
        "BACKEND_SEND_FD",
        "CONFIGURE_MEM_SLOTS",
        "RESET_DEVICE",
        "STATUS",
    ):
        assert proto >> ProtocolFeature[bit] & 1, bit
    # No config space and no shared memory: neither CONFIG nor SHMEM.
    assert not proto >> ProtocolFeature.CONFIG & 1
    assert not proto >> ProtocolFeature.SHMEM & 1
    assert h.u64(R.GET_QUEUE_NUM) == 2


def test_config_and_shmem_are_offered_when_the_device_has_them() -> None:
    device = UppercaseDevice(config=b"tag\0", shmem_sizes=[1 << 30])
    h = Harness(device)
    try:
        proto = h.u64(R.GET_PROTOCOL_FEATURES)
        assert proto >> ProtocolFeature.CONFIG & 1
        assert proto >> 22 & 1  # SHMEM, as QEMU 11.1 numbers it
        h.negotiate()
        reply = h.send(R.GET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)).encode())
        assert reply is not None
        assert ConfigSpace.decode(reply.payload).data == b"tag\0" + bytes(4)
        reply = h.send(R.GET_SHMEM_CONFIG)
        assert reply is not None and len(reply.payload) == 2056
        assert ShmemConfig.decode(reply.payload).sizes == (1 << 30,)
        assert h.ack(R.SET_CONFIG, ConfigSpace(0, 1, 0, b"x").encode()) != 0
    finally:
        h.close()


def test_get_config_without_config_fails_with_empty_reply(h: Harness) -> None:
    reply = h.send(R.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)).encode())
    assert reply is not None and reply.payload == b""
    reply = h.send(R.GET_SHMEM_CONFIG)
    assert reply is not None and reply.payload == b""


def test_unoffered_features_are_refused(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.send(R.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.REPLY_ACK))
    with caplog.at_level(logging.WARNING):
        assert h.ack(R.SET_FEATURES, encode_u64(STANDARD | 1 << 40)) == 1
        assert h.ack(R.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.SHMEM)) == 1
    assert "not offered" in caplog.text
    assert h.session.acked_features == 0


def test_reply_ack_only_once_negotiated(h: Harness) -> None:
    assert h.send(R.SET_OWNER, need_reply=True) is None
    h.send(R.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.REPLY_ACK))
    assert h.ack(R.SET_OWNER) == 0
    assert h.send(R.SET_OWNER) is None  # no NEED_REPLY, no reply
    # Requests with a reply of their own never get an extra ack.
    reply = h.send(R.GET_FEATURES, need_reply=True)
    assert reply is not None and decode_u64(reply.payload) == STANDARD


def test_status(h: Harness) -> None:
    h.negotiate()
    assert h.ack(R.SET_STATUS, encode_u64(0xF)) == 0
    assert h.u64(R.GET_STATUS) == 0xF
    assert h.ack(R.SET_STATUS, encode_u64(0x100)) == 1


# -- hostile and unknown messages --------------------------------------------------------------


def test_unknown_request(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.negotiate()
    r, w = os.pipe()
    os.close(w)
    with caplog.at_level(logging.WARNING):
        assert h.ack(200, b"junk", [r]) == 1
        assert h.send(201) is None
    assert "request 200 refused" in caplog.text
    assert_closed(r)


def test_unsupported_requests_that_expect_a_u64(h: Harness) -> None:
    reply = h.send(R.SET_DEVICE_STATE_FD, struct.pack("=II", 0, 0))
    assert reply is not None and decode_u64(reply.payload) != 0


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (R.SET_VRING_NUM, b"\0" * 4),
        (R.SET_VRING_ADDR, b"\0" * 20),
        (R.SET_FEATURES, b"\1"),
        (R.SET_MEM_TABLE, b"\0" * 6),
        (R.SET_MEM_TABLE, struct.pack("=II", 2, 0) + bytes(40)),
        (R.ADD_MEM_REG, bytes(16)),
        (R.SET_VRING_KICK, b""),
    ],
)
def test_truncated_payloads(
    h: Harness, caplog: pytest.LogCaptureFixture, request_: int, payload: bytes
) -> None:
    h.negotiate()
    with caplog.at_level(logging.WARNING):
        assert h.ack(request_, payload) == 1
    assert "payload of" in caplog.text


def test_truncated_get_request_still_gets_a_reply(h: Harness) -> None:
    reply = h.send(R.GET_VRING_BASE, b"\0")
    assert reply is not None and reply.payload == b""


def test_bad_version_and_stray_reply(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.negotiate()
    with caplog.at_level(logging.WARNING):
        reply = h.send(R.SET_OWNER, flags=2 | 8)
        assert reply is not None and decode_u64(reply.payload) == 1
        reply = h.send(R.SET_OWNER, flags=1 | 4 | 8)
        assert reply is not None and decode_u64(reply.payload) == 1
    assert "version 2" in caplog.text and "a reply where" in caplog.text


def test_logging_is_refused(h: Harness) -> None:
    h.negotiate()
    fd = os.dup(h.ram.fd)
    assert h.ack(R.SET_LOG_BASE, struct.pack("=QQ", 4096, 0), [fd]) == 1
    assert_closed(fd)
    assert h.ack(R.SET_LOG_FD, b"", [os.eventfd(0)]) == 1


# -- memory table ----------------------------------------------------------------------------


def test_set_mem_table(h: Harness) -> None:
    h.negotiate()
    fds = h.ram_fds()
    assert h.ack(R.SET_MEM_TABLE, encode_mem_table(h.ram.descs()), fds) == 0
    for fd in fds:
        assert_closed(fd)
    assert len(h.session.memory) == 2
    h.ram.write(0x100, b"shared")
    assert bytes(h.session.memory.translate(0x100, 6)) == b"shared"


def test_set_mem_table_fd_missing(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.negotiate()
    h.share_ram()
    old = h.session.memory
    with caplog.at_level(logging.WARNING):
        assert h.ack(R.SET_MEM_TABLE, encode_mem_table(h.ram.descs()), h.ram_fds(1)) == 1
    assert "2 regions but 1 fds" in caplog.text
    assert h.session.memory is old


@pytest.mark.parametrize(
    "regions",
    [
        # overlapping in guest-physical space
        [
            MemoryRegionDesc(0, 2 * MiB, 0x10_0000_0000, 0),
            MemoryRegionDesc(MiB, 2 * MiB, 0x20_0000_0000, 0),
        ],
        # overlapping in the front-end's space
        [
            MemoryRegionDesc(0, MiB, 0x10_0000_0000, 0),
            MemoryRegionDesc(8 * MiB, MiB, 0x10_0000_1000, 0),
        ],
        # overflowing 64 bits
        [MemoryRegionDesc(2**64 - MiB, 2 * MiB, 0x10_0000_0000, 0)],
        [MemoryRegionDesc(0, MiB, 2**64 - 4096, 0)],
        # larger than the file behind it
        [MemoryRegionDesc(0, 64 * MiB, 0x10_0000_0000, 0)],
        [MemoryRegionDesc(0, MiB, 0x10_0000_0000, 2**63)],
        # empty
        [MemoryRegionDesc(0, 0, 0x10_0000_0000, 0)],
    ],
)
def test_bad_memory_tables(
    h: Harness, caplog: pytest.LogCaptureFixture, regions: list[MemoryRegionDesc]
) -> None:
    h.negotiate()
    with caplog.at_level(logging.WARNING):
        assert h.ack(R.SET_MEM_TABLE, encode_mem_table(regions), h.ram_fds(len(regions))) == 1
    assert "SET_MEM_TABLE refused" in caplog.text
    assert len(h.session.memory) == 0


def test_mem_table_with_bad_fd_type(h: Harness) -> None:
    h.negotiate()
    r, w = os.pipe()
    os.close(w)
    region = [MemoryRegionDesc(0, MiB, 0x10_0000_0000, 0)]
    assert h.ack(R.SET_MEM_TABLE, encode_mem_table(region), [r]) == 1
    assert_closed(r)


def test_add_and_remove_regions(h: Harness) -> None:
    h.negotiate()
    first, second = h.ram.descs()
    assert h.u64(R.GET_MAX_MEM_SLOTS) == 512
    assert h.ack(R.ADD_MEM_REG, encode_single_region(first), h.ram_fds(1)) == 0
    assert h.ack(R.ADD_MEM_REG, encode_single_region(second), h.ram_fds(1)) == 0
    assert len(h.session.memory) == 2
    # the same region again overlaps itself
    assert h.ack(R.ADD_MEM_REG, encode_single_region(first), h.ram_fds(1)) == 1
    assert h.ack(R.ADD_MEM_REG, encode_single_region(first), []) == 1
    assert h.ack(R.REM_MEM_REG, encode_single_region(first)) == 0
    assert len(h.session.memory) == 1
    assert h.ack(R.REM_MEM_REG, encode_single_region(first)) == 1
    # the mmap offset is ignored when removing; a stray fd is closed
    fd = os.dup(h.ram.fd)
    moved = MemoryRegionDesc(second.guest_addr, second.size, second.user_addr, 12345)
    assert h.ack(R.REM_MEM_REG, encode_single_region(moved), [fd]) == 0
    assert_closed(fd)
    assert len(h.session.memory) == 0


def test_mem_slots_are_limited() -> None:
    h = Harness()
    h.session.max_mem_slots = 1
    try:
        h.negotiate()
        first, second = h.ram.descs()
        assert h.ack(R.ADD_MEM_REG, encode_single_region(first), h.ram_fds(1)) == 0
        assert h.ack(R.ADD_MEM_REG, encode_single_region(second), h.ram_fds(1)) == 1
    finally:
        h.close()


def test_device_region(h: Harness) -> None:
    h.negotiate()
    h.share_ram()
    window = bytearray(2 * MiB)
    region = h.session.add_device_region(1 << 40, window, name="dax")
    h.session.memory.translate(1 << 40, 3)[:] = b"dax"
    assert window[:3] == b"dax"
    # a new memory table keeps the device region
    h.share_ram()
    assert bytes(h.session.memory.translate(1 << 40, 3)) == b"dax"
    h.session.remove_device_region(region)
    assert len(h.session.memory) == 2


# -- rings -----------------------------------------------------------------------------------


def test_ring_start_and_stop(h: Harness) -> None:
    h.negotiate()
    h.share_ram()
    h.start_ring(1)
    vring = h.session.vrings[1]
    assert vring.started and vring.queue is not None and not vring.enabled
    assert vring.queue.event_idx and vring.queue.indirect
    assert h.runner.calls == [("start", 1)]
    assert h.ack(R.SET_VRING_ENABLE, VringState(1, 1).encode()) == 0
    assert vring.enabled and h.runner.calls[-1] == ("wake", 1)
    # changing a running ring is refused
    assert h.ack(R.SET_VRING_NUM, VringState(1, 32).encode()) == 1
    assert h.ack(R.SET_VRING_BASE, VringState(1, 5).encode()) == 1
    vring.queue.next_avail = 7  # as if seven chains had been served
    reply = h.send(R.GET_VRING_BASE, VringState(1, 0).encode())
    assert reply is not None and VringState.decode(reply.payload) == VringState(1, 7)
    assert h.runner.calls[-1] == ("stop", 1)
    assert not vring.started and vring.queue is None and vring.kick_fd is None
    assert vring.call_fd is not None  # kept: QEMU does not always resend it


def test_rings_start_enabled_without_protocol_features(h: Harness) -> None:
    h.negotiate(STANDARD & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))
    assert all(v.enabled for v in h.session.vrings)
    assert h.ack(R.SET_VRING_ENABLE, VringState(0, 1).encode()) == 1


def test_set_vring_enable_needs_protocol_features(h: Harness) -> None:
    h.send(R.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.REPLY_ACK))
    h.ack(R.SET_FEATURES, encode_u64(1 << VIRTIO_F_VERSION_1))
    assert h.ack(R.SET_VRING_ENABLE, VringState(0, 1).encode()) == 1
    h.ack(R.SET_FEATURES, encode_u64(STANDARD))
    assert h.ack(R.SET_VRING_ENABLE, VringState(0, 2).encode()) == 1
    assert h.ack(R.SET_VRING_ENABLE, VringState(0, 1).encode()) == 0


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (R.SET_VRING_NUM, VringState(2, 16).encode()),  # no such ring
        (R.SET_VRING_NUM, VringState(0, 24).encode()),  # not a power of two
        (R.SET_VRING_NUM, VringState(0, 0).encode()),
        (R.SET_VRING_NUM, VringState(0, 512).encode()),  # above the device's maximum
        (R.SET_VRING_BASE, VringState(0, 0x1_0000).encode()),
        (R.SET_VRING_ADDR, VringAddr(0, 2, 0, 0, 0, 0).encode()),
        (R.SET_VRING_ENABLE, VringState(9, 1).encode()),
        (R.SET_VRING_CALL, encode_u64(0x107)),
    ],
)
def test_bad_ring_requests(h: Harness, request_: int, payload: bytes) -> None:
    h.negotiate()
    assert h.ack(request_, payload) == 1


def test_ring_outside_memory(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.negotiate()
    h.share_ram()
    assert h.ack(R.SET_VRING_NUM, VringState(0, 16).encode()) == 0
    bogus = VringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0)  # guest, not front-end, addresses
    assert h.ack(R.SET_VRING_ADDR, bogus.encode()) == 0
    with caplog.at_level(logging.WARNING):
        assert h.ack(R.SET_VRING_KICK, encode_u64(0), [os.eventfd(0)]) == 1
    assert "ring outside shared memory" in caplog.text
    assert not h.session.vrings[0].started
    assert h.runner.calls == []


def test_ring_before_memory_or_addresses(h: Harness) -> None:
    h.negotiate()
    assert h.ack(R.SET_VRING_KICK, encode_u64(0), [os.eventfd(0)]) == 1
    assert h.ack(R.SET_VRING_NUM, VringState(0, 16).encode()) == 0
    assert h.ack(R.SET_VRING_KICK, encode_u64(0), [os.eventfd(0)]) == 1


def test_notifier_fds_are_checked(h: Harness, tmp_path: object) -> None:
    h.negotiate()
    h.share_ram()
    fd = os.dup(h.ram.fd)  # a memfd is always readable: a worker would spin on it
    assert h.ack(R.SET_VRING_CALL, encode_u64(0), [fd]) == 1
    assert_closed(fd)
    assert h.ack(R.SET_VRING_CALL, encode_u64(0), []) == 1  # fd flag but no fd
    assert h.ack(R.SET_VRING_CALL, encode_u64(0x100), [os.eventfd(0)]) == 1  # no-fd flag + fd
    assert h.ack(R.SET_VRING_KICK, encode_u64(0x100)) == 1  # polling is not supported
    r, w = os.pipe()
    assert h.ack(R.SET_VRING_ERR, encode_u64(0), [r]) == 0  # pipes are fine
    os.close(w)
    assert h.ack(R.SET_VRING_CALL, encode_u64(0x100)) == 0  # no call fd: the driver polls


def test_memory_change_restarts_running_rings(h: Harness) -> None:
    h.negotiate()
    h.share_ram()
    h.start_ring(0)
    old_queue = h.session.vrings[0].queue
    old_regions = h.session.memory.regions
    h.runner.calls.clear()
    h.share_ram()  # the same RAM again, new mappings
    assert h.runner.calls == [("stop", 0), ("start", 0)]
    assert h.session.vrings[0].queue is not old_queue
    for region in old_regions:  # unmapped: our views of them are released
        with pytest.raises(ValueError, match="released"):
            len(region.view)
    # Adding a region swaps the snapshot under the running ring without stopping it.
    h.runner.calls.clear()
    extra = GuestRam(MiB)
    try:
        desc = MemoryRegionDesc(1 << 33, MiB, 0x55_0000_0000, 0)
        assert h.ack(R.ADD_MEM_REG, encode_single_region(desc), [os.dup(extra.fd)]) == 0
        assert h.runner.calls == []
        queue = h.session.vrings[0].queue
        assert queue is not None and queue.memory is h.session.memory
        # Removing one that holds no ring leaves the ring running too (the front-end may be
        # waiting on a request in flight, e.g. a DAX mapping, while it removes the region).
        assert h.ack(R.REM_MEM_REG, encode_single_region(desc)) == 0
        assert h.runner.calls == []
        queue = h.session.vrings[0].queue
        assert queue is not None and queue.memory is h.session.memory
    finally:
        extra.close()


def test_removing_the_ring_memory_breaks_only_that_ring(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.negotiate()
    h.share_ram()
    h.start_ring(0)
    first = h.ram.descs()[0]
    with caplog.at_level(logging.ERROR):
        assert h.ack(R.REM_MEM_REG, encode_single_region(first)) == 0
    assert "can't restart" in caplog.text
    assert h.session.vrings[0].broken


def test_reset_device(h: Harness) -> None:
    h.negotiate()
    h.share_ram()
    h.start_ring(0)
    assert h.ack(R.RESET_DEVICE) == 0
    assert h.device.resets == 1
    assert not h.session.vrings[0].started and h.session.vrings[0].size == 0
    assert h.session.acked_features == 0
    assert h.session.acked_protocol_features  # the connection's protocol state stays
    assert len(h.session.memory) == 2


def test_reset_owner_disables_rings(h: Harness) -> None:
    h.negotiate()
    h.session.vrings[0].enabled = True
    assert h.ack(R.RESET_OWNER) == 0
    assert not h.session.vrings[0].enabled


# -- back-end channel ------------------------------------------------------------------------


def test_backend_channel(h: Harness) -> None:
    h.negotiate()
    fd = os.eventfd(0)  # any fd will do for the fake factory
    assert h.ack(R.SET_BACKEND_REQ_FD, b"", [fd]) == 0
    assert h.channels[0].fd == fd
    assert h.device.channel is h.channels[0]
    assert h.ack(R.SET_BACKEND_REQ_FD, b"", [os.eventfd(0)]) == 0
    assert h.channels[0].closed and h.device.channel is h.channels[1]
    assert h.ack(R.SET_BACKEND_REQ_FD, b"", []) == 1
    h.session.close()
    assert h.channels[1].closed and h.device.channel is None


def test_backend_channel_needs_the_feature(h: Harness) -> None:
    h.send(R.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.REPLY_ACK))
    fd = os.eventfd(0)
    assert h.ack(R.SET_BACKEND_REQ_FD, b"", [fd]) == 1
    assert_closed(fd)


def test_close_unmaps_and_closes(h: Harness) -> None:
    h.negotiate()
    h.share_ram()
    h.start_ring(0)
    vring = h.session.vrings[0]
    kick = vring.kick_fd
    assert kick is not None
    h.session.close()
    assert_closed(kick)
    assert len(h.session.memory) == 0


# -- live migration ------------------------------------------------------------------------------

LOG_ALL = 1 << VHOST_F_LOG_ALL


def memfd(size: int) -> int:
    fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def m() -> Iterator[Harness]:
    """A harness whose device is migratable."""
    harness = Harness(UppercaseDevice(num_queues=2, max_queue_size=256, migratable=True))
    yield harness
    harness.close()


def ring_addr(h: Harness, index: int, flags: int = 0) -> VringAddr:
    dq = h.drivers[-1]
    ua = h.ram.user_addr
    return VringAddr(index, flags, ua(dq.desc_addr), ua(dq.used_addr), ua(dq.avail_addr), 0x5000)


def test_migration_is_offered_only_by_a_migratable_device(h: Harness, m: Harness) -> None:
    assert not h.u64(R.GET_FEATURES) & LOG_ALL
    proto = h.u64(R.GET_PROTOCOL_FEATURES)
    assert not proto >> ProtocolFeature.LOG_SHMFD & 1
    assert not proto >> ProtocolFeature.DEVICE_STATE & 1
    assert m.u64(R.GET_FEATURES) == STANDARD | LOG_ALL
    proto = m.u64(R.GET_PROTOCOL_FEATURES)
    assert proto >> ProtocolFeature.LOG_SHMFD & 1 and proto >> ProtocolFeature.DEVICE_STATE & 1


def test_a_log_is_mapped_replied_to_and_replaced(m: Harness) -> None:
    m.negotiate()
    m.share_ram()
    m.start_ring(1)
    first = memfd(4096)
    # QEMU sends it without NEED_REPLY and waits for the reply all the same.
    reply = m.send(R.SET_LOG_BASE, LogDescription(4096, 0).encode(), [first])
    assert reply is not None and LogDescription.decode(reply.payload) == LogDescription(4096, 0)
    assert_closed(first)
    old = m.session.log
    assert old is not None and old.pages == 4096 * 8
    assert m.ack(R.SET_FEATURES, encode_u64(STANDARD | LOG_ALL)) == 0
    queue = m.session.vrings[1].queue
    assert queue is not None and queue.data_log is old
    second = memfd(8192)
    reply = m.send(R.SET_LOG_BASE, LogDescription(8192, 0).encode(), [second])
    assert reply is not None
    # The ring writes to the new log before the reply; the old one is unmapped.
    assert queue.data_log is m.session.log and m.session.log is not old
    assert old.closed


def test_logging_switches_on_and_off_on_running_rings(m: Harness) -> None:
    m.negotiate()
    m.share_ram()
    m.start_ring(1)
    vring = m.session.vrings[1]
    queue = vring.queue
    assert queue is not None
    queue.next_avail = 9  # as if nine chains had been served
    m.send(R.SET_LOG_BASE, LogDescription(4096, 0).encode(), [memfd(4096)])
    dirty = m.session.log
    # A migration begins: LOG_ALL, then the used ring's logging, ring by ring (as QEMU does).
    assert m.ack(R.SET_FEATURES, encode_u64(STANDARD | LOG_ALL)) == 0
    assert m.ack(R.SET_VRING_ADDR, ring_addr(m, 1, VringAddr.LOG_FLAG).encode()) == 0
    assert vring.queue is queue and queue.next_avail == 9  # the ring ran on undisturbed
    assert queue.data_log is dirty and queue._used_log is dirty and queue._used_gpa == 0x5000
    assert m.runner.calls == [("start", 1)]
    # Moving a running ring is still refused.
    moved = ring_addr(m, 1, VringAddr.LOG_FLAG)
    moved = VringAddr(1, moved.flags, moved.desc, moved.used + 64, moved.avail, moved.log)
    assert m.ack(R.SET_VRING_ADDR, moved.encode()) == 1
    # The migration is cancelled: LOG_ALL goes, then each ring's logging; the log is unmapped.
    assert m.ack(R.SET_FEATURES, encode_u64(STANDARD)) == 0
    assert queue.data_log is None and queue._used_log is dirty
    assert m.session.log is dirty
    assert m.ack(R.SET_VRING_ADDR, ring_addr(m, 1).encode()) == 0
    assert not queue.logging and m.session.log is None
    assert dirty is not None and dirty.closed


def test_logging_asked_before_the_log_starts_with_the_log(m: Harness) -> None:
    m.negotiate()
    m.share_ram()
    m.start_ring(1)
    queue = m.session.vrings[1].queue
    assert queue is not None
    assert m.ack(R.SET_FEATURES, encode_u64(STANDARD | LOG_ALL)) == 0
    assert m.ack(R.SET_VRING_ADDR, ring_addr(m, 1, VringAddr.LOG_FLAG).encode()) == 0
    assert not queue.logging
    m.send(R.SET_LOG_BASE, LogDescription(4096, 0).encode(), [memfd(4096)])
    assert queue.data_log is m.session.log and queue._used_log is m.session.log


def test_a_log_that_cannot_be_mapped(m: Harness, caplog: pytest.LogCaptureFixture) -> None:
    m.negotiate()
    with caplog.at_level(logging.WARNING):
        reply = m.send(R.SET_LOG_BASE, LogDescription(8192, 0).encode(), [memfd(4096)])
    assert reply is not None and reply.payload == b""  # answered: the front-end waits for it
    assert "holds 4096 bytes" in caplog.text
    # Logging without a log would lose pages: the front-end learns it here.
    assert m.ack(R.SET_FEATURES, encode_u64(STANDARD | LOG_ALL)) == 1


def test_reset_ends_logging(m: Harness) -> None:
    m.negotiate()
    m.send(R.SET_LOG_BASE, LogDescription(4096, 0).encode(), [memfd(4096)])
    assert m.ack(R.SET_FEATURES, encode_u64(STANDARD | LOG_ALL)) == 0
    dirty = m.session.log
    assert m.ack(R.RESET_DEVICE) == 0
    assert m.session.log is None and dirty is not None and dirty.closed


def state_fd(m: Harness, direction: int, fd: int, phase: int = 0) -> int:
    reply = m.send(R.SET_DEVICE_STATE_FD, DeviceStateRequest(direction, phase).encode(), [fd])
    assert reply is not None
    return decode_u64(reply.payload)


def test_device_state_save_and_load(m: Harness) -> None:
    m.negotiate()
    m.session.device.state = b"the state" * 20000  # more than a pipe holds
    r, w = os.pipe()
    assert state_fd(m, DEVICE_STATE_SAVE, w) == 0x100  # done, no fd in the reply
    saved = b""
    while chunk := os.read(r, 65536):
        saved += chunk
    os.close(r)
    assert m.u64(R.CHECK_DEVICE_STATE) == 0
    assert saved == b"the state" * 20000

    other = Harness(UppercaseDevice(num_queues=2, migratable=True))
    try:
        other.negotiate()
        r, w = os.pipe()
        assert state_fd(other, DEVICE_STATE_LOAD, r) == 0x100
        writer = threading.Thread(target=lambda: (os.write(w, saved), os.close(w)))
        writer.start()
        assert other.u64(R.CHECK_DEVICE_STATE) == 0
        writer.join()
        assert other.session.device.state == saved
    finally:
        other.close()


def test_a_load_that_fails_fails_the_check(m: Harness, caplog: pytest.LogCaptureFixture) -> None:
    m.negotiate()
    r, w = os.pipe()
    assert state_fd(m, DEVICE_STATE_LOAD, r) == 0x100
    os.write(w, b"!not this")
    os.close(w)
    with caplog.at_level(logging.ERROR):
        assert m.u64(R.CHECK_DEVICE_STATE) == 1
    assert "device state load failed: state refused" in caplog.text
    assert m.u64(R.CHECK_DEVICE_STATE) == 1  # nothing more to check


@pytest.mark.parametrize("case", ["running", "phase", "no-feature"])
def test_device_state_transfers_that_are_refused(m: Harness, case: str) -> None:
    if case == "no-feature":
        m.send(R.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.REPLY_ACK))
    else:
        m.negotiate()
    if case == "running":
        m.share_ram()
        m.start_ring(1)
    r, w = os.pipe()
    assert state_fd(m, DEVICE_STATE_SAVE, w, phase=1 if case == "phase" else 0) == 0x101
    assert_closed(w)
    assert os.read(r, 10) == b""  # our end is closed: nothing comes
    os.close(r)


def test_a_request_before_the_check_abandons_the_transfer(
    m: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    m.negotiate()
    m.session.device.state = b"x" * (1 << 20)
    r, w = os.pipe()
    assert state_fd(m, DEVICE_STATE_SAVE, w) == 0x100
    with caplog.at_level(logging.WARNING):
        assert m.ack(R.RESET_DEVICE) == 0  # the front-end never read the pipe
    assert "device state save abandoned" in caplog.text
    assert m.u64(R.CHECK_DEVICE_STATE) == 1
    os.close(r)
