"""Vhost-user messages over a Unix stream socket, with their file descriptors.

:mod:`.messages` encodes and parses messages without I/O; this module moves them, and is the
only code that does. The back-end's connection, the back-end channel and the test front-end
all send and receive through it, so these rules hold for each of them:

* A message's fds go as SCM_RIGHTS with its first byte (:func:`send_with_fds`). The kernel
  delivers them with that byte, and :func:`recv_message` never reads past the message it is
  reading (it asks its :class:`~.messages.MessageParser` how much to read), so each message
  keeps its own fds.
* One read takes at most :data:`~.messages.MAX_FDS` fds, close-on-exec. If the sender attached
  more, the kernel closes the rest (MSG_CTRUNC) and a warning says so; whoever handles the
  message then refuses it for a missing fd.
* A header announcing a payload larger than :data:`~.messages.MAX_PAYLOAD` raises
  :class:`~.messages.MessageTooLarge` before anything is allocated for it, and the fds that
  came with it are closed. The stream is out of step from there on: the caller hangs up.
* The fds of a message :func:`recv_message` returns are the caller's (see
  :meth:`~.messages.Message.take_fds` and :meth:`~.messages.Message.close_fds`); the fds of a
  message it does not complete (an error, the peer gone half way) are closed here.
* The socket's open file description may be the peer's (the back-end channel came from the
  front-end), so its flags are never changed: each call is non-blocking on its own
  (MSG_DONTWAIT) and waits in poll(). ``deadline`` is a :func:`time.monotonic` time past
  which a call raises TimeoutError (None: wait as long as it takes). Shutting the socket down
  from another thread ends a wait at once.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import time
from collections.abc import Sequence

from pyvirtiofsd.vhost_user.messages import MAX_FDS, MAX_PAYLOAD, Message, MessageParser

__all__ = [
    "ClosedMidMessage",
    "deadline_after",
    "recv_message",
    "recv_with_fds",
    "send_with_fds",
]

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)


class ClosedMidMessage(ConnectionError):
    """The peer closed the connection with a message half sent."""


def deadline_after(timeout: float | None) -> float | None:
    """The deadline ``timeout`` seconds from now (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


def _wait(sock: socket.socket, events: int, deadline: float | None) -> None:
    """Wait until ``sock`` is ready for ``events``; TimeoutError past ``deadline``."""
    poller = select.poll()
    poller.register(sock, events)
    while True:
        if deadline is None:
            ready = poller.poll()
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the peer did not answer in time")
            ready = poller.poll(max(1, int(remaining * 1000)))
        if ready:
            return


def send_with_fds(
    sock: socket.socket, data: bytes, fds: Sequence[int] = (), *, deadline: float | None = None
) -> None:
    """Send all of ``data`` (one or more encoded messages), ``fds`` with its first byte."""
    if fds and not data:
        raise ValueError("fds need at least one byte to travel with")
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    view = memoryview(data)
    while view:
        try:
            sent = sock.sendmsg([view], ancillary, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            _wait(sock, select.POLLOUT, deadline)
            continue
        ancillary = []  # the fds went with the first byte
        view = view[sent:]


def recv_with_fds(
    sock: socket.socket, size: int, *, deadline: float | None = None
) -> tuple[bytes, list[int]]:
    """One read of up to ``size`` bytes and the fds that came with them (b"": the peer closed
    the connection)."""
    while True:
        try:
            data, ancdata, msg_flags, _ = sock.recvmsg(
                size, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
            break
        except BlockingIOError:
            _wait(sock, select.POLLIN, deadline)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if msg_flags & socket.MSG_CTRUNC:
        log.warning("vhost-user: more than %d fds in one message; extra fds dropped", MAX_FDS)
    return data, fds


def recv_message(
    sock: socket.socket, *, deadline: float | None = None, max_payload: int = MAX_PAYLOAD
) -> Message | None:
    """Read exactly one message and its fds; None if the peer closed the connection before it.

    Raises :class:`ClosedMidMessage` if the peer closed it half way through a message,
    :class:`~.messages.MessageTooLarge` for a header announcing more than ``max_payload``
    bytes, TimeoutError past ``deadline``.
    """
    parser = MessageParser(max_payload)
    try:
        while True:
            data, fds = recv_with_fds(sock, parser.bytes_wanted(), deadline=deadline)
            if not data:
                for fd in fds:
                    os.close(fd)
                if parser.idle:
                    return None
                raise ClosedMidMessage("the peer closed the connection in the middle of a message")
            parser.feed(data, fds)
            msg = parser.next_message()
            if msg is not None:
                return msg
    finally:
        parser.close()  # the fds of a message not completed
