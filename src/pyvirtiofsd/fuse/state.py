"""The byte format of a FUSE session's saved state (live migration): versioned and compact.

A saved state is a sequence of *sections*, each a tag, a version and a body of known length
(:meth:`StateWriter.section`, :meth:`StateReader.section`). Inside a body, integers are
unsigned LEB128 varints (small numbers take one byte: nodeids, counts, flags) and byte strings a
varint length and the bytes. The format is our own; nothing in it is meant to be read by
another implementation.

Rules for readers: every length is checked against what is left before anything is taken, a
count never sizes an allocation by itself (and may have a bound of its own), a field with a
range is checked against it as it is read (:meth:`StateReader.uint_below`), a section of a
version this code does not know is refused with a message naming it (a newer source, an older
destination), and bytes left over at the end are an error. Every failure is a
:class:`StateError` whose message says what was being read.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["StateError", "StateReader", "StateWriter"]

#: The largest integer a varint may carry here (64 bits: flags, offsets, lock owners).
_MAX_BITS = 64


class StateError(ValueError):
    """Saved state that can't be read (truncated, corrupt, or of an unknown version)."""


class StateWriter:
    """Builds a saved state (or one section's body)."""

    def __init__(self) -> None:
        self._out = bytearray()

    def uint(self, value: int) -> StateWriter:
        out = self._out
        if 0 <= value < 0x80:
            out.append(value)
            return self
        if value < 0 or value >> _MAX_BITS:
            raise ValueError(f"{value} does not fit an unsigned 64-bit field")
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
        return self

    def bytes(self, value: bytes) -> StateWriter:
        self.uint(len(value))
        self._out += value
        return self

    def items(self, values: Iterable[int | bytes]) -> StateWriter:
        """Many numbers and byte strings at once (each as :meth:`uint` or :meth:`bytes`)."""
        out = self._out
        for value in values:
            if type(value) is int and 0 <= value < 0x80:
                out.append(value)
            elif isinstance(value, int):
                self.uint(value)
            else:
                self.bytes(value)
        return self

    def section(self, tag: bytes, version: int, body: bytes | StateWriter) -> StateWriter:
        """A section: ``tag`` (a short name), the body's format ``version``, the body."""
        self.bytes(tag)
        self.uint(version)
        self.bytes(body.getvalue() if isinstance(body, StateWriter) else body)
        return self

    def getvalue(self) -> bytes:
        return bytes(self._out)

    def __len__(self) -> int:
        return len(self._out)


class StateReader:
    """Reads a saved state; ``what`` names it in error messages."""

    def __init__(self, data: bytes | memoryview, what: str = "saved state") -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def uint(self) -> int:
        data, pos = self._data, self._pos
        if pos < len(data) and data[pos] < 0x80:
            self._pos = pos + 1
            return data[pos]
        value = shift = 0
        while True:
            if pos >= len(data):
                raise StateError(f"{self.what}: truncated (inside a number)")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift >= _MAX_BITS:
                raise StateError(f"{self.what}: a number longer than 64 bits")
        if value >> _MAX_BITS:
            raise StateError(f"{self.what}: a number longer than 64 bits")
        self._pos = pos
        return value

    def uints(self, n: int) -> list[int]:
        """``n`` numbers at once (one call for a record's fields: loads run in a downtime)."""
        data, pos = self._data, self._pos
        end = len(data)
        out = []
        for _ in range(n):
            if pos < end and data[pos] < 0x80:
                out.append(data[pos])
                pos += 1
            else:
                self._pos = pos
                out.append(self.uint())
                pos = self._pos
        self._pos = pos
        return out

    def bytes(self, limit: int | None = None) -> bytes:
        """A byte string (at most ``limit`` bytes long, when given)."""
        n = self.uint()
        if limit is not None and n > limit:
            raise StateError(f"{self.what}: a field of {n} bytes (at most {limit})")
        if n > self.remaining:
            left = self.remaining
            raise StateError(f"{self.what}: truncated (a field of {n} bytes, {left} left)")
        start = self._pos
        self._pos += n
        return bytes(self._data[start : self._pos])

    def uint_below(self, limit: int, name: str) -> int:
        """A number that must be below ``limit`` (``name`` says what it is in the error)."""
        value = self.uint()
        if value >= limit:
            raise StateError(f"{self.what}: {name} {value} out of range (below {limit})")
        return value

    def count(self, least_size: int = 1, *, limit: int | None = None, name: str = "items") -> int:
        """A count of items that take at least ``least_size`` bytes each: one that could not
        fit in what is left, or is above ``limit``, is refused before anyone loops on it."""
        n = self.uint()
        if limit is not None and n > limit:
            raise StateError(f"{self.what}: {name}: {n} (at most {limit})")
        if n * least_size > self.remaining:
            raise StateError(f"{self.what}: {n} {name} announced, {self.remaining} bytes left")
        return n

    def section(self, tag: bytes, versions: tuple[int, ...]) -> tuple[int, StateReader]:
        """The next section, which must be ``tag`` in one of ``versions``: its version and a
        reader of its body."""
        got = self.bytes(limit=64)
        if got != tag:
            raise StateError(f"{self.what}: section {got!r} where {tag!r} belongs")
        version = self.uint()
        name = tag.decode(errors="replace")
        if version not in versions:
            known = ", ".join(map(str, versions))
            raise StateError(
                f"{self.what}: section {name!r} of version {version}; this daemon reads "
                f"version {known} (a newer daemon saved it?)"
            )
        return version, StateReader(self.bytes(), f"{self.what}, {name} v{version}")

    def end(self) -> None:
        """Everything must have been read."""
        if self.remaining:
            raise StateError(f"{self.what}: {self.remaining} bytes past the end")
