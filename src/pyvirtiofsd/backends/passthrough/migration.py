"""Live migration of the passthrough: what the guest holds, saved on the source and found again on
the destination, which serves the same files (the same directory, or an identical copy).

What is saved (section ``passthrough``, version 1), all while no request runs:

* the guest's inodes: number, lookup count, file type, and how to find the file (below);
* its open handles: number, inode, the guest's open flags, and the flock() held through it;
* the POSIX locks each lock owner holds on each inode, as the ranges granted
  (:mod:`.lockranges`), with the owner's pid;
* the next inode and handle numbers: the destination never gives out one the guest may hold.

How an inode is found (``--migration-mode``):

* Paths are taken at save time, from each inode's own descriptor (its ``/proc/self/fd`` link),
  each checked to name that very inode; the rest (a file-handle store's disconnected entries)
  by one walk of the share. The guest is stopped, so nothing it does can change them
  meanwhile. An inode goes as (parent inode, name) when the guest holds its directory, else as
  a path from the share's root.
* find-paths (the default): by path. An inode with none (unlinked, but still open) goes by file
  handle where the file system gives one. With ``--migration-verify-handles`` every path also
  carries the file's handle, and the destination refuses a file found there whose handle
  differs (another file by that name).
* file-handles: by file handle where the file system gives one (and the mount it is on), by
  path otherwise.
* An inode neither way can name goes as unknown; one the source had itself lost as lost.

On the destination nothing outside the share is reached: a name is opened ``O_PATH |
O_NOFOLLOW`` in its parent directory (found first), a path below the share's root with
``openat2`` (``RESOLVE_BENEATH``, no symlinks); a file opened by handle is accepted only when its
handle is the one sent and it lies inside the share (its path does, or its mount is a whole file
system mounted inside the share), on a file system with the source's id. Its type must be the
source's. An inode that can't be found fails the load, with a log line for each
(``--migration-on-error abort``, the default), or is *lost* (``guest-error``): its number stays
the guest's, and every request naming it, or a handle on it, gets EIO.

Open files are opened again from their inode with the guest's flags, less O_TRUNC (nothing is
truncated twice). File offsets are not carried: FUSE reads and writes carry their own, and
READDIR seeks to the guest's offset, a cookie of the file system's (``d_off``), which holds on
the same file system; on a copy, a listing in progress when the guest moved may repeat or miss
entries.

Locks are taken again at once, without waiting. Those another process holds (on one host, the
source daemon, until it exits) are *pending*: a background thread tries them again every 50 ms
at most until it gets them. In that window another host process could take such a lock first,
and the guest's own lock calls on those ranges get EAGAIN; the guest's unlock of a pending range
settles it. A lock whose file can't be opened any more is reported and dropped.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pyvirtiofsd import linux
from pyvirtiofsd.backends.base import HandleTable
from pyvirtiofsd.backends.passthrough import locks
from pyvirtiofsd.backends.passthrough.config import (
    MigrationMode,
    MigrationOnError,
    PassthroughConfig,
)
from pyvirtiofsd.backends.passthrough.inodes import Inode, InodeStore, ident_of
from pyvirtiofsd.backends.passthrough.lockranges import LockRanges
from pyvirtiofsd.fuse.state import StateError, StateReader, StateWriter

__all__ = ["PassthroughFs", "load", "save"]


class PassthroughFs(Protocol):
    """What this module uses of :class:`~.fs.PassthroughFs` (which calls it)."""

    cfg: PassthroughConfig
    inodes: InodeStore
    #: fh -> flock() operation still to take again (guarded by ``inodes.lock_book``).
    pending_flocks: dict[int, int]
    retaker: threading.Thread | None

    @property
    def handle_table(self) -> HandleTable[Any]: ...

    @property
    def stopping(self) -> bool: ...

    def reopen(self, inode: Inode, guest_flags: int) -> int: ...

    def insert_handle(self, fh: int, fd: int, inode: Inode, guest_flags: int) -> Any: ...

    def lock_opener(self, inode: Inode) -> Any: ...

    def destroy(self) -> None: ...


log = logging.getLogger(__name__)

_TAG = b"passthrough"
_VERSION = 1

# How an inode is found.
_ROOT = 0
_CHILD = 1  # parent nodeid, name
_PATH = 2  # path from the share's root
_HANDLE = 3  # mount index, file handle
_UNKNOWN = 4  # the source could not tell
_LOST = 5  # the source had lost it itself
_HOWS = ("root", "name", "path", "file handle", "unknown", "lost")

#: Header flags: paths carry file handles to check.
_F_VERIFY = 1
#: An inode record's extras: a file handle to check follows.
_X_HANDLE = 1

_PATH_MAX = 4096
_HANDLE_MAX = 4 + linux.MAX_HANDLE_SZ
#: Bounds a destination holds a state to (it passed through the front-end: untrusted bytes).
#: Far above what a guest holds (each open file and, without file handles, each inode is an
#: fd of the source's), low enough that no state makes the load allocate without end.
_MAX_INODES = 1 << 23
_MAX_HANDLES = 1 << 22
_MAX_MOUNTS = 1 << 10
_MAX_LOCK_OWNERS = 1 << 20
_MAX_RANGES = 1 << 16
#: Inode and file handle numbers, lookup counts: what the source could have given out.
_ID_LIMIT = 1 << 63
#: The file types an inode may have (S_IFMT >> 12).
_TYPES = frozenset(
    t >> 12
    for t in (
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
        stat.S_IFCHR,
        stat.S_IFBLK,
    )
)
_FLOCKS = (0, fcntl.LOCK_SH, fcntl.LOCK_EX)
_LOCK_TYPES = (fcntl.F_RDLCK, fcntl.F_WRLCK)
_OFFSET_MAX = (1 << 63) - 1
_DELETED = b" (deleted)"
_O_LOOKUP = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: Failures named one by one in the log and in the error.
_SHOWN = 20
#: Lock re-taking: the longest pause between tries, and when to say it is still waiting.
_RETAKE_POLL_MAX = 0.05
_RETAKE_NOTICE = 10.0


# --- saving ------------------------------------------------------------------------------------


def save(fs: PassthroughFs) -> bytes:
    """What the guest holds of ``fs``, for a destination (see the module's rules)."""
    started = time.monotonic()
    store = fs.inodes
    cfg = fs.cfg
    inodes, lost, next_id = store.snapshot()
    root = store.root
    by_handle = cfg.migration_mode is MigrationMode.FILE_HANDLES
    verify = cfg.migration_verify_handles and not by_handle

    handles: dict[int, tuple[bytes, int]] = {}
    if by_handle:
        for inode in inodes:
            if inode is not root:
                found = store.handle_of(inode)
                if found is not None:
                    handles[inode.nodeid] = found
    # Directories get paths in either mode: they anchor the mounts handles are on.
    needing_paths = [i for i in inodes if i is not root and (i.nodeid not in handles or i.is_dir())]
    paths, unlinked = _paths(store, needing_paths)
    if not by_handle:
        for inode in unlinked:
            found = store.handle_of(inode)
            if found is not None:
                handles[inode.nodeid] = found
    verify_handles: dict[int, tuple[bytes, int]] = {}
    if verify:
        for inode in inodes:
            if inode.nodeid in paths:
                found = store.handle_of(inode)
                if found is not None:
                    verify_handles[inode.nodeid] = found

    mounts, mount_table = _mount_table(
        store, {m for _, m in (*handles.values(), *verify_handles.values())}, inodes, paths
    )
    # Handles on a mount the destination could not find go by path instead.
    orphans = [n for n, (_, m) in handles.items() if m not in mounts]
    if orphans:
        todo = [i for i in inodes if i.nodeid in orphans and i.nodeid not in paths]
        more, _ = _paths(store, todo)
        paths.update(more)
        for nodeid in orphans:
            del handles[nodeid]

    by_path = {rel: nodeid for nodeid, rel in paths.items()}
    by_path[b""] = root.nodeid
    body = StateWriter()
    body.uint(_F_VERIFY if verify else 0).uint(next_id).uint(fs.handle_table.items()[2])
    body.uint(len(mount_table))
    for rel, fsid in mount_table:
        body.bytes(rel).uint(fsid)

    ordered = [root]
    ordered += [i for i in inodes if i.nodeid in handles]
    sent = {i.nodeid for i in ordered}
    ordered += sorted(
        (i for i in inodes if i.nodeid in paths and i.nodeid not in sent),
        key=lambda i: paths[i.nodeid].count(b"/"),
    )
    sent = {i.nodeid for i in ordered}
    unknown = [i for i in inodes if i.nodeid not in sent]
    body.uint(len(ordered) + len(unknown) + len(lost))
    # Each record: nodeid, lookups, file type, how to find it (and its fields), extras.
    out: list[int | bytes] = [1, 1, root.mode >> 12, _ROOT, 0]
    emitted: set[int] = {root.nodeid}
    for inode in ordered[1:]:
        nodeid = inode.nodeid
        out += (nodeid, inode.refcount, inode.mode >> 12)
        if nodeid in handles:
            handle, mount_id = handles[nodeid]
            out += (_HANDLE, mounts[mount_id], handle)
        else:
            rel = paths[nodeid]
            parent_rel, _, name = rel.rpartition(b"/")
            parent = by_path.get(parent_rel)
            if parent is not None and parent in emitted:
                out += (_CHILD, parent, name)
            else:
                out += (_PATH, rel)
        check = verify_handles.get(nodeid) if verify_handles else None
        if check is not None and check[1] in mounts:
            out += (_X_HANDLE, mounts[check[1]], check[0])
        else:
            out.append(0)
        emitted.add(nodeid)
    for inode in unknown:
        log.error(
            "migration: inode %d (a %s) has no path in the share and no file handle: the "
            "destination cannot find it",
            inode.nodeid,
            _kind(inode.mode),
        )
        out += (inode.nodeid, max(inode.refcount, 1), inode.mode >> 12, _UNKNOWN, 0)
    for nodeid, refcount in lost:
        out += (nodeid, refcount, 0, _LOST, 0)
    body.items(out)

    _save_handles(fs, body)
    _save_locks(store, inodes, body)
    data = StateWriter().section(_TAG, _VERSION, body).getvalue()
    log.info(
        "migration: saved %d inodes (%d by handle, %d unknown), %d bytes, in %.1f ms",
        len(inodes),
        sum(1 for i in ordered if i.nodeid in handles),
        len(unknown),
        len(data),
        (time.monotonic() - started) * 1000,
    )
    return data


def _mount_table(
    store: InodeStore, wanted: set[int], inodes: list[Inode], paths: dict[int, bytes]
) -> tuple[dict[int, int], list[tuple[bytes, int]]]:
    """For each mount the handles are on, a file there the destination can find by path (the
    root, or an inode the guest holds), and its file system's id: ``{mount id: index}`` and
    the table of ``(path, fsid)``."""
    mounts: dict[int, int] = {}
    table: list[tuple[bytes, int]] = []
    if not wanted:
        return mounts, table
    held = sorted(
        (i for i in inodes if i.nodeid in paths), key=lambda i: paths[i.nodeid].count(b"/")
    )
    candidates = [store.root, *held]
    for inode in candidates:
        found = store.handle_of(inode)
        if found is None or found[1] not in wanted or found[1] in mounts:
            continue
        try:
            with store.path(inode) as fd:
                fsid = os.fstatvfs(fd).f_fsid
        except OSError:
            continue
        mounts[found[1]] = len(table)
        table.append((paths.get(inode.nodeid, b""), fsid))
        if len(mounts) == len(wanted):
            break
    return mounts, table


def _save_handles(fs: PassthroughFs, body: StateWriter) -> None:
    items, lost, _ = fs.handle_table.items()
    with fs.inodes.lock_book:
        pending = dict(fs.pending_flocks)
    body.uint(len(items) + len(lost))
    for fh, h in items:
        body.uint(fh).uint(h.inode.nodeid).uint(h.flags & 0xFFFFFFFF)
        body.uint(pending.get(fh, h.flock))
    for fh in lost:
        body.uint(fh).uint(0).uint(0).uint(0)


def _save_locks(store: InodeStore, inodes: list[Inode], body: StateWriter) -> None:
    held: list[tuple[int, int, int, list[tuple[int, int, int]]]] = []
    with store.lock_book:
        pending = {key: list(r.ranges) for key, r in store.pending_locks.items()}
    for inode in inodes:
        if not inode.lock_ranges:
            continue
        for owner, pid, ranges in store.held_locks(inode):
            extra = pending.pop((inode.nodeid, owner), [])
            held.append((inode.nodeid, owner, pid, _merge(ranges, extra)))
    for (nodeid, owner), ranges in pending.items():
        held.append((nodeid, owner, 0, ranges))
    body.uint(len(held))
    for nodeid, owner, pid, ranges in held:
        body.uint(nodeid).uint(owner).uint(pid).uint(len(ranges))
        for start, end, ltype in ranges:
            body.uint(start).uint(end).uint(ltype)


def _merge(
    held: list[tuple[int, int, int]], pending: list[tuple[int, int, int]]
) -> list[tuple[int, int, int]]:
    merged = LockRanges(held)
    for start, end, ltype in pending:
        merged.set(start, end, ltype)
    return merged.ranges


def _root_path(store: InodeStore) -> bytes:
    return os.readlink(f"/proc/self/fd/{store.root.fd}".encode())


def _relative(target: bytes, root: bytes) -> bytes | None:
    """``target`` (an absolute path) relative to the share's root; None when outside it."""
    if target == root:
        return b""
    prefix = root.rstrip(b"/") + b"/"
    if target.startswith(prefix):
        return target[len(prefix) :]
    return None


def _paths(store: InodeStore, inodes: list[Inode]) -> tuple[dict[int, bytes], list[Inode]]:
    """Each inode's path from the share's root, checked to name it, and the inodes with none
    (unlinked ones, and what the share does not hold any more)."""
    root = store.root
    root_path = _root_path(store)
    paths: dict[int, bytes] = {}
    missing: list[Inode] = []
    prefix = root_path.rstrip(b"/") + b"/"
    cut = len(prefix)
    readlink = os.readlink
    for inode in inodes:
        try:
            fd = inode.fd
            if fd >= 0:
                # No request runs while the state is saved: the fd stays the inode's.
                target = readlink(b"/proc/self/fd/%d" % fd)
            else:
                with store.path(inode) as fd:
                    target = readlink(b"/proc/self/fd/%d" % fd)
        except OSError:
            missing.append(inode)
            continue
        # The link of a descriptor that holds its dentry is the file's path now, unless the
        # file was unlinked (" (deleted)"); only those, and a handle's maybe disconnected
        # dentry, are checked.
        if target.startswith(prefix) and (
            (inode.fd >= 0 and not target.endswith(_DELETED))
            or _names(root.fd, target[cut:], inode)
        ):
            paths[inode.nodeid] = target[cut:]
        else:
            missing.append(inode)
    if missing:
        wanted = {(i.dev, i.ino): i for i in missing}
        for rel, st in _walk(root.fd):
            inode = wanted.pop((st.st_dev, st.st_ino), None)
            if inode is not None:
                paths[inode.nodeid] = rel
                if not wanted:
                    break
        missing = list(wanted.values())
    return paths, missing


def _names(root_fd: int, rel: bytes, inode: Inode) -> bool:
    try:
        st = os.lstat(rel, dir_fd=root_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (inode.dev, inode.ino)


def _walk(root_fd: int) -> Iterator[tuple[bytes, os.stat_result]]:
    """Every entry below the share's root (submounts included, symlinks not followed), with
    its path from the root and its lstat."""
    stack: list[tuple[bytes, int]] = [(b"", os.dup(root_fd))]
    try:
        while stack:
            prefix, dir_fd = stack.pop()
            try:
                fd = os.open(f"/proc/self/fd/{dir_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    names = os.listdir(fd)
                finally:
                    os.close(fd)
                for name in names:
                    bname = os.fsencode(name)
                    try:
                        st = os.lstat(bname, dir_fd=dir_fd)
                    except OSError:
                        continue
                    rel = prefix + bname
                    yield rel, st
                    if stat.S_ISDIR(st.st_mode):
                        try:
                            sub = os.open(
                                bname,
                                os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=dir_fd,
                            )
                        except OSError:
                            continue
                        stack.append((rel + b"/", sub))
            except OSError:
                pass
            finally:
                os.close(dir_fd)
    finally:
        for _, fd in stack:
            os.close(fd)


def _kind(mode: int) -> str:
    return {
        stat.S_IFREG: "regular file",
        stat.S_IFDIR: "directory",
        stat.S_IFLNK: "symlink",
        stat.S_IFIFO: "FIFO",
        stat.S_IFSOCK: "socket",
        stat.S_IFCHR: "character device",
        stat.S_IFBLK: "block device",
    }.get(stat.S_IFMT(mode), f"file of type {stat.S_IFMT(mode):o}")


# --- loading -----------------------------------------------------------------------------------


@dataclass
class _Record:
    nodeid: int
    refcount: int
    mode: int
    how: int
    parent: int = 0
    text: bytes = b""  # a name or a path
    mount: int = 0
    handle: bytes = b""
    check_mount: int = -1
    check_handle: bytes = b""


class _NotFound(Exception):
    pass


@dataclass
class _Mount:
    rel: bytes
    fsid: int
    mount_id: int | None = None  # ours
    problem: str = ""
    whole_fs_inside: bool = False


def load(fs: PassthroughFs, data: bytes) -> None:
    """Take over what the guest holds (see the module's rules); StateError naming what can't
    be found, unless ``--migration-on-error guest-error``."""
    started = time.monotonic()
    reader = StateReader(data, "passthrough state")
    _, body = reader.section(_TAG, (_VERSION,))
    reader.end()
    flags = body.uint()
    next_id = body.uint_below(_ID_LIMIT, "next inode number")
    next_fh = body.uint_below(_ID_LIMIT, "next file handle number")
    mounts = [
        _Mount(body.bytes(_PATH_MAX), body.uint())
        for _ in range(body.count(2, limit=_MAX_MOUNTS, name="mounts"))
    ]
    records = [
        _read_record(body, len(mounts))
        for _ in range(body.count(6, limit=_MAX_INODES, name="inodes"))
    ]
    handles = [_read_handle(body) for _ in range(body.count(4, limit=_MAX_HANDLES, name="handles"))]
    held = [_read_locks(body) for _ in range(body.count(4, limit=_MAX_LOCK_OWNERS, name="owners"))]
    body.end()
    if not records or records[0].how != _ROOT or records[0].nodeid != 1:
        raise StateError("passthrough state: the root inode does not come first")
    try:
        _load(fs, flags, next_id, next_fh, mounts, records, handles, held, started)
    except BaseException:
        fs.destroy()  # nothing of a half-loaded session stays
        raise


def _load(
    fs: PassthroughFs,
    flags: int,
    next_id: int,
    next_fh: int,
    mounts: list[_Mount],
    records: list[_Record],
    handles: list[tuple[int, int, int, int]],
    held: list[tuple[int, int, int, list[tuple[int, int, int]]]],
    started: float,
) -> None:
    store = fs.inodes
    guest_error = fs.cfg.migration_on_error is MigrationOnError.GUEST_ERROR
    verify = bool(flags & _F_VERIFY)
    root_path = _root_path(store)
    for m in mounts:
        _open_mount(store, m, root_path)
    found: dict[int, Inode] = {1: store.root}
    where: dict[int, bytes] = {1: b"."}
    failures: list[tuple[int, int, str]] = []  # nodeid, refcount, why
    lost = 0
    for rec in records[1:]:
        if rec.nodeid <= 1 or rec.how == _ROOT:
            raise StateError(f"passthrough state: a second root (inode {rec.nodeid})")
        if rec.how == _LOST:
            store.mark_lost(rec.nodeid, rec.refcount)
            lost += 1
            continue
        try:
            inode, path = _find(store, rec, found, where, mounts, root_path, verify)
        except _NotFound as e:
            failures.append((rec.nodeid, rec.refcount, str(e)))
            continue
        except ValueError as e:
            failures.append((rec.nodeid, rec.refcount, str(e)))
            continue
        found[rec.nodeid] = inode
        where[rec.nodeid] = path
    store.reserve_ids(next_id)
    fs.handle_table.reserve(next_fh)

    handle_failures: list[str] = []
    failed_fhs: list[int] = []
    for fh, nodeid, oflags, flock in handles:
        why = _restore_handle(fs, fh, found.get(nodeid), nodeid, oflags, flock)
        if why is not None:
            handle_failures.append(f"file handle {fh} (inode {nodeid}): {why}")
            failed_fhs.append(fh)

    shared = fs.cfg.shared_dir
    if (failures or handle_failures) and not guest_error:
        for nodeid, _, why in failures[:_SHOWN]:
            log.error("migration: inode %d not found in %s: %s", nodeid, shared, why)
        for why in handle_failures[:_SHOWN]:
            log.error("migration: %s", why)
        shown = [f"inode {n}: {w}" for n, _, w in failures[:3]] + handle_failures[:3]
        raise StateError(
            f"{len(failures)} of the {len(records)} inodes and {len(handle_failures)} of the "
            f"{len(handles)} open files the guest holds can't be found in {shared} ("
            + "; ".join(shown)
            + "); --migration-on-error guest-error would let the migration go on, with EIO "
            "in the guest for them"
        )
    for nodeid, refcount, why in failures:
        log.warning("migration: inode %d lost (EIO in the guest): %s", nodeid, why)
        store.mark_lost(nodeid, refcount)
    for fh in failed_fhs:
        # Whatever kept it from opening, the guest holds the number: EIO until released.
        fs.handle_table.mark_lost(fh)
    for why in handle_failures:
        log.warning("migration: %s; lost (EIO in the guest)", why)

    store.drop_borrowed_mounts()
    retaking = _restore_locks(fs, found, held)
    log.info(
        "migration: loaded %d inodes (%d lost), %d open files, %d lock owners, in %.1f ms",
        len(records),
        len(failures) + lost,
        len(handles),
        len(held),
        (time.monotonic() - started) * 1000,
    )
    if retaking:
        log.info(
            "migration: %d lock(s) are held by another process (on one host, the source "
            "daemon until it exits); taking them again in the background",
            retaking,
        )
        _start_retaker(fs)


def _read_record(body: StateReader, mounts: int) -> _Record:
    nodeid, refcount, kind, how = body.uints(4)
    if nodeid >= _ID_LIMIT or refcount >= _ID_LIMIT:
        # (Checked here rather than by uint_below: this runs once per inode, in the downtime.)
        raise StateError(f"passthrough state: inode {nodeid} with {refcount} lookups")
    rec = _Record(nodeid, refcount, kind << 12, how)
    if kind not in _TYPES and not (kind == 0 and rec.how == _LOST):
        raise StateError(f"passthrough state: inode {nodeid} has file type {kind:#o}")
    if rec.how == _CHILD:
        rec.parent = body.uint()
        rec.text = body.bytes(_PATH_MAX)
    elif rec.how == _PATH:
        rec.text = body.bytes(_PATH_MAX)
    elif rec.how == _HANDLE:
        rec.mount = body.uint()
        rec.handle = body.bytes(_HANDLE_MAX)
        if rec.mount >= mounts:
            raise StateError(f"passthrough state: inode {rec.nodeid} names mount {rec.mount}")
    elif rec.how not in (_ROOT, _UNKNOWN, _LOST):
        raise StateError(f"passthrough state: inode {rec.nodeid} is found in way {rec.how}")
    extras = body.uint()
    if extras & _X_HANDLE:
        rec.check_mount = body.uint()
        rec.check_handle = body.bytes(_HANDLE_MAX)
        if rec.check_mount >= mounts:
            raise StateError(f"passthrough state: inode {rec.nodeid} names mount {rec.mount}")
    if rec.refcount < 1 and rec.how != _ROOT:
        raise StateError(f"passthrough state: inode {rec.nodeid} with no lookup")
    return rec


def _read_handle(body: StateReader) -> tuple[int, int, int, int]:
    fh = body.uint_below(_ID_LIMIT, "file handle")
    if fh == 0:
        raise StateError("passthrough state: file handle 0")
    nodeid = body.uint_below(_ID_LIMIT, f"file handle {fh}: inode")
    oflags = body.uint_below(1 << 32, f"file handle {fh}: open flags")
    flock = body.uint()
    if flock not in _FLOCKS:
        raise StateError(f"passthrough state: file handle {fh}: flock {flock}")
    return fh, nodeid, oflags, flock


def _read_locks(body: StateReader) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    nodeid, owner = body.uint_below(_ID_LIMIT, "lock inode"), body.uint()
    pid = body.uint_below(1 << 32, f"inode {nodeid}: lock pid")
    ranges = []
    for _ in range(body.count(3, limit=_MAX_RANGES, name="lock ranges")):
        start, end, ltype = body.uint(), body.uint(), body.uint()
        if not start <= end <= _OFFSET_MAX:
            raise StateError(f"passthrough state: inode {nodeid}: lock range {start}-{end}")
        if ltype not in _LOCK_TYPES:
            raise StateError(f"passthrough state: inode {nodeid}: lock type {ltype}")
        ranges.append((start, end, ltype))
    return nodeid, owner, pid, ranges


def _open_mount(store: InodeStore, m: _Mount, root_path: bytes) -> None:
    """Find the destination's descriptor for a mount the source's handles are on."""
    try:
        fd = _open_below(store.root.fd, m.rel, os.O_DIRECTORY) if m.rel else os.dup(store.root.fd)
    except OSError as e:
        m.problem = f"its mount at {m.rel.decode(errors='replace') or '.'} is missing ({e})"
        return
    try:
        fsid = os.fstatvfs(fd).f_fsid
        if fsid != m.fsid:
            m.problem = (
                "the share here is on another file system than the source's "
                f"(id {fsid:#x}, not {m.fsid:#x})"
            )
            return
        m.mount_id = store.register_mount(fd)
        if m.mount_id is None:
            m.problem = "file handles are not available here"
            return
        m.whole_fs_inside = _whole_fs_inside(m.mount_id, root_path)
    finally:
        os.close(fd)


def _open_below(root_fd: int, rel: bytes, flags: int = 0) -> int:
    """An O_PATH fd of ``rel`` below the share's root: no symlink, no "..", nothing outside."""
    if b"\0" in rel or rel.startswith(b"/"):
        raise OSError(errno.EINVAL, "not a relative path")
    return linux.openat2(
        root_fd,
        rel,
        os.O_PATH | os.O_NOFOLLOW | flags,
        resolve=linux.RESOLVE_BENEATH | linux.RESOLVE_NO_SYMLINKS | linux.RESOLVE_NO_MAGICLINKS,
    )


def _whole_fs_inside(mount_id: int, root_path: bytes) -> bool:
    """Whether mount ``mount_id`` shows its file system's root at or below the share's root:
    then every file of it is inside the share."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[0] == str(mount_id).encode():
                    fs_root, point = _unescape(fields[3]), _unescape(fields[4])
                    return fs_root == b"/" and _relative(point, root_path) is not None
    except OSError:
        pass
    return False


def _unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out += field[i : i + 1]
            i += 1
    return bytes(out)


def _find(
    store: InodeStore,
    rec: _Record,
    found: dict[int, Inode],
    where: dict[int, bytes],
    mounts: list[_Mount],
    root_path: bytes,
    verify: bool,
) -> tuple[Inode, bytes]:
    """Find ``rec``'s file here: its inode (restored under the source's number) and a path to
    name it by in messages."""
    if rec.how == _UNKNOWN:
        raise _NotFound("the source could give neither a path nor a file handle")
    if rec.how == _HANDLE:
        mount = mounts[rec.mount]
        path = b"<file handle>"
        fd = _open_handle(store, mount, rec.handle, root_path)
    else:
        if rec.how == _CHILD:
            parent = found.get(rec.parent)
            name = rec.text
            if parent is None:
                raise _NotFound(f"its directory (inode {rec.parent}) was not found")
            path = where.get(rec.parent, b"?") + b"/" + name
            if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
                raise _NotFound(f"a bad name {name!r}")
            try:
                if parent.fd >= 0:
                    # No request runs while a state loads: the fd stays the parent's.
                    fd = os.open(name, _O_LOOKUP, dir_fd=parent.fd)
                else:
                    with store.path(parent) as pfd:
                        fd = os.open(name, _O_LOOKUP, dir_fd=pfd)
            except OSError as e:
                raise _NotFound(f"{_show(path)}: {e.strerror}") from None
        else:
            path = rec.text
            try:
                fd = _open_below(store.root.fd, path)
            except OSError as e:
                raise _NotFound(f"{_show(path)}: {e.strerror}") from None
        if verify and rec.check_handle:
            try:
                _check_handle(fd, rec.check_handle, mounts[rec.check_mount])
            except _NotFound as e:
                os.close(fd)
                raise _NotFound(f"{_show(path)}: {e}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise _NotFound(f"{_show(path)}: {e.strerror}") from None
    if stat.S_IFMT(st.st_mode) != rec.mode:
        os.close(fd)
        raise _NotFound(
            f"{_show(path)} is a {_kind(st.st_mode)} here, a {_kind(rec.mode)} on the source"
        )
    return store.restore(rec.nodeid, fd, ident_of(st), rec.refcount), path


def _check_handle(fd: int, handle: bytes, mount: _Mount) -> None:
    if mount.problem:
        raise _NotFound(mount.problem)
    try:
        mine, _ = linux.name_to_handle_at(fd, b"", linux.AT_EMPTY_PATH)
    except OSError as e:
        raise _NotFound(f"no file handle here ({e.strerror})") from None
    if mine != handle:
        raise _NotFound("another file than the source's (its file handle differs)")


def _open_handle(store: InodeStore, mount: _Mount, handle: bytes, root_path: bytes) -> int:
    """An O_PATH fd of the file ``handle`` names, if it is the source's and inside the share."""
    if mount.problem or mount.mount_id is None:
        raise _NotFound(mount.problem or "no mount for it")
    try:
        fd = store.open_on_mount(mount.mount_id, handle, os.O_PATH | os.O_NOFOLLOW)
    except OSError as e:
        raise _NotFound(f"its file handle opens nothing here ({e.strerror})") from None
    try:
        _check_handle(fd, handle, mount)
        if not mount.whole_fs_inside:
            target = os.readlink(f"/proc/self/fd/{fd}".encode()).removesuffix(_DELETED)
            if _relative(target, root_path) is None:
                raise _NotFound("its file handle names a file outside the share")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _show(path: bytes) -> str:
    return os.fsdecode(path)


def _restore_handle(
    fs: PassthroughFs, fh: int, inode: Inode | None, nodeid: int, oflags: int, flock: int
) -> str | None:
    """Open handle ``fh`` again; why not, when it can't be."""
    if fh <= 0:
        return "a bad number"
    if inode is None:
        return "its inode was not found" if nodeid else "lost on the source"
    try:
        fd = fs.reopen(inode, oflags)
    except OSError as e:
        return f"can't be opened again: {e.strerror}"
    try:
        h = fs.insert_handle(fh, fd, inode, oflags)
    except ValueError as e:
        os.close(fd)
        return str(e)
    if flock:
        op = fcntl.LOCK_EX if flock == fcntl.LOCK_EX else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            h.flock = op
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                log.error("migration: flock of file handle %d: %s; dropped", fh, e.strerror)
            else:
                with fs.inodes.lock_book:
                    fs.pending_flocks[fh] = op
    return None


def _cannot_retake(owner: int, nodeid: int, e: OSError) -> None:
    log.error(
        "migration: the locks of owner %#x on inode %d can't be taken again: %s",
        owner,
        nodeid,
        e.strerror,
    )


def _restore_locks(
    fs: PassthroughFs,
    found: dict[int, Inode],
    held: list[tuple[int, int, int, list[tuple[int, int, int]]]],
) -> int:
    """Take the POSIX locks again; how many ranges are pending."""
    store = fs.inodes
    pending = 0
    for nodeid, owner, pid, ranges in held:
        inode = found.get(nodeid)
        if inode is None:
            log.warning(
                "migration: the locks of owner %#x on lost inode %d are gone", owner, nodeid
            )
            continue
        if not ranges:
            continue
        try:
            store.pin(inode)
            try:
                store.owner_fd(inode, owner, fs.lock_opener(inode))
            finally:
                store.unpin(inode)
        except OSError as e:
            _cannot_retake(owner, nodeid, e)
            continue
        store.set_lock_pid(inode, owner, pid)
        with store.lock_book:
            store.pending_locks[(nodeid, owner)] = LockRanges(ranges)
        try:
            taken = locks.retake(store, inode, owner)
        except OSError as e:
            _cannot_retake(owner, nodeid, e)
            with store.lock_book:
                store.pending_locks.pop((nodeid, owner), None)
            continue
        if not taken:
            with store.lock_book:
                left = store.pending_locks.get((nodeid, owner))
                pending += len(left.ranges) if left is not None else 0
    with store.lock_book:
        return pending + len(fs.pending_flocks)


def _start_retaker(fs: PassthroughFs) -> None:
    thread = threading.Thread(target=_retake_loop, args=(fs,), name="lock-retake", daemon=True)
    fs.retaker = thread
    thread.start()


def _retake_loop(fs: PassthroughFs) -> None:
    """Take pending locks again until all are, or the daemon stops."""
    store = fs.inodes
    started = time.monotonic()
    delay = 0.001
    noticed = False
    while not fs.stopping:
        with store.lock_book:
            keys = list(store.pending_locks)
        for nodeid, owner in keys:
            try:
                inode = store.get(nodeid)
            except OSError:
                with store.lock_book:
                    store.pending_locks.pop((nodeid, owner), None)
                continue
            try:
                locks.retake(store, inode, owner)
            except OSError as e:
                log.error("migration: taking a lock of inode %d again: %s", nodeid, e.strerror)
                with store.lock_book:
                    store.pending_locks.pop((nodeid, owner), None)
        _retake_flocks(fs)
        with store.lock_book:
            left = len(store.pending_locks) + len(fs.pending_flocks)
        if not left:
            log.info("migration: every lock taken again, %.3f s after the load", _since(started))
            return
        if not noticed and _since(started) > _RETAKE_NOTICE:
            noticed = True
            log.warning(
                "migration: %d lock(s) still held by another process %.0f s after the load",
                left,
                _since(started),
            )
        time.sleep(delay)
        delay = min(delay * 2, _RETAKE_POLL_MAX)


def _retake_flocks(fs: PassthroughFs) -> None:
    store = fs.inodes
    with store.lock_book:
        wanted = list(fs.pending_flocks.items())
    for fh, op in wanted:
        try:
            h = fs.handle_table.use(fh)
        except OSError:
            with store.lock_book:
                fs.pending_flocks.pop(fh, None)
            continue
        try:
            with store.lock_book:
                if fs.pending_flocks.get(fh) != op:
                    continue  # the guest has had its say since
                try:
                    fcntl.flock(h.fd, op | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        continue
                    log.error("migration: flock of file handle %d: %s", fh, e.strerror)
                else:
                    h.flock = op
                del fs.pending_flocks[fh]
        finally:
            fs.handle_table.done(h)


def _since(t: float) -> float:
    return time.monotonic() - t
