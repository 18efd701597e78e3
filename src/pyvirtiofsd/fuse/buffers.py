"""Scatter-gather access to one request and its reply.

A request arrives as a list of readable memoryviews and its reply goes into a list of writable
ones: a single buffer for /dev/fuse, the descriptors of a chain for virtio. Small structures are
read and written through these classes; file data moves between the views and a file descriptor
with ``os.preadv``/``os.pwritev`` so that it is never copied in Python.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = [
    "Buffer",
    "ReplyWriter",
    "RequestReader",
    "ShortBuffer",
    "WriteData",
]

Buffer = memoryview | bytes | bytearray


class ShortBuffer(Exception):
    """A request or reply does not fit the buffers it was given."""


def _slice_views(
    views: Sequence[memoryview], index: int, offset: int, size: int
) -> tuple[list[memoryview], int, int]:
    """Views covering ``size`` bytes from (index, offset), and the position after them.

    Whole buffers are passed on as they are: a 1 MiB request comes as some 260 of them, and
    slicing each would be most of the work.
    """
    out: list[memoryview] = []
    count = len(views)
    while size > 0 and index < count:
        view = views[index]
        vlen = len(view)
        take = vlen - offset
        if take > size:
            take = size
        if take > 0:
            out.append(view if offset == 0 and take == vlen else view[offset : offset + take])
            size -= take
            offset += take
        if offset >= vlen:
            index += 1
            offset = 0
    return out, index, offset


class RequestReader:
    """Reads one request from a list of readable views, front to back."""

    __slots__ = ("_index", "_offset", "_views", "remaining")

    def __init__(self, views: Sequence[memoryview], length: int | None = None) -> None:
        self._views = views
        self._index = 0
        self._offset = 0
        total = sum(map(len, views))
        self.remaining = total if length is None else min(length, total)

    def take(self, size: int) -> tuple[Buffer, int]:
        """The next ``size`` bytes as ``(buffer, offset)``, for ``unpack_from``: in place when
        they lie in one view (nothing is sliced or copied), else a copy at offset 0."""
        if size > self.remaining:
            raise ShortBuffer(f"need {size} bytes, {self.remaining} left")
        views = self._views
        index = self._index
        if index < len(views):
            view = views[index]
            start = self._offset
            end = start + size
            if end <= len(view):
                self.remaining -= size
                if end == len(view):
                    self._index = index + 1
                    self._offset = 0
                else:
                    self._offset = end
                return view, start
        return self.read(size), 0

    def read(self, size: int) -> Buffer:
        """The next ``size`` bytes: a view when they lie in one buffer, else a copy."""
        if size > self.remaining:
            raise ShortBuffer(f"need {size} bytes, {self.remaining} left")
        self.remaining -= size
        view = self._views[self._index] if self._index < len(self._views) else b""
        end = self._offset + size
        if end <= len(view):
            out = view[self._offset : end]
            self._offset = end
            if end == len(view):
                self._index += 1
                self._offset = 0
            return out
        parts, self._index, self._offset = _slice_views(
            self._views, self._index, self._offset, size
        )
        return b"".join(parts)

    def views(self, size: int) -> list[memoryview]:
        """The next ``size`` bytes as views into the request (no copy)."""
        if size > self.remaining:
            raise ShortBuffer(f"need {size} bytes, {self.remaining} left")
        self.remaining -= size
        out, self._index, self._offset = _slice_views(self._views, self._index, self._offset, size)
        return out


class ReplyWriter:
    """Writes one reply into a list of writable views.

    The 16-byte out header is written last, once the reply's length is known, so the payload
    starts at :data:`HEADER` and :meth:`finish` fills in the header.
    """

    __slots__ = ("_views", "capacity", "length")

    HEADER = 16

    def __init__(self, views: Sequence[memoryview]) -> None:
        self._views = views
        self.capacity = len(views[0]) if len(views) == 1 else sum(len(v) for v in views)
        #: Bytes of reply written so far, header included once finished.
        self.length = self.HEADER

    def _write_at(self, pos: int, data: Buffer) -> None:
        size = len(data)
        if pos + size > self.capacity:
            raise ShortBuffer(f"reply of {pos + size} bytes exceeds {self.capacity}")
        first = self._views[0]
        if pos + size <= len(first):
            first[pos : pos + size] = data
            return
        index = 0
        while pos >= len(self._views[index]):
            pos -= len(self._views[index])
            index += 1
        src = memoryview(data).cast("B")
        done = 0
        while done < size:
            view = self._views[index]
            take = min(len(view) - pos, size - done)
            view[pos : pos + take] = src[done : done + take]
            done += take
            index += 1
            pos = 0

    def write(self, data: Buffer) -> None:
        """Append ``data`` to the payload."""
        self._write_at(self.length, data)
        self.length += len(data)

    def pack(self, layout_struct: Any, *values: Any) -> None:
        """Append one structure, packed in place when it fits the current buffer."""
        size = layout_struct.size
        pos = self.length
        first = self._views[0]
        if pos + size <= len(first):
            layout_struct.pack_into(first, pos, *values)
            self.length += size
        else:
            self.write(layout_struct.pack(*values))

    def space(self) -> int:
        """Payload bytes that still fit."""
        return self.capacity - self.length

    def views(self, size: int) -> list[memoryview]:
        """Views over the next ``size`` payload bytes (clipped to what fits), for a fill in place;
        :meth:`advance` then accounts for what was filled."""
        index, pos = 0, self.length
        while index < len(self._views) and pos >= len(self._views[index]):
            pos -= len(self._views[index])
            index += 1
        out, _, _ = _slice_views(self._views, index, pos, min(size, self.space()))
        return out

    def advance(self, size: int) -> None:
        self.length += size

    def read_from_fd(self, fd: int, offset: int, size: int) -> int:
        """Fill up to ``size`` payload bytes straight from ``fd`` at ``offset``."""
        done = 0
        while done < size:
            views = self.views(size - done)
            if not views:
                break
            n = os.preadv(fd, views, offset + done)
            if n <= 0:
                break
            self.length += n
            done += n
        return done

    def finish(self, header_struct: Any, error: int, unique: int) -> int:
        """Write the out header for the payload written so far; returns the reply length."""
        first = self._views[0]
        if len(first) >= self.HEADER:
            header_struct.pack_into(first, 0, self.length, error, unique)
        else:
            self._write_at(0, header_struct.pack(self.length, error, unique))
        return self.length

    def reset(self) -> None:
        """Drop the payload (an error reply follows)."""
        self.length = self.HEADER


class WriteData:
    """The data of a WRITE request, as views into the request buffers."""

    __slots__ = ("_views", "size")

    def __init__(self, views: list[memoryview], size: int) -> None:
        self._views = views
        self.size = size

    def views(self) -> list[memoryview]:
        return self._views

    def to_fd(self, fd: int, offset: int) -> int:
        """Write all of the data to ``fd`` at ``offset`` (short writes are continued)."""
        views = self._views
        done = 0
        while done < self.size:
            n = os.pwritev(fd, views, offset + done)
            if n <= 0:
                break
            done += n
            views = _skip(self._views, done)
        return done

    def tobytes(self) -> bytes:
        return b"".join(self._views)


def _skip(views: list[memoryview], count: int) -> list[memoryview]:
    out = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        out.append(view[count:])
        count = 0
    return out
