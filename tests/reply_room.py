"""Requests of every opcode that replies, each with the size of its reply's fixed part, for the
tests that give a request less writable room than its reply needs (the server must refuse it
before the file system runs: nothing created, opened, looked up or changed).

The sizes are written out here from the FUSE ABI rather than taken from the server, so that
the tests check the server's table instead of repeating it. Each case's ``build`` prepares what
its request needs (through the client, with names of its own) and returns the request; sent with
enough room, the request succeeds, or at least reaches the file system.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.testing.fuse_client import FuseClient

Op = abi.Opcode
HEADER = abi.OUT_HEADER.size
Z = b"\0"


@dataclass
class Env:
    """A share (seen from the host) and a FUSE session on it."""

    share: Path
    fuse: FuseClient
    _names: itertools.count[int] = field(default_factory=itertools.count)

    def name(self, stem: str) -> bytes:
        return f"{stem}{next(self._names)}".encode()

    def host_file(self, data: bytes = b"hello, world\n") -> tuple[bytes, int]:
        """A new file made on the host and looked up: (name, nodeid)."""
        name = self.name("file")
        (self.share / name.decode()).write_bytes(data)
        os.setxattr(self.share / name.decode(), "user.tag", b"x")
        return name, int(self.fuse.lookup(ROOT, name).nodeid)

    def opened(self) -> tuple[int, int]:
        """A new file, looked up and opened read-write: (nodeid, fh)."""
        _, node = self.host_file()
        return node, int(self.fuse.open(node, os.O_RDWR).fh)

    def host_dir(self) -> tuple[bytes, int]:
        name = self.name("dir")
        (self.share / name.decode()).mkdir()
        return name, int(self.fuse.lookup(ROOT, name).nodeid)


#: (nodeid, payload) of one request.
Request = tuple[int, bytes]


@dataclass(frozen=True)
class Case:
    opcode: int
    #: Bytes of the reply after the out header that the server must have room for up front.
    fixed: int
    build: Callable[[Env], Request]


def _lookup(env: Env) -> Request:
    name = env.name("unseen")
    (env.share / name.decode()).write_bytes(b"")
    return ROOT, name + Z


def _setattr(env: Env) -> Request:
    _, node = env.host_file()
    return node, abi.SETATTR_IN.pack(valid=abi.FATTR_MODE, mode=stat.S_IFREG | 0o600)


def _readlink(env: Env) -> Request:
    name = env.name("link")
    os.symlink("somewhere", env.share / name.decode())
    return int(env.fuse.lookup(ROOT, name).nodeid), b""


def _rename(env: Env, op: int) -> Request:
    name, _ = env.host_file()
    new = env.name("renamed")
    if op == Op.RENAME:
        return ROOT, abi.RENAME_IN.pack(ROOT) + name + Z + new + Z
    return ROOT, abi.RENAME2_IN.pack(ROOT, 0, 0) + name + Z + new + Z


def _fh_op(layout: abi.Layout, *rest: int) -> Callable[[Env], Request]:
    def build(env: Env) -> Request:
        node, fh = env.opened()
        return node, layout.pack(fh, *rest)

    return build


def _dir_fh_op(layout: abi.Layout, *rest: int) -> Callable[[Env], Request]:
    def build(env: Env) -> Request:
        _, node = env.host_dir()
        return node, layout.pack(int(env.fuse.opendir(node).fh), *rest)

    return build


def _copy(env: Env) -> Request:
    node, fh = env.opened()
    out_node, out_fh = env.opened()
    return node, abi.COPY_FILE_RANGE_IN.pack(fh, 0, out_node, out_fh, 100, 5, 0)


def _lock(env: Env) -> Request:
    node, fh = env.opened()
    return node, abi.LK_IN.pack(fh, 4242, 0, 99, fcntl.F_WRLCK, 77, 0, 0)


def _write(env: Env) -> Request:
    node, fh = env.opened()
    return node, abi.WRITE_IN.pack(fh, 0, 3, 0, 0, 0, 0) + b"XYZ"


def _node(payload: bytes = b"") -> Callable[[Env], Request]:
    def build(env: Env) -> Request:
        return env.host_file()[1], payload

    return build


def _in_root(make: Callable[[Env], bytes]) -> Callable[[Env], Request]:
    return lambda env: (ROOT, make(env))


CASES: dict[str, Case] = {
    "lookup": Case(Op.LOOKUP, abi.ENTRY_OUT.size, _lookup),
    "getattr": Case(Op.GETATTR, abi.ATTR_OUT.size, _node(abi.GETATTR_IN.pack(0, 0, 0))),
    "setattr": Case(Op.SETATTR, abi.ATTR_OUT.size, _setattr),
    "readlink": Case(Op.READLINK, 0, _readlink),
    "symlink": Case(
        Op.SYMLINK, abi.ENTRY_OUT.size, _in_root(lambda e: e.name("sym") + Z + b"target" + Z)
    ),
    "mknod": Case(
        Op.MKNOD,
        abi.ENTRY_OUT.size,
        _in_root(lambda e: abi.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0, 0) + e.name("fifo") + Z),
    ),
    "mkdir": Case(
        Op.MKDIR,
        abi.ENTRY_OUT.size,
        _in_root(lambda e: abi.MKDIR_IN.pack(0o755, 0) + e.name("newdir") + Z),
    ),
    "unlink": Case(Op.UNLINK, 0, lambda e: (ROOT, e.host_file()[0] + Z)),
    "rmdir": Case(Op.RMDIR, 0, lambda e: (ROOT, e.host_dir()[0] + Z)),
    "rename": Case(Op.RENAME, 0, lambda e: _rename(e, Op.RENAME)),
    "rename2": Case(Op.RENAME2, 0, lambda e: _rename(e, Op.RENAME2)),
    "link": Case(
        Op.LINK,
        abi.ENTRY_OUT.size,
        lambda e: (ROOT, abi.LINK_IN.pack(e.host_file()[1]) + e.name("hardlink") + Z),
    ),
    "open": Case(Op.OPEN, abi.OPEN_OUT.size, _node(abi.OPEN_IN.pack(os.O_RDWR, 0))),
    "read": Case(Op.READ, 0, _fh_op(abi.READ_IN, 0, 4096, 0, 0, 0, 0)),
    "write": Case(Op.WRITE, abi.WRITE_OUT.size, _write),
    "statfs": Case(Op.STATFS, abi.KSTATFS.size, lambda e: (ROOT, b"")),
    "release": Case(Op.RELEASE, 0, _fh_op(abi.RELEASE_IN, 0, 0, 0)),
    "fsync": Case(Op.FSYNC, 0, _fh_op(abi.FSYNC_IN, 0, 0)),
    "setxattr": Case(
        Op.SETXATTR,
        0,
        # The short layout: the sessions here do not agree to SETXATTR_EXT.
        _node(abi.GETXATTR_IN.pack(3, 0) + b"user.new" + Z + b"abc"),
    ),
    "getxattr": Case(Op.GETXATTR, 0, _node(abi.GETXATTR_IN.pack(64, 0) + b"user.tag" + Z)),
    "listxattr": Case(Op.LISTXATTR, 0, _node(abi.GETXATTR_IN.pack(64, 0))),
    "removexattr": Case(Op.REMOVEXATTR, 0, _node(b"user.tag" + Z)),
    "flush": Case(Op.FLUSH, 0, _fh_op(abi.FLUSH_IN, 0, 0, 0)),
    "opendir": Case(
        Op.OPENDIR, abi.OPEN_OUT.size, lambda e: (e.host_dir()[1], abi.OPEN_IN.pack(0, 0))
    ),
    "readdir": Case(Op.READDIR, 0, _dir_fh_op(abi.READ_IN, 0, 4096, 0, 0, 0, 0)),
    "releasedir": Case(Op.RELEASEDIR, 0, _dir_fh_op(abi.RELEASE_IN, 0, 0, 0)),
    "fsyncdir": Case(Op.FSYNCDIR, 0, _dir_fh_op(abi.FSYNC_IN, 0, 0)),
    "getlk": Case(Op.GETLK, abi.LK_OUT.size, _lock),
    "setlk": Case(Op.SETLK, 0, _lock),
    "setlkw": Case(Op.SETLKW, 0, _lock),
    "access": Case(Op.ACCESS, 0, lambda e: (ROOT, abi.ACCESS_IN.pack(os.R_OK, 0))),
    "create": Case(
        Op.CREATE,
        abi.ENTRY_OUT.size + abi.OPEN_OUT.size,
        _in_root(
            lambda e: abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + e.name("new") + Z
        ),
    ),
    "bmap": Case(Op.BMAP, abi.BMAP_OUT.size, _node(abi.BMAP_IN.pack(0, 4096, 0))),
    "ioctl": Case(Op.IOCTL, abi.IOCTL_OUT.size, _fh_op(abi.IOCTL_IN, 0, 0x5401, 0, 0, 0)),
    "poll": Case(Op.POLL, abi.POLL_OUT.size, _fh_op(abi.POLL_IN, 0, 0, 1)),
    "fallocate": Case(Op.FALLOCATE, 0, _fh_op(abi.FALLOCATE_IN, 0, 8192, 0, 0)),
    "readdirplus": Case(Op.READDIRPLUS, 0, _dir_fh_op(abi.READ_IN, 0, 4096, 0, 0, 0, 0)),
    "lseek": Case(Op.LSEEK, abi.LSEEK_OUT.size, _fh_op(abi.LSEEK_IN, 0, os.SEEK_END, 0)),
    "copy_file_range": Case(Op.COPY_FILE_RANGE, abi.WRITE_OUT.size, _copy),
    "copy_file_range_64": Case(Op.COPY_FILE_RANGE_64, abi.COPY_FILE_RANGE_OUT.size, _copy),
    "setupmapping": Case(Op.SETUPMAPPING, 0, _fh_op(abi.SETUPMAPPING_IN, 0, 4096, 1, 0)),
    "removemapping": Case(
        Op.REMOVEMAPPING,
        0,
        lambda e: (ROOT, abi.REMOVEMAPPING_IN.pack(1) + abi.REMOVEMAPPING_ONE.pack(0, 4096)),
    ),
    "syncfs": Case(Op.SYNCFS, 0, lambda e: (ROOT, abi.SYNCFS_IN.pack(0))),
    "tmpfile": Case(
        Op.TMPFILE,
        abi.ENTRY_OUT.size + abi.OPEN_OUT.size,
        lambda e: (ROOT, abi.CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0)),
    ),
    "statx": Case(Op.STATX, abi.STATX_OUT.size, _node(abi.STATX_IN.pack(0, 0, 0, 0, 0x7FF))),
    # Last: it ends the session.
    "destroy": Case(Op.DESTROY, 0, lambda e: (ROOT, b"")),
}

#: Requests that never get a reply, so never need room for one.
NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})


def host_state(share: Path) -> list[tuple[object, ...]]:
    """Everything the host sees of the share: names, types, modes, sizes, links, contents,
    extended attributes."""
    state: list[tuple[object, ...]] = []
    for dirpath, dirnames, filenames in os.walk(share):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = b""
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
            xattrs = {} if stat.S_ISLNK(st.st_mode) else _xattrs(path)
            rel = os.path.relpath(path, share)
            state.append((rel, st.st_mode, st.st_size, st.st_nlink, data, xattrs))
    return sorted(state, key=lambda item: str(item[0]))


def _xattrs(path: str) -> dict[str, bytes]:
    return {n: os.getxattr(path, n) for n in os.listxattr(path) if n.startswith("user.")}
