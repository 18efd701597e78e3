"""Buffers held as a packed ``struct iovec`` array, moved to and from files in one system call.

A Linux guest's 1 MiB READ or WRITE brings 256 scattered 4 KiB pages. Held as memoryviews, each
page is a Python object made and freed per request, and ``os.preadv`` walks the 256 of them again
to build its own array. Held as :class:`Iovecs`, the pages are one 4 KiB ``bytes`` (made in bulk
by :mod:`pyvirtiofsd.virtio.chain` from the descriptor table) that the kernel reads directly.

Rules:

* An :class:`Iovecs` is a ``Sequence[memoryview]`` and behaves exactly like the list of views it
  stands for: code that indexes, slices or iterates it gets views, made on demand (one slice of
  the mapping each, never cached). Only :meth:`Iovecs.preadv` and :meth:`Iovecs.pwritev`, which
  callers that move file data try first (:mod:`pyvirtiofsd.fuse.buffers`), take the short way.
* Every entry lies inside one of its mappings. The maker checks that, from data the other side
  can no longer change (a private copy); nothing here checks it again, since the kernel is
  handed the addresses as they are.
* Its views of the mappings are its own (exports), so a mapping stays mapped while an
  :class:`Iovecs` over it lives, whatever its owner releases meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Final, overload

__all__ = ["IOVEC", "Iovecs"]

#: One ``struct iovec`` on a 64-bit host: ``void *iov_base; size_t iov_len``.
IOVEC: Final = struct.Struct("<QQ")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
# ctypes releases the GIL around the call, as os.preadv does.
_preadv = _libc.preadv
_preadv.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int64)
_preadv.restype = ctypes.c_ssize_t
_pwritev = _libc.pwritev
_pwritev.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int64)
_pwritev.restype = ctypes.c_ssize_t


#: File offsets a call takes: ``os.preadv`` refuses the others with OverflowError too.
_OFFSETS: Final = range(-(1 << 63), 1 << 63)


def _raise(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class Iovecs(Sequence[memoryview]):
    """Buffers inside a few mappings, as a packed iovec array.

    ``raw`` is the array (16 bytes per buffer, host addresses); ``spans`` the mappings, each as
    the host address of its first byte and a view of it of its own. Every buffer lies inside one
    of them.
    """

    __slots__ = ("_raw", "_spans")

    def __init__(self, raw: bytes, spans: tuple[tuple[int, memoryview], ...]) -> None:
        self._raw = raw
        self._spans = spans

    def __len__(self) -> int:
        return len(self._raw) >> 4

    @overload
    def __getitem__(self, index: int) -> memoryview: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[memoryview]: ...

    def __getitem__(self, index: int | slice) -> memoryview | Sequence[memoryview]:
        count = len(self._raw) >> 4
        if isinstance(index, slice):
            start, stop, step = index.indices(count)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return Iovecs(self._raw[start << 4 : max(start, stop) << 4], self._spans)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("Iovecs index out of range")
        base, length = IOVEC.unpack_from(self._raw, index << 4)
        return self._view(base, length)

    def _view(self, base: int, length: int) -> memoryview:
        for host, view in self._spans:
            start = base - host
            if 0 <= start < len(view):
                return view[start : start + length]
        raise ValueError(f"buffer at {base:#x} outside the mappings")  # broken maker

    def __iter__(self) -> Iterator[memoryview]:
        for base, length in IOVEC.iter_unpack(self._raw):
            yield self._view(base, length)

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold."""
        return sum(memoryview(self._raw).cast("Q")[1::2].tolist())

    def preadv(self, fd: int, offset: int) -> int:
        """Fill the buffers from ``fd`` at ``offset``, as ``os.preadv`` would."""
        if offset not in _OFFSETS:
            raise OverflowError(f"file offset {offset} out of range")
        return _raise(_preadv(fd, self._raw, len(self._raw) >> 4, offset))

    def pwritev(self, fd: int, offset: int) -> int:
        """Write the buffers to ``fd`` at ``offset``, as ``os.pwritev`` would."""
        if offset not in _OFFSETS:
            raise OverflowError(f"file offset {offset} out of range")
        return _raise(_pwritev(fd, self._raw, len(self._raw) >> 4, offset))

    def __repr__(self) -> str:
        return f"Iovecs({[length for _, length in IOVEC.iter_unpack(self._raw)]})"
