from __future__ import annotations

import os
import struct

import pytest

from pyvirtiofsd.vhost_user.messages import (
    DEVICE_STATE_LOAD,
    DEVICE_STATE_NO_FD,
    DEVICE_STATE_SAVE,
    HEADER,
    MAX_PAYLOAD,
    OWN_REPLY,
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_FLAG_REPLY,
    BackendReq,
    ConfigSpace,
    DeviceStateRequest,
    FrontendReq,
    LogDescription,
    MemoryRegionDesc,
    Message,
    MessageError,
    MessageParser,
    MessageTooLarge,
    MMapRequest,
    ProtocolFeature,
    ShmemConfig,
    VringAddr,
    VringState,
    decode_mem_table,
    decode_single_region,
    decode_u64,
    decode_vring_fd,
    encode_mem_table,
    encode_message,
    encode_reply,
    encode_single_region,
    encode_u64,
    protocol_mask,
)


def test_request_ids() -> None:
    assert FrontendReq.SET_BACKEND_REQ_FD == 21
    assert FrontendReq.GET_CONFIG == 24
    assert FrontendReq.RESET_DEVICE == 34
    assert FrontendReq.ADD_MEM_REG == 37
    assert FrontendReq.SET_STATUS == 39
    assert FrontendReq.GET_SHMEM_CONFIG == 44
    assert BackendReq.SHMEM_MAP == 9
    assert BackendReq.SHMEM_UNMAP == 10


def test_protocol_feature_bits() -> None:
    # QEMU 11.1 numbers SHMEM 22; 20 and 21 belong to other features there.
    assert ProtocolFeature.SHMEM == 22
    assert ProtocolFeature.GPA_ADDRESSES == 21
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS == 15
    assert protocol_mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK) == 0b1001


def test_header_and_flags() -> None:
    data = encode_message(FrontendReq.SET_OWNER, need_reply=True)
    assert data == HEADER.pack(3, 1 | VHOST_USER_FLAG_NEED_REPLY, 0)
    reply = encode_reply(FrontendReq.GET_FEATURES, encode_u64(7))
    request, flags, size = HEADER.unpack_from(reply)
    assert (request, flags, size) == (1, 1 | VHOST_USER_FLAG_REPLY, 8)
    msg = Message(1, 1 | VHOST_USER_FLAG_NEED_REPLY, b"")
    assert msg.need_reply and not msg.is_reply and msg.version == 1
    assert msg.name() == "GET_FEATURES"
    assert Message(999, 1, b"").name() == "request 999"
    assert Message(5, 1, b"ab").encode() == HEADER.pack(5, 1, 2) + b"ab"


def test_u64() -> None:
    assert decode_u64(encode_u64(2**64 - 1)) == 2**64 - 1
    with pytest.raises(MessageError):
        decode_u64(b"1234")


def test_vring_payloads() -> None:
    assert VringState.decode(VringState(3, 256).encode()) == VringState(3, 256)
    addr = VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)
    raw = addr.encode()
    assert len(raw) == 40
    # the wire order is descriptor, used, available
    assert struct.unpack("=IIQQQQ", raw)[2:5] == (0x1000, 0x3000, 0x2000)
    assert VringAddr.decode(raw) == addr
    with pytest.raises(MessageError):
        VringState.decode(b"\0" * 4)
    with pytest.raises(MessageError):
        VringAddr.decode(raw[:39])


def test_vring_fd_payload() -> None:
    assert decode_vring_fd(encode_u64(5)) == (5, True)
    assert decode_vring_fd(encode_u64(0x105)) == (5, False)
    with pytest.raises(MessageError, match="reserved"):
        decode_vring_fd(encode_u64(0x205))


def test_memory_table() -> None:
    regions = [
        MemoryRegionDesc(0, 1 << 20, 0x7F00_0000_0000, 0),
        MemoryRegionDesc(1 << 32, 1 << 20, 0x7F10_0000_0000, 1 << 20),
    ]
    raw = encode_mem_table(regions)
    assert len(raw) == 8 + 64
    assert decode_mem_table(raw) == regions
    with pytest.raises(MessageError, match="regions"):
        decode_mem_table(struct.pack("=II", 9, 0) + bytes(9 * 32))
    with pytest.raises(MessageError):
        decode_mem_table(raw[:-1])  # truncated
    single = encode_single_region(regions[1])
    assert len(single) == 40
    assert decode_single_region(single) == regions[1]
    with pytest.raises(MessageError):
        decode_single_region(single[:32])


def test_config_space() -> None:
    cfg = ConfigSpace(0, 4, 0, b"abcd")
    assert ConfigSpace.decode(cfg.encode()) == cfg
    assert ConfigSpace.decode(struct.pack("=III", 4, 36, 0), with_data=False).size == 36
    with pytest.raises(MessageError, match="beyond"):
        ConfigSpace.decode(struct.pack("=III", 250, 10, 0) + bytes(10))
    with pytest.raises(MessageError, match="beyond"):
        ConfigSpace.decode(struct.pack("=III", 2**32 - 1, 2, 0) + bytes(2))
    with pytest.raises(MessageError, match="header says"):
        ConfigSpace.decode(struct.pack("=III", 0, 8, 0) + bytes(4))


