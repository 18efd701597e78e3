"""Per-ring state and its notifiers (:mod:`pyvirtiofsd.vhost_user.vring`): only eventfds and pipes
are taken as notifiers, reading and writing them never blocks whatever their flags (which are
the front-end's too and stay as they were), and a replaced or reset ring closes its fds."""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.vhost_user.vring import Vring, check_notifier_fd, consume, notify

#: The largest value an eventfd counter holds; one more write would block.
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE


def readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0)  # blocking, as the front-end's may be
    yield fd
    if is_open(fd):
        os.close(fd)


def test_notifiers_are_eventfds_or_pipes(eventfd: int, tmp_path: Path) -> None:
    check_notifier_fd(eventfd)
    r, w = os.pipe()
    check_notifier_fd(r)
    check_notifier_fd(w)
    os.close(r)
    os.close(w)
    f = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    null = os.open("/dev/null", os.O_RDWR)
    a, b = socket.socketpair()
    try:
        for fd in (f, null, a.fileno()):
            with pytest.raises(ValueError, match=f"fd {fd} is neither an eventfd nor a pipe"):
                check_notifier_fd(fd)
    finally:
        os.close(f)
        os.close(null)
        a.close()
        b.close()


def test_consume_takes_the_count_and_never_blocks(eventfd: int) -> None:
    os.eventfd_write(eventfd, 3)
    scratch = bytearray(8)
    if not consume(eventfd, scratch):
        pytest.skip("this kernel can't read an eventfd with RWF_NOWAIT")
    assert int.from_bytes(scratch, "little") == 3
    assert not readable(eventfd)
    # Nothing left (another reader of the description got there first): no wait.
    assert consume(eventfd, scratch)
    assert os.get_blocking(eventfd)  # its flags are the front-end's, untouched


def test_notify_adds_one_and_never_blocks(eventfd: int) -> None:
    poller = select.poll()
    poller.register(eventfd, select.POLLOUT)
    notify(eventfd, poller)
    notify(eventfd, poller)
    assert os.eventfd_read(eventfd) == 2
    # A saturated counter: the driver has a notification pending anyway, and a write would
    # block on this blocking fd.
    os.eventfd_write(eventfd, EVENTFD_MAX)
    notify(eventfd, poller)
    assert os.eventfd_read(eventfd) == EVENTFD_MAX
    assert os.get_blocking(eventfd)


def test_notify_on_a_full_pipe_does_not_block() -> None:
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        with pytest.raises(BlockingIOError):
            while True:
                os.write(w, b"x" * 65536)
        os.set_blocking(w, True)
        poller = select.poll()
        poller.register(w, select.POLLOUT)
        notify(w, poller)  # would block for ever if it wrote
    finally:
        os.close(r)
        os.close(w)


def test_a_non_blocking_notifier_is_written_without_a_poll_first() -> None:
    """QEMU makes its eventfds non-blocking: the write alone then suffices, and on a saturated
    counter it fails at once (EAGAIN, taken as a wake-up already pending), without blocking
    and without touching the front-end's flags. A blocking one is still polled first."""
    ring = Vring(0)
    fast = os.eventfd(0, os.EFD_NONBLOCK)
    ring.set_call_fd(fast)
    assert ring._call_poll is None  # no poll() per interrupt
    ring.signal_call()
    ring.signal_call()
    assert os.eventfd_read(fast) == 2
    os.eventfd_write(fast, EVENTFD_MAX)
    ring.signal_call()  # would block: fails with EAGAIN, which is no error
    assert os.eventfd_read(fast) == EVENTFD_MAX
    assert not os.get_blocking(fast)
    ring.set_call_fd(os.eventfd(0))
    assert ring._call_poll is not None
    ring.set_err_fd(os.eventfd(0, os.EFD_NONBLOCK))
    ring.signal_err()
    assert os.eventfd_read(ring.err_fd) == 1  # type: ignore[arg-type]
    ring.close_fds()


def test_signal_call_notifies_the_current_call_fd() -> None:
    ring = Vring(0)
    ring.signal_call()  # no call fd yet: nothing to do
    first, second = os.eventfd(0), os.eventfd(0)
    ring.set_call_fd(first)
    ring.signal_call()
    assert os.eventfd_read(first) == 1
    ring.set_call_fd(second)  # QEMU replaces the call fd of a running ring
    assert not is_open(first)
    ring.signal_call()
    assert os.eventfd_read(second) == 1
    os.eventfd_write(second, EVENTFD_MAX)
    ring.signal_call()  # saturated: returns at once
    ring.set_err_fd(os.eventfd(0))
    ring.signal_err()
    assert os.eventfd_read(ring.err_fd) == 1  # type: ignore[arg-type]
    ring.close_fds()
    assert not is_open(second)


def test_reset_closes_the_fds_and_starts_over() -> None:
    ring = Vring(3)
    fds = [os.eventfd(0) for _ in range(3)]
    ring.set_kick_fd(fds[0])
    ring.set_call_fd(fds[1])
    ring.set_err_fd(fds[2])
    ring.size, ring.base, ring.enabled, ring.started, ring.broken = 256, 17, True, True, True
    ring.reset()
    assert not any(is_open(fd) for fd in fds)
    assert (ring.kick_fd, ring.call_fd, ring.err_fd) == (None, None, None)
    assert (ring.size, ring.base, ring.addr, ring.queue) == (0, 0, None, None)
    assert not (ring.enabled or ring.started or ring.broken)
    assert repr(ring) == "Vring(3, size=0, stopped, enabled=False)"
