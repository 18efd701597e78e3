"""The vhost-user codec's socket side over real socket pairs: fds stay with their message,
oversized and half-sent messages leak nothing, waits end by deadline or shutdown, and the
socket's flags are never changed."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from pyvirtiofsd.vhost_user.messages import (
    HEADER,
    MAX_FDS,
    MAX_PAYLOAD,
    FrontendReq,
    MessageTooLarge,
    encode_message,
    encode_reply,
    encode_u64,
)
from pyvirtiofsd.vhost_user.wire import (
    ClosedMidMessage,
    deadline_after,
    recv_message,
    send_with_fds,
)


@pytest.fixture
def eventfds() -> Iterator[list[int]]:
    """Three fds to send, closed after the test."""
    fds = [os.eventfd(0) for _ in range(3)]
    yield fds
    for fd in fds:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_a_message_and_its_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    fd = os.eventfd(0)
    try:
        send_with_fds(a, encode_message(FrontendReq.SET_VRING_KICK, encode_u64(1)), [fd])
        msg = recv_message(b, deadline=deadline_after(10))
        assert msg is not None
        assert (msg.request, msg.payload) == (FrontendReq.SET_VRING_KICK, encode_u64(1))
        (got,) = msg.take_fds()
        try:
            assert same_file(got, fd)
            assert fcntl.fcntl(got, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            os.close(got)
    finally:
        os.close(fd)


def test_each_message_keeps_its_own_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    first, second = os.eventfd(0), os.eventfd(0)
    try:
        # Both are queued before anything is read: the reads must stop at the boundary.
        send_with_fds(a, encode_message(1, b"one"), [first])
        send_with_fds(a, encode_message(2, b"two"), [second])
        send_with_fds(a, encode_message(3))
        messages = [recv_message(b, deadline=deadline_after(10)) for _ in range(3)]
        assert [(m.request, m.payload, len(m.fds)) for m in messages if m] == [
            (1, b"one", 1),
            (2, b"two", 1),
            (3, b"", 0),
        ]
        for m, fd in zip(messages, (first, second), strict=False):
            assert m is not None and same_file(m.fds[0], fd)
            m.close_fds()
    finally:
        os.close(first)
        os.close(second)


def test_a_message_sent_in_pieces(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = encode_reply(7, b"x" * 100)
    for start in range(0, len(data), 5):
        send_with_fds(a, data[start : start + 5])
    msg = recv_message(b, deadline=deadline_after(10))
    assert msg is not None and msg.is_reply and msg.payload == b"x" * 100


def test_peer_gone_between_messages(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert recv_message(b, deadline=deadline_after(10)) is None


@pytest.mark.parametrize("sent", [5, HEADER.size + 3], ids=["in-header", "in-payload"])
def test_peer_gone_mid_message_leaks_no_fd(
    pair: tuple[socket.socket, socket.socket], eventfds: list[int], sent: int
) -> None:
    a, b = pair
    baseline = open_fds()
    send_with_fds(a, encode_message(FrontendReq.SET_CONFIG, bytes(16))[:sent], eventfds)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ClosedMidMessage):
        recv_message(b, deadline=deadline_after(10))
    assert open_fds() == baseline


def test_oversized_header_is_refused_before_its_payload(
    pair: tuple[socket.socket, socket.socket], eventfds: list[int]
) -> None:
    a, b = pair
    baseline = open_fds()
    send_with_fds(a, HEADER.pack(FrontendReq.SET_CONFIG, 1, MAX_PAYLOAD + 1), eventfds)
    with pytest.raises(MessageTooLarge, match=f"announces a {MAX_PAYLOAD + 1}-byte payload"):
        recv_message(b, deadline=deadline_after(10))
    assert open_fds() == baseline


def test_more_fds_than_a_message_takes(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    fds = [os.eventfd(0) for _ in range(MAX_FDS + 8)]
    try:
        with caplog.at_level(logging.WARNING):
            send_with_fds(a, encode_message(FrontendReq.SET_MEM_TABLE), fds)
            msg = recv_message(b, deadline=deadline_after(10))
        assert msg is not None and len(msg.fds) == MAX_FDS
        msg.close_fds()
        assert "extra fds dropped" in caplog.text
    finally:
        for fd in fds:
            os.close(fd)


def test_fds_need_a_byte(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(ValueError):
        send_with_fds(pair[0], b"", [0])


def test_timeouts_leave_the_flags_alone(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    # Our own fd for the peer's open file description, as one that came by SCM_RIGHTS.
    theirs = socket.socket(fileno=os.dup(b.fileno()))
    try:
        with pytest.raises(TimeoutError):
            recv_message(theirs, deadline=deadline_after(0.05))
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with pytest.raises(TimeoutError):  # nobody reads: the send buffer fills up
            send_with_fds(theirs, bytes(4 << 20), deadline=deadline_after(0.05))
        assert not fcntl.fcntl(b, fcntl.F_GETFL) & os.O_NONBLOCK
        assert b.gettimeout() is None
    finally:
        theirs.close()


def test_shutdown_ends_a_wait(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    results: list[object] = []
    reader = threading.Thread(target=lambda: results.append(recv_message(b)))
    reader.start()
    b.shutdown(socket.SHUT_RDWR)
    reader.join(10)
    assert not reader.is_alive() and results == [None]
