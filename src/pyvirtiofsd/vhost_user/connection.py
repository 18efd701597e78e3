"""The socket edge of the vhost-user back-end.

Listening (on a path we create, or on an already-listening fd inherited from libvirt),
accepting the one front-end, and the receive loop: each message read with its fds
(:func:`~.wire.recv_message`), put through the state machine, its reply sent back
(:func:`~.wire.send_with_fds`). The loop returns when the front-end disconnects; the daemon
then exits, as virtiofsd does. It also returns, after a log line, when the front-end sends
something that can't be a vhost-user message (a header announcing a payload larger than any
message has): nothing after it can be read in step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from typing import Protocol

from pyvirtiofsd.vhost_user.messages import Message, MessageTooLarge
from pyvirtiofsd.vhost_user.wire import ClosedMidMessage, recv_message, send_with_fds

__all__ = [
    "Connection",
    "MessageHandler",
    "accept_frontend",
    "check_listener",
    "listen_unix",
]

log = logging.getLogger(__name__)


class MessageHandler(Protocol):
    def handle(self, msg: Message) -> bytes | None: ...


def listen_unix(path: str, backlog: int = 1) -> socket.socket:
    """Listen on a Unix socket at ``path``, replacing a stale socket file left there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def check_listener(listener: socket.socket) -> None:
    """Refuse anything but a listening Unix stream socket (an inherited fd may be anything)."""
    try:
        family, kind = listener.family, listener.type
        listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        raise ValueError(f"the vhost-user fd is not a socket: {e}") from None
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
        raise ValueError("the vhost-user socket must be a Unix stream socket")
    if not listening:
        raise ValueError("the vhost-user socket is not listening")


def accept_frontend(listener: socket.socket) -> socket.socket:
    """Wait for the front-end on a listening socket (ours, or inherited with ``--fd``)."""
    check_listener(listener)
    sock, _ = listener.accept()
    sock.setblocking(True)
    return sock


class Connection:
    """Drives one front-end connection until it closes."""

    def __init__(self, sock: socket.socket, handler: MessageHandler) -> None:
        self.sock = sock
        self.handler = handler

    def run(self) -> None:
        """Serve requests until the front-end disconnects (or :meth:`shutdown`)."""
        while True:
            try:
                msg = recv_message(self.sock)
            except MessageTooLarge as e:
                log.error("vhost-user: %s; closing the connection", e)
                return
            except ClosedMidMessage:
                log.warning("vhost-user: front-end closed mid-message")
                log.info("vhost-user: front-end disconnected")
                return
            except OSError as e:
                log.info("vhost-user: connection error: %s", e)
                return
            if msg is None:
                log.info("vhost-user: front-end disconnected")
                return
            reply = self.handler.handle(msg)
            if reply is not None:
                try:
                    send_with_fds(self.sock, reply)
                except OSError as e:
                    log.info("vhost-user: reply failed, front-end gone: %s", e)
                    return

    def shutdown(self) -> None:
        """Make :meth:`run` return (from another thread)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
