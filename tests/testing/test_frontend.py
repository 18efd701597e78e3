"""The test front-end itself, against a scripted peer on a socket pair (no daemon): guest RAM
layout, requests and their replies, the ways an answer can fail, and the back-end channel
served through the hook."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from pyvirtiofsd.testing.frontend import Frontend, FrontendError, GuestRam
from pyvirtiofsd.vhost_user.channel import BackendChannel
from pyvirtiofsd.vhost_user.messages import (
    BackendReq,
    FrontendReq,
    Message,
    MMapRequest,
    ProtocolFeature,
    encode_reply,
    encode_u64,
    protocol_mask,
)
from pyvirtiofsd.vhost_user.wire import deadline_after, recv_message, send_with_fds


@pytest.fixture
def peer() -> Iterator[tuple[Frontend, socket.socket]]:
    """(front-end, the daemon's end of its socket); the test plays the daemon."""
    ours, daemon_end = socket.socketpair()
    fe = Frontend(ours, timeout=10)
    try:
        yield fe, daemon_end
    finally:
        fe.close()
        daemon_end.close()


def expect(sock: socket.socket, request: int) -> Message:
    msg = recv_message(sock, deadline=deadline_after(10))
    assert msg is not None and msg.request == request
    return msg


def test_guest_ram_regions() -> None:
    ram = GuestRam(4 << 20, regions=2, gap=1 << 20)
    try:
        first, second = ram.regions
        assert second.guest_addr == first.guest_addr + first.size + (1 << 20)
        # Front-end addresses differ from guest-physical ones, and not by one constant.
        assert ram.user_addr(first.guest_addr) != first.guest_addr
        assert (ram.user_addr(second.guest_addr) - second.guest_addr) != (
            ram.user_addr(first.guest_addr) - first.guest_addr
        )
        ram.write(second.guest_addr + 8, b"hello")
        assert ram.read(second.guest_addr + 8, 5) == b"hello"
        with pytest.raises(ValueError):
            ram.view(first.guest_addr + first.size - 4, 8)  # runs into the gap
        addr = ram.carve(first.size // 2 + 4096)
        assert ram.carve(first.size // 2 + 4096) >= second.guest_addr  # did not fit in region 0
        assert addr < second.guest_addr
    finally:
        ram.close()


def test_a_request_and_its_reply(peer: tuple[Frontend, socket.socket]) -> None:
    fe, daemon = peer
    send_with_fds(daemon, encode_reply(FrontendReq.GET_QUEUE_NUM, encode_u64(3)))
    assert fe.get_queue_num() == 3
    expect(daemon, FrontendReq.GET_QUEUE_NUM)


def test_reply_ack_status(peer: tuple[Frontend, socket.socket]) -> None:
    fe, daemon = peer
    fe.protocol_features = protocol_mask(ProtocolFeature.REPLY_ACK)
    send_with_fds(daemon, encode_reply(FrontendReq.SET_STATUS, encode_u64(1)))
    with pytest.raises(FrontendError, match="SET_STATUS failed"):
        fe.set_status(0xF)
    assert expect(daemon, FrontendReq.SET_STATUS).need_reply


def test_wrong_answers(peer: tuple[Frontend, socket.socket]) -> None:
    fe, daemon = peer
    send_with_fds(daemon, encode_reply(FrontendReq.GET_FEATURES, encode_u64(0)))
    with pytest.raises(FrontendError, match="came as request"):
        fe.get_queue_num()
    fe.timeout = 0.05
    with pytest.raises(FrontendError, match="did not answer"):
        fe.get_queue_num()
    daemon.shutdown(socket.SHUT_WR)
    with pytest.raises(FrontendError, match="closed the connection"):
        fe.get_queue_num()


@pytest.mark.parametrize("reply_ack", [True, False], ids=["reply_ack", "no_reply_ack"])
def test_backend_channel_through_the_hook(
    peer: tuple[Frontend, socket.socket], reply_ack: bool
) -> None:
    fe, daemon = peer
    seen: list[Message] = []  # the hook owns their fds: closed at the end

    def hook(msg: Message) -> int:
        seen.append(msg)
        return 7

    fe.open_backend_channel(hook)
    (channel_fd,) = expect(daemon, FrontendReq.SET_BACKEND_REQ_FD).take_fds()
    channel = BackendChannel(socket.socket(fileno=channel_fd), reply_ack=reply_ack, send_fds=True)
    mapped = os.eventfd(0)
    try:
        assert channel.shmem_map(0, mapped, 0, 4096, 8192, True) == (7 if reply_ack else 0)
        assert channel.shmem_unmap(0, 4096, 8192) == (7 if reply_ack else 0)
    finally:
        channel.close()
        os.close(mapped)
    # Without replies nothing says the hook has run yet: the thread serving the channel ends
    # once it has read everything up to the close.
    assert fe._channel_thread is not None
    fe._channel_thread.join(10)
    assert not fe._channel_thread.is_alive()
    got = [(m.request, MMapRequest.decode(m.payload), len(m.fds)) for m in seen]
    for m in seen:
        m.close_fds()
    assert got == [
        (BackendReq.SHMEM_MAP, MMapRequest(0, 0, 4096, 8192, MMapRequest.WRITABLE), 1),
        (BackendReq.SHMEM_UNMAP, MMapRequest(0, 0, 4096, 8192, 0), 0),
    ]
    assert [m.request for m in fe.backend_requests] == [
        BackendReq.SHMEM_MAP,
        BackendReq.SHMEM_UNMAP,
    ]
