"""The back-end's receive loop over a socket pair, with a recording handler in place of the
state machine: messages in order with their fds, replies out, and the ways the loop ends."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from pyvirtiofsd.vhost_user.connection import Connection
from pyvirtiofsd.vhost_user.messages import (
    HEADER,
    MAX_PAYLOAD,
    FrontendReq,
    Message,
    encode_message,
    encode_reply,
    encode_u64,
)
from pyvirtiofsd.vhost_user.wire import deadline_after, recv_message, send_with_fds


class Recorder:
    """Keeps (request, payload, fd count); answers GET_QUEUE_NUM with 4."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bytes, int]] = []

    def handle(self, msg: Message) -> bytes | None:
        self.seen.append((msg.request, msg.payload, len(msg.fds)))
        msg.close_fds()
        if msg.request == FrontendReq.GET_QUEUE_NUM:
            return encode_reply(msg.request, encode_u64(4))
        return None


class Running:
    def __init__(self) -> None:
        self.frontend, backend = socket.socketpair()
        self.handler = Recorder()
        self.connection = Connection(backend, self.handler)
        self.thread = threading.Thread(target=self.connection.run, daemon=True)
        self.thread.start()

    def ended(self) -> bool:
        self.thread.join(10)
        return not self.thread.is_alive()

    def close(self) -> None:
        self.connection.shutdown()
        self.thread.join(10)
        self.frontend.close()
        self.connection.sock.close()


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running()
    try:
        yield r
    finally:
        r.close()


def test_messages_in_order_with_their_fds(running: Running) -> None:
    fe = running.frontend
    fds = [os.eventfd(0), os.eventfd(0)]
    try:
        send_with_fds(fe, encode_message(FrontendReq.SET_OWNER))
        send_with_fds(fe, encode_message(FrontendReq.SET_MEM_TABLE, bytes(8)), fds)
        send_with_fds(fe, encode_message(FrontendReq.GET_QUEUE_NUM))
        reply = recv_message(fe, deadline=deadline_after(10))
    finally:
        for fd in fds:
            os.close(fd)
    assert reply is not None and reply.is_reply and reply.payload == encode_u64(4)
    assert running.handler.seen == [
        (FrontendReq.SET_OWNER, b"", 0),
        (FrontendReq.SET_MEM_TABLE, bytes(8), 2),
        (FrontendReq.GET_QUEUE_NUM, b"", 0),
    ]


def test_front_end_leaving_ends_the_loop(running: Running) -> None:
    running.frontend.shutdown(socket.SHUT_WR)
    assert running.ended()


def test_leaving_mid_message_is_logged(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        send_with_fds(running.frontend, encode_message(FrontendReq.SET_STATUS, bytes(8))[:15])
        running.frontend.shutdown(socket.SHUT_WR)
        assert running.ended()
    assert "front-end closed mid-message" in caplog.text
    assert running.handler.seen == []


def test_oversized_message_ends_the_loop(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        send_with_fds(running.frontend, HEADER.pack(FrontendReq.SET_CONFIG, 1, MAX_PAYLOAD + 1))
        assert running.ended()
    assert "closing the connection" in caplog.text
    assert running.handler.seen == []


def test_shutdown_ends_the_loop(running: Running) -> None:
    running.connection.shutdown()
    assert running.ended()
