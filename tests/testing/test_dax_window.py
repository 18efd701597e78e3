"""The test VMM's DAX window: SHMEM_MAP / SHMEM_UNMAP through its hook, QEMU's rules."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator

import pytest

from pyvirtiofsd.testing.dax_window import FrontendDaxWindow
from pyvirtiofsd.vhost_user.messages import BackendReq, Message, MMapRequest

PAGE = mmap.PAGESIZE


@pytest.fixture
def window() -> Iterator[FrontendDaxWindow]:
    w = FrontendDaxWindow(16 * PAGE)
    yield w
    w.close()


@pytest.fixture
def file_fd() -> Iterator[int]:
    fd = os.memfd_create("dax-test")
    os.pwrite(fd, b"A" * PAGE + b"B" * PAGE, 0)
    yield fd
    os.close(fd)


def shmem_map(window: FrontendDaxWindow, fd: int, fd_off: int, off: int, n: int) -> int:
    req = MMapRequest(0, fd_off, off, n, MMapRequest.WRITABLE)
    return window.hook(Message(BackendReq.SHMEM_MAP, 1, req.encode(), [os.dup(fd)]))


def shmem_unmap(window: FrontendDaxWindow, off: int, n: int) -> int:
    req = MMapRequest(0, 0, off, n, 0)
    return window.hook(Message(BackendReq.SHMEM_UNMAP, 1, req.encode(), []))


def test_map_read_write_unmap(window: FrontendDaxWindow, file_fd: int) -> None:
    assert shmem_map(window, file_fd, PAGE, 4 * PAGE, PAGE) == 0
    assert window.read(4 * PAGE, 4) == b"BBBB"
    window.write(4 * PAGE, b"xy")
    assert os.pread(file_fd, 2, PAGE) == b"xy"  # MAP_SHARED: the file sees it
    assert shmem_unmap(window, 4 * PAGE, PAGE) == 0
    with pytest.raises(OSError) as e:
        window.read(4 * PAGE, 4)
    assert e.value.errno == errno.EFAULT
    assert window.log == [("map", 4 * PAGE, PAGE), ("unmap", 4 * PAGE, PAGE)]


def test_qemu_rules(window: FrontendDaxWindow, file_fd: int) -> None:
    assert shmem_map(window, file_fd, 0, 0, 2 * PAGE) == 0
    assert shmem_map(window, file_fd, 0, PAGE, PAGE) == errno.EEXIST  # overlaps
    assert shmem_map(window, file_fd, 0, 16 * PAGE, PAGE) == errno.EFAULT  # outside
    assert shmem_map(window, file_fd, 0, 5, PAGE) == errno.EINVAL  # not aligned
    assert shmem_map(window, file_fd, PAGE, 8 * PAGE, 2 * PAGE) == errno.EFAULT  # past the file
    assert shmem_unmap(window, 0, PAGE) == errno.EINVAL  # part of a mapping
    assert window.hook(Message(BackendReq.SHMEM_MAP, 1, b"short", [])) == errno.EINVAL
    assert window.hook(Message(BackendReq.VRING_CALL, 1, b"", [])) == errno.ENOSYS
    assert window.mappings == {0: (2 * PAGE, True)}


def test_hook_closes_the_fds(window: FrontendDaxWindow, file_fd: int) -> None:
    before = len(os.listdir("/proc/self/fd"))
    shmem_map(window, file_fd, 0, 0, PAGE)
    shmem_map(window, file_fd, 0, 0, PAGE)  # refused: EEXIST
    assert len(os.listdir("/proc/self/fd")) == before
