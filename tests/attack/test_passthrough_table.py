"""Every FUSE opcode against every kind of file, on the real daemon: one row per (daemon mode,
file kind, operation), each with the only outcomes the security contract allows.

The daemon runs as a process (``python -m pyvirtiofsd --xattr --posix-acl --dax-window``),
driven by the project's own vhost-user front-end; one daemon serves every row of a mode. Each
row builds its files fresh on the host, in a directory of its own inside the share:

* file kinds: a regular file, a directory (holding a FIFO, a socket, a device node and a
  symlink out), a symlink to a file inside and one to a file outside the share, a FIFO, a unix
  socket, a character device (the numbers of /dev/null), a block device (an unbound loop
  device), a regular file of mode 000 owned by another uid, and "swapped" kinds: the guest
  looks a regular file up, then the host replaces the name with a FIFO, a device, a symlink to
  outside or a directory before the request that uses the nodeid or the name;
* operations: every opcode the server handles (setattr field by field, open access mode by
  access mode, create with and without O_EXCL over each kind, locks posix and flock, ...);
* modes: the default, ``--allow-devices`` (device rows), ``--readonly`` and
  ``--inode-file-handles=mandatory`` (when the file system has file handles).

After every row the host checks what the daemon did, whatever it answered: no descriptor of
the daemon refers to anything but a regular file or a directory unless it is O_PATH (and in
a read-only share none is open for writing); no special file in the share was opened, not
even for an instant (inotify IN_OPEN on each); nothing in the sentinel tree beside the share
was opened, read or changed (inotify, and a fingerprint of contents, modes, owners, times and
xattrs), and no name in the share became a hard link to it; the daemon logged no traceback
and still answers a GETATTR of the root on another queue; no request took longer than
:data:`HANG_TIMEOUT` seconds (a FIFO the daemon opened is then opened from the host so that
the daemon can go on, and the row fails). A DESTROY and a new INIT end every row, so that
whatever one row leaves behind cannot spoil the next.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd import linux
from pyvirtiofsd.fuse import abi
from tests.attack.tools import (
    IN_OPEN,
    O_PATH,
    ROOT,
    SENTINEL_EVENTS,
    AttackDaemon,
    DaemonStartError,
    Hang,
    Inotify,
    Reply,
    diff,
    dirent_names,
    entry_of,
    errname,
    fd_violations,
    fingerprint,
    handles_supported,
    inode_ids,
    names,
    open_of,
    special_files,
    start_daemon,
    unused_loop_minor,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and chown need root")

OWNER = 0x5EC0DE
INSIDE = b"inside-data-" * 700  # two pages and a bit: reads, maps and copies have data
FILE_SIZE = 8192
SECRET = b"outside: the guest must never see or change this\n"
XNAME = b"user.attack"
XVALUE = b"inside"
#: A minimal valid POSIX ACL (user::rw-, group::r--, other::r--), version 2.
ACL = (2).to_bytes(4, "little") + b"".join(
    tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + (0xFFFFFFFF).to_bytes(4, "little")
    for tag, perm in ((0x01, 6), (0x04, 4), (0x20, 4))
)
LOOP_MINOR = unused_loop_minor()
NULL_RDEV = os.makedev(1, 3)
BLK_RDEV = os.makedev(7, LOOP_MINOR if LOOP_MINOR is not None else 0)

# -- file kinds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of file under the name ``t``: ``node`` is what the nodeid the guest holds is,
    ``at`` what the name is when the request runs (they differ for swapped kinds). Both are
    one of reg, dir, lnk, spc (FIFO, socket or device)."""

    name: str
    node: str
    at: str
    make: str  # what to build at "t": reg, noperm, dir, sym_in, sym_out, fifo, sock, chr, blk
    swap_to: str | None = None

    @property
    def swapped(self) -> bool:
        return self.swap_to is not None

    @property
    def device(self) -> bool:
        return "chr" in self.name or "blk" in self.name


KINDS = {
    k.name: k
    for k in (
        Kind("reg", "reg", "reg", "reg"),
        Kind("noperm", "reg", "reg", "noperm"),
        Kind("dir", "dir", "dir", "dir"),
        Kind("sym_in", "lnk", "lnk", "sym_in"),
        Kind("sym_out", "lnk", "lnk", "sym_out"),
        Kind("fifo", "spc", "spc", "fifo"),
        Kind("sock", "spc", "spc", "sock"),
        Kind("chr", "spc", "spc", "chr"),
        Kind("blk", "spc", "spc", "blk"),
        Kind("swap_fifo", "reg", "spc", "reg", "fifo"),
        Kind("swap_chr", "reg", "spc", "reg", "chr"),
        Kind("swap_blk", "reg", "spc", "reg", "blk"),
        Kind("swap_sym_out", "reg", "lnk", "reg", "sym_out"),
        Kind("swap_dir", "reg", "dir", "reg", "emptydir"),
    )
}


def make(what: str, path: Path, outside: Path) -> None:
    """Build ``what`` at ``path`` on the host."""
    if what in ("reg", "noperm"):
        path.write_bytes(INSIDE[:FILE_SIZE])
        os.setxattr(path, XNAME, XVALUE)
        if what == "noperm":
            os.chown(path, 65534, 65534)
            os.chmod(path, 0)
    elif what == "dir":
        path.mkdir()
        os.setxattr(path, XNAME, XVALUE)
        (path / "inner").write_bytes(b"inner")
        os.mkfifo(path / "inner_fifo")
        os.mknod(path / "inner_chr", stat.S_IFCHR | 0o666, NULL_RDEV)
        (path / "inner_out").symlink_to(outside / "secret")
        make("sock", path / "inner_sock", outside)
    elif what == "emptydir":
        path.mkdir()
    elif what == "sym_in":
        path.symlink_to("h")
    elif what == "sym_out":
        path.symlink_to(outside / "secret")
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "sock":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(path))
        finally:
            s.close()
    elif what == "chr":
        os.mknod(path, stat.S_IFCHR | 0o666, NULL_RDEV)
    elif what == "blk":
        os.mknod(path, stat.S_IFBLK | 0o600, BLK_RDEV)
    else:
        raise AssertionError(what)


