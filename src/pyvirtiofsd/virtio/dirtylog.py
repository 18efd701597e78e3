"""Dirty-page logging for live migration: the log a front-end shares, and marking pages in it.

While a VMM migrates a guest it copies guest RAM in passes, each pass re-copying the pages
written since the last. It sees the guest's own writes, but not a device back-end's: the
back-end tells it through the *dirty log*, a bitmap in memory the front-end shares (vhost-user's
SET_LOG_BASE), one bit per 4 KiB guest-physical page. Page ``p`` is bit ``p % 8`` of byte
``p // 8``; on a little-endian host that is bit ``p % 64`` of the 64-bit word ``p // 64``, and
words are how the log is written here (QEMU harvests it a word at a time too).

Rules:

* A bit is set *after* the bytes of its page are stored. The VMM harvests the log while we
  write: a bit set first could be harvested, and the page copied, before the data lands.
* The log is shared by every vhost device of the VMM's process, other back-ends' processes
  included, so a bit is only ever set by an atomic OR on the mapped word, never by a
  read-modify-write in Python: libatomic's ``__atomic_fetch_or_8`` when the library is there
  (one call per word), else the kernel's FUTEX_WAKE_OP, whose operation is an atomic OR on a
  32-bit word (one call per page).
* Work is batched: the guest-physical ranges an operation wrote become one mask per 64-page
  word (:func:`word_masks`, no I/O), and each word gets one atomic OR.
* Pages past the end of the log are no guest RAM (a DAX window, say) and are left alone.
* The mapping lives until :meth:`DirtyLog.close`, which waits for markers in progress; marking a
  closed log does nothing. Nothing can write to the log's memory after it is unmapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterable

__all__ = [
    "LOG_PAGE_SHIFT",
    "LOG_PAGE_SIZE",
    "DirtyLog",
    "DirtyLogError",
    "atomic_or_method",
    "word_masks",
]

log = logging.getLogger(__name__)

#: vhost's VHOST_LOG_PAGE: the log has one bit per 4 KiB of guest-physical memory.
LOG_PAGE_SHIFT = 12
LOG_PAGE_SIZE = 1 << LOG_PAGE_SHIFT
_WORD_BITS = 64


class DirtyLogError(ValueError):
    """A log that can't be mapped as described."""


def word_masks(ranges: Iterable[tuple[int, int]]) -> dict[int, int]:
    """The pages that guest-physical ``(address, length)`` ranges cover, as ``{word: mask}``:
    word ``w`` holds pages ``64*w .. 64*w + 63``, bit ``i`` of its mask page ``64*w + i``.
    Empty ranges cover nothing."""
    masks: dict[int, int] = {}
    for addr, length in ranges:
        if length <= 0:
            continue
        first = addr >> LOG_PAGE_SHIFT
        last = (addr + length - 1) >> LOG_PAGE_SHIFT
        w = first >> 6
        last_w = last >> 6
        lo = first & 63
        while True:
            hi = last & 63 if w == last_w else 63
            mask = ((2 << hi) - 1) & ~((1 << lo) - 1)
            masks[w] = masks.get(w, 0) | mask
            if w == last_w:
                break
            w += 1
            lo = 0
    return masks


# --- the atomic OR --------------------------------------------------------------------------


def _libatomic_or() -> Callable[[int, int], None] | None:
    name = ctypes.util.find_library("atomic")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        fetch_or = lib.__atomic_fetch_or_8
    except (OSError, AttributeError):
        return None
    fetch_or.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int)
    fetch_or.restype = ctypes.c_uint64
    seq_cst = 5  # __ATOMIC_SEQ_CST: a full barrier, so the data stores come first

    def or_word(address: int, mask: int) -> None:
        fetch_or(address, mask, seq_cst)

    return or_word


_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
_FUTEX_WAKE_OP = 5  # not FUTEX_PRIVATE_FLAG: the log is shared between processes
_FUTEX_OP_OR = 2
_FUTEX_OP_OPARG_SHIFT = 8


