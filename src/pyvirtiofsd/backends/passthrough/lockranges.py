"""The POSIX record locks one owner holds on one file, as ranges (no I/O).

The passthrough takes the guest's POSIX locks as open file description locks, one open file per
lock owner (:mod:`.locks`), and the kernel keeps them. For a live migration the destination
must take the same locks again, and the kernel has no call that lists what an open file holds,
so the daemon keeps the record itself: each lock or unlock the kernel granted is applied here in
the order the kernel saw them (the caller serialises the call and its record).

The rules are the kernel's for one owner: ranges never overlap; a lock of either type replaces
whatever of the owner's it overlaps (splitting what sticks out on either side), an unlock
removes it. Ends are inclusive, and ``OFFSET_MAX`` means "to the end of the file". Adjacent
ranges of one type are not merged: taking them again gives the same locks.
"""

from __future__ import annotations

import fcntl

__all__ = ["LockRanges"]


class LockRanges:
    """One owner's locks on one file: ``ranges`` is a sorted list of ``(start, end, type)``."""

    __slots__ = ("ranges",)

    def __init__(self, ranges: list[tuple[int, int, int]] | None = None) -> None:
        self.ranges: list[tuple[int, int, int]] = sorted(ranges or [])

    def set(self, start: int, end: int, ltype: int) -> None:
        """The owner locked ``[start, end]`` with ``ltype`` (F_RDLCK, F_WRLCK), or unlocked
        it (F_UNLCK)."""
        if end < start:
            return
        out = []
        for s, e, t in self.ranges:
            if e < start or s > end:
                out.append((s, e, t))
                continue
            if s < start:
                out.append((s, start - 1, t))
            if e > end:
                out.append((end + 1, e, t))
        if ltype != fcntl.F_UNLCK:
            out.append((start, end, ltype))
        out.sort()
        self.ranges = out

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __repr__(self) -> str:
        return f"LockRanges({self.ranges!r})"