# -- modes ------------------------------------------------------------------------------------

BASE_ARGS = ("--xattr", "--posix-acl", "--dax-window", "64M")


@dataclass(frozen=True)
class Mode:
    name: str
    args: tuple[str, ...]
    kinds: tuple[str, ...]
    ro: bool = False
    dev: bool = False


MODES = {
    m.name: m
    for m in (
        Mode("default", BASE_ARGS, tuple(KINDS)),
        Mode(
            "devices",
            (*BASE_ARGS, "--allow-devices"),
            ("dir", "chr", "blk", "swap_chr", "swap_blk"),
            dev=True,
        ),
        Mode(
            "readonly",
            ("--xattr", "--posix-acl", "--readonly"),
            ("reg", "dir", "sym_out", "fifo", "chr", "swap_fifo"),
            ro=True,
        ),
        Mode(
            "handles",
            (*BASE_ARGS, "--inode-file-handles=mandatory"),
            ("reg", "dir", "sym_out", "fifo", "sock", "chr", "swap_fifo", "swap_sym_out"),
        ),
    )
}


# -- one row ----------------------------------------------------------------------------------


@dataclass
class Row:
    """The state of one row while it runs: what the guest holds, what went wrong."""

    d: AttackDaemon
    mode: Mode
    kind: Kind
    dir: Path  # the row's directory on the host
    dnode: int = 0  # its nodeid
    node: int = 0  # nodeid of "t", looked up before any swap
    helper: int = 0  # nodeid of "h", a regular file
    looked: Counter[int] = field(default_factory=Counter)
    handles: list[tuple[int, int, bool]] = field(default_factory=list)  # nodeid, fh, is dir
    locked: list[tuple[int, int]] = field(default_factory=list)  # nodeid, fh of lock requests
    failures: list[str] = field(default_factory=list)

    @property
    def g(self) -> Any:
        return self.d.guest

    @property
    def t(self) -> Path:
        return self.dir / "t"

    def fail(self, text: str) -> None:
        self.failures.append(text)

    def need(self, what: str, r: Reply) -> Reply:
        """A setup request of the row that must succeed."""
        if not r.ok:
            raise AssertionError(f"setup: {what} answered {errname(r.err)}")
        return r

    def entry(self, r: Reply) -> int:
        """Count the lookup an entry reply gives; its nodeid (0 if none)."""
        if not r.ok:
            return 0
        nodeid = entry_of(r).nodeid
        self.looked[nodeid] += 1
        return int(nodeid)

    def opened(self, r: Reply, nodeid: int, is_dir: bool, offset: int = 0) -> int:
        if not r.ok:
            return 0
        fh = int(open_of(r, offset).fh)
        self.handles.append((nodeid, fh, is_dir))
        return fh

    def created(self, r: Reply) -> None:
        """CREATE/TMPFILE reply: an entry and an open file."""
        if r.ok:
            nodeid = self.entry(r)
            self.opened(r, nodeid, False, abi.ENTRY_OUT.size)

    def drop_handle(self, fh: int) -> None:
        self.handles = [h for h in self.handles if h[1] != fh]

    def writable(self) -> int:
        return os.O_RDONLY if self.mode.ro else os.O_RDWR

    def helper_fh(self) -> int:
        r = self.need("OPEN h", self.g.open(self.helper, self.writable()))
        return self.opened(r, self.helper, False)

    def other_fh(self) -> tuple[int, int]:
        """(nodeid, fh) of "h2", a second regular file, for copies."""
        nodeid = self.entry(self.need("LOOKUP h2", self.g.lookup(self.dnode, b"h2")))
        r = self.need("OPEN h2", self.g.open(nodeid, self.writable()))
        return nodeid, self.opened(r, nodeid, False)

    def target_fh(self) -> tuple[int, str]:
        """A handle to use with the target's nodeid: its own when it can be opened, else the
        helper's (a guest may pair any nodeid with any handle). (fh, what it is)."""
        if self.kind.node == "reg":
            res = self.g.open(self.node, self.writable())
            if res.err == errno.ESTALE and self.stale_ok:
                return self.helper_fh(), "helper"
            return self.opened(self.need("OPEN t", res), self.node, False), "reg"
        if self.kind.node == "dir":
            r = self.need("OPENDIR t", self.g.opendir(self.node))
            return self.opened(r, self.node, True), "dir"
        return self.helper_fh(), "helper"

    @property
    def stale_ok(self) -> bool:
        """A file reached through its file handle is gone once unlinked: ESTALE."""
        return self.kind.swapped and self.mode.name == "handles"

    def cleanup(self) -> None:
        g = self.g
        for nodeid, fh in self.locked:
            g.lock(abi.Opcode.SETLK, nodeid, fh, OWNER, fcntl.F_UNLCK, False)
        for nodeid, fh, is_dir in self.handles:
            if is_dir:
                g.releasedir(nodeid, fh)
            else:
                g.release(nodeid, fh, OWNER, flush=True)
        self.handles = []
        items = [(n, c) for n, c in self.looked.items() if c]
        if items:
            g.batch_forget(items)
        self.looked.clear()


Expect = Callable[[Kind, Mode], set[int]]


@dataclass(frozen=True)
class Op:
    name: str
    run: Callable[[Row], int]
    expect: Expect


def w(m: Mode, natural: set[int]) -> set[int]:
    """A request that changes something: EROFS in a read-only share (or the error it would
    get anyway), never success."""
    if m.ro:
        return {errno.EROFS} | (natural - {0})
    return natural


def by(cat: str, table: dict[str, set[int]]) -> set[int]:
    return table.get(cat, table.get("*", set()))


OPS: list[Op] = []


def op(name: str, expect: Expect) -> Callable[[Callable[[Row], int]], Callable[[Row], int]]:
    def register(fn: Callable[[Row], int]) -> Callable[[Row], int]:
        OPS.append(Op(name, fn, expect))
        return fn

    return register


def _fixed(*codes: int) -> Expect:
    return lambda k, m: set(codes)


# -- names ------------------------------------------------------------------------------------