def _futex_or() -> Callable[[int, int], None] | None:
    """An atomic OR of each bit of ``mask`` into the u64 at ``address``, through FUTEX_WAKE_OP:
    the kernel ORs ``1 << n`` into the aligned u32 at its second address (and wakes nobody:
    the compare it then makes wakes only waiters, and there are none)."""
    import platform

    nr = _SYS_FUTEX.get(platform.machine())
    if nr is None:
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    op_base = (_FUTEX_OP_OR | _FUTEX_OP_OPARG_SHIFT) << 28

    def or_word(address: int, mask: int) -> None:
        while mask:
            bit = (mask & -mask).bit_length() - 1
            mask &= mask - 1
            word = ctypes.c_void_p(address + 4 * (bit >> 5))
            op = op_base | (bit & 31) << 12
            if syscall(nr, word, _FUTEX_WAKE_OP, 0, 0, word, op) < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))

    return or_word


_OR_METHODS: dict[str, Callable[[], Callable[[int, int], None] | None]] = {
    "libatomic": _libatomic_or,
    "futex": _futex_or,
}
_or_word: Callable[[int, int], None] | None = None
_or_name = ""


def _select_or() -> tuple[Callable[[int, int], None], str]:
    global _or_word, _or_name
    if _or_word is None:
        for name, make in _OR_METHODS.items():
            fn = make()
            if fn is not None:
                _or_word, _or_name = fn, name
                break
        else:
            raise DirtyLogError("no atomic OR on this machine (neither libatomic nor a futex)")
    return _or_word, _or_name


def atomic_or_method() -> str:
    """How bits are set here: "libatomic" or "futex"."""
    return _select_or()[1]


# --- the log ------------------------------------------------------------------------------


class DirtyLog:
    """The dirty log the front-end shares: ``size`` bytes at ``offset`` in the file ``fd``
    (the caller keeps ``fd``). ``method`` picks the atomic OR ("libatomic", "futex"; None: the
    best one here)."""

    def __init__(self, fd: int, size: int, offset: int = 0, *, method: str | None = None) -> None:
        if size <= 0 or size % 8 or offset < 0 or offset % 8:
            raise DirtyLogError(
                f"a log of {size} bytes at offset {offset} (both must be multiples of 8)"
            )
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise DirtyLogError(f"log fd {fd}: {e}") from None
        # Touching a mapping past the end of its file raises SIGBUS; QEMU seals its log memfd
        # against shrinking, but a front-end need not.
        if not stat.S_ISREG(st.st_mode) or st.st_size < offset + size:
            raise DirtyLogError(
                f"the log file holds {st.st_size} bytes; {size} at offset {offset} wanted"
            )
        if method is None:
            self._or, self.method = _select_or()
        else:
            made = _OR_METHODS[method]()
            if made is None:
                raise DirtyLogError(f"atomic OR by {method} is not available here")
            self._or, self.method = made, method
        try:
            self._mmap = mmap.mmap(
                fd, offset + size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except (OSError, ValueError, OverflowError) as e:
            raise DirtyLogError(f"mapping the log failed: {e}") from None
        self.size = size
        #: Pages the log covers (guest-physical 0 up to this many pages).
        self.pages = size * 8
        self._words = size // 8
        # The array pins the mapping (it can't be unmapped while the array exists); its
        # address is where the words are.
        self._array: ctypes.Array[ctypes.c_uint64] | None = (
            ctypes.c_uint64 * self._words
        ).from_buffer(self._mmap, offset)
        self._base = ctypes.addressof(self._array)
        self._lock = threading.Lock()
        self._warned = False

    def mark(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Mark the pages of guest-physical ``(address, length)`` ranges as written (after
        writing them)."""
        masks = word_masks(ranges)
        if not masks:
            return
        with self._lock:
            if self._array is None:
                return
            base, words, or_word = self._base, self._words, self._or
            for w, mask in masks.items():
                if w < words:
                    or_word(base + 8 * w, mask)
                elif not self._warned:
                    self._warned = True
                    log.debug("dirty log: page %#x lies past the log; not logged", w << 6)

    def words(self) -> list[int]:
        """The log's words as they are now (for tests and diagnostics)."""
        with self._lock:
            if self._array is None:
                return []
            return list(self._array)

    @property
    def closed(self) -> bool:
        return self._array is None

    def close(self) -> None:
        """Unmap the log, once no marker uses it; later marks do nothing."""
        with self._lock:
            if self._array is None:
                return
            self._array = None
            self._base = 0
        try:
            self._mmap.close()
        except BufferError:  # pragma: no cover - the array was the only export
            log.warning("dirty log: still exported; unmapping when it goes")

    def __repr__(self) -> str:
        state = "closed" if self._array is None else f"{self.pages} pages"
        return f"DirtyLog({state}, {self.method})"
