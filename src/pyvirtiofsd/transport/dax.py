"""The DAX window: file ranges mapped into the device's shared memory region 0.

The guest asks for mappings with FUSE_SETUPMAPPING and drops them with FUSE_REMOVEMAPPING; the
front-end (the VMM) does the actual mmap() when we send it VHOST_USER_BACKEND_SHMEM_MAP /
SHMEM_UNMAP. The two sides disagree on what a request may do:

* FUSE (the virtio-fs spec): a mapping that exactly covers an old one replaces it; one that
  partly overlaps old mappings splits them, keeping what lies outside; a REMOVEMAPPING of part
  of a mapping splits it too;
* vhost-user (QEMU): SHMEM_MAP must land on unmapped space, and SHMEM_UNMAP must name a whole
  mapping made earlier.

:class:`MappingTable` keeps the window's mappings and turns each FUSE request into the
vhost-user steps that satisfy both: unmap every mapping touched, then map again the pieces that
survive and the new range. It does no I/O, so every rule is tested on its own.
:class:`DaxWindow` runs those steps through the back-end channel, one request at a time.

One more difference: the guest maps whole 2 MiB ranges, also past the end of a file, as mmap()
allows; QEMU maps a file only as far as the file reaches, in whole pages. So the front-end gets
the whole pages of a mapping that the file backs; the rest of the range stays a hole, which the
guest never touches, as it reads no further than the file's size. The last page of a file whose
size is not a multiple of the page size is the exception: QEMU refuses it, and the guest reads
it. It is shadowed by a one-page memfd holding the same bytes, copied back to the file when the
guest syncs, flushes or closes (or the daemon is about to touch the file), and refreshed from
the file when the file changes. A file that grows or shrinks has its mappings mapped again
(:meth:`DaxWindow.resized`) before the request that changed its size is answered.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "MAP_ALIGNMENT",
    "MAX_REGIONS",
    "PAGE",
    "SPARE_MAPPINGS",
    "WINDOW_GRANULE",
    "DaxWindow",
    "MappedFile",
    "Mapping",
    "MappingTable",
    "Plan",
    "ShmemMapper",
    "TailPage",
]

log = logging.getLogger(__name__)

PAGE = 4096
#: log2 of the alignment asked of the guest (the kernel accepts up to 21, its 2 MiB ranges).
MAP_ALIGNMENT = 12
#: Granule the window size is a multiple of; Linux maps the window in 2 MiB ranges.
WINDOW_GRANULE = 2 << 20
#: Mappings beyond one per 2 MiB range, allowed for splits before requests are refused.
SPARE_MAPPINGS = 1024
#: Front-end regions the window may use at once. QEMU makes each of our mappings a memory
#: region it also sends us (ADD_MEM_REG), counted against its 512 vhost-user memory slots
#: with guest RAM; it aborts past 512. What is left after RAM is the window's.
MAX_REGIONS = 480


class MappedFile:
    """An fd of a mapped file, shared by the pieces of a split mapping; closed with the last."""

    __slots__ = ("fd", "owner", "refs")

    def __init__(self, fd: int, owner: object) -> None:
        self.fd = fd
        self.owner = owner
        self.refs = 0


class TailPage:
    """A one-page memfd standing in for a file's partial last page in the window."""

    __slots__ = ("fd", "foffset", "snapshot")

    def __init__(self, fd: int, foffset: int, snapshot: bytes) -> None:
        self.fd = fd
        #: Offset of the page in the file.
        self.foffset = foffset
        #: The file's bytes in that page when last copied either way.
        self.snapshot = snapshot


@dataclass(slots=True)
class Mapping:
    moffset: int
    length: int
    foffset: int
    writable: bool
    file: MappedFile = field(compare=False)
    #: Bytes of the file the front-end has mapped from ``moffset`` (whole pages).
    mapped: int = 0
    #: The shadow of the file's partial last page, when it lies in this range.
    tail: TailPage | None = None

    @property
    def end(self) -> int:
        return self.moffset + self.length


@dataclass(slots=True)
class Plan:
    """What one request does to the front-end's map: unmap these, then map those."""

    unmap: list[Mapping]
    map: list[Mapping]


