"""The dirty log (:mod:`pyvirtiofsd.virtio.dirtylog`): which bits a write sets, and that bits
are set atomically even while another process sets bits in the same words."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from pyvirtiofsd.virtio.dirtylog import (
    LOG_PAGE_SIZE,
    DirtyLog,
    DirtyLogError,
    atomic_or_method,
    word_masks,
)

P = LOG_PAGE_SIZE
METHODS = ["libatomic", "futex"]


def memfd(size: int) -> int:
    fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def log_fd() -> Iterator[int]:
    fd = memfd(4096)
    yield fd
    os.close(fd)


def pages(words: list[int]) -> set[int]:
    return {64 * w + b for w, word in enumerate(words) for b in range(64) if word >> b & 1}


# --- which pages -----------------------------------------------------------------------------


def test_word_masks() -> None:
    assert word_masks([]) == {}
    assert word_masks([(0, 0), (5 * P, 0)]) == {}
    assert word_masks([(0, 1)]) == {0: 1}
    assert word_masks([(P - 1, 2)]) == {0: 0b11}  # a write across a page boundary
    assert word_masks([(63 * P, P + 1)]) == {0: 1 << 63, 1: 1}  # across a word boundary
    assert word_masks([(64 * P, 64 * P)]) == {1: (1 << 64) - 1}
    assert word_masks([(10 * P + 5, 3), (10 * P + 100, 1), (70 * P, 1)]) == {0: 1 << 10, 1: 1 << 6}
    big = word_masks([(P, 200 * P)])  # pages 1..200
    assert sum(bin(m).count("1") for m in big.values()) == 200
    assert set(big) == {0, 1, 2, 3}


# --- the log -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_marks_the_pages_written(log_fd: int, method: str) -> None:
    log = DirtyLog(log_fd, 64, method=method)  # 8 words: 512 pages
    assert log.pages == 512
    log.mark([(3 * P + 10, 20), (100 * P - 1, 2), (400 * P, 3 * P)])
    assert pages(log.words()) == {3, 99, 100, 400, 401, 402}
    # Bits already set stay set; the log is the front-end's to clear.
    log.mark([(3 * P, 1)])
    assert pages(log.words()) == {3, 99, 100, 400, 401, 402}
    log.close()


@pytest.mark.parametrize("method", METHODS)
def test_pages_past_the_log_are_not_marked(log_fd: int, method: str) -> None:
    log = DirtyLog(log_fd, 8, method=method)  # one word: pages 0..63
    log.mark([(63 * P, 2 * P), (1 << 40, 4096)])
    assert log.words() == [1 << 63]
    log.close()


def test_the_log_sits_at_its_offset(log_fd: int) -> None:
    log = DirtyLog(log_fd, 16, offset=1024)
    log.mark([(65 * P, 1)])
    log.close()
    raw = os.pread(log_fd, 4096, 0)
    assert raw[:1024] == bytes(1024)
    assert int.from_bytes(raw[1024 + 8 : 1024 + 16], "little") == 1 << 1


def test_marking_a_closed_log_does_nothing(log_fd: int) -> None:
    log = DirtyLog(log_fd, 64)
    log.close()
    log.close()
    log.mark([(0, P)])
    assert log.closed and log.words() == []
    assert os.pread(log_fd, 64, 0) == bytes(64)


@pytest.mark.parametrize(
    ("size", "offset", "message"),
    [
        (0, 0, "multiples of 8"),
        (12, 0, "multiples of 8"),
        (8, 4, "multiples of 8"),
        (8192, 0, "holds 4096 bytes"),
        (4096, 8, "holds 4096 bytes"),
    ],
)
def test_a_log_that_does_not_fit_is_refused(
    log_fd: int, size: int, offset: int, message: str
) -> None:
    with pytest.raises(DirtyLogError, match=message):
        DirtyLog(log_fd, size, offset)


def test_a_log_that_is_no_memory_file_is_refused() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(DirtyLogError, match="holds"):
            DirtyLog(r, 8)
    finally:
        os.close(r)
        os.close(w)


def test_the_best_atomic_or_here_is_used(log_fd: int) -> None:
    assert atomic_or_method() in METHODS
    log = DirtyLog(log_fd, 8)
    assert log.method == atomic_or_method()
    log.close()


@pytest.mark.parametrize("method", METHODS)
def test_bits_set_by_another_process_at_the_same_time_are_kept(method: str) -> None:
    """The log is shared with other processes (QEMU, other back-ends): every bit set in a word
    survives the other's setting bits of that word at the same moment. A read-modify-write
    of the word would lose some of them."""
    words = 2048
    fd = memfd(words * 8)
    try:
        log = DirtyLog(fd, words * 8, method=method)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(ready_w, b"x")
                os.read(go_r, 1)
                for bit in range(1, 64, 2):
                    log.mark([(64 * P * w + bit * P, 1) for w in range(words)])
            finally:
                os._exit(0)
        try:
            os.read(ready_r, 1)
            os.write(go_w, b"x")
            for bit in range(0, 64, 2):
                log.mark([(64 * P * w + bit * P, 1) for w in range(words)])
            _, status = os.waitpid(pid, 0)
            pid = 0
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            for x in (ready_r, ready_w, go_r, go_w):
                os.close(x)
        assert log.words() == [(1 << 64) - 1] * words
        log.close()
    finally:
        os.close(fd)
