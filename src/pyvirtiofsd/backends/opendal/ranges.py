"""Sets of byte ranges: which parts of a staged file hold the object's data."""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = [
    "Ranges",
]


class Ranges:
    """Disjoint, sorted, half-open ranges kept as one flat list ``[s0, e0, s1, e1, ...]``: a
    file read or written front to back is a single pair however large it grows."""

    __slots__ = ("_b",)

    def __init__(self) -> None:
        self._b: list[int] = []

    def __len__(self) -> int:
        return len(self._b) // 2

    def pairs(self) -> list[tuple[int, int]]:
        b = self._b
        return [(b[i], b[i + 1]) for i in range(0, len(b), 2)]

    def total(self) -> int:
        b = self._b
        return sum(b[i + 1] - b[i] for i in range(0, len(b), 2))

    def add(self, start: int, end: int) -> int:
        """Add [start, end); returns how many bytes were not in the set before."""
        if end <= start:
            return 0
        b = self._b
        # Every range touching or overlapping [start, end) merges into one.
        i = bisect_left(b, start)
        j = bisect_right(b, end)
        if i % 2:
            i -= 1
        if j % 2:
            j += 1
        covered = 0
        for k in range(i, j, 2):
            lo, hi = max(b[k], start), min(b[k + 1], end)
            if hi > lo:
                covered += hi - lo
        new_start = min(start, b[i]) if i < j else start
        new_end = max(end, b[j - 1]) if i < j else end
        b[i:j] = [new_start, new_end]
        return (end - start) - covered

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not in the set, in order."""
        out: list[tuple[int, int]] = []
        if end <= start:
            return out
        b = self._b
        i = bisect_right(b, start)
        pos = start
        if i % 2:
            # ``start`` lies inside the range ending at b[i].
            pos = b[i]
            i += 1
        while pos < end:
            if i >= len(b) or b[i] >= end:
                out.append((pos, end))
                break
            if b[i] > pos:
                out.append((pos, b[i]))
            pos = b[i + 1]
            i += 2
        return out

    def covers(self, start: int, end: int) -> bool:
        return not self.missing(start, end)

    def cut(self, end: int) -> int:
        """Drop everything at or beyond ``end``; returns the bytes dropped."""
        b = self._b
        before = self.total()
        i = bisect_left(b, end)
        if i % 2:
            # ``end`` lies inside a range: keep its front part.
            del b[i:]
            b.append(end)
        else:
            del b[i:]
        return before - self.total()

    def remove(self, start: int, end: int) -> int:
        """Drop [start, end); returns the bytes dropped."""
        if end <= start:
            return 0
        b = self._b
        before = self.total()
        out: list[int] = []
        for k in range(0, len(b), 2):
            lo, hi = b[k], b[k + 1]
            if hi <= start or lo >= end:
                out += (lo, hi)
                continue
            if lo < start:
                out += (lo, start)
            if hi > end:
                out += (end, hi)
        self._b = out
        return before - self.total()