class MappingTable:
    """The mappings of one window, sorted by offset, never overlapping."""

    def __init__(self, size: int, max_mappings: int | None = None) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError("window size must be a positive multiple of the page size")
        self.size = size
        self.max_mappings = (
            max_mappings if max_mappings is not None else size // WINDOW_GRANULE + SPARE_MAPPINGS
        )
        self._starts: list[int] = []
        self._maps: list[Mapping] = []
        self._owners: dict[object, int] = {}

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._maps))

    def check_range(self, moffset: int, length: int) -> None:
        if length <= 0:
            raise OSError(errno.EINVAL, "empty DAX range")
        if moffset % PAGE or length % PAGE:
            raise OSError(errno.EINVAL, "DAX range not page aligned")
        if moffset < 0 or moffset + length > self.size:
            raise OSError(errno.EINVAL, "DAX range beyond the end of the window")

    def overlapping(self, moffset: int, length: int) -> list[Mapping]:
        end = moffset + length
        i = bisect.bisect_right(self._starts, moffset) - 1
        if i < 0 or self._maps[i].end <= moffset:
            i += 1
        out = []
        while i < len(self._maps) and self._maps[i].moffset < end:
            out.append(self._maps[i])
            i += 1
        return out

    def _cut(self, old: Mapping, moffset: int, length: int) -> list[Mapping]:
        """The parts of ``old`` outside [moffset, moffset + length)."""
        pieces = []
        if old.moffset < moffset:
            pieces.append(
                Mapping(old.moffset, moffset - old.moffset, old.foffset, old.writable, old.file)
            )
        end = moffset + length
        if old.end > end:
            pieces.append(
                Mapping(
                    end, old.end - end, old.foffset + (end - old.moffset), old.writable, old.file
                )
            )
        return pieces

    def plan_setup(self, new: Mapping) -> Plan:
        self.check_range(new.moffset, new.length)
        if new.foffset < 0 or new.foffset % PAGE:
            raise OSError(errno.EINVAL, "file offset not page aligned")
        old = self.overlapping(new.moffset, new.length)
        keep = [piece for m in old for piece in self._cut(m, new.moffset, new.length)]
        if len(self._maps) - len(old) + len(keep) + 1 > self.max_mappings:
            raise OSError(errno.ENOSPC, "DAX window has no mapping slots left")
        return Plan(old, [*keep, new])

    def plan_remove(self, moffset: int, length: int) -> Plan:
        self.check_range(moffset, length)
        old = self.overlapping(moffset, length)
        keep = [piece for m in old for piece in self._cut(m, moffset, length)]
        # A split of one mapping into two takes a slot; refusing would leave the guest
        # unable to free anything, so removals may go past the limit.
        return Plan(old, keep)

    def remove(self, mapping: Mapping) -> None:
        i = bisect.bisect_left(self._starts, mapping.moffset)
        if i < len(self._maps) and self._maps[i] is mapping:
            del self._starts[i]
            del self._maps[i]
            mapping.file.refs -= 1
            owner = mapping.file.owner
            self._owners[owner] -= 1
            if not self._owners[owner]:
                del self._owners[owner]
            return
        raise KeyError(mapping.moffset)

    def add(self, mapping: Mapping) -> None:
        i = bisect.bisect_left(self._starts, mapping.moffset)
        if (i > 0 and self._maps[i - 1].end > mapping.moffset) or (
            i < len(self._maps) and self._maps[i].moffset < mapping.end
        ):
            raise ValueError(f"mapping at {mapping.moffset:#x} overlaps another")
        self._starts.insert(i, mapping.moffset)
        self._maps.insert(i, mapping)
        mapping.file.refs += 1
        owner = mapping.file.owner
        self._owners[owner] = self._owners.get(owner, 0) + 1

    def clear(self) -> list[Mapping]:
        maps = self._maps
        for m in maps:
            m.file.refs -= 1
        self._maps = []
        self._starts = []
        self._owners.clear()
        return maps

    def holds(self, owner: object) -> bool:
        return owner in self._owners

    def mappings_of(self, owner: object) -> list[Mapping]:
        if owner not in self._owners:
            return []
        return [m for m in self._maps if m.file.owner == owner]


class ShmemMapper(Protocol):
    """The front-end's side: :class:`~pyvirtiofsd.vhost_user.channel.BackendChannel`."""

    def shmem_map(
        self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool
    ) -> int: ...

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> int: ...