@op("lookup", _fixed(0))
def _lookup(r: Row) -> int:
    res = r.g.lookup(r.dnode, b"t")
    r.entry(res)
    return res.err


@op("lookup_dotdot", lambda k, m: {0} if k.node == "dir" else {errno.ENOTDIR})
def _lookup_dotdot(r: Row) -> int:
    res = r.g.lookup(r.node, b"..")
    r.entry(res)
    return res.err


def _create_over_expect(flags: int) -> Expect:
    def expect(k: Kind, m: Mode) -> set[int]:
        if flags & os.O_EXCL:
            return w(m, {errno.EEXIST})
        natural = by(
            k.at, {"reg": {0}, "dir": {errno.EISDIR}, "lnk": {errno.ELOOP}, "spc": {errno.ENXIO}}
        )
        return w(m, natural)

    return expect


CREATE_FLAGS = {
    "rdwr": os.O_RDWR,
    "rdonly": os.O_RDONLY,
    "wronly": os.O_WRONLY,
    "trunc": os.O_RDWR | os.O_TRUNC,
    "excl": os.O_RDWR | os.O_EXCL,
    "excl_trunc": os.O_WRONLY | os.O_EXCL | os.O_TRUNC,
}


def _create_over(flags: int) -> Callable[[Row], int]:
    def run(r: Row) -> int:
        res = r.g.create(r.dnode, b"t", flags)
        r.created(res)
        if res.ok and r.kind.at == "reg":
            size = os.lstat(r.t).st_size
            want = 0 if flags & os.O_TRUNC else FILE_SIZE
            if size != want:
                r.fail(f"CREATE without O_EXCL over a file left it {size} bytes, not {want}")
        return res.err

    return run


for _n, _f in CREATE_FLAGS.items():
    op(f"create_over_{_n}", _create_over_expect(_f))(_create_over(_f))


def _in_dir(k: Kind, m: Mode, ok: set[int] | None = None) -> set[int]:
    return w(m, (ok or {0}) if k.node == "dir" else {errno.ENOTDIR})


@op("create_in", _in_dir)
def _create_in(r: Row) -> int:
    res = r.g.create(r.node, b"new", os.O_RDWR)
    r.created(res)
    return res.err


@op("create_in_excl", _in_dir)
def _create_in_excl(r: Row) -> int:
    res = r.g.create(r.node, b"new", os.O_RDWR | os.O_EXCL)
    r.created(res)
    return res.err


@op(
    "tmpfile_in",
    lambda k, m: w(m, {0} if k.node == "dir" else {errno.ENOTDIR, errno.ELOOP}),
)
def _tmpfile_in(r: Row) -> int:
    res = r.g.tmpfile(r.node, os.O_RDWR)
    r.created(res)
    return res.err


MKNOD_TYPES = {
    "reg": (stat.S_IFREG, 0),
    "fifo": (stat.S_IFIFO, 0),
    "sock": (stat.S_IFSOCK, 0),
    "chr": (stat.S_IFCHR, NULL_RDEV),
    "blk": (stat.S_IFBLK, BLK_RDEV),
}


def _devices(k: Kind, m: Mode, what: str, natural: set[int]) -> set[int]:
    """MKNOD of a device: EPERM unless the daemon runs with --allow-devices."""
    if what in ("chr", "blk") and not m.dev:
        natural = {errno.EPERM} | (natural - {0})
    return w(m, natural)


def _mknod_in(what: str) -> tuple[Expect, Callable[[Row], int]]:
    ftype, rdev = MKNOD_TYPES[what]

    def expect(k: Kind, m: Mode) -> set[int]:
        return _devices(k, m, what, {0} if k.node == "dir" else {errno.ENOTDIR})

    def run(r: Row) -> int:
        res = r.g.mknod(r.node, b"new", ftype | 0o644, rdev)
        r.entry(res)
        return res.err

    return expect, run


def _mknod_over(what: str) -> tuple[Expect, Callable[[Row], int]]:
    ftype, rdev = MKNOD_TYPES[what]

    def expect(k: Kind, m: Mode) -> set[int]:
        return _devices(k, m, what, {errno.EEXIST})

    def run(r: Row) -> int:
        res = r.g.mknod(r.dnode, b"t", ftype | 0o644, rdev)
        r.entry(res)
        return res.err

    return expect, run


for _what in MKNOD_TYPES:
    op(f"mknod_in_{_what}", _mknod_in(_what)[0])(_mknod_in(_what)[1])
for _what in ("fifo", "chr"):
    op(f"mknod_over_{_what}", _mknod_over(_what)[0])(_mknod_over(_what)[1])


@op("mkdir_in", _in_dir)
def _mkdir_in(r: Row) -> int:
    res = r.g.mkdir(r.node, b"new")
    r.entry(res)
    return res.err


@op("mkdir_over", lambda k, m: w(m, {errno.EEXIST}))
def _mkdir_over(r: Row) -> int:
    res = r.g.mkdir(r.dnode, b"t")
    r.entry(res)
    return res.err


@op("symlink_in", _in_dir)
def _symlink_in(r: Row) -> int:
    res = r.g.symlink(r.node, b"new", os.fsencode(r.d.outside / "secret"))
    r.entry(res)
    return res.err


@op("symlink_over", lambda k, m: w(m, {errno.EEXIST}))
def _symlink_over(r: Row) -> int:
    res = r.g.symlink(r.dnode, b"t", b"h")
    r.entry(res)
    return res.err


@op("unlink", lambda k, m: w(m, {errno.EISDIR} if k.at == "dir" else {0}))
def _unlink(r: Row) -> int:
    return r.g.unlink(r.dnode, b"t").err


def _rmdir_expect(k: Kind, m: Mode) -> set[int]:
    if k.at != "dir":
        return w(m, {errno.ENOTDIR})
    return w(m, {0} if k.swapped else {errno.ENOTEMPTY})


@op("rmdir", _rmdir_expect)
def _rmdir(r: Row) -> int:
    return r.g.rmdir(r.dnode, b"t").err


