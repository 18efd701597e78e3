"""The socket edge of the vhost-user back-end.

:class:`Listener` is the listening socket, with one owner: the socket is made in
:meth:`Listener.bind` (on a path we create) or wrapped by :meth:`Listener.inherit` (an
already-listening fd inherited from libvirt), and its file is removed only by
:meth:`Listener.close`, called by whoever made it; an inherited socket's file is never ours to
remove. The loop that serves a front-end takes a Listener and never creates a socket.

One front-end at a time: by default :meth:`Listener.accept` stops listening once one came, so a
second is refused at connect. A daemon that serves one front-end after another
(``--keep-listening``) keeps the same socket listening for as long as it runs (never unlinked
or bound again, so no front-end ever finds the path missing or another socket there); while
one front-end is served, another that connects is accepted and closed at once
(:meth:`Listener.refuse_waiting`), so that it fails at its first message instead of hanging in
the backlog.

:class:`Connection` is the receive loop: each message read with its fds
(:func:`~.wire.recv_message`), put through the state machine, its reply sent back
(:func:`~.wire.send_with_fds`). The loop returns when the front-end disconnects; the daemon
then exits, as virtiofsd does, or waits for the next front-end. It also returns, after a log
line, when the front-end sends something that can't be a vhost-user message (a header
announcing a payload larger than any message has): nothing after it can be read in step.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import select
import socket
import stat
import threading
from typing import Protocol

from pyvirtiofsd.vhost_user.messages import Message, MessageTooLarge
from pyvirtiofsd.vhost_user.wire import ClosedMidMessage, recv_message, send_with_fds

__all__ = [
    "Connection",
    "Listener",
    "MessageHandler",
]

log = logging.getLogger(__name__)


class MessageHandler(Protocol):
    def handle(self, msg: Message) -> bytes | None: ...


class Listener:
    """The listening socket a front-end connects to, and its one owner.

    :meth:`bind` makes the socket at a path (replacing a stale socket file there, never
    anything else); :meth:`inherit` wraps a listening socket handed down to us (libvirt's
    ``--fd``), after checking it is one. :meth:`accept` takes the one front-end a device serves
    and stops listening, so that a second one is refused rather than left in the backlog; or,
    asked to keep listening, leaves the socket as it is for the next front-end.
    :meth:`shutdown` wakes a thread blocked in :meth:`accept`; it takes no lock, so a signal
    handler may call it. :meth:`close` stops listening and removes the socket file, if we made
    it and it is still ours: through a descriptor of its directory taken at :meth:`bind`, which
    stays valid after the process changed its root (the sandbox).
    """

    def __init__(self, sock: socket.socket, where: str, dir_fd: int = -1, name: str = "") -> None:
        self.sock: socket.socket | None = sock
        #: The path, or "fd N": for log lines.
        self.where = where
        self._dir_fd = dir_fd
        self._name = name
        self._ident: tuple[int, int] | None = None
        self._lock = threading.Lock()  # close() may race the exit deadline's

    @classmethod
    def bind(cls, path: str, group: str | None = None, *, backlog: int = 1) -> Listener:
        """Listen at ``path`` (a new socket file; a stale socket there is replaced), owned by
        ``group`` and open to it (mode 0660) when given."""
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_PATH | os.O_CLOEXEC)
        name = os.path.basename(path)
        try:
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise FileExistsError(f"{path} exists and is not a socket")
                os.unlink(name, dir_fd=dir_fd)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except BaseException:
            os.close(dir_fd)
            raise
        listener = cls(sock, path, dir_fd, name)
        try:
            sock.bind(path)
            st = os.lstat(name, dir_fd=dir_fd)
            listener._ident = (st.st_dev, st.st_ino)
            sock.listen(backlog)
            if group is not None:
                try:
                    gid = grp.getgrnam(group).gr_gid
                except KeyError:
                    raise ValueError(f"no group named {group!r}") from None
                os.chown(path, -1, gid)
                os.chmod(path, 0o660)
        except BaseException:
            listener.close()
            raise
        return listener

    @classmethod
    def inherit(cls, fd: int) -> Listener:
        """Wrap ``fd``, a listening Unix stream socket made by our caller; it is closed once a
        front-end connected (or at :meth:`close`), and its file is left alone. ValueError, and
        ``fd`` left to the caller, if it is anything else."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ValueError(f"the vhost-user fd {fd} is not a socket: {e}") from None
        try:
            family, kind = sock.family, sock.type
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as e:
            sock.detach()
            raise ValueError(f"the vhost-user fd is not a socket: {e}") from None
        if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
            sock.detach()
            raise ValueError("the vhost-user socket must be a Unix stream socket")
        if not listening:
            sock.detach()
            raise ValueError("the vhost-user socket is not listening")
        return cls(sock, f"fd {fd}")

    def accept(self, *, keep_listening: bool = False) -> socket.socket:
        """Wait for the front-end, then stop listening (whether it came or the wait failed),
        unless ``keep_listening``: the socket then stays as it is, for the next front-end."""
        sock = self.sock
        if sock is None:
            raise OSError(errno.EBADF, "the listener is closed")
        try:
            conn, _ = sock.accept()
        finally:
            if not keep_listening:
                self._stop_listening()
        conn.setblocking(True)
        return conn

    def refuse_waiting(self) -> bool:
        """Take a front-end that connected while another is served and close its connection
        at once. Call it when the socket polls readable; False when there was none to take,
        because the socket is shut down or closed (it then stays readable: stop watching it)."""
        sock = self.sock
        if sock is None:
            return False
        try:
            # poll() said one is waiting, and no other thread accepts while a front-end is
            # served, so this does not block (the socket's own flags stay untouched).
            conn, _ = sock.accept()
        except OSError:
            return False
        conn.close()
        log.warning(
            "vhost-user: another front-end connected on %s while one is being served; "
            "closed its connection (one front-end at a time)",
            self.where,
        )
        return True

    def shutdown(self) -> None:
        """Make a blocked :meth:`accept` fail (from another thread or a signal handler)."""
        sock = self.sock
        if sock is not None:
            # shutdown() wakes a thread blocked in accept() (it fails with EINVAL).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop listening and remove the socket file if we made it; idempotent."""
        with self._lock:
            self._stop_listening()
            if self._dir_fd < 0:
                return
            try:
                st = os.lstat(self._name, dir_fd=self._dir_fd)
                # Only our own socket: another may have been bound at the path since.
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self._name, dir_fd=self._dir_fd)
            except OSError:
                pass
            os.close(self._dir_fd)
            self._dir_fd = -1

    def _stop_listening(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Connection:
    """Drives one front-end connection until it closes.

    With ``refuse``, the listener that stays listening while this front-end is served, the loop
    also watches it and closes every connection that arrives there meanwhile
    (:meth:`Listener.refuse_waiting`). The front-end's own socket is looked at first: a
    front-end that hung up and came back (a VMM reconnecting after a guest reboot) is never
    the one refused, as its hang-up is already readable when its new connection arrives; the
    new connection waits in the backlog for the next accept.
    """

    def __init__(
        self, sock: socket.socket, handler: MessageHandler, *, refuse: Listener | None = None
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.refuse = refuse

    def _watch(self) -> select.poll | None:
        listener = self.refuse
        if listener is None or listener.sock is None:
            return None
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(listener.sock, select.POLLIN)
        return poller

    def run(self) -> None:
        """Serve requests until the front-end disconnects (or :meth:`shutdown`)."""
        poller = self._watch()
        own = self.sock.fileno()
        while True:
            if poller is not None:
                ready = [fd for fd, _ in poller.poll()]
                if own not in ready:
                    assert self.refuse is not None
                    if not self.refuse.refuse_waiting():
                        poller = None  # shut down or closed: we are stopping
                    continue
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
