"""Scatter-gather access to one request and its reply.

A request arrives as a list of readable memoryviews and its reply goes into a list of writable
ones: a single buffer for /dev/fuse, the descriptors of a chain for virtio. Small structures are
read and written through these classes; file data moves between the views and a file descriptor
with ``os.preadv``/``os.pwritev`` so that it is never copied in Python; buffers given as an
:class:`~pyvirtiofsd.iovec.Iovecs` (a big request's pages) go to the kernel as the iovec array
they already are. The compiled build stores a reply's bytes and its out header in C
(``_buffers.c``), the same way.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any, Final, cast

from pyvirtiofsd.iovec import Iovecs

__all__ = [
    "OUT_HEADER",
    "Buffer",
    "ReplyWriter",
    "RequestReader",
    "ShortBuffer",
    "WriteData",
]

Buffer = memoryview | bytes | bytearray

#: A class of a module not compiled, bound Final so that a compiled build keeps it in a C
#: variable rather than looking it up in this module's dictionary for each READ and WRITE.
_IOVECS: Final = Iovecs
#: The system calls that move file data, bound Final as _IOVECS is: each call would otherwise
#: look the function up among the os module's attributes.
_preadv: Final = os.preadv
_pwritev: Final = os.pwritev
#: The out header a reply starts with (``abi.OUT_HEADER``: u32 len, s32 error, u64 unique).
OUT_HEADER: Final = struct.Struct("<IiQ")

try:
    from pyvirtiofsd.fuse._buffers import pread_into as _c_pread_into
    from pyvirtiofsd.fuse._buffers import put as _c_put
    from pyvirtiofsd.fuse._buffers import put_header as _c_put_header
except ImportError:  # the pure build
    _c_put = None
    _c_put_header = None
    _c_pread_into = None
#: The compiled build's stores and read (``_buffers.c``), bound Final: read as C variables.
_native_put: Final = _c_put
_native_put_header: Final = _c_put_header
_native_pread_into: Final = _c_pread_into


class ShortBuffer(Exception):
    """A request or reply does not fit the buffers it was given."""


def _slice_views(
    views: Sequence[Buffer], index: int, offset: int, size: int
) -> tuple[list[Buffer], int, int]:
    """Views covering ``size`` bytes from (index, offset), and the position after them.

    Whole buffers are passed on as they are: a 1 MiB request comes as some 260 of them, and
    slicing each would be most of the work.
    """
    out: list[Buffer] = []
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
    """Reads one request from a list of readable views, front to back.

    ``remaining`` is what the request still holds (its declared length may end before the
    buffers do); the cursor (view index, offset) is where the next read starts.
    """

    __slots__ = ("_avail", "_index", "_offset", "_views", "remaining")

    def __init__(
        self, views: Sequence[Buffer], length: int | None = None, total: int | None = None
    ) -> None:
        self._views = views
        self._index = 0
        self._offset = 0
        if total is None:
            total = sum(map(len, views))
        #: Bytes in the views from the cursor on.
        self._avail = total
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
                self._avail -= size
                if end == len(view):
                    self._index = index + 1
                    self._offset = 0
                else:
                    self._offset = end
                return view, start
        return self.read(size), 0

    def skip(self, size: int) -> None:
        """Move the cursor past ``size`` bytes, decoded already by other means."""
        if size > self.remaining:
            raise ShortBuffer(f"need {size} bytes, {self.remaining} left")
        self.remaining -= size
        self._avail -= size
        views = self._views
        index = self._index
        offset = self._offset + size
        # Stops at an empty buffer it has not stepped into, as take() does.
        while index < len(views) and offset and offset >= len(views[index]):
            offset -= len(views[index])
            index += 1
        self._index = index
        self._offset = offset

    def resume(self, index: int, offset: int, size: int) -> None:
        """:meth:`skip` of ``size`` bytes at the start, told where they end (view ``index``,
        ``offset`` in it, as :meth:`skip` would leave them) rather than walking to it."""
        if size > self.remaining:
            raise ShortBuffer(f"need {size} bytes, {self.remaining} left")
        self.remaining -= size
        self._avail -= size
        self._index = index
        self._offset = offset

    def read(self, size: int) -> Buffer:
        """The next ``size`` bytes: a view when they lie in one buffer, else a copy."""
        if size > self.remaining:
            raise ShortBuffer(f"need {size} bytes, {self.remaining} left")
        self.remaining -= size
        self._avail -= size
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

    def views(self, size: int) -> Sequence[Buffer]:
        """The next ``size`` bytes as views into the request (no copy; pieces of it when the
        request came as a copy)."""
        if size > self.remaining:
            raise ShortBuffer(f"need {size} bytes, {self.remaining} left")
        self.remaining -= size
        if size == self._avail and not self._offset:
            # The rest of the buffers, whole (a WRITE's pages): no view is looked at, and an
            # Iovecs stays one.
            out = self._views[self._index :]
            self._index = len(self._views)
            self._avail = 0
            return out
        self._avail -= size
        out, self._index, self._offset = _slice_views(self._views, self._index, self._offset, size)
        return out


class ReplyWriter:
    """Writes one reply into a list of writable views.

    The 16-byte out header is written last, once the reply's length is known, so the payload
    starts at :data:`HEADER` and :meth:`finish` fills in the header. A cursor (view index,
    offset) follows ``length``, so that structures go straight into the view they belong in and
    file data into the views from there on, however many there are.
    """

    __slots__ = ("_index", "_offset", "_views", "capacity", "length")

    HEADER: Final = 16

    def __init__(self, views: Sequence[memoryview], capacity: int | None = None) -> None:
        self._views = views
        if capacity is None:
            capacity = len(views[0]) if len(views) == 1 else sum(map(len, views))
        self.capacity = capacity
        #: Bytes of reply written so far, header included once finished.
        self.length = self.HEADER
        first = len(views[0])
        if first > self.HEADER:
            self._index, self._offset = 0, self.HEADER
        elif first == self.HEADER:
            self._index, self._offset = 1, 0
        else:
            self._seek(self.HEADER)

    def _seek(self, pos: int) -> None:
        """Put the cursor at byte ``pos`` of the reply."""
        views = self._views
        index = 0
        while index < len(views) and pos >= len(views[index]):
            pos -= len(views[index])
            index += 1
        self._index, self._offset = index, pos

    def _write_at(self, pos: int, data: Buffer) -> None:
        size = len(data)
        if pos + size > self.capacity:
            raise ShortBuffer(f"reply of {pos + size} bytes exceeds {self.capacity}")
        if not size:
            # Nothing to store: at the end of the buffers there is no view to look for.
            return
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
        size = len(data)
        index = self._index
        if index < len(self._views):
            view = self._views[index]
            offset = self._offset
            end = offset + size
            if end <= len(view):
                if _native_put is not None:
                    _native_put(view, offset, data)
                else:
                    view[offset:end] = data
                self.length += size
                if end == len(view):
                    self._index, self._offset = index + 1, 0
                else:
                    self._offset = end
                return
        self._write_at(self.length, data)
        self.length += size
        self._seek(self.length)

    def pack(self, layout_struct: Any, *values: Any) -> None:
        """Append one structure. Packed to bytes, then stored as :meth:`write` stores: packing
        in place would pass ``values`` on through a second call gathering its arguments, which
        costs a compiled build more than the few bytes' copy."""
        self.write(layout_struct.pack(*values))

    def pack_then(self, layout_struct: Any, values: tuple[int, ...], tail: bytes) -> None:
        """Append one structure packed from ``values``, then the bytes ``tail`` (a reply's
        fields, then the attributes it carries), in place when both fit the current view."""
        size = layout_struct.size
        end = size + len(tail)
        index = self._index
        if index < len(self._views):
            view = self._views[index]
            offset = self._offset
            end += offset
            if end <= len(view):
                layout_struct.pack_into(view, offset, *values)
                view[offset + size : end] = tail
                self.length += end - offset
                if end == len(view):
                    self._index, self._offset = index + 1, 0
                else:
                    self._offset = end
                return
        self.write(layout_struct.pack(*values) + tail)

    def space(self) -> int:
        """Payload bytes that still fit."""
        return self.capacity - self.length

    def views(self, size: int) -> Sequence[memoryview]:
        """Views over the next ``size`` payload bytes (clipped to what fits), for a fill in place;
        :meth:`advance` then accounts for what was filled."""
        space = self.capacity - self.length
        if size >= space and not self._offset:
            # The rest of the buffers, whole (a READ's pages): no view is looked at, and an
            # Iovecs stays one.
            return self._views[self._index :]
        out, _, _ = _slice_views(self._views, self._index, self._offset, min(size, space))
        # Slices of views: views.
        return cast("list[memoryview]", out)

    def advance(self, size: int) -> None:
        """Account for ``size`` bytes filled in place through :meth:`views`."""
        self.length += size
        if self.length == self.capacity:
            self._index, self._offset = len(self._views), 0
        else:
            self._seek(self.length)

    def read_from_fd(self, fd: int, offset: int, size: int) -> int:
        """Fill up to ``size`` payload bytes straight from ``fd`` at ``offset``."""
        done = 0
        while done < size:
            if _native_pread_into is not None and type(self._views) is not _IOVECS:
                # What fits in the view under the cursor (all of it through /dev/fuse, or a
                # guest's page), read there in C: no list of views, no slice for os.preadv.
                want = size - done
                space = self.capacity - self.length
                if space < want:
                    want = space
                index = self._index
                if want <= 0 or index >= len(self._views):
                    break
                view = self._views[index]
                start = self._offset
                if start + want <= len(view):
                    # Typed, so that a compiled build adds and compares it as an integer.
                    n: int = _native_pread_into(view, start, want, fd, offset + done)
                    if n <= 0:
                        break
                    self.length += n
                    end = start + n
                    if end == len(view):
                        self._index, self._offset = index + 1, 0
                    else:
                        self._offset = end
                    done += n
                    continue
            views = self.views(size - done)
            if not views:
                break
            if type(views) is _IOVECS:
                n = views.preadv(fd, offset + done)
            else:
                n = _preadv(fd, views, offset + done)
            if n <= 0:
                break
            self.advance(n)
            done += n
        return done

    def finish(self, error: int, unique: int) -> int:
        """Write the out header for the payload written so far; returns the reply length."""
        first = self._views[0]
        if len(first) < self.HEADER:
            self._write_at(0, OUT_HEADER.pack(self.length, error, unique))
        elif _native_put_header is not None:
            _native_put_header(first, self.length, error, unique)
        else:
            OUT_HEADER.pack_into(first, 0, self.length, error, unique)
        return self.length

    def reset(self) -> None:
        """Drop the payload (an error reply follows)."""
        self.length = self.HEADER
        self._seek(self.HEADER)


class WriteData:
    """The data of a WRITE request, as views into the request buffers."""

    __slots__ = ("_views", "size")

    def __init__(self, views: Sequence[Buffer], size: int) -> None:
        self._views = views
        self.size = size

    def views(self) -> Sequence[Buffer]:
        return self._views

    def to_fd(self, fd: int, offset: int) -> int:
        """Write all of the data to ``fd`` at ``offset`` (short writes are continued)."""
        views = self._views
        done = 0
        while done < self.size:
            if type(views) is _IOVECS:
                n = views.pwritev(fd, offset + done)
            else:
                n = _pwritev(fd, views, offset + done)
            if n <= 0:
                break
            done += n
            if done < self.size:
                views = _skip(self._views, done)
        return done

    def tobytes(self) -> bytes:
        return b"".join(self._views)


def _skip(views: Sequence[Buffer], count: int) -> list[Buffer]:
    out = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        out.append(view[count:])
        count = 0
    return out