@op("rename_away", lambda k, m: w(m, {0}))
def _rename_away(r: Row) -> int:
    return r.g.rename(r.dnode, b"t", r.dnode, b"t2").err


@op("rename_over", lambda k, m: w(m, {errno.EISDIR} if k.at == "dir" else {0}))
def _rename_over(r: Row) -> int:
    return r.g.rename(r.dnode, b"h2", r.dnode, b"t").err


@op("rename_into", _in_dir)
def _rename_into(r: Row) -> int:
    return r.g.rename(r.dnode, b"h2", r.node, b"moved").err


@op("rename_exchange", lambda k, m: w(m, {0}))
def _rename_exchange(r: Row) -> int:
    return r.g.rename(r.dnode, b"t", r.dnode, b"h2", linux.RENAME_EXCHANGE).err


@op("rename_noreplace", lambda k, m: w(m, {errno.EEXIST}))
def _rename_noreplace(r: Row) -> int:
    return r.g.rename(r.dnode, b"h2", r.dnode, b"t", linux.RENAME_NOREPLACE).err


@op("rename_whiteout", lambda k, m: w(m, {0, errno.EINVAL}))
def _rename_whiteout(r: Row) -> int:
    return r.g.rename(r.dnode, b"t", r.dnode, b"t3", linux.RENAME_WHITEOUT).err


def _link_from_expect(k: Kind, m: Mode) -> set[int]:
    if k.node == "reg":
        # A swapped file was unlinked on the host: it has no name left to link to.
        return w(m, {errno.ENOENT} if k.swapped else {0})
    return w(m, by(k.node, {"dir": {errno.EPERM}, "lnk": {0}, "spc": {0}}))


@op("link_from", _link_from_expect)
def _link_from(r: Row) -> int:
    res = r.g.link(r.node, r.dnode, b"t_link")
    r.entry(res)
    return res.err


@op("link_over", lambda k, m: w(m, {errno.EEXIST}))
def _link_over(r: Row) -> int:
    res = r.g.link(r.helper, r.dnode, b"t")
    r.entry(res)
    return res.err


# -- the inode itself -------------------------------------------------------------------------


@op("getattr", _fixed(0))
def _getattr(r: Row) -> int:
    return r.g.getattr(r.node).err


@op("statfs", _fixed(0))
def _statfs(r: Row) -> int:
    return r.g.statfs(r.node).err


@op("syncfs", _fixed(0))
def _syncfs(r: Row) -> int:
    return r.g.syncfs(r.node).err


@op("statx", _fixed(0, errno.ENOSYS))
def _statx(r: Row) -> int:
    return r.g.statx(r.node).err


@op("bmap", _fixed(errno.ENOSYS, errno.EINVAL))
def _bmap(r: Row) -> int:
    return r.g.bmap(r.node).err


for _n, _mask in (("f", os.F_OK), ("r", os.R_OK), ("w", os.W_OK), ("x", os.X_OK)):
    op(
        f"access_{_n}",
        (lambda k, m: {0, errno.EACCES, errno.EROFS})
        if _mask == os.W_OK
        else _fixed(0, errno.EACCES),
    )(lambda r, _mask=_mask: r.g.access(r.node, _mask).err)


SETATTR = {
    "mode": ({"valid": abi.FATTR_MODE, "mode": 0o640}, {"lnk": {errno.EOPNOTSUPP}, "*": {0}}),
    "uid": ({"valid": abi.FATTR_UID, "uid": 1000}, {"*": {0}}),
    "gid": ({"valid": abi.FATTR_GID, "gid": 1000}, {"*": {0}}),
    "size": (
        {"valid": abi.FATTR_SIZE, "size": 3},
        {"reg": {0}, "dir": {errno.EISDIR}, "*": {errno.EINVAL}},
    ),
    "atime": ({"valid": abi.FATTR_ATIME, "atime": 1_000_000}, {"*": {0}}),
    "mtime": ({"valid": abi.FATTR_MTIME, "mtime": 1_000_000}, {"*": {0}}),
    "atime_now": ({"valid": abi.FATTR_ATIME | abi.FATTR_ATIME_NOW}, {"*": {0}}),
    "mtime_now": ({"valid": abi.FATTR_MTIME | abi.FATTR_MTIME_NOW}, {"*": {0}}),
    "ctime": ({"valid": abi.FATTR_CTIME, "ctime": 1_000_000}, {"*": {0}}),
    "kill_suidgid": ({"valid": abi.FATTR_KILL_SUIDGID}, {"*": {0}}),
}

for _n, (_fields, _table) in SETATTR.items():
    op(f"setattr_{_n}", lambda k, m, _t=_table: w(m, by(k.node, _t)))(
        lambda r, _f=_fields: r.g.setattr(r.node, **_f).err
    )


@op("readlink", lambda k, m: {0} if k.node == "lnk" else {errno.EINVAL})
def _readlink(r: Row) -> int:
    res = r.g.readlink(r.node)
    if res.ok and res.payload not in (b"h", os.fsencode(r.d.outside / "secret")):
        r.fail(f"READLINK gave {res.payload!r}")
    return res.err


OPEN_FLAGS = {
    "rdonly": os.O_RDONLY,
    "wronly": os.O_WRONLY,
    "rdwr": os.O_RDWR,
    "trunc": os.O_RDWR | os.O_TRUNC,
    "rdonly_trunc": os.O_RDONLY | os.O_TRUNC,
    "append": os.O_WRONLY | os.O_APPEND,
    "nonblock": os.O_RDONLY | os.O_NONBLOCK,
    "nonblock_wronly": os.O_WRONLY | os.O_NONBLOCK,
    "directory": os.O_RDONLY | os.O_DIRECTORY,
    "opath": O_PATH,
    "tmpfile": os.O_TMPFILE | os.O_RDWR,
    "creat_excl": os.O_RDWR | os.O_CREAT | os.O_EXCL,
}