def test_mmap_request_layout() -> None:
    req = MMapRequest(0, 0x1000, 0x20_0000, 0x20_0000, MMapRequest.WRITABLE)
    raw = req.encode()
    assert len(raw) == MMapRequest.SIZE == 40
    assert raw[0] == 0 and raw[1:8] == bytes(7)
    assert struct.unpack_from("=QQQQ", raw, 8) == (0x1000, 0x20_0000, 0x20_0000, 1)
    assert MMapRequest.decode(raw) == req


def test_shmem_config_layout() -> None:
    raw = ShmemConfig((1 << 30,)).encode()
    assert len(raw) == 2056
    assert struct.unpack_from("=IIQQ", raw) == (1, 0, 1 << 30, 0)
    assert ShmemConfig.decode(raw).sizes == (1 << 30,)
    with pytest.raises(MessageError):
        ShmemConfig(tuple(range(1, 258)))


def test_parser_reassembles_split_messages() -> None:
    parser = MessageParser()
    stream = encode_message(FrontendReq.SET_FEATURES, encode_u64(1 << 32)) + encode_message(
        FrontendReq.SET_OWNER
    )
    for i in range(len(stream)):
        parser.feed(stream[i : i + 1])
    first = parser.next_message()
    second = parser.next_message()
    assert first is not None and second is not None
    assert first.request == FrontendReq.SET_FEATURES and decode_u64(first.payload) == 1 << 32
    assert second.request == FrontendReq.SET_OWNER and second.payload == b""
    assert parser.next_message() is None
    assert parser.idle


def test_parser_keeps_fds_with_their_message() -> None:
    parser = MessageParser()
    r, w = os.pipe()
    try:
        data = encode_message(FrontendReq.SET_VRING_KICK, encode_u64(0))
        assert parser.bytes_wanted() == HEADER.size
        parser.feed(data[: HEADER.size], [r])
        assert parser.bytes_wanted() == 8
        parser.feed(data[HEADER.size :])
        msg = parser.next_message()
        assert msg is not None and msg.fds == [r]
        assert msg.take_fds() == [r] and msg.fds == []
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("size", [MAX_PAYLOAD + 1, 1 << 20, 0xFFFF_FFFF])
def test_parser_refuses_oversized_payloads(size: int) -> None:
    parser = MessageParser()
    r, w = os.pipe()
    os.close(w)
    big = HEADER.pack(FrontendReq.SET_CONFIG, 1, size)
    with pytest.raises(MessageTooLarge, match=f"announces a {size}-byte payload"):
        parser.feed(big, [r])
    with pytest.raises(OSError):
        os.fstat(r)  # the oversized message's fd was closed
    assert parser.bytes_wanted() <= MAX_PAYLOAD  # a reader never asks for the announced size
    r, w = os.pipe()
    os.close(w)
    # Nothing after it is taken: the stream is out of step for good. Fds still get closed.
    with pytest.raises(MessageTooLarge):
        parser.feed(encode_message(FrontendReq.SET_OWNER), [r])
    with pytest.raises(OSError):
        os.fstat(r)
    assert parser.next_message() is None


def test_parser_never_wants_more_than_a_message() -> None:
    parser = MessageParser()
    parser.feed(HEADER.pack(FrontendReq.SET_CONFIG, 1, MAX_PAYLOAD))
    assert parser.bytes_wanted() == MAX_PAYLOAD
    parser.feed(bytes(MAX_PAYLOAD))
    msg = parser.next_message()
    assert msg is not None and len(msg.payload) == MAX_PAYLOAD


def test_parser_close_closes_pending_fds() -> None:
    parser = MessageParser()
    r, w = os.pipe()
    os.close(w)
    parser.feed(encode_message(FrontendReq.SET_VRING_CALL, encode_u64(0))[:4], [r])
    assert not parser.idle
    parser.close()
    with pytest.raises(OSError):
        os.fstat(r)


def test_live_migration_payloads() -> None:
    assert FrontendReq.SET_LOG_BASE == 6
    assert FrontendReq.SET_DEVICE_STATE_FD == 42 and FrontendReq.CHECK_DEVICE_STATE == 43
    assert ProtocolFeature.LOG_SHMFD == 1 and ProtocolFeature.DEVICE_STATE == 19
    log = LogDescription(0x4000, 0)
    assert log.encode() == struct.pack("=QQ", 0x4000, 0)
    assert LogDescription.decode(log.encode()) == log
    with pytest.raises(MessageError):
        LogDescription.decode(bytes(8))
    state = DeviceStateRequest(DEVICE_STATE_LOAD, 0)
    assert state.encode() == struct.pack("=II", 1, 0)
    assert DeviceStateRequest.decode(state.encode()) == state
    assert DEVICE_STATE_SAVE == 0 and DEVICE_STATE_NO_FD == 0x100
    # Both have a u64 reply of their own, whatever happens.
    assert {FrontendReq.SET_DEVICE_STATE_FD, FrontendReq.CHECK_DEVICE_STATE} <= OWN_REPLY
