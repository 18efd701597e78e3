"""Guest memory: the regions a front-end shares with us, and address translation.

A front-end (QEMU, or our test driver) shares guest RAM as file descriptors, one per
region, each described by ``(guest_addr, size, user_addr, mmap_offset)``. We map each
region once and hand out :class:`memoryview` slices of the mapping: that is how a request's
buffers reach the FUSE layer without a copy.

Two address spaces are translated:

* guest-physical addresses, which descriptors carry;
* front-end "user" addresses, which vhost-user uses for the ring locations.

Everything coming from the other side is hostile. Every translation is bounds-checked and
raises :class:`GuestMemoryError`; nothing here can read or write outside a mapping.

Lifetimes. A :class:`GuestMemory` is an immutable snapshot. Changing the table (add or
remove a region) builds a new snapshot that shares the unchanged :class:`MappedRegion`
objects. A mapping can only be unmapped once every memoryview exported from it is released:
the vhost-user layer stops the queue workers (which drains in-flight requests) before it
retires a region, and :meth:`MappedRegion.close` reports views that are still alive.

Besides front-end regions, *device-owned* regions can be added: buffers the daemon maps
itself at a guest-physical range (e.g. a DAX window), which translation also consults.

Translation also goes backwards, for dirty logging only: :meth:`GuestMemory.guest_ranges`
finds the guest-physical ranges of views handed out earlier from where they lie in our own
address space (the chain walk keeps the addresses itself while logging is on; this serves the
chains that were already in flight when it was switched on).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import os
import stat
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "GuestMemory",
    "GuestMemoryError",
    "MappedRegion",
    "RegionSpec",
]

log = logging.getLogger(__name__)

_U64_MAX: Final = (1 << 64) - 1


class GuestMemoryError(ValueError):
    """An address range is not backed by guest memory, or a region table is invalid."""


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """Where a region sits in the guest-physical and front-end address spaces.

    ``mmap_offset`` is the offset of the region's first byte in the file descriptor that
    backs it.
    """

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def validate(self) -> None:
        """Reject sizes and addresses that are empty or wrap around 2**64."""
        if self.size <= 0:
            raise GuestMemoryError(f"region {self}: size must be positive")
        for name, start in (
            ("guest_addr", self.guest_addr),
            ("user_addr", self.user_addr),
            ("mmap_offset", self.mmap_offset),
        ):
            if start < 0 or start + self.size - 1 > _U64_MAX:
                raise GuestMemoryError(f"region {self}: {name} + size overflows 64 bits")


class MappedRegion:
    """A guest-physical range backed by a buffer we can access.

    Front-end regions are created with :meth:`map_fd`; device-owned regions with
    :meth:`from_buffer`. ``view`` is a writable memoryview of exactly ``size`` bytes.
    """

    __slots__ = (
        "_host_addr",
        "_mmap",
        "device_owned",
        "guest_addr",
        "guest_end",
        "name",
        "size",
        "spec",
        "user_addr",
        "user_end",
        "view",
    )

    def __init__(
        self,
        spec: RegionSpec,
        view: memoryview,
        mapping: mmap.mmap | None,
        *,
        device_owned: bool,
        name: str,
    ) -> None:
        if len(view) != spec.size or view.readonly:
            raise GuestMemoryError(f"region {name}: buffer must be writable and {spec.size} bytes")
        self.spec = spec
        self.guest_addr = spec.guest_addr
        self.size = spec.size
        self.guest_end = spec.guest_addr + spec.size
        self.user_addr = spec.user_addr
        self.user_end = spec.user_addr + spec.size
        self.view = view
        self._mmap = mapping
        self.device_owned = device_owned
        self.name = name
        self._host_addr = -1

    @property
    def host_addr(self) -> int:
        """Where the region lies in our own address space."""
        if self._host_addr < 0:
            self._host_addr = _address_of(self.view)
        return self._host_addr

    @classmethod
    def map_fd(cls, spec: RegionSpec, fd: int) -> MappedRegion:
        """Map ``spec`` from ``fd`` (shared, read-write). The caller keeps ownership of fd.

        The mapping starts at file offset 0 and the region begins ``mmap_offset`` bytes in:
        that works for any offset, including hugetlbfs files that only accept hugepage
        aligned mapping offsets.
        """
        spec.validate()
        length = spec.mmap_offset + spec.size
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise GuestMemoryError(f"region {spec}: bad fd {fd}: {e}") from None
        # Touching a mapping beyond the end of its file raises SIGBUS, which would kill the
        # daemon: a regular file (memfd, hugetlbfs, /dev/shm) must be long enough now.
        # Character devices (e.g. /dev/dax) have no size to check; other types can't back
        # guest RAM at all.
        if stat.S_ISREG(st.st_mode):
            if st.st_size < length:
                raise GuestMemoryError(
                    f"region {spec}: fd {fd} holds {st.st_size} bytes, region needs {length}"
                )
        elif not stat.S_ISCHR(st.st_mode):
            raise GuestMemoryError(f"region {spec}: fd {fd} is not a memory file")
        try:
            mapping = mmap.mmap(
                fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except (OSError, ValueError, OverflowError) as failed:
            raise GuestMemoryError(f"region {spec}: mmap failed: {failed}") from None
        whole = memoryview(mapping)
        view = whole[spec.mmap_offset :]
        whole.release()
        return cls(spec, view, mapping, device_owned=False, name=f"fd@{spec.guest_addr:#x}")

    @classmethod
    def from_buffer(
        cls, guest_addr: int, buffer: memoryview | mmap.mmap | bytearray, *, name: str = "device"
    ) -> MappedRegion:
        """Wrap a device-owned writable buffer placed at ``guest_addr``.

        The caller owns the buffer; :meth:`close` only releases our view of it.
        """
        view = memoryview(buffer).cast("B")
        spec = RegionSpec(guest_addr, len(view), -1, 0)
        if spec.size <= 0 or guest_addr < 0 or guest_addr + spec.size - 1 > _U64_MAX:
            raise GuestMemoryError(f"device region {name}: bad range {guest_addr:#x}+{spec.size}")
        return cls(spec, view, None, device_owned=True, name=name)

    def close(self, quiet: bool = False) -> bool:
        """Release our view and unmap. Returns False if views are still exported.

        A still-exported view keeps the mapping alive until it is garbage collected; the
        region is then unmapped by the mmap object's finalizer, never while in use.
        ``quiet`` when that is expected (a region retired while requests run).
        """
        self.view.release()
        if self._mmap is None:
            return True
        try:
            self._mmap.close()
        except BufferError:
            (log.debug if quiet else log.warning)(
                "region %s: memoryviews still alive, unmapping deferred", self.name
            )
            self._mmap = None
            return False
        self._mmap = None
        return True

    def __repr__(self) -> str:
        return (
            f"MappedRegion({self.name}, guest={self.guest_addr:#x}+{self.size:#x}, "
            f"user={self.user_addr:#x})"
        )


class GuestMemory:
    """An immutable set of non-overlapping regions with bounds-checked translation."""

    __slots__ = ("_ends", "_regions", "_starts", "_user_regions", "_user_starts", "main")

    def __init__(self, regions: Iterable[MappedRegion] = ()) -> None:
        by_guest = sorted(regions, key=lambda r: r.guest_addr)
        for a, b in itertools.pairwise(by_guest):
            if b.guest_addr < a.guest_end:
                raise GuestMemoryError(f"regions overlap in guest-physical space: {a} and {b}")
        frontend = sorted((r for r in by_guest if not r.device_owned), key=lambda r: r.user_addr)
        for a, b in itertools.pairwise(frontend):
            if b.user_addr < a.user_end:
                raise GuestMemoryError(f"regions overlap in front-end address space: {a} and {b}")
        self._regions = tuple(by_guest)
        #: The largest region (guest RAM, mostly), which the chain walk checks first.
        self.main: MappedRegion | None = max(by_guest, key=lambda r: r.size, default=None)
        self._starts = [r.guest_addr for r in by_guest]
        self._ends = [r.guest_end for r in by_guest]
        self._user_regions = tuple(frontend)
        self._user_starts = [r.user_addr for r in frontend]

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return self._regions

    def with_region(self, region: MappedRegion) -> GuestMemory:
        """A new snapshot with ``region`` added (raises if it overlaps)."""
        return GuestMemory((*self._regions, region))

    def without_region(self, region: MappedRegion) -> GuestMemory:
        return GuestMemory(r for r in self._regions if r is not region)

    def find(self, guest_addr: int, size: int, user_addr: int) -> MappedRegion | None:
        """The front-end region with exactly this placement (as REM_MEM_REG names it)."""
        for r in self._user_regions:
            if r.guest_addr == guest_addr and r.size == size and r.user_addr == user_addr:
                return r
        return None

    def region_of(self, start: int, end: int) -> MappedRegion | None:
        """The one region holding all of guest-physical ``[start, end)``, if one does."""
        i = bisect_right(self._starts, start) - 1
        if i >= 0:
            r = self._regions[i]
            if end <= r.guest_end and start >= r.guest_addr:
                return r
        return None

    def translate(self, addr: int, length: int) -> memoryview:
        """A view of ``length`` bytes at guest-physical ``addr``, inside one region."""
        i = bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            off = addr - r.guest_addr
            end = off + length
            if end <= r.size and length >= 0:
                return r.view[off:end]
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not in guest memory")

    def translate_into(self, addr: int, length: int, out: list[memoryview]) -> None:
        """Append views covering ``[addr, addr+length)`` to ``out``.

        The range may span adjacent regions, giving one view per region. A zero length
        appends nothing. On error nothing is appended.
        """
        if length <= 0:
            if length < 0:
                raise GuestMemoryError(f"negative length {length}")
            return
        i = bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            off = addr - r.guest_addr
            end = off + length
            if end <= r.size:
                out.append(r.view[off:end])
                return
            if off < r.size:
                self._translate_spanning(i, addr, length, out)
                return
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not in guest memory")

    def _translate_spanning(self, i: int, addr: int, length: int, out: list[memoryview]) -> None:
        """The slow path of :meth:`translate_into`: ``addr`` is in region ``i``, the end isn't."""
        pieces: list[memoryview] = []
        regions = self._regions
        start = addr
        while True:
            r = regions[i]
            off = addr - r.guest_addr
            take = min(length, r.size - off)
            pieces.append(r.view[off : off + take])
            addr += take
            length -= take
            if not length:
                break
            i += 1
            if i >= len(regions):
                raise GuestMemoryError(f"guest range at {start:#x} runs off memory at {addr:#x}")
            if regions[i].guest_addr != addr:
                raise GuestMemoryError(f"guest range at {start:#x} reaches a hole at {addr:#x}")
        out.extend(pieces)

    def translate_user(self, user_addr: int, length: int) -> memoryview:
        """A view of ``length`` bytes at front-end address ``user_addr``, inside one region."""
        i = bisect_right(self._user_starts, user_addr) - 1
        if i >= 0 and length >= 0:
            r = self._user_regions[i]
            off = user_addr - r.user_addr
            if off + length <= r.size:
                return r.view[off : off + length]
        raise GuestMemoryError(
            f"front-end range {user_addr:#x}+{length:#x} is not in shared memory"
        )

    def user_to_guest(self, user_addr: int) -> int:
        """The guest-physical address of a front-end address (for ring diagnostics)."""
        i = bisect_right(self._user_starts, user_addr) - 1
        if i >= 0:
            r = self._user_regions[i]
            if user_addr < r.user_end:
                return r.guest_addr + (user_addr - r.user_addr)
        raise GuestMemoryError(f"front-end address {user_addr:#x} is not in shared memory")

    def guest_ranges(self, views: Sequence[memoryview], used: int) -> list[tuple[int, int]]:
        """The guest-physical ``(address, length)`` ranges of the first ``used`` bytes of
        ``views``, views of this memory's regions (a view of none is skipped)."""
        out = []
        for v in views:
            if used <= 0:
                break
            n = min(len(v), used)
            used -= n
            if not n:
                continue
            addr = _address_of(v)
            for r in self._regions:
                base = r.host_addr
                if base <= addr and addr + n <= base + r.size:
                    out.append((r.guest_addr + addr - base, n))
                    break
        return out

    def __len__(self) -> int:
        return len(self._regions)

    def __repr__(self) -> str:
        return f"GuestMemory({list(self._regions)!r})"


def _address_of(view: memoryview) -> int:
    """The address of a writable, non-empty view's first byte (the ctypes object that tells
    pins the buffer only until it goes, at once)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))