def _open_expect(flags: int) -> Expect:
    writes = bool(flags & os.O_ACCMODE or flags & os.O_TRUNC)

    def expect(k: Kind, m: Mode) -> set[int]:
        special = by(k.node, {"lnk": {errno.ELOOP}, "spc": {errno.ENXIO}, "*": set()})
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            # O_TMPFILE only through FUSE_TMPFILE, which runs with the caller's credentials.
            natural = {errno.EINVAL} | special
        elif special:
            natural = special
        elif flags & O_PATH:
            natural = {0, errno.EINVAL}
        elif k.node == "reg":
            natural = {errno.ENOTDIR} if flags & os.O_DIRECTORY else {0}
        else:
            natural = {errno.EISDIR} if writes else {0}
        if m.ro and writes:
            return {errno.EROFS} | (natural - {0})
        return natural

    return expect


def _open(flags: int) -> Callable[[Row], int]:
    def run(r: Row) -> int:
        res = r.g.open(r.node, flags)
        r.opened(res, r.node, False)
        if res.ok and r.kind.node == "reg" and not r.kind.swapped:
            size = os.lstat(r.t).st_size
            want = 0 if flags & os.O_TRUNC else FILE_SIZE
            if size != want:
                r.fail(f"OPEN left the file {size} bytes, not {want}")
        return res.err

    return run


for _n, _f in OPEN_FLAGS.items():
    op(f"open_{_n}", _open_expect(_f))(_open(_f))


@op("opendir", lambda k, m: {0} if k.node == "dir" else {errno.ENOTDIR})
def _opendir(r: Row) -> int:
    res = r.g.opendir(r.node)
    r.opened(res, r.node, True)
    return res.err


def _dir_fh(r: Row) -> int:
    """A directory handle for the target: its own when it is a directory, else the row
    directory's (paired with the target's nodeid, as a hostile guest may)."""
    if r.kind.node == "dir":
        return r.opened(r.need("OPENDIR t", r.g.opendir(r.node)), r.node, True)
    return r.opened(r.need("OPENDIR row", r.g.opendir(r.dnode)), r.dnode, True)


def _mismatch(k: Kind, m: Mode) -> set[int]:
    return {0} if k.node == "dir" else {0, errno.EBADF, errno.EINVAL}


def _readdir(plus: bool) -> Callable[[Row], int]:
    def run(r: Row) -> int:
        fh = _dir_fh(r)
        res = r.g.readdir(r.node, fh, plus=plus)
        if res.ok:
            for name, nodeid in dirent_names(res.payload, plus):
                if nodeid and name not in (b".", b".."):
                    r.looked[nodeid] += 1
        return res.err

    return run


op("readdir", _mismatch)(_readdir(False))
op("readdirplus", _mismatch)(_readdir(True))


@op("readdir_file_fh", _fixed(errno.ENOTDIR, errno.EBADF, errno.EINVAL))
def _readdir_file_fh(r: Row) -> int:
    return r.g.readdir(r.node, r.helper_fh(), plus=True).err


@op("fsyncdir", _mismatch)
def _fsyncdir(r: Row) -> int:
    return r.g.fsync(r.node, _dir_fh(r), opcode=abi.Opcode.FSYNCDIR).err


@op("releasedir", _fixed(0))
def _releasedir(r: Row) -> int:
    fh = _dir_fh(r)
    res = r.g.releasedir(r.node, fh)
    r.drop_handle(fh)
    return res.err


# -- extended attributes ----------------------------------------------------------------------

_XATTR_OK = {"reg": {0}, "dir": {0}, "*": {errno.EPERM}}


@op("setxattr_user", lambda k, m: w(m, by(k.node, _XATTR_OK)))
def _setxattr(r: Row) -> int:
    return r.g.setxattr(r.node, XNAME, b"guest").err


def _getxattr_expect(k: Kind, m: Mode) -> set[int]:
    return by(k.node, {"reg": {0}, "dir": {0}, "*": {errno.ENODATA}})


@op("getxattr_user", _getxattr_expect)
def _getxattr(r: Row) -> int:
    res = r.g.getxattr(r.node, XNAME)
    if res.ok and res.payload != XVALUE:
        r.fail(f"GETXATTR gave {res.payload!r}")
    probe = r.g.getxattr(r.node, b"user.outside")
    if probe.ok:
        r.fail(f"GETXATTR user.outside gave the sentinel's {probe.payload!r}")
    return res.err


@op("getxattr_size", _getxattr_expect)
def _getxattr_size(r: Row) -> int:
    return r.g.getxattr(r.node, XNAME, size=0).err


@op("listxattr", _fixed(0))
def _listxattr(r: Row) -> int:
    res = r.g.listxattr(r.node)
    if res.ok and b"user.outside" in res.payload:
        r.fail("LISTXATTR shows the sentinel's attribute")
    return res.err


@op(
    "removexattr_user",
    lambda k, m: w(m, by(k.node, {"reg": {0}, "dir": {0}, "*": {errno.ENODATA, errno.EPERM}})),
)
def _removexattr(r: Row) -> int:
    return r.g.removexattr(r.node, XNAME).err


@op(
    "setxattr_acl",
    lambda k, m: w(
        m,
        by(
            k.node,
            {
                "reg": {0},
                "dir": {0},
                "lnk": {errno.EOPNOTSUPP, errno.EPERM},
                "spc": {0, errno.EPERM, errno.EOPNOTSUPP},
            },
        ),
    ),
)
def _setxattr_acl(r: Row) -> int:
    return r.g.setxattr(r.node, b"system.posix_acl_access", ACL).err


@op("getxattr_acl", _fixed(0, errno.ENODATA, errno.EOPNOTSUPP))
def _getxattr_acl(r: Row) -> int:
    return r.g.getxattr(r.node, b"system.posix_acl_access").err


# -- locks ------------------------------------------------------------------------------------


def _posix_expect(opcode: int, ltype: int) -> Expect:
    def expect(k: Kind, m: Mode) -> set[int]:
        if k.node in ("lnk", "spc"):
            # Never opened for a lock: ENOLCK (an unlock of nothing may succeed).
            return {errno.ENOLCK} | ({0} if ltype == fcntl.F_UNLCK else set())
        if opcode == abi.Opcode.GETLK or ltype != fcntl.F_WRLCK:
            return {0} if opcode != abi.Opcode.GETLK else {0, errno.EBADF}
        # Directories, and every file of a read-only share, are locked through O_RDONLY
        # descriptors: a write lock is EBADF there.
        if k.node == "dir" or m.ro:
            return {errno.EBADF}
        return {0}

    return expect


