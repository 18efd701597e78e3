"""Tools for the attack suites: a guest that never waits forever, and the host's view of what
the daemon did.

Rules of the suites that use it:

* Every request has a bounded wait. A request still unanswered after :data:`HANG_TIMEOUT`
  seconds is a failure (:class:`Hang`), never a stuck run: the host then opens every FIFO in
  the share from its side (which ends a daemon's blocking open of one) and collects the late
  reply, so that the ring stays in step and the next row can run.
* What the daemon did is judged from the host, not from its replies: its open descriptors
  (``/proc/PID/fd`` and ``fdinfo``), inotify events on the share's special files (an open of a
  FIFO or device node, even one closed again at once, is seen) and on a sentinel tree beside
  the share, and a fingerprint of that tree (contents, modes, owners, times, xattrs).
* :class:`FuseClient` lives in ``src/`` and is not extended here: requests are built with
  :func:`encode_request` and the ABI layouts, and answered with an errno rather than raised.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.testing.dax_window import FrontendDaxWindow
from pyvirtiofsd.testing.frontend import DriverQueue, Frontend, FrontendError
from pyvirtiofsd.testing.fuse_client import decode_reply, encode_request
from pyvirtiofsd.vhost_user.messages import BackendReq, Message, ProtocolFeature
from pyvirtiofsd.virtio.chain import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket

#: Seconds a request may take before it counts as blocked in the daemon.
HANG_TIMEOUT = 3.0
#: Seconds to wait for a blocked request once the host has opened the share's FIFOs.
LATE_TIMEOUT = 20.0
O_PATH = 0o10000000
ROOT = abi.ROOT_ID
#: Descriptor flags, as the tests that write descriptor tables by hand spell them.
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
#: One past the last guest-physical address.
TOP = 1 << 64
#: What a guest kernel offers at INIT (the daemon picks from these).
INIT_FLAGS = (
    abi.InitFlag.ASYNC_READ
    | abi.InitFlag.POSIX_LOCKS
    | abi.InitFlag.ATOMIC_O_TRUNC
    | abi.InitFlag.EXPORT_SUPPORT
    | abi.InitFlag.BIG_WRITES
    | abi.InitFlag.FLOCK_LOCKS
    | abi.InitFlag.DO_READDIRPLUS
    | abi.InitFlag.READDIRPLUS_AUTO
    | abi.InitFlag.MAX_PAGES
    | abi.InitFlag.POSIX_ACL
    | abi.InitFlag.DONT_MASK
    | abi.InitFlag.SETXATTR_EXT
    | abi.InitFlag.MAP_ALIGNMENT
    | abi.InitFlag.HAS_INODE_DAX
    | abi.InitFlag.CREATE_SUPP_GROUP
)


def errname(code: int) -> str:
    return "OK" if code == 0 else errno.errorcode.get(code, str(code))


def names(codes: Any) -> str:
    return "{" + ", ".join(sorted(errname(c) for c in codes)) + "}"


# -- inotify ----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
IN_ACCESS = 0x1
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_OPEN = 0x20
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_IGNORED = 0x8000
IN_DONT_FOLLOW = 0x02000000
_EVENT = struct.Struct("iIII")
#: What anything at all doing to the sentinel tree shows up as.
SENTINEL_EVENTS = (
    IN_ACCESS | IN_MODIFY | IN_ATTRIB | IN_OPEN | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
) | IN_DELETE


class Inotify:
    """Watches paths; :meth:`events` drains what happened to them since the last call."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}

    def watch(self, path: Path | str, mask: int) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask | IN_DONT_FOLLOW)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.paths[wd] = str(path)

    def events(self) -> list[tuple[str, int, str]]:
        """(watched path, mask, child name) of every event so far."""
        out = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                wd, mask, _, size = _EVENT.unpack_from(data, pos)
                name = data[pos + 16 : pos + 16 + size].rstrip(b"\0").decode(errors="replace")
                pos += 16 + size
                if not mask & IN_IGNORED:
                    out.append((self.paths.get(wd, "?"), mask, name))

    def close(self) -> None:
        os.close(self.fd)