class DaxWindow:
    """Shared memory region 0 of a virtio-fs device, as the FUSE file system sees it.

    ``setup`` and ``remove`` are what a file system's setupmapping/removemapping call; they
    raise ``OSError`` with the errno the guest should see.
    """

    shmid = 0

    def __init__(
        self, size: int, max_mappings: int | None = None, max_regions: int = MAX_REGIONS
    ) -> None:
        self.table = MappingTable(size, max_mappings)
        self.size = size
        self.mapper: ShmemMapper | None = None
        self.max_regions = max_regions
        #: Regions mapped at the front-end now (a mapping takes one, two with a shadowed
        #: last page).
        self.regions = 0
        self._lock = threading.Lock()
        self.stats = {"setup": 0, "remove": 0, "shmem_map": 0, "shmem_unmap": 0, "failed": 0}

    def _mapper(self) -> ShmemMapper:
        mapper = self.mapper
        if mapper is None:
            raise OSError(errno.ENODEV, "the front-end gave no back-end channel")
        return mapper

    def _request(self, kind: str, status: int, moffset: int, length: int) -> None:
        self.stats["shmem_" + kind] += 1
        if not status:
            self.regions += 1 if kind == "map" else -1
        else:
            self.stats["failed"] += 1
            log.error(
                "front-end refused to %s DAX range %#x+%#x (status %d)",
                kind,
                moffset,
                length,
                status,
            )
            raise OSError(errno.EIO, f"front-end refused SHMEM_{kind.upper()}")

    def _send_unmap(self, m: Mapping) -> None:
        mapper = self._mapper()
        if m.mapped:
            status = mapper.shmem_unmap(self.shmid, m.moffset, m.mapped)
            self._request("unmap", status, m.moffset, m.mapped)
            m.mapped = 0
        tail = m.tail
        if tail is not None:
            self._sync_tail(m)
            at = m.moffset + tail.foffset - m.foffset
            status = mapper.shmem_unmap(self.shmid, at, PAGE)
            self._request("unmap", status, at, PAGE)
            os.close(tail.fd)
            m.tail = None

    def _send_map(self, m: Mapping, size: int | None = None) -> None:
        if size is None:
            size = os.fstat(m.file.fd).st_size
        full, tail_at = _layout(m, size)
        mapper = self._mapper()
        if self.regions + bool(full) + (tail_at is not None) > self.max_regions:
            raise OSError(errno.ENOSPC, "the front-end's memory slots are all in use")
        if full:
            status = mapper.shmem_map(self.shmid, m.file.fd, m.foffset, m.moffset, full, m.writable)
            self._request("map", status, m.moffset, full)
            m.mapped = full
        if tail_at is not None:
            data = os.pread(m.file.fd, size - tail_at, tail_at)
            fd = os.memfd_create("pyvirtiofsd-dax-tail", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, PAGE)
                os.pwrite(fd, data, 0)
                at = m.moffset + tail_at - m.foffset
                status = mapper.shmem_map(self.shmid, fd, 0, at, PAGE, m.writable)
                self._request("map", status, at, PAGE)
            except BaseException:
                os.close(fd)
                raise
            m.tail = TailPage(fd, tail_at, data)

    def _sync_tail(self, m: Mapping) -> None:
        """Copy what the guest wrote into a shadowed last page back to the file."""
        tail = m.tail
        # Nothing goes back through a read-only mapping: its file may be open read-only, and
        # only a misbehaving guest writes there (QEMU maps the shadow writable all the same).
        if tail is None or not m.writable:
            return
        now = os.pread(tail.fd, len(tail.snapshot), 0)
        if now == tail.snapshot:
            return
        first = next(i for i, (a, b) in enumerate(zip(now, tail.snapshot, strict=True)) if a != b)
        last = len(now) - next(
            i
            for i, (a, b) in enumerate(zip(reversed(now), reversed(tail.snapshot), strict=True))
            if a != b
        )
        # Never past the file's end: the guest can't grow a file through its mapping.
        end = min(last, os.fstat(m.file.fd).st_size - tail.foffset)
        if end > first:
            os.pwrite(m.file.fd, now[first:end], tail.foffset + first)
        tail.snapshot = now

    def _refresh_tail(self, m: Mapping, size: int) -> None:
        """Copy the file's last page into its shadow (the file changed)."""
        tail = m.tail
        assert tail is not None
        data = os.pread(m.file.fd, size - tail.foffset, tail.foffset)
        if data != tail.snapshot:
            # Zeros past the end, as a page of the file itself would show.
            os.pwrite(tail.fd, data.ljust(PAGE, b"\0"), 0)
            tail.snapshot = data

    def _run(self, plan: Plan) -> None:
        """Carry ``plan`` out, keeping the table equal to what the front-end has mapped."""
        self._mapper()
        # The pieces to map again share the fd of the mapping they are cut from: hold it
        # while that mapping is unmapped.
        freed = sum(bool(m.mapped) + (m.tail is not None) for m in plan.unmap)
        needed = 0
        for m in plan.map:
            full, tail_at = _layout(m, os.fstat(m.file.fd).st_size)
            needed += bool(full) + (tail_at is not None)
        if self.regions - freed + needed > self.max_regions:
            raise OSError(errno.ENOSPC, "the front-end's memory slots are all in use")
        touched = {id(m.file): m.file for m in (*plan.unmap, *plan.map)}
        for m in plan.map:
            m.file.refs += 1
        try:
            for m in plan.unmap:
                self._send_unmap(m)
                self.table.remove(m)
            for m in plan.map:
                self._send_map(m)
                self.table.add(m)
        finally:
            for m in plan.map:
                m.file.refs -= 1
            for file in touched.values():
                if file.refs == 0 and file.fd >= 0:
                    os.close(file.fd)
                    file.fd = -1

    def setup(
        self, fd: int, foffset: int, moffset: int, length: int, writable: bool, owner: object
    ) -> None:
        """Map ``length`` bytes of ``fd`` (borrowed; the window keeps its own copy) from
        ``foffset`` at ``moffset`` in the window."""
        with self._lock:
            file = MappedFile(os.dup(fd), owner)
            try:
                plan = self.table.plan_setup(Mapping(moffset, length, foffset, writable, file))
            except OSError:
                os.close(file.fd)
                raise
            self.stats["setup"] += 1
            self._run(plan)

    def remove(self, ranges: Iterable[tuple[int, int]]) -> None:
        with self._lock:
            for moffset, length in ranges:
                self.stats["remove"] += 1
                self._run(self.table.plan_remove(moffset, length))

    def reset(self) -> None:
        """The front-end dropped every mapping (device reset): forget ours, send nothing."""
        with self._lock:
            self.regions = 0
            for m in self.table.clear():
                if m.tail is not None:
                    self._sync_tail(m)
                    os.close(m.tail.fd)
                    m.tail = None
                if m.file.refs == 0 and m.file.fd >= 0:
                    os.close(m.file.fd)
                    m.file.fd = -1

    def holds(self, owner: object) -> bool:
        """Whether ``owner`` has mappings (cheap; no lock needed for a hint)."""
        return self.table.holds(owner)

    def flush(self, owner: object) -> None:
        """Make what the guest wrote through the window visible in ``owner``'s file (the
        shadowed last pages): before a sync, a close, or the daemon's own access to it."""
        with self._lock:
            for m in self.table.mappings_of(owner):
                if m.tail is not None:
                    self._sync_tail(m)

    def resized(self, owner: object, size: int) -> None:
        """``owner``'s file is now ``size`` bytes, or changed: map again what its mappings
        should show (more of a file that grew; less of one that shrank, whose pages past
        the end would fault in the front-end), and refresh shadowed last pages."""
        with self._lock:
            for m in self.table.mappings_of(owner):
                full, tail_at = _layout(m, size)
                if full != m.mapped or tail_at != (m.tail.foffset if m.tail else None):
                    self._send_unmap(m)
                    self._send_map(m, size)
                elif m.tail is not None:
                    self._sync_tail(m)
                    self._refresh_tail(m, size)


def _layout(m: Mapping, size: int) -> tuple[int, int | None]:
    """What a file of ``size`` bytes backs of ``m``: the whole pages to map from ``moffset``,
    and the file offset of a partial last page in the range (to shadow), if any."""
    available = size - m.foffset
    if available <= 0:
        return 0, None
    full = min(m.length, available & ~(PAGE - 1))
    if full < m.length and available % PAGE:
        return full, m.foffset + full
    return full, None