def _posix(opcode: int, ltype: int) -> Callable[[Row], int]:
    def run(r: Row) -> int:
        fh, _ = r.target_fh()
        r.locked.append((r.node, fh))
        return r.g.lock(opcode, r.node, fh, OWNER, ltype, False).err

    return run


LOCKS = {
    "getlk_rd": (abi.Opcode.GETLK, fcntl.F_RDLCK),
    "getlk_wr": (abi.Opcode.GETLK, fcntl.F_WRLCK),
    "setlk_rd": (abi.Opcode.SETLK, fcntl.F_RDLCK),
    "setlk_wr": (abi.Opcode.SETLK, fcntl.F_WRLCK),
    "setlk_unlck": (abi.Opcode.SETLK, fcntl.F_UNLCK),
    "setlkw_rd": (abi.Opcode.SETLKW, fcntl.F_RDLCK),
    "setlkw_wr": (abi.Opcode.SETLKW, fcntl.F_WRLCK),
}
for _n, (_opc, _lt) in LOCKS.items():
    op(_n, _posix_expect(_opc, _lt))(_posix(_opc, _lt))


def _flock_expect(k: Kind, m: Mode) -> set[int]:
    return {0} if k.node in ("reg", "dir") else {0, errno.ENOLCK, errno.EBADF}


for _n, _lt in (
    ("flock_sh", fcntl.F_RDLCK),
    ("flock_ex", fcntl.F_WRLCK),
    ("flock_un", fcntl.F_UNLCK),
):
    op(_n, _flock_expect)(
        lambda r, _lt=_lt: (
            r.g.lock(abi.Opcode.SETLK, r.node, r.target_fh()[0], OWNER, _lt, True).err
        )
    )


def _interrupt_expect(k: Kind, m: Mode) -> set[int]:
    if k.node in ("lnk", "spc"):
        return {errno.ENOLCK}
    if k.node == "dir" or m.ro:
        return {errno.EBADF}
    # A plain regular file is write-locked by the host: the wait is interrupted. The
    # swapped file was unlinked before the host could lock it: no contention.
    return {0} if k.swapped else {errno.EINTR}