def special_files(top: Path) -> list[Path]:
    """FIFOs, sockets and device nodes under ``top`` (not following symlinks)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            try:
                mode = os.lstat(p).st_mode
            except FileNotFoundError:
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                found.append(p)
    return found


# -- the sentinel tree ------------------------------------------------------------------------


def fingerprint(top: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a change to ``top`` would alter: the listing, and per entry its type,
    mode, owner, size, mtime, ctime, link count, xattrs and (files) a hash of the contents,
    read with O_NOATIME; for files also the atime (a read through an escape would set it)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in [".", *dirnames, *filenames]:
            p = Path(dirpath, n) if n != "." else Path(dirpath)
            st = os.lstat(p)
            xattrs: tuple[Any, ...] = ()
            if not stat.S_ISLNK(st.st_mode):
                xattrs = tuple(
                    sorted((x, os.getxattr(p, x)) for x in os.listxattr(p, follow_symlinks=False))
                )
            digest = ""
            atime = 0
            if stat.S_ISREG(st.st_mode):
                fd = os.open(p, os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC)
                try:
                    digest = hashlib.sha256(os.read(fd, 1 << 20)).hexdigest()
                finally:
                    os.close(fd)
                atime = st.st_atime_ns
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            key = str(p.relative_to(top))
            out[key] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_nlink,
                atime,
                digest,
                xattrs,
            )
    return out


def inode_ids(top: Path) -> set[tuple[int, int]]:
    ids = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(Path(dirpath, n))
                ids.add((st.st_dev, st.st_ino))
    return ids


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(before) | set(after)):
        if before.get(k) != after.get(k):
            out.append(f"{k}: {before.get(k)} -> {after.get(k)}")
    return out


# -- the daemon's descriptors -----------------------------------------------------------------


@dataclass(frozen=True)
class OpenFd:
    num: int
    target: str
    flags: int
    mode: int  # st_mode of what it refers to (0 when it can't be stat'ed)

    @property
    def is_path(self) -> bool:
        return bool(self.flags & O_PATH)

    def describe(self) -> str:
        kind = stat.filemode(self.mode)[0] if self.mode else "?"
        return f"fd {self.num} -> {self.target} (type {kind}, flags {self.flags:#o})"


def open_fds(pid: int) -> dict[int, OpenFd]:
    out = {}
    base = f"/proc/{pid}/fd"
    try:
        entries = os.listdir(base)
    except FileNotFoundError:
        return out
    for entry in entries:
        num = int(entry)
        try:
            target = os.readlink(f"{base}/{entry}")
            with open(f"/proc/{pid}/fdinfo/{entry}") as f:
                info = f.read()
        except FileNotFoundError:
            continue  # closed meanwhile
        flags = 0
        for line in info.splitlines():
            if line.startswith("flags:"):
                flags = int(line.split()[1], 8)
        try:
            mode = os.stat(f"{base}/{entry}").st_mode
        except OSError:
            mode = 0
        out[num] = OpenFd(num, target, flags, mode)
    return out


def fd_violations(
    pid: int,
    baseline: dict[int, OpenFd],
    share: Path,
    outside: Path,
    *,
    read_only: bool = False,
) -> list[str]:
    """What the contract forbids among the daemon's descriptors that are not in ``baseline``:
    anything opened (not O_PATH) that is not a regular file or a directory, anything at all
    outside the share but in the test's tree, and (``read_only``) a share file open for
    writing."""
    bad = []
    share_s, outside_s = str(share), str(outside)
    for num, fd in open_fds(pid).items():
        old = baseline.get(num)
        if old is not None and old.target == fd.target:
            continue
        if fd.target.startswith(outside_s):
            bad.append(f"outside the share: {fd.describe()}")
            continue
        if fd.is_path:
            continue
        if not (stat.S_ISREG(fd.mode) or stat.S_ISDIR(fd.mode)):
            bad.append(f"not a regular file or directory: {fd.describe()}")
        elif read_only and fd.target.startswith(share_s) and fd.flags & os.O_ACCMODE:
            bad.append(f"open for writing in a read-only share: {fd.describe()}")
    return bad


# -- the guest --------------------------------------------------------------------------------


class Hang(Exception):
    """A request the daemon did not answer in time."""


@dataclass
class Reply:
    err: int
    payload: bytes = b""

    @property
    def ok(self) -> bool:
        return self.err == 0


class Guest:
    """FUSE requests through one virtqueue, each answered within a bounded time.

    ``unblock()`` is called when a request hangs; it returns a cleanup callable, run once the
    late reply arrived (or did not)."""

    def __init__(
        self,
        q: DriverQueue,
        unblock: Callable[[], Callable[[], None]] | None = None,
        timeout: float = HANG_TIMEOUT,
    ) -> None:
        self.q = q
        self.unblock = unblock
        self.timeout = timeout
        self.unique = 1
        self._lock = threading.Lock()
        self.flags = 0
        #: Set once a request never came back: nothing more can be trusted on this queue.
        self.broken = False
        self.late: list[Reply] = []

    def _next(self) -> int:
        with self._lock:
            self.unique += 1
            return self.unique

    def submit(self, opcode: int, nodeid: int, payload: bytes, reply_size: int, **kw: Any):  # type: ignore[no-untyped-def]
        unique = kw.pop("unique", None) or self._next()
        req = encode_request(opcode, nodeid, payload, unique, **kw)
        head = self.q.submit([req], [reply_size + abi.OUT_HEADER.size] if reply_size else [])
        self.q.kick()
        return head, unique

    def collect(self, head: int, opcode: int, timeout: float | None = None) -> Reply:
        if self.broken:
            raise Hang("an earlier request on this queue never came back")
        try:
            self.q.wait(head, self.timeout if timeout is None else timeout)
        except FrontendError:
            cleanup = self.unblock() if self.unblock is not None else (lambda: None)
            try:
                self.q.wait(head, LATE_TIMEOUT)
            except FrontendError:
                self.broken = True
                raise Hang(
                    f"opcode {abi.Opcode(opcode).name} blocked in the daemon for more than "
                    f"{self.timeout:.0f} s, and still after the host opened the share's FIFOs"
                ) from None
            finally:
                cleanup()
            late = self._decode(self.q.result(head)[1])
            self.late.append(late)
            raise Hang(
                f"opcode {abi.Opcode(opcode).name} blocked in the daemon for more than "
                f"{self.timeout:.0f} s; it answered {errname(late.err)} once the host opened "
                "the share's FIFOs from its side"
            ) from None
        return self._decode(self.q.result(head)[1])

    @staticmethod
    def _decode(raw: bytes) -> Reply:
        if not raw:
            return Reply(-1)
        r = decode_reply(raw)
        return Reply(r.error, r.payload)

    def call(
        self, opcode: int, nodeid: int, payload: bytes = b"", reply_size: int = 4096, **kw: Any
    ) -> Reply:
        head, _ = self.submit(opcode, nodeid, payload, reply_size, **kw)
        return self.collect(head, opcode)

    def send(self, opcode: int, nodeid: int, payload: bytes = b"") -> None:
        """A request without a reply (FORGET, BATCH_FORGET, INTERRUPT)."""
        head, _ = self.submit(opcode, nodeid, payload, 0)
        self.collect(head, opcode)

    # --- requests, by name -----------------------------------------------------------------

    def init(self, flags: int = INIT_FLAGS) -> Any:
        flags |= abi.InitFlag.INIT_EXT
        payload = abi.INIT_IN.pack(
            abi.KERNEL_VERSION,
            abi.KERNEL_MINOR_VERSION,
            1 << 17,
            flags & 0xFFFFFFFF,
            flags >> 32,
            (0,) * 11,
        )
        r = self.call(abi.Opcode.INIT, 0, payload)
        assert r.ok, f"INIT: {errname(r.err)}"
        out = abi.INIT_OUT.unpack(r.payload)
        self.flags = out.flags | out.flags2 << 32
        return out

    def destroy(self) -> Reply:
        return self.call(abi.Opcode.DESTROY, 0)

    def lookup(self, parent: int, name: bytes) -> Reply:
        return self.call(abi.Opcode.LOOKUP, parent, name + b"\0")

    def forget(self, nodeid: int, count: int) -> None:
        self.send(abi.Opcode.FORGET, nodeid, abi.FORGET_IN.pack(count))

    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        payload = abi.BATCH_FORGET_IN.pack(len(items), 0) + b"".join(
            abi.FORGET_ONE.pack(n, c) for n, c in items
        )
        self.send(abi.Opcode.BATCH_FORGET, 0, payload)

    def getattr(self, nodeid: int, fh: int | None = None) -> Reply:
        payload = abi.GETATTR_IN.pack(abi.GETATTR_FH if fh is not None else 0, 0, fh or 0)
        return self.call(abi.Opcode.GETATTR, nodeid, payload)

    def setattr(self, nodeid: int, **fields: int) -> Reply:
        return self.call(abi.Opcode.SETATTR, nodeid, abi.SETATTR_IN.pack(**fields))

    def readlink(self, nodeid: int) -> Reply:
        return self.call(abi.Opcode.READLINK, nodeid)

    def symlink(self, parent: int, name: bytes, target: bytes) -> Reply:
        return self.call(abi.Opcode.SYMLINK, parent, name + b"\0" + target + b"\0")

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0) -> Reply:
        return self.call(
            abi.Opcode.MKNOD, parent, abi.MKNOD_IN.pack(mode, rdev, 0, 0) + name + b"\0"
        )

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> Reply:
        return self.call(abi.Opcode.MKDIR, parent, abi.MKDIR_IN.pack(mode, 0) + name + b"\0")

    def unlink(self, parent: int, name: bytes) -> Reply:
        return self.call(abi.Opcode.UNLINK, parent, name + b"\0")

    def rmdir(self, parent: int, name: bytes) -> Reply:
        return self.call(abi.Opcode.RMDIR, parent, name + b"\0")

    def rename(
        self, parent: int, name: bytes, new_parent: int, new: bytes, flags: int = 0
    ) -> Reply:
        if flags == 0:
            payload = abi.RENAME_IN.pack(new_parent) + name + b"\0" + new + b"\0"
            return self.call(abi.Opcode.RENAME, parent, payload)
        payload = abi.RENAME2_IN.pack(new_parent, flags, 0) + name + b"\0" + new + b"\0"
        return self.call(abi.Opcode.RENAME2, parent, payload)

    def link(self, nodeid: int, new_parent: int, new: bytes) -> Reply:
        return self.call(abi.Opcode.LINK, new_parent, abi.LINK_IN.pack(nodeid) + new + b"\0")

    def open(self, nodeid: int, flags: int) -> Reply:
        return self.call(abi.Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0))

    def create(self, parent: int, name: bytes, flags: int, mode: int = 0o644) -> Reply:
        payload = abi.CREATE_IN.pack(flags | os.O_CREAT, mode, 0, 0) + name + b"\0"
        return self.call(abi.Opcode.CREATE, parent, payload)

    def tmpfile(self, parent: int, flags: int = os.O_RDWR, mode: int = 0o600) -> Reply:
        payload = abi.CREATE_IN.pack(flags, mode, 0, 0)
        return self.call(abi.Opcode.TMPFILE, parent, payload)

    def read(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096) -> Reply:
        payload = abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
        return self.call(abi.Opcode.READ, nodeid, payload, reply_size=size)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> Reply:
        payload = abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data
        return self.call(abi.Opcode.WRITE, nodeid, payload)

    def flush(self, nodeid: int, fh: int, lock_owner: int = 0) -> Reply:
        return self.call(abi.Opcode.FLUSH, nodeid, abi.FLUSH_IN.pack(fh, 0, 0, lock_owner))

    def release(self, nodeid: int, fh: int, lock_owner: int = 0, flush: bool = False) -> Reply:
        rflags = abi.RELEASE_FLUSH if flush else 0
        payload = abi.RELEASE_IN.pack(fh, 0, rflags, lock_owner)
        return self.call(abi.Opcode.RELEASE, nodeid, payload)

    def releasedir(self, nodeid: int, fh: int) -> Reply:
        return self.call(abi.Opcode.RELEASEDIR, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0))

    def fsync(self, nodeid: int, fh: int, datasync: bool = False, opcode: int = 0) -> Reply:
        payload = abi.FSYNC_IN.pack(fh, abi.FSYNC_FDATASYNC if datasync else 0, 0)
        return self.call(opcode or abi.Opcode.FSYNC, nodeid, payload)

    def opendir(self, nodeid: int) -> Reply:
        return self.call(abi.Opcode.OPENDIR, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0))

    def readdir(self, nodeid: int, fh: int, plus: bool = False, size: int = 4096) -> Reply:
        op = abi.Opcode.READDIRPLUS if plus else abi.Opcode.READDIR
        payload = abi.READ_IN.pack(fh, 0, size, 0, 0, 0, 0)
        return self.call(op, nodeid, payload, reply_size=size)

    def statfs(self, nodeid: int) -> Reply:
        return self.call(abi.Opcode.STATFS, nodeid)

    def syncfs(self, nodeid: int) -> Reply:
        return self.call(abi.Opcode.SYNCFS, nodeid, abi.SYNCFS_IN.pack(0))

    def access(self, nodeid: int, mask: int) -> Reply:
        return self.call(abi.Opcode.ACCESS, nodeid, abi.ACCESS_IN.pack(mask, 0))

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int = 0) -> Reply:
        if self.flags & abi.InitFlag.SETXATTR_EXT:
            head = abi.SETXATTR_IN.pack(len(value), flags, 0, 0)
        else:
            head = abi.GETXATTR_IN.pack(len(value), flags)
        return self.call(abi.Opcode.SETXATTR, nodeid, head + name + b"\0" + value)

    def getxattr(self, nodeid: int, name: bytes, size: int = 4096) -> Reply:
        payload = abi.GETXATTR_IN.pack(size, 0) + name + b"\0"
        return self.call(abi.Opcode.GETXATTR, nodeid, payload)

    def listxattr(self, nodeid: int, size: int = 4096) -> Reply:
        return self.call(abi.Opcode.LISTXATTR, nodeid, abi.GETXATTR_IN.pack(size, 0))

    def removexattr(self, nodeid: int, name: bytes) -> Reply:
        return self.call(abi.Opcode.REMOVEXATTR, nodeid, name + b"\0")

    @staticmethod
    def lk_payload(fh: int, owner: int, ltype: int, flock: bool, start: int = 0) -> bytes:
        end = 0x7FFF_FFFF_FFFF_FFFF
        return abi.LK_IN.pack(fh, owner, start, end, ltype, 4242, abi.LK_FLOCK if flock else 0, 0)

    def lock(self, opcode: int, nodeid: int, fh: int, owner: int, ltype: int, flock: bool) -> Reply:
        return self.call(opcode, nodeid, self.lk_payload(fh, owner, ltype, flock))

    def bmap(self, nodeid: int) -> Reply:
        return self.call(abi.Opcode.BMAP, nodeid, abi.BMAP_IN.pack(0, 4096, 0))

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int = 0) -> Reply:
        payload = abi.FALLOCATE_IN.pack(fh, offset, length, mode, 0)
        return self.call(abi.Opcode.FALLOCATE, nodeid, payload)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> Reply:
        return self.call(abi.Opcode.LSEEK, nodeid, abi.LSEEK_IN.pack(fh, offset, whence, 0))

    def copy_file_range(
        self, nodeid: int, fh_in: int, nodeid_out: int, fh_out: int, length: int
    ) -> Reply:
        payload = abi.COPY_FILE_RANGE_IN.pack(fh_in, 0, nodeid_out, fh_out, 0, length, 0)
        return self.call(abi.Opcode.COPY_FILE_RANGE, nodeid, payload)

    def statx(self, nodeid: int) -> Reply:
        payload = abi.STATX_IN.pack(0, 0, 0, 0, 0x7FF)
        return self.call(abi.Opcode.STATX, nodeid, payload)

    def setupmapping(
        self, nodeid: int, fh: int, foffset: int, length: int, flags: int, moffset: int
    ) -> Reply:
        payload = abi.SETUPMAPPING_IN.pack(fh, foffset, length, flags, moffset)
        return self.call(abi.Opcode.SETUPMAPPING, nodeid, payload)

    def removemapping(self, ranges: list[tuple[int, int]]) -> Reply:
        payload = abi.REMOVEMAPPING_IN.pack(len(ranges)) + b"".join(
            abi.REMOVEMAPPING_ONE.pack(m, n) for m, n in ranges
        )
        return self.call(abi.Opcode.REMOVEMAPPING, ROOT, payload)

    def ioctl(self, nodeid: int, fh: int, cmd: int) -> Reply:
        payload = abi.IOCTL_IN.pack(fh, 0, cmd, 0, 0, 8)
        return self.call(abi.Opcode.IOCTL, nodeid, payload)

    def poll(self, nodeid: int, fh: int) -> Reply:
        payload = abi.POLL_IN.pack(fh, 0, 0, 1)
        return self.call(abi.Opcode.POLL, nodeid, payload)


def entry_of(reply: Reply) -> Any:
    return abi.ENTRY_OUT.unpack(reply.payload)


def open_of(reply: Reply, offset: int = 0) -> Any:
    return abi.OPEN_OUT.unpack(reply.payload, offset)


def dirent_names(payload: bytes, plus: bool) -> list[tuple[bytes, int]]:
    """(name, nodeid) of a READDIR(PLUS) reply; nodeid 0 for plain READDIR and for . and ..
    entries (which READDIRPLUS gives without a lookup)."""
    out, pos = [], 0
    while pos < len(payload):
        if plus:
            e = abi.DIRENTPLUS.unpack(payload, pos)
            start = pos + abi.DIRENTPLUS.size
            name = payload[start : start + e.d_namelen]
            out.append((name, e.nodeid))
            pos += abi.direntplus_size(e.d_namelen)
        else:
            _, _, namelen, _ = abi.DIRENT.struct.unpack_from(payload, pos)
            start = pos + abi.DIRENT.size
            out.append((payload[start : start + namelen], 0))
            pos += abi.dirent_size(namelen)
    return out


# -- the daemon -------------------------------------------------------------------------------


def unblock_fifos(top: Path) -> Callable[[], None]:
    """Open every FIFO under ``top`` read-write from the host, which ends any open of it that
    blocks waiting for a partner; returns what closes them again."""
    fds = []
    for p in special_files(top):
        try:
            if stat.S_ISFIFO(os.lstat(p).st_mode):
                fds.append(os.open(p, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            pass

    def close() -> None:
        for fd in fds:
            os.close(fd)

    return close


@dataclass
class MapRecord:
    """A SHMEM_MAP the daemon asked for: writable or not, and the access mode of its fd."""

    writable: bool
    accmode: int
    target: str


@dataclass
class AttackDaemon:
    """``python -m pyvirtiofsd`` serving ``share`` to our front-end, with a guest queue for
    the requests under test, one for health checks and one for INTERRUPTs, each driven by
    its own :class:`Guest`."""

    share: Path
    outside: Path
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    log_path: Path
    frontend: Frontend
    window: FrontendDaxWindow
    guests: dict[int, Guest]
    baseline: dict[int, OpenFd] = field(default_factory=dict)
    maps: list[MapRecord] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def guest(self) -> Guest:
        return self.guests[1]

    @property
    def health(self) -> Guest:
        return self.guests[2]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def serves(self) -> str | None:
        """Why the daemon does not answer a GETATTR of the root, or None when it does."""
        if not self.alive():
            return f"the daemon exited with status {self.proc.returncode}"
        try:
            r = self.health.getattr(ROOT)
        except Hang as e:
            return f"GETATTR of the root on another queue: {e}"
        if not r.ok:
            return f"GETATTR of the root answered {errname(r.err)}"
        return None

    def close(self) -> str:
        """Disconnect; the daemon must exit 0 without a traceback. Its log."""
        with contextlib.suppress(OSError):
            self.frontend.close()
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_child(self.proc)
            self.window.close()
        text = self.log_text()
        assert rc == 0, f"daemon exit status {rc}:\n{text[-3000:]}"
        assert "Traceback" not in text, text[-5000:]
        return text


class DaemonStartError(Exception):
    pass


def start_daemon(
    workdir: Path,
    share: Path,
    outside: Path,
    *args: str,
    queues: int = 3,
    name: str = "daemon",
    regions: int = 1,
) -> AttackDaemon:
    sock = workdir / f"{name}.sock"
    log_path = workdir / f"{name}.log"
    argv = [
        sys.executable,
        "-m",
        "pyvirtiofsd",
        "--socket-path",
        str(sock),
        "--shared-dir",
        str(share),
        "--log-level",
        "info",
        *args,
    ]
    with open(log_path, "wb") as log:
        proc = spawn_child(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_for_socket(str(sock), proc)
    except Exception as e:
        kill_child(proc)
        raise DaemonStartError(
            f"{' '.join(args)}: {e}\n{log_path.read_text(errors='replace')[-2000:]}"
        ) from None
    frontend = Frontend.connect(str(sock))
    qs = frontend.setup(
        queues=tuple(range(queues + 1)),
        queue_size=128,
        ram_size=64 << 20,
        regions=regions,
        arena_size=4 << 20,
    )
    has_window = frontend.has_protocol(ProtocolFeature.SHMEM)
    window = FrontendDaxWindow(frontend.get_shmem_config()[0] if has_window else 64 << 20)
    maps: list[MapRecord] = []

    def hook(msg: Message) -> int:
        if msg.request == BackendReq.SHMEM_MAP and msg.fds:
            fd = msg.fds[0]
            from pyvirtiofsd.vhost_user.messages import MMapRequest

            req = MMapRequest.decode(msg.payload)
            maps.append(
                MapRecord(
                    bool(req.flags & MMapRequest.WRITABLE),
                    _fcntl_getfl(fd) & os.O_ACCMODE,
                    os.readlink(f"/proc/self/fd/{fd}"),
                )
            )
        return window.hook(msg)

    frontend.open_backend_channel(hook)
    d = AttackDaemon(share, outside, args, proc, log_path, frontend, window, {}, maps=maps)
    for i in range(1, queues + 1):
        g = Guest(qs[i], unblock=lambda: unblock_fifos(share))
        d.guests[i] = g
    d.guest.init()
    for i in range(2, queues + 1):
        # Every queue serves the same session; INIT once, let the others learn the flags.
        d.guests[i].flags = d.guest.flags
    # Settle: one request on every queue, so that every worker is up before the baseline.
    for g in d.guests.values():
        assert g.getattr(ROOT).ok
    d.baseline = open_fds(proc.pid)
    return d


def _fcntl_getfl(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def unused_loop_minor() -> int | None:
    """The minor of a loop block device bound to nothing (opening it reads no disk)."""
    for n in range(7, -1, -1):
        dev = Path(f"/dev/loop{n}")
        if dev.exists() and not Path(f"/sys/block/loop{n}/loop/backing_file").exists():
            return os.minor(dev.stat().st_rdev)
    return None


def handles_supported(path: Path) -> str | None:
    """Why --inode-file-handles=mandatory can't work on ``path``'s file system, or None."""
    from pyvirtiofsd import linux

    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        handle, _ = linux.name_to_handle_at(fd, b"", linux.AT_EMPTY_PATH)
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.close(linux.open_by_handle_at(dfd, handle, os.O_PATH))
        finally:
            os.close(dfd)
    except OSError as e:
        return f"file handles do not work on {path}: {e}"
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def timed(label: str, sink: dict[str, float]) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        sink[label] = sink.get(label, 0.0) + time.monotonic() - start
