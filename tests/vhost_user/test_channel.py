"""The back-end channel over a real socket pair: it leaves the flags of the socket the front-end
gave it alone, times out through poll(), and closing it ends a request waiting for a reply."""

from __future__ import annotations

import fcntl
import os
import socket
import threading

import pytest

from pyvirtiofsd.vhost_user.channel import BackendChannel, BackendChannelError
from pyvirtiofsd.vhost_user.messages import (
    HEADER,
    VHOST_USER_FLAG_REPLY,
    VHOST_USER_VERSION,
    encode_u64,
)


def channel_on(backend: socket.socket, timeout: float | None) -> BackendChannel:
    # The channel gets its own fd for the same open file description, as from SCM_RIGHTS;
    # ``pair`` keeps the back-end end open, as a front-end that kept a copy would hold it.
    return BackendChannel(
        socket.socket(fileno=os.dup(backend.fileno())),
        reply_ack=True,
        send_fds=True,
        timeout=timeout,
    )


def answer(frontend: socket.socket, status: int) -> None:
    header = frontend.recv(HEADER.size, socket.MSG_WAITALL)
    request, _, size = HEADER.unpack(header)
    if size:
        frontend.recv(size, socket.MSG_WAITALL)
    reply = HEADER.pack(request, VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY, 8)
    frontend.sendall(reply + encode_u64(status))


def test_flags_are_left_alone(pair: tuple[socket.socket, socket.socket]) -> None:
    frontend, backend = pair
    channel = channel_on(backend, timeout=30)
    try:
        helper = threading.Thread(target=answer, args=(frontend, 7))
        helper.start()
        assert channel.shmem_unmap(0, 0, 4096) == 7
        helper.join()
        assert not fcntl.fcntl(backend, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        channel.close()


def test_unanswered_request_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    _, backend = pair
    channel = channel_on(backend, timeout=0.1)
    with pytest.raises(BackendChannelError, match="did not answer"):
        channel.shmem_unmap(0, 0, 4096)
    assert channel.closed
    assert not fcntl.fcntl(backend, fcntl.F_GETFL) & os.O_NONBLOCK


def test_close_ends_a_waiting_request(pair: tuple[socket.socket, socket.socket]) -> None:
    frontend, backend = pair
    channel = channel_on(backend, timeout=None)
    errors: list[BaseException] = []

    def request() -> None:
        try:
            channel.shmem_unmap(0, 0, 4096)
        except BaseException as e:
            errors.append(e)

    waiting = threading.Thread(target=request)
    waiting.start()
    frontend.recv(HEADER.size + 40, socket.MSG_WAITALL)  # the request is out: it now waits
    closer = threading.Thread(target=channel.close)
    closer.start()
    closer.join(10)
    waiting.join(10)
    assert not closer.is_alive() and not waiting.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], BackendChannelError)
