"""The values every request carries in and out of a file system: who asks (:class:`Context`),
an inode's attributes (:class:`Attr`) and a name resolved to an inode (:class:`Entry`).

They live apart from :mod:`.filesystem`, which re-exports them, so that a compiled build
compiles them (see :mod:`pyvirtiofsd.accel`): the server and the backends make and read them
for every request, and a compiled class is made and read without Python's generic machinery.
Nothing here subclasses them, and nothing may: a compiled class takes no Python subclass.
"""

from __future__ import annotations

import os
from typing import Any, Final, NamedTuple

__all__ = ["Attr", "Context", "Entry", "SecurityContext", "split_timeout"]


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
    """The attributes of an inode, as the kernel caches them."""

    __slots__ = (
        "atime",
        "atimensec",
        "blksize",
        "blocks",
        "ctime",
        "ctimensec",
        "flags",
        "gid",
        "ino",
        "mode",
        "mtime",
        "mtimensec",
        "nlink",
        "rdev",
        "size",
        "uid",
    )

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
    ) -> None:
        self.ino = ino
        self.size = size
        self.blocks = blocks
        self.atime = atime
        self.mtime = mtime
        self.ctime = ctime
        self.atimensec = atimensec
        self.mtimensec = mtimensec
        self.ctimensec = ctimensec
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.blksize = blksize
        self.flags = flags

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
            st.st_rdev & 0xFFFFFFFF,
            st.st_blksize,
            flags,
        )

    def pack(self, out: Any, layout: Any, *head: int, tail: tuple[int, ...] = ()) -> None:
        """Pack ``layout`` into the reply ``out``: ``head``, the fields in fuse_attr order, then
        ``tail`` (the fields passed one by one: no tuple of them made and unpacked, as this runs
        for every reply that carries attributes)."""
        out.pack(
            layout,
            *head,
            self.ino,
            self.size,
            self.blocks,
            self.atime,
            self.mtime,
            self.ctime,
            self.atimensec,
            self.mtimensec,
            self.ctimensec,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev,
            self.blksize,
            self.flags,
            *tail,
        )

    def __repr__(self) -> str:
        return f"Attr(ino={self.ino}, mode={self.mode:o}, size={self.size})"


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
