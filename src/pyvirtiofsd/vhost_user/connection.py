"""The socket edge of the vhost-user back-end.

Listening (on a path we create, or on an already-listening fd inherited from libvirt),
accepting the one front-end, and the receive loop: ``recvmsg`` with SCM_RIGHTS into a
:class:`~.messages.MessageParser`, each message through the state machine, each reply
out with ``sendall``. The loop returns when the front-end disconnects; the daemon then
exits, as virtiofsd does. It also returns, after a log line, when the front-end sends
something that can't be a vhost-user message (a header announcing a payload larger than any
message has): nothing after it can be read in step.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import stat
from typing import Protocol

from pyvirtiofsd.vhost_user.messages import MAX_FDS, Message, MessageParser, MessageTooLarge

__all__ = [
    "Connection",
    "MessageHandler",
    "accept_frontend",
    "check_listener",
    "listen_unix",
    "recv_with_fds",
]

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize


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


def recv_with_fds(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` of up to ``size`` bytes and the fds that came with them."""
    data, ancdata, msg_flags, _ = sock.recvmsg(
        size, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if msg_flags & socket.MSG_CTRUNC:
        # The kernel closed the fds that did not fit; the message they belong to will be
        # refused for missing fds.
        log.warning("vhost-user: more than %d fds in one message; extra fds dropped", MAX_FDS)
    return data, fds


class Connection:
    """Drives one front-end connection until it closes."""

    def __init__(self, sock: socket.socket, handler: MessageHandler) -> None:
        self.sock = sock
        self.handler = handler
        self.parser = MessageParser()

    def run(self) -> None:
        """Serve requests until the front-end disconnects (or :meth:`shutdown`)."""
        parser = self.parser
        try:
            while True:
                try:
                    data, fds = recv_with_fds(self.sock, parser.bytes_wanted())
                except (ConnectionResetError, OSError) as e:
                    log.info("vhost-user: connection error: %s", e)
                    return
                if not data:
                    for fd in fds:
                        os.close(fd)
                    if not parser.idle:
                        log.warning("vhost-user: front-end closed mid-message")
                    log.info("vhost-user: front-end disconnected")
                    return
                try:
                    parser.feed(data, fds)
                except MessageTooLarge as e:
                    log.error("vhost-user: %s; closing the connection", e)
                    return
                while (msg := parser.next_message()) is not None:
                    reply = self.handler.handle(msg)
                    if reply is not None:
                        try:
                            self.sock.sendall(reply)
                        except OSError as e:
                            log.info("vhost-user: reply failed, front-end gone: %s", e)
                            return
        finally:
            parser.close()

    def shutdown(self) -> None:
        """Make :meth:`run` return (from another thread)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
