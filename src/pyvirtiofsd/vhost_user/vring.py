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
import select
import stat
from typing import Final

from pyvirtiofsd.mutex import Mutex, new_mutex
from pyvirtiofsd.vhost_user.messages import VringAddr
from pyvirtiofsd.virtio.queue import SplitQueue

__all__ = ["Vring", "check_notifier_fd", "consume", "notify"]

log = logging.getLogger(__name__)

_ONE: Final = (1).to_bytes(8, "little")
#: Bound Final, so that a compiled build reads them as C variables rather than as attributes
#: of the os module at each interrupt and kick.
_write: Final = os.write
_preadv: Final = os.preadv
_RWF_NOWAIT: Final = os.RWF_NOWAIT


def check_notifier_fd(fd: int) -> None:
    """Accept only eventfds and pipes as kick/call/err notifiers.

    Any other file type could make a worker spin (a regular file is always readable) or
    block for ever (a socket nobody reads). The fd's flags are left alone: its open file
    description is the front-end's too, and O_NONBLOCK set on it would make the front-end's
    own blocking reads fail with EAGAIN. So reads here never rely on it (:func:`consume`),
    and writes rely on it only where the front-end set it itself (:func:`notify`).
    """
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target != "anon_inode:[eventfd]":
            raise ValueError(f"fd {fd} is neither an eventfd nor a pipe ({target or 'unknown'})")


def consume(fd: int, scratch: bytearray) -> bool:
    """Take a notification from ``fd`` (poll() said it is readable) without blocking, whatever
    its flags: a read with RWF_NOWAIT, which finds nothing (EAGAIN) rather than waiting if
    another reader of the shared description got there first. Returns False when the kernel
    can't read ``fd`` that way (too old); the caller then reads it plainly, and must be able to
    wake itself by notifying ``fd`` should it wait there."""
    try:
        _preadv(fd, [scratch], -1, _RWF_NOWAIT)
    except BlockingIOError:
        pass
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    return True


def notify(fd: int, poller: select.poll | None) -> None:
    """Add one to the eventfd (or 8 bytes to the pipe) ``fd`` unless that would block: a write
    blocks only when the counter is saturated or the pipe full, and the driver then has a
    notification pending anyway. An eventfd can't be written with RWF_NOWAIT and its flags are
    not ours to change, so a blocking ``fd`` is registered in ``poller`` for POLLOUT and polled
    first. ``poller`` None says the front-end made ``fd`` non-blocking itself, as QEMU makes
    every eventfd: the write alone then fails (EAGAIN) where it would block, a system call
    fewer per interrupt."""
    if poller is None or poller.poll(0):
        _write(fd, _ONE)


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _writable_poller(fd: int | None) -> select.poll | None:
    """What :func:`notify` needs to write ``fd`` without blocking: None for a descriptor the
    front-end made non-blocking. Its flags are looked at once, here: a front-end that cleared
    O_NONBLOCK later could make a write wait, once it had saturated the counter itself, until
    it reads the counter again; its own notifier, its own stall."""
    if fd is not None and not os.get_blocking(fd):
        return None
    poller = select.poll()
    if fd is not None:
        poller.register(fd, select.POLLOUT)
    return poller


class Vring:
    """One virtqueue as the front-end configured it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock: Mutex = new_mutex()
        self.size = 0
        self.addr: VringAddr | None = None
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self._call_poll: select.poll | None = select.poll()
        self._err_poll: select.poll | None = select.poll()
        self.enabled = False
        self.started = False
        self.queue: SplitQueue | None = None
        self.broken = False

    def set_kick_fd(self, fd: int | None) -> None:
        old, self.kick_fd = self.kick_fd, fd
        _close(old)

    def set_call_fd(self, fd: int | None) -> None:
        poller = _writable_poller(fd)
        with self.lock:
            old, self.call_fd, self._call_poll = self.call_fd, fd, poller
        _close(old)

    def set_err_fd(self, fd: int | None) -> None:
        poller = _writable_poller(fd)
        with self.lock:
            old, self.err_fd, self._err_poll = self.err_fd, fd, poller
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
            notify(fd, self._call_poll)
        except OSError as e:
            # EAGAIN: another writer filled it since the poll; a wake-up is pending.
            if e.errno != errno.EAGAIN:
                log.warning("vring %d: call fd write failed: %s", self.index, e)

    def signal_err(self) -> None:
        with self.lock:
            fd = self.err_fd
            if fd is None:
                return
            try:
                notify(fd, self._err_poll)
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
