"""Per-ring state shared by the vhost-user state machine and the queue worker.

The state machine (on the connection thread) owns everything here and changes it only
while the ring's worker is stopped, with two exceptions that the worker must tolerate at
any time: ``enabled`` (a plain flag the worker re-reads) and the call/err eventfds, which
are swapped under ``lock`` because QEMU replaces the call fd of a running ring whenever the
guest masks or unmasks its interrupt vector.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading

from pyvirtiofsd.vhost_user.messages import VringAddr
from pyvirtiofsd.virtio.queue import SplitQueue

__all__ = ["Vring", "check_notifier_fd"]

log = logging.getLogger(__name__)


def check_notifier_fd(fd: int) -> None:
    """Accept only eventfds and pipes as kick/call/err notifiers, and make them non-blocking.

    Any other file type could make a worker spin (a regular file is always readable) or
    block for ever (a socket nobody reads). QEMU creates its notifiers non-blocking
    already, so setting O_NONBLOCK on the shared file description changes nothing for it.
    """
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target != "anon_inode:[eventfd]":
            raise ValueError(f"fd {fd} is neither an eventfd nor a pipe ({target or 'unknown'})")
    os.set_blocking(fd, False)


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


_ONE = (1).to_bytes(8, "little")


class Vring:
    """One virtqueue as the front-end configured it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.Lock()
        self.size = 0
        self.addr: VringAddr | None = None
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.started = False
        self.queue: SplitQueue | None = None
        self.broken = False

    def set_kick_fd(self, fd: int | None) -> None:
        old, self.kick_fd = self.kick_fd, fd
        _close(old)

    def set_call_fd(self, fd: int | None) -> None:
        with self.lock:
            old, self.call_fd = self.call_fd, fd
        _close(old)

    def set_err_fd(self, fd: int | None) -> None:
        with self.lock:
            old, self.err_fd = self.err_fd, fd
        _close(old)

    def signal_call(self) -> None:
        """Interrupt the driver (used buffers are ready)."""
        with self.lock:
            self.signal_call_locked()

    def signal_call_locked(self) -> None:
        """:meth:`signal_call` for a caller that already holds ``lock``."""
        fd = self.call_fd
        if fd is None:
            return
        try:
            os.write(fd, _ONE)
        except OSError as e:
            # EAGAIN: the counter is saturated, so the driver has a wake-up pending.
            if e.errno != errno.EAGAIN:
                log.warning("vring %d: call fd write failed: %s", self.index, e)

    def signal_err(self) -> None:
        with self.lock:
            fd = self.err_fd
            if fd is None:
                return
            try:
                os.write(fd, _ONE)
            except OSError:
                pass

    def close_fds(self) -> None:
        self.set_kick_fd(None)
        self.set_call_fd(None)
        self.set_err_fd(None)

    def reset(self) -> None:
        """Back to the initial state (the worker must be stopped)."""
        self.close_fds()
        self.size = 0
        self.addr = None
        self.base = 0
        self.enabled = False
        self.started = False
        self.queue = None
        self.broken = False

    def __repr__(self) -> str:
        state = "started" if self.started else "stopped"
        return f"Vring({self.index}, size={self.size}, {state}, enabled={self.enabled})"
