"""The kernel's side of FUSE, in miniature: build requests, read replies.

Tests, benchmarks and the Python front-end use it to talk to a FUSE server through any
transport: a :class:`FuseClient` only needs a ``transact(request, reply_size) -> reply`` callable
(a direct call of :meth:`Server.handle`, or a trip through a virtqueue).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from pyvirtiofsd.fuse import abi


class Reply(NamedTuple):
    error: int
    unique: int
    payload: bytes


def encode_request(
    opcode: int,
    nodeid: int,
    payload: bytes = b"",
    unique: int = 1,
    uid: int = 0,
    gid: int = 0,
    pid: int = 0,
    ext: bytes = b"",
) -> bytes:
    length = abi.IN_HEADER.size + len(payload) + len(ext)
    header = abi.IN_HEADER.pack(length, opcode, unique, nodeid, uid, gid, pid, len(ext) // 8, 0)
    return header + payload + ext


def decode_reply(data: bytes) -> Reply:
    if len(data) < abi.OUT_HEADER.size:
        raise ValueError(f"reply of {len(data)} bytes has no header")
    length, error, unique = abi.OUT_HEADER.struct.unpack_from(data)
    if length != len(data):
        raise ValueError(f"reply header says {length} bytes, got {len(data)}")
    return Reply(-error, unique, bytes(data[abi.OUT_HEADER.size :]))


def groups_extension(groups: list[int]) -> bytes:
    body = abi.SUPP_GROUPS.pack(len(groups)) + b"".join(g.to_bytes(4, "little") for g in groups)
    size = abi.EXT_HEADER.size + len(body)
    padded = (size + 7) & ~7
    return abi.EXT_HEADER.pack(padded, abi.EXT_GROUPS) + body + b"\0" * (padded - size)


def secctx_extension(contexts: list[tuple[bytes, bytes]]) -> bytes:
    """A security-context extension as the kernel lays it out (one context at most, from a
    kernel; any number here): the header, then per context a ``fuse_secctx``, the xattr
    name with its NUL and the value, zero-padded to 8 bytes."""
    body = b""
    for name, value in contexts:
        record = abi.SECCTX.pack(len(value), 0) + name + b"\0" + value
        body += record + b"\0" * (-len(record) % 8)
    return abi.SECCTX_HEADER.pack(abi.SECCTX_HEADER.size + len(body), len(contexts)) + body


def _z(name: bytes) -> bytes:
    return name + b"\0"


class FuseClient:
    """Sends FUSE requests through ``transact`` and decodes the replies.

    Methods raise ``OSError`` with the server's errno; they return decoded named tuples.
    """

    def __init__(self, transact: Callable[[bytes, int], bytes], uid: int = 0, gid: int = 0):
        self._transact = transact
        self._unique = itertools.count(1)
        self.uid = uid
        self.gid = gid
        self.max_write = 1 << 20
        #: INIT flags in force (flags | flags2 << 32), once init() has run.
        self.flags = 0

    # --- plumbing --------------------------------------------------------------------------

    def call(
        self, opcode: int, nodeid: int, payload: bytes = b"", reply_size: int = 4096, **kw: Any
    ) -> bytes:
        unique = next(self._unique)
        kw.setdefault("uid", self.uid)
        kw.setdefault("gid", self.gid)
        req = encode_request(opcode, nodeid, payload, unique, **kw)
        raw = self._transact(req, reply_size + abi.OUT_HEADER.size)
        reply = decode_reply(raw)
        if reply.unique != unique:
            raise ValueError(f"reply to {reply.unique}, expected {unique}")
        if reply.error:
            raise OSError(reply.error, os.strerror(reply.error))
        return reply.payload

    def send(self, opcode: int, nodeid: int, payload: bytes = b"", **kw: Any) -> None:
        """A request that gets no reply (FORGET, BATCH_FORGET)."""
        req = encode_request(opcode, nodeid, payload, next(self._unique), **kw)
        self._transact(req, 0)

    # --- requests --------------------------------------------------------------------------

    def init(self, flags: int = 0, minor: int = abi.KERNEL_MINOR_VERSION) -> Any:
        flags |= abi.InitFlag.INIT_EXT
        payload = abi.INIT_IN.pack(
            abi.KERNEL_VERSION, minor, 1 << 17, flags & 0xFFFFFFFF, flags >> 32, (0,) * 11
        )
        out = abi.INIT_OUT.unpack(self.call(abi.Opcode.INIT, 0, payload))
        self.max_write = out.max_write
        self.flags = out.flags | out.flags2 << 32
        return out

    def lookup(self, parent: int, name: bytes) -> Any:
        return abi.ENTRY_OUT.unpack(self.call(abi.Opcode.LOOKUP, parent, _z(name)))

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.send(abi.Opcode.FORGET, nodeid, abi.FORGET_IN.pack(nlookup))

    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        payload = abi.BATCH_FORGET_IN.pack(len(items), 0) + b"".join(
            abi.FORGET_ONE.pack(n, c) for n, c in items
        )
        self.send(abi.Opcode.BATCH_FORGET, 0, payload)

    def getattr(self, nodeid: int, fh: int | None = None) -> Any:
        payload = abi.GETATTR_IN.pack(abi.GETATTR_FH if fh is not None else 0, 0, fh or 0)
        return abi.ATTR_OUT.unpack(self.call(abi.Opcode.GETATTR, nodeid, payload))

    def setattr(self, nodeid: int, **fields: int) -> Any:
        return abi.ATTR_OUT.unpack(
            self.call(abi.Opcode.SETATTR, nodeid, abi.SETATTR_IN.pack(**fields))
        )

    def readlink(self, nodeid: int) -> bytes:
        return self.call(abi.Opcode.READLINK, nodeid)

    def symlink(self, parent: int, name: bytes, target: bytes, **kw: Any) -> Any:
        payload = _z(name) + _z(target)
        return abi.ENTRY_OUT.unpack(self.call(abi.Opcode.SYMLINK, parent, payload, **kw))

    def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int = 0, umask: int = 0, **kw: Any
    ) -> Any:
        payload = abi.MKNOD_IN.pack(mode, rdev, umask, 0) + _z(name)
        return abi.ENTRY_OUT.unpack(self.call(abi.Opcode.MKNOD, parent, payload, **kw))

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, umask: int = 0, **kw: Any) -> Any:
        payload = abi.MKDIR_IN.pack(mode, umask) + _z(name)
        return abi.ENTRY_OUT.unpack(self.call(abi.Opcode.MKDIR, parent, payload, **kw))

    def unlink(self, parent: int, name: bytes) -> None:
        self.call(abi.Opcode.UNLINK, parent, _z(name))

    def rmdir(self, parent: int, name: bytes) -> None:
        self.call(abi.Opcode.RMDIR, parent, _z(name))

    def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        payload = abi.RENAME2_IN.pack(new_parent, flags, 0) + _z(name) + _z(new_name)
        self.call(abi.Opcode.RENAME2, parent, payload)

    def link(self, nodeid: int, new_parent: int, new_name: bytes) -> Any:
        payload = abi.LINK_IN.pack(nodeid) + _z(new_name)
        return abi.ENTRY_OUT.unpack(self.call(abi.Opcode.LINK, new_parent, payload))

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> Any:
        return abi.OPEN_OUT.unpack(self.call(abi.Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0)))

    def create(
        self,
        parent: int,
        name: bytes,
        mode: int = 0o644,
        flags: int = os.O_RDWR,
        umask: int = 0,
        **kw: Any,
    ) -> tuple[Any, Any]:
        payload = abi.CREATE_IN.pack(flags | os.O_CREAT, mode, umask, 0) + _z(name)
        raw = self.call(abi.Opcode.CREATE, parent, payload, **kw)
        return (
            abi.ENTRY_OUT.unpack(raw),
            abi.OPEN_OUT.unpack(raw, abi.ENTRY_OUT.size),
        )

    def tmpfile(
        self, parent: int, mode: int = 0o600, flags: int = os.O_RDWR, umask: int = 0, **kw: Any
    ) -> tuple[Any, Any]:
        payload = abi.CREATE_IN.pack(flags, mode, umask, 0)
        raw = self.call(abi.Opcode.TMPFILE, parent, payload, **kw)
        return (
            abi.ENTRY_OUT.unpack(raw),
            abi.OPEN_OUT.unpack(raw, abi.ENTRY_OUT.size),
        )

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        payload = abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
        return self.call(abi.Opcode.READ, nodeid, payload, reply_size=size)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, flags: int = 0) -> int:
        payload = abi.WRITE_IN.pack(fh, offset, len(data), flags, 0, 0, 0) + data
        return abi.WRITE_OUT.unpack(self.call(abi.Opcode.WRITE, nodeid, payload)).size

    def flush(self, nodeid: int, fh: int, lock_owner: int = 0) -> None:
        self.call(abi.Opcode.FLUSH, nodeid, abi.FLUSH_IN.pack(fh, 0, 0, lock_owner))

    def release(self, nodeid: int, fh: int, flags: int = 0) -> None:
        self.call(abi.Opcode.RELEASE, nodeid, abi.RELEASE_IN.pack(fh, flags, 0, 0))

    def fsync(self, nodeid: int, fh: int, datasync: bool = False) -> None:
        payload = abi.FSYNC_IN.pack(fh, abi.FSYNC_FDATASYNC if datasync else 0, 0)
        self.call(abi.Opcode.FSYNC, nodeid, payload)

    def opendir(self, nodeid: int) -> Any:
        return abi.OPEN_OUT.unpack(self.call(abi.Opcode.OPENDIR, nodeid, abi.OPEN_IN.pack(0, 0)))

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096) -> list[Any]:
        """Entries as (ino, off, type, name)."""
        payload = abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
        raw = self.call(abi.Opcode.READDIR, nodeid, payload, reply_size=size)
        out, pos = [], 0
        while pos < len(raw):
            ino, off, namelen, dtype = abi.DIRENT.struct.unpack_from(raw, pos)
            name = raw[pos + abi.DIRENT.size : pos + abi.DIRENT.size + namelen]
            out.append((ino, off, dtype, name))
            pos += abi.dirent_size(namelen)
        return out

    def readdirplus(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096) -> list[Any]:
        """Entries as (entry_out, name)."""
        payload = abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
        raw = self.call(abi.Opcode.READDIRPLUS, nodeid, payload, reply_size=size)
        out, pos = [], 0
        while pos < len(raw):
            entry = abi.DIRENTPLUS.unpack(raw, pos)
            start = pos + abi.DIRENTPLUS.size
            out.append((entry, raw[start : start + entry.d_namelen]))
            pos += abi.direntplus_size(entry.d_namelen)
        return out

    def releasedir(self, nodeid: int, fh: int) -> None:
        self.call(abi.Opcode.RELEASEDIR, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0))

    def statfs(self, nodeid: int = abi.ROOT_ID) -> Any:
        return abi.KSTATFS.unpack(self.call(abi.Opcode.STATFS, nodeid))

    def getxattr(self, nodeid: int, name: bytes, size: int = 4096) -> bytes:
        payload = abi.GETXATTR_IN.pack(size, 0) + _z(name)
        return self.call(abi.Opcode.GETXATTR, nodeid, payload)

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int = 0) -> None:
        # The layout depends on INIT: the long form only once SETXATTR_EXT was agreed.
        if self.flags & abi.InitFlag.SETXATTR_EXT:
            head = abi.SETXATTR_IN.pack(len(value), flags, 0, 0)
        else:
            head = abi.GETXATTR_IN.pack(len(value), flags)
        payload = head + _z(name) + value
        self.call(abi.Opcode.SETXATTR, nodeid, payload)

    def listxattr(self, nodeid: int, size: int = 4096) -> list[bytes] | int:
        """The names (size 0: the byte count the server says a list needs)."""
        raw = self.call(abi.Opcode.LISTXATTR, nodeid, abi.GETXATTR_IN.pack(size, 0))
        if size == 0:
            return int(abi.GETXATTR_OUT.unpack(raw).size)
        return raw.split(b"\0")[:-1]

    def removexattr(self, nodeid: int, name: bytes) -> None:
        self.call(abi.Opcode.REMOVEXATTR, nodeid, _z(name))

    def setupmapping(
        self, nodeid: int, fh: int, foffset: int, length: int, flags: int, moffset: int
    ) -> None:
        payload = abi.SETUPMAPPING_IN.pack(fh, foffset, length, flags, moffset)
        self.call(abi.Opcode.SETUPMAPPING, nodeid, payload)

    def removemapping(self, ranges: list[tuple[int, int]]) -> None:
        payload = abi.REMOVEMAPPING_IN.pack(len(ranges)) + b"".join(
            abi.REMOVEMAPPING_ONE.pack(m, n) for m, n in ranges
        )
        self.call(abi.Opcode.REMOVEMAPPING, abi.ROOT_ID, payload)


def direct(server: Any) -> Callable[[bytes, int], bytes]:
    """A ``transact`` that calls ``server.handle`` in-process, as /dev/fuse would."""

    def transact(request: bytes, reply_size: int) -> bytes:
        out = bytearray(max(reply_size, 0))
        n = server.handle([memoryview(request)], [memoryview(out)] if reply_size else [])
        return bytes(out[: max(n, 0)])

    return transact


__all__ = [
    "FuseClient",
    "Reply",
    "decode_reply",
    "direct",
    "encode_request",
    "groups_extension",
    "secctx_extension",
]
