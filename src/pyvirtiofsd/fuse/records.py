"""The values every request carries in and out of a file system: who asks (:class:`Context`),
an inode's attributes (:class:`Attr`) and a name resolved to an inode (:class:`Entry`).

They live apart from :mod:`.filesystem`, which re-exports them, so that a compiled build
compiles them (see :mod:`pyvirtiofsd.accel`): the server and the backends make and read them
for every request, and a compiled class is made and read without Python's generic machinery.
Nothing here subclasses them, and nothing may: a compiled class takes no Python subclass.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Final, NamedTuple

__all__ = ["Attr", "Context", "Entry", "SecurityContext", "entry_out", "split_timeout"]

#: fuse_attr, as :data:`pyvirtiofsd.fuse.abi.ATTR` lays it out (a test holds them equal; the
#: compiled build's type check cannot type that Layout's struct from here).
_ATTR: Final = struct.Struct("<QQQQQQIIIIIIIIII")
_ATTR_SIZE: Final = 88
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_U64_MASK: Final = (1 << 64) - 1
_U32_MASK: Final = (1 << 32) - 1


class SecurityContext(NamedTuple):
    """The label the guest's security module chose for a file it creates (FUSE_SECURITY_CTX):
    the xattr to store it in, as the guest names it (``security.selinux``), and its value."""

    name: bytes
    value: bytes


class Context:
    """Who sent a request: the caller's ids in the guest (or on the host for /dev/fuse).

    A plain class rather than a dataclass: a compiled dataclass is made through the
    generated Python ``__init__``, which costs more than the rest of the class does."""

    __slots__ = ("gid", "groups", "interrupted", "pid", "secctx", "uid", "unique")

    def __init__(
        self,
        uid: int,
        gid: int,
        pid: int,
        unique: int = 0,
        groups: tuple[int, ...] = (),
        secctx: SecurityContext | None = None,
        interrupted: bool = False,
    ) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.unique = unique
        #: Supplementary groups sent with create-like requests (FUSE_CREATE_SUPP_GROUP).
        self.groups = groups
        #: The new file's security context, sent with create-like requests once
        #: FUSE_SECURITY_CTX is agreed (None: none came, or the guest has no security module
        #: that labels files).
        self.secctx = secctx
        #: Set when the kernel interrupts this request (the caller got a signal).
        self.interrupted = interrupted

    def _fields(self) -> tuple[object, ...]:
        return (
            self.uid,
            self.gid,
            self.pid,
            self.unique,
            self.groups,
            self.secctx,
            self.interrupted,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Context):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        return (
            f"Context(uid={self.uid}, gid={self.gid}, pid={self.pid}, unique={self.unique}, "
            f"groups={self.groups}, secctx={self.secctx}, interrupted={self.interrupted})"
        )


class Attr:
    """The attributes of an inode, as the kernel caches them.

    Kept as the kernel's ``fuse_attr`` itself (:attr:`raw`, 88 bytes, :data:`abi.ATTR
    <pyvirtiofsd.fuse.abi.ATTR>`): every reply that carries attributes copies them whole (after
    the fields before them: :meth:`~pyvirtiofsd.fuse.buffers.ReplyWriter.pack_then`), and a
    backend that has them in that form already (the compiled build's fstat) hands them over as
    they are. The fields read back from it. Times are the kernel's signed seconds in two's
    complement (a file from before 1970 has them "negative"), their nanoseconds always in
    0..999,999,999; the link count and the device number are cut to the 32 bits the kernel
    reads, as it reads them.
    """

    __slots__ = ("raw",)

    def __init__(
        self,
        ino: int = 0,
        size: int = 0,
        blocks: int = 0,
        atime: int = 0,
        mtime: int = 0,
        ctime: int = 0,
        atimensec: int = 0,
        mtimensec: int = 0,
        ctimensec: int = 0,
        mode: int = 0,
        nlink: int = 1,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        blksize: int = 4096,
        flags: int = 0,
        *,
        raw: bytes | None = None,
    ) -> None:
        if raw is None:
            raw = _ATTR.pack(
                ino,
                size,
                blocks,
                atime & _U64_MASK,
                mtime & _U64_MASK,
                ctime & _U64_MASK,
                atimensec,
                mtimensec,
                ctimensec,
                mode,
                nlink & _U32_MASK,
                uid,
                gid,
                rdev & _U32_MASK,
                blksize,
                flags,
            )
        elif len(raw) != _ATTR_SIZE:
            raise ValueError(f"a fuse_attr is {_ATTR_SIZE} bytes, not {len(raw)}")
        self.raw = raw

    @classmethod
    def from_stat(
        cls,
        st: os.stat_result,
        ino: int | None = None,
        flags: int = 0,
        uid: int | None = None,
        gid: int | None = None,
    ) -> Attr:
        """The attributes of ``st``; ``ino``, ``uid`` and ``gid`` replace its own if given."""
        a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        # Floor division: a time before 1970 is whole seconds below it plus nanoseconds
        # above, as a timespec has it.
        return cls(
            st.st_ino if ino is None else ino,
            st.st_size,
            st.st_blocks,
            a // 1_000_000_000,
            m // 1_000_000_000,
            c // 1_000_000_000,
            a % 1_000_000_000,
            m % 1_000_000_000,
            c % 1_000_000_000,
            st.st_mode,
            st.st_nlink,
            st.st_uid if uid is None else uid,
            st.st_gid if gid is None else gid,
            st.st_rdev,
            st.st_blksize,
            flags,
        )

    def with_flags(self, flags: int) -> Attr:
        """These attributes with ``flags`` in place of their own."""
        return Attr(raw=self.raw[:-4] + _U32.pack(flags))

    def _field(self, index: int) -> int:
        value: int = _ATTR.unpack(self.raw)[index]
        return value

    @property
    def ino(self) -> int:
        # Alone, not through _field: a READDIRPLUS entry asks it, and the whole unpack makes
        # sixteen integers.
        value: int = _U64.unpack_from(self.raw)[0]
        return value

    @property
    def size(self) -> int:
        return self._field(1)

    @property
    def blocks(self) -> int:
        return self._field(2)

    @property
    def atime(self) -> int:
        return _signed(self._field(3))

    @property
    def mtime(self) -> int:
        return _signed(self._field(4))

    @property
    def ctime(self) -> int:
        return _signed(self._field(5))

    @property
    def atimensec(self) -> int:
        return self._field(6)

    @property
    def mtimensec(self) -> int:
        return self._field(7)

    @property
    def ctimensec(self) -> int:
        return self._field(8)

    @property
    def mode(self) -> int:
        return self._field(9)

    @property
    def nlink(self) -> int:
        return self._field(10)

    @property
    def uid(self) -> int:
        return self._field(11)

    @property
    def gid(self) -> int:
        return self._field(12)

    @property
    def rdev(self) -> int:
        return self._field(13)

    @property
    def blksize(self) -> int:
        return self._field(14)

    @property
    def flags(self) -> int:
        return self._field(15)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Attr):
            return NotImplemented
        return self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"Attr(ino={self.ino}, mode={self.mode:o}, size={self.size})"


def _signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


class Entry:
    """A name resolved to an inode: what lookup and the create family return."""

    __slots__ = ("attr", "attr_timeout", "entry_timeout", "generation", "ino")

    def __init__(
        self,
        ino: int,
        attr: Attr,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
        generation: int = 0,
    ) -> None:
        self.ino = ino
        self.attr = attr
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.generation = generation

    @classmethod
    def negative(cls, timeout: float) -> Entry:
        """A cacheable "no such name" (inode 0), answered instead of ENOENT."""
        return cls(0, Attr(), timeout, 0.0)


def _split(seconds: float) -> tuple[int, int]:
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, int((seconds - whole) * 1_000_000_000)


#: Timeouts split into (seconds, nanoseconds), as replies carry them: a file system answers
#: with the few it was configured with, so each is split once.
_TIMEOUTS: dict[float, tuple[int, int]] = {}
#: Beyond this many distinct timeouts (a file system that computes them), split each time.
_TIMEOUTS_KEPT: Final = 64


def split_timeout(seconds: float) -> tuple[int, int]:
    """A timeout in seconds as a reply carries it: whole seconds and nanoseconds (0, 0 for
    none)."""
    split = _TIMEOUTS.get(seconds)
    if split is None:
        split = _split(seconds)
        if len(_TIMEOUTS) < _TIMEOUTS_KEPT:
            _TIMEOUTS[seconds] = split
    return split


#: fuse_entry_out up to its attributes: the node's id and generation, then the validity fields,
#: which depend on the two timeouts alone and so are packed once per pair.
_NODE: Final = struct.Struct("<QQ")
_TIMES: Final = struct.Struct("<QQII")
_ENTRY_TIMES: Final[dict[tuple[float, float], bytes]] = {}
#: The last pair packed, with its bytes (a NaN pair matches none).
_LAST_TIMES: Final[list[tuple[float, float, bytes]]] = [(math.nan, math.nan, b"")]


def entry_out(entry: Entry) -> bytes:
    """``entry`` as a fuse_entry_out: what LOOKUP and the create family answer, and what
    each READDIRPLUS entry starts with."""
    entry_timeout = entry.entry_timeout
    attr_timeout = entry.attr_timeout
    # The pair of the last entry first: compared as two floats, where a look-up in the table
    # hashes a new tuple of them. A file system gives most entries the same pair.
    last = _LAST_TIMES[0]
    if last[0] == entry_timeout and last[1] == attr_timeout:
        times = last[2]
    else:
        timeouts = (entry_timeout, attr_timeout)
        found = _ENTRY_TIMES.get(timeouts)
        if found is None:
            ev, evn = split_timeout(entry_timeout)
            av, avn = split_timeout(attr_timeout)
            found = _TIMES.pack(ev, av, evn, avn)
            if len(_ENTRY_TIMES) < _TIMEOUTS_KEPT:
                _ENTRY_TIMES[timeouts] = found
        times = found
        # One tuple replaced whole: another thread reads the old pair or the new, never a mix.
        _LAST_TIMES[0] = (entry_timeout, attr_timeout, times)
    return _NODE.pack(entry.ino, entry.generation) + times + entry.attr.raw
