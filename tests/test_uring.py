"""The small io_uring: reads submitted, waited for and reaped, more than the ring has slots."""

from __future__ import annotations

import ctypes
import errno
import os
import threading

import pytest

from pyvirtiofsd.uring import Ring, supported

pytestmark = pytest.mark.skipif(not supported(), reason="io_uring is not available here")


def test_a_read_completes_once_the_eventfd_is_written() -> None:
    ring = Ring(4)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    buf = (ctypes.c_uint64 * 1)()
    try:
        ring.prepare_read(efd, ctypes.addressof(buf), 8, 7)
        ring.submit_and_wait(0)  # submitted; nothing to reap yet
        assert ring.completions() == []
        got: list[list[tuple[int, int]]] = []

        def wait() -> None:
            ring.submit_and_wait(1)  # blocks: nothing prepared, one completion wanted
            got.append(ring.completions())

        t = threading.Thread(target=wait)
        t.start()
        t.join(0.2)
        assert t.is_alive(), "the wait returned with nothing completed"
        os.eventfd_write(efd, 5)
        t.join(10)
        assert got == [[(7, 8)]]
        assert buf[0] == 5
    finally:
        ring.close()
        os.close(efd)


def test_prepared_entries_are_all_submitted_in_one_call() -> None:
    ring = Ring(4)
    fds = [os.eventfd(i + 1, os.EFD_CLOEXEC) for i in range(3)]
    bufs = [(ctypes.c_uint64 * 1)() for _ in fds]
    try:
        for i, (fd, buf) in enumerate(zip(fds, bufs, strict=True)):
            ring.prepare_read(fd, ctypes.addressof(buf), 8, i)
        done: list[tuple[int, int]] = []
        while len(done) < 3:
            ring.submit_and_wait(1)
            done += ring.completions()
        assert sorted(done) == [(0, 8), (1, 8), (2, 8)]
        assert [b[0] for b in bufs] == [1, 2, 3]
    finally:
        ring.close()
        for fd in fds:
            os.close(fd)


def test_a_full_ring_submits_what_it_holds_to_take_another() -> None:
    ring = Ring(2)
    fds = [os.eventfd(1, os.EFD_CLOEXEC) for _ in range(ring.sq_entries + 3)]
    bufs = [(ctypes.c_uint64 * 1)() for _ in fds]
    try:
        for i, (fd, buf) in enumerate(zip(fds, bufs, strict=True)):
            ring.prepare_read(fd, ctypes.addressof(buf), 8, i)
        done: list[tuple[int, int]] = []
        while len(done) < len(fds):
            ring.submit_and_wait(1)
            done += ring.completions()
        assert sorted(done) == [(i, 8) for i in range(len(fds))]
    finally:
        ring.close()
        ring.close()  # twice is harmless
        for fd in fds:
            os.close(fd)


def test_a_uring_command_to_a_file_without_them_fails_in_its_completion() -> None:
    ring = Ring(2)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        ring.prepare_cmd(efd, 1, 42)
        ring.submit_and_wait(1)
        [(user_data, res)] = ring.completions()
        assert user_data == 42 and res < 0
    finally:
        ring.close()
        os.close(efd)


def test_the_c_enter_answers_as_the_system_call_through_ctypes() -> None:
    native = pytest.importorskip("pyvirtiofsd._uring")
    from pyvirtiofsd import uring

    bad = os.open("/dev/null", os.O_RDONLY)
    os.close(bad)  # a number that names nothing now
    assert uring._syscall(426, bad, 0, 0, 0, 0, 0) == -1
    assert ctypes.get_errno() == errno.EBADF
    with pytest.raises(OSError) as e:
        native.enter(bad, 0, 0, 0)
    assert e.value.errno == errno.EBADF
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        assert uring._syscall(426, null, 0, 0, 0, 0, 0) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:
            native.enter(null, 0, 0, 0)
        assert e.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(null)
    ring = Ring(2)
    try:
        assert native.enter(ring.fd, 0, 0, 0) == 0
    finally:
        ring.close()
    for args in ((1 << 32, 0, 0, 0), (0, 0, 0, -1)):
        with pytest.raises((ValueError, OverflowError)):
            native.enter(*args)
    with pytest.raises(TypeError):
        native.enter(0, 0, 0)