@op("interrupt_setlkw", _interrupt_expect)
def _interrupt_setlkw(r: Row) -> int:
    """SETLKW that must wait (the host holds a write lock), then INTERRUPT from another
    queue: the waiting request answers EINTR."""
    host_fd = -1
    if r.kind.node == "reg" and not r.kind.swapped:
        host_fd = os.open(r.t, os.O_RDWR)
        fcntl.fcntl(host_fd, fcntl.F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
    try:
        fh, _ = r.target_fh()
        r.locked.append((r.node, fh))
        g = r.g
        head, unique = g.submit(
            abi.Opcode.SETLKW,
            r.node,
            g.lk_payload(fh, OWNER, fcntl.F_WRLCK, False),
            4096,
        )
        intr = r.d.guests[3]
        payload = abi.INTERRUPT_IN.pack(unique)
        # Never answered: it reaches the request whether or not that has begun to wait.
        intr.send(abi.Opcode.INTERRUPT, ROOT, payload)
        return g.collect(head, abi.Opcode.SETLKW).err
    finally:
        if host_fd >= 0:
            os.close(host_fd)


def _flock_struct(ltype: int) -> bytes:
    import struct

    return struct.pack("=hh4xqqi4x", ltype, os.SEEK_SET, 0, 0, 0)


# -- handles ----------------------------------------------------------------------------------


def _on_fh(reg: set[int], dir_: set[int], writes: bool = False) -> Expect:
    """A request on a handle: reg when the target's own file handle is used, dir for its
    directory handle, else the helper's handle paired with the target's nodeid."""

    def expect(k: Kind, m: Mode) -> set[int]:
        natural = by(k.node, {"reg": reg, "dir": dir_, "*": {0, errno.EBADF, errno.EINVAL}})
        if writes:
            return {errno.EROFS} | (natural - {0}) if m.ro else natural
        return natural

    return expect


@op("read", _on_fh({0}, {errno.EISDIR}))
def _read(r: Row) -> int:
    return r.g.read(r.node, r.target_fh()[0], 0, 4096).err


@op("write", _on_fh({0}, {errno.EISDIR, errno.EBADF}, writes=True))
def _write(r: Row) -> int:
    return r.g.write(r.node, r.target_fh()[0], 0, b"guest").err


@op("flush", _on_fh({0}, {0}))
def _flush(r: Row) -> int:
    return r.g.flush(r.node, r.target_fh()[0], OWNER).err


@op("fsync", _on_fh({0}, {0, errno.EINVAL}))
def _fsync(r: Row) -> int:
    return r.g.fsync(r.node, r.target_fh()[0]).err


@op("fdatasync", _on_fh({0}, {0, errno.EINVAL}))
def _fdatasync(r: Row) -> int:
    return r.g.fsync(r.node, r.target_fh()[0], datasync=True).err


@op(
    "fallocate",
    _on_fh({0}, {errno.EISDIR, errno.EBADF, errno.ENODEV, errno.EOPNOTSUPP}, writes=True),
)
def _fallocate(r: Row) -> int:
    return r.g.fallocate(r.node, r.target_fh()[0], 0, 16384).err


@op("lseek_data", _on_fh({0}, {0, errno.EINVAL, errno.ENXIO}))
def _lseek(r: Row) -> int:
    return r.g.lseek(r.node, r.target_fh()[0], 0, os.SEEK_DATA).err


@op("copy_file_range_out", _on_fh({0}, {errno.EISDIR, errno.EINVAL, errno.EBADF}, writes=True))
def _copy_out(r: Row) -> int:
    fh, _ = r.target_fh()
    other, other_fh = r.other_fh()
    return r.g.copy_file_range(r.node, fh, other, other_fh, 100).err


@op("copy_file_range_in", _on_fh({0}, {errno.EISDIR, errno.EINVAL, errno.EBADF}, writes=True))
def _copy_in(r: Row) -> int:
    fh, _ = r.target_fh()
    other, other_fh = r.other_fh()
    return r.g.copy_file_range(other, other_fh, r.node, fh, 100).err


@op("getattr_fh", _fixed(0))
def _getattr_fh(r: Row) -> int:
    return r.g.getattr(r.node, r.target_fh()[0]).err


@op("setattr_size_fh", _on_fh({0}, {errno.EINVAL, errno.EISDIR, errno.EBADF}, writes=True))
def _setattr_size_fh(r: Row) -> int:
    fh, _ = r.target_fh()
    return r.g.setattr(r.node, valid=abi.FATTR_SIZE | abi.FATTR_FH, size=3, fh=fh).err


@op("release", _fixed(0))
def _release(r: Row) -> int:
    fh, _ = r.target_fh()
    res = r.g.release(r.node, fh, OWNER, flush=True)
    r.drop_handle(fh)
    return res.err


@op("poll", _fixed(0, errno.ENOSYS))
def _poll(r: Row) -> int:
    return r.g.poll(r.node, r.target_fh()[0]).err


@op("ioctl", _fixed(errno.ENOSYS, errno.ENOTTY, errno.EINVAL))
def _ioctl(r: Row) -> int:
    return r.g.ioctl(r.node, r.target_fh()[0], 0x541B).err  # FIONREAD


def _mapping(flags: int) -> Callable[[Row], int]:
    def run(r: Row) -> int:
        before = len(r.d.maps)
        res = r.g.setupmapping(r.node, abi.INVALID_FH, 0, 4096, flags, 0)
        if res.ok:
            for rec in r.d.maps[before:]:
                # QEMU maps every DAX range writable whatever the mapping asks, so a read-only
                # mapping gets a read-write fd where the guest could ask for a writable one
                # anyway; a share the guest may not write (--readonly) offers no window at all.
                if str(r.d.share) in rec.target and r.mode.ro and rec.accmode != os.O_RDONLY:
                    r.fail(f"read-only share mapped from an fd open with {rec.accmode:#o}")
            rm = r.g.removemapping([(0, 4096)])
            if not rm.ok:
                r.fail(f"REMOVEMAPPING answered {errname(rm.err)}")
        return res.err

    return run


def _mapped(k: Kind, m: Mode) -> set[int]:
    if m.ro:
        return {errno.ENOSYS}  # no DAX window on a read-only share
    return {0} if k.node == "reg" else {errno.EINVAL}


op("setupmapping_r", _mapped)(
    _mapping(abi.SETUPMAPPING_FLAG_READ)
)
op("setupmapping_rw", _mapped)(
    _mapping(abi.SETUPMAPPING_FLAG_READ | abi.SETUPMAPPING_FLAG_WRITE)
)


@op("forget_batch_forget", _fixed(errno.EBADF))
def _forget(r: Row) -> int:
    """FORGET one of two lookups: the inode stays. BATCH_FORGET the rest: it is gone."""
    g = r.g
    if not r.kind.swapped:  # after a swap the name is another inode
        r.entry(r.need("LOOKUP t", g.lookup(r.dnode, b"t")))
    g.forget(r.node, 1)
    r.looked[r.node] -= 1
    if r.looked[r.node]:
        still = g.getattr(r.node)
        if not still.ok:
            r.fail(f"GETATTR after forgetting one of two lookups: {errname(still.err)}")
        g.batch_forget([(r.node, r.looked[r.node])])
        r.looked[r.node] = 0
    return g.getattr(r.node).err


# -- the table --------------------------------------------------------------------------------


def _rows() -> Iterator[Any]:
    for mode in MODES.values():
        for kname in mode.kinds:
            for o in OPS:
                yield pytest.param(mode.name, kname, o.name, id=f"{mode.name}-{kname}-{o.name}")


ROWS = list(_rows())
OPS_BY_NAME = {o.name: o for o in OPS}


@dataclass
class Pool:
    """One daemon per mode, started when the first row of that mode runs (rows are in mode
    order, so the previous mode's daemon is stopped then)."""

    workdir: Path
    share: Path
    outside: Path
    current: AttackDaemon | None = None
    mode: str = ""
    refused: dict[str, str] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    logs: list[str] = field(default_factory=list)

    def get(self, mode: Mode) -> AttackDaemon:
        if mode.name in self.refused:
            pytest.fail(self.refused[mode.name], pytrace=False)
        d = self.current
        if d is not None and (
            self.mode != mode.name or d.guest.broken or d.health.broken or not d.alive()
        ):
            self.stop()
            d = None
        if d is None:
            try:
                d = start_daemon(
                    self.workdir, self.share, self.outside, *mode.args, name=f"daemon-{mode.name}"
                )
            except DaemonStartError as e:
                why = [line for line in str(e).splitlines() if "error" in line] or [str(e)]
                self.refused[mode.name] = f"the daemon did not start ({mode.name}): {why[0]}"
            if d is None:
                pytest.fail(self.refused[mode.name], pytrace=False)
            self.current, self.mode = d, mode.name
        return d

    def stop(self) -> None:
        d, self.current = self.current, None
        if d is None:
            return
        if d.guest.broken or d.health.broken or not d.alive():
            from pyvirtiofsd.vm.guest import kill_child

            kill_child(d.proc)
            d.window.close()
            self.logs.append(d.log_text())
            return
        self.logs.append(d.close())


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    workdir = Path(tempfile.mkdtemp(prefix="pva-"))  # short: socket paths are limited
    workdir.chmod(0o755)
    share = workdir / "share"
    outside = workdir / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    os.setxattr(outside / "secret", b"user.outside", b"sentinel")
    (outside / "secret_dir").mkdir()
    (outside / "secret_dir" / "inner").write_bytes(SECRET)
    p = Pool(workdir, share, outside)
    try:
        yield p
    finally:
        try:
            p.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            elapsed = time.monotonic() - p.started
            line = f"attack table: {sum(p.stats.values())} rows run in {elapsed:.1f} s " + " ".join(
                f"{k}={v}" for k, v in sorted(p.stats.items())
            )
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                # After the run, when output is no longer captured.
                request.config.add_cleanup(lambda: reporter.write_line(line))
            report = os.environ.get("ATTACK_REPORT")
            if report:
                with open(report, "a") as f:
                    f.write(line + "\n")


_ROW_IDS = iter(range(1 << 30))


@pytest.mark.parametrize(("mode_name", "kind_name", "op_name"), ROWS)
def test_row(pool: Pool, mode_name: str, kind_name: str, op_name: str) -> None:
    mode, kind, o = MODES[mode_name], KINDS[kind_name], OPS_BY_NAME[op_name]
    uses_blk = kind.make == "blk" or kind.swap_to == "blk" or op_name == "mknod_in_blk"
    if uses_blk and LOOP_MINOR is None:
        pytest.skip("no unbound loop device to borrow the numbers of")
    if mode.name == "handles":
        reason = handles_supported(pool.workdir)
        if reason:
            pytest.skip(reason)
    d = pool.get(mode)
    pool.stats[mode.name] += 1
    rowdir = pool.share / f"r{next(_ROW_IDS)}"
    rowdir.mkdir()
    outcome = _run_row(d, mode, kind, o, rowdir)
    shutil.rmtree(rowdir, ignore_errors=True)
    if outcome:
        pytest.fail("\n".join(outcome), pytrace=False)


def _run_row(d: AttackDaemon, mode: Mode, kind: Kind, o: Op, rowdir: Path) -> list[str]:
    outside = d.outside
    before = fingerprint(outside)
    sentinel_ids = inode_ids(outside)
    log_start = len(d.log_text())
    r = Row(d, mode, kind, rowdir)
    (rowdir / "h").write_bytes(INSIDE[:FILE_SIZE])
    (rowdir / "h2").write_bytes(b"second helper")
    make(kind.make, r.t, outside)
    watch = Inotify()
    problems: list[str] = []
    try:
        g = r.g
        r.dnode = r.entry(r.need("LOOKUP row", g.lookup(ROOT, rowdir.name.encode())))
        r.node = r.entry(r.need("LOOKUP t", g.lookup(r.dnode, b"t")))
        r.helper = r.entry(r.need("LOOKUP h", g.lookup(r.dnode, b"h")))
        if kind.swap_to is not None:
            os.unlink(r.t)
            make(kind.swap_to, r.t, outside)
        for p in special_files(rowdir):
            watch.watch(p, IN_OPEN)
        for dirpath in [dirpath for dirpath, _, _ in os.walk(outside)]:
            watch.watch(dirpath, SENTINEL_EVENTS)
        expected = o.expect(kind, mode)
        if r.stale_ok:
            expected |= {errno.ESTALE}
        try:
            got = o.run(r)
        except Hang as e:
            problems.append(f"hang: {e}")
            got = None
        events = watch.events()
        if got is not None and got not in expected:
            problems.append(
                f"{o.name} on {kind.name}: answered {errname(got)}, allowed {names(expected)}"
            )
        problems += r.failures
        problems += [f"held while the row ran: {v}" for v in _fds(d, mode)]
        if not d.guest.broken:
            try:
                r.cleanup()
            except Hang as e:
                problems.append(f"hang in cleanup: {e}")
        problems += [f"after release and forget: {v}" for v in _fds(d, mode)]
        events += watch.events()
        for path, mask, name in events:
            if mask & IN_OPEN and not path.startswith(str(outside)):
                problems.append(f"the daemon opened {path}")
            elif path.startswith(str(outside)):
                problems.append(f"touched outside the share: {path}/{name} (mask {mask:#x})")
        why = d.serves()
        if why:
            problems.append(f"no longer serves: {why}")
    except AssertionError as e:
        problems.append(str(e))
    finally:
        watch.close()
    after = fingerprint(outside)
    problems += [f"outside changed: {line}" for line in diff(before, after)]
    escaped = inode_ids(d.share) & sentinel_ids
    if escaped:
        problems.append(f"a name in the share is a hard link to the sentinel tree: {escaped}")
    log = d.log_text()[log_start:]
    if "Traceback" in log:
        problems.append("the daemon logged a traceback:\n" + log[log.index("Traceback") :][:3000])
    if not d.guest.broken and d.alive():
        # A clean slate for the next row, whatever this one left behind.
        try:
            d.guest.destroy()
            d.guest.init()
        except (Hang, AssertionError) as e:
            problems.append(f"DESTROY/INIT after the row: {e}")
    return problems


def _fds(d: AttackDaemon, mode: Mode) -> list[str]:
    return fd_violations(d.pid, d.baseline, d.share, d.outside, read_only=mode.ro)


def test_table_covers_every_opcode() -> None:
    """The table is meant to be every opcode the server has a handler for."""
    from pyvirtiofsd.fuse.server import Server

    handled = {name[4:].upper() for name in dir(Server) if name.startswith("_op_")}
    covered = {
        "LOOKUP", "FORGET", "BATCH_FORGET", "GETATTR", "SETATTR", "READLINK", "SYMLINK", "MKNOD",
        "MKDIR", "UNLINK", "RMDIR", "RENAME", "RENAME2", "LINK", "OPEN", "READ", "WRITE",
        "STATFS", "RELEASE", "FSYNC", "SETXATTR", "GETXATTR", "LISTXATTR", "REMOVEXATTR",
        "FLUSH", "INIT", "OPENDIR", "READDIR", "RELEASEDIR", "FSYNCDIR", "GETLK", "SETLK",
        "SETLKW", "ACCESS", "CREATE", "INTERRUPT", "BMAP", "DESTROY", "IOCTL", "POLL",
        "READDIRPLUS", "FALLOCATE", "LSEEK", "COPY_FILE_RANGE", "SETUPMAPPING",
        "REMOVEMAPPING", "SYNCFS", "TMPFILE", "STATX",
    }  # fmt: skip
    # COPY_FILE_RANGE_64 is COPY_FILE_RANGE with a wider reply: the same backend call.
    assert handled - covered <= {"COPY_FILE_RANGE_64"}, handled - covered
