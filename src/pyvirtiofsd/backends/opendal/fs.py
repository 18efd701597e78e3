"""Serve an OpenDAL service (memory, fs, s3, gcs, azblob, webdav, ...) as a POSIX file system.

The pieces: :mod:`.inodes` (inode numbers and lookup counts), :mod:`.staging` (local files that
stage writes and cache reads), :mod:`.attrs` (mode, owner and times the store has no place
for), :mod:`.store` (the Operator behind calls that raise OSError). docs/opendal.md describes the
behaviour from the user's side.

Consistency, in short: the store is the truth for what is committed; what a file open here has
written is the truth until it is committed, which flush (close), fsync and release do, and
which is complete when they return. Metadata fetched from the store is trusted for the
``--cache`` timeout (0 s, 1 s or a day), by the kernel and by us alike; when it is stale, a
stat asks the store again and a changed object (another ETag, length or modification time)
replaces the locally cached copy.

Threads: the server calls in from several workers at once. No lock is held across a store call
except a blob's ``commit_lock`` (only commits, renames and unlinks of that one object wait for
it) and a directory handle's lock (only readdirs of that one open directory). FORGET touches
memory only.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...fuse import abi
from ...fuse.filesystem import (
    Attr,
    ConnectionInfo,
    Context,
    DirBuffer,
    Entry,
    Filesystem,
    Opened,
    SetAttr,
    StatVfs,
    dax_flush,
    dax_map,
    dax_resized,
    dax_unmap,
)
from ...linux import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT
from ..passthrough.config import DIR_OPEN_FLAGS, FILE_OPEN_FLAGS, CachePolicy
from .attrs import (
    Defaults,
    LocalAttrs,
    Meta,
    build,
    decode,
    encode,
    now_ns,
    overrides_of,
)
from .config import OpendalConfig
from .inodes import ROOT_INO, InodeTable, Node, is_unlinked, now
from .staging import Blob, BlobCache
from .store import Listed, Stat, Store, parent_of

if TYPE_CHECKING:
    from ...fuse.buffers import ReplyWriter, WriteData

log = logging.getLogger(__name__)

#: Services whose data lives in the daemon's memory: attributes kept in memory last exactly as
#: long as the data, so symlinks can be emulated there without user metadata.
VOLATILE_SCHEMES = frozenset({"memory", "dashmap", "moka", "mini_moka", "mini-moka"})
#: What st_blksize says: programs size their I/O by it, and each write() is one FUSE WRITE.
BLKSIZE = 1 << 20
NAME_MAX = 255
_NS = 1_000_000_000
_DT_UNKNOWN, _DT_DIR, _DT_REG, _DT_LNK = 0, 4, 8, 10


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, what or os.strerror(code))


def _dtype(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


class _FileHandle:
    __slots__ = ("append", "blob", "node", "writable")

    def __init__(self, node: Node, blob: Blob, writable: bool, append: bool) -> None:
        self.node = node
        self.blob = blob
        self.writable = writable
        self.append = append


class _DirHandle:
    __slots__ = ("lock", "node", "peeked", "pos", "source")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.lock = threading.Lock()
        #: Entries handed out so far (the READDIR offset of the next one).
        self.pos = 0
        self.source: Iterator[tuple[str, bool, Listed | None]] | None = None
        #: An entry taken from the listing that did not fit the last reply.
        self.peeked: tuple[str, bool, Listed | None] | None = None


class OpendalFs(Filesystem):
    def __init__(self, config: OpendalConfig, operator: object | None = None) -> None:
        self.cfg = config
        op = operator if operator is not None else config.build_operator()
        self.store = Store(op, config.part_size, config.multipart_threshold)
        self.local = LocalAttrs()
        self.defaults = Defaults(
            config.default_uid,
            config.default_gid,
            config.file_mode,
            config.dir_mode,
            now_ns(),
        )
        self._timeout = config.entry_timeout
        #: Symlinks need their type to survive in the store, or in a store that dies with us.
        self._symlinks = self.store.user_metadata or config.scheme in VOLATILE_SCHEMES
        self.inodes = InodeTable(self._dir_meta("", None))
        self.cache = BlobCache(config.cache_parent(), config.cache_bytes)
        self._handles: dict[int, _FileHandle | _DirHandle] = {}
        self._fh_lock = threading.Lock()
        self._next_fh = 1
        self._conn = ConnectionInfo()
        self._writeback = False

    # --- connection ------------------------------------------------------------------------

    def init(self, conn: ConnectionInfo) -> None:
        self._conn = conn
        want = conn.want
        # Locks stay in the kernel: the store has none to offer, and a guest is one client.
        want &= ~(abi.InitFlag.POSIX_LOCKS | abi.InitFlag.FLOCK_LOCKS)
        if not self.cfg.readdirplus or self.cfg.cache is CachePolicy.NEVER:
            want &= ~(abi.InitFlag.DO_READDIRPLUS | abi.InitFlag.READDIRPLUS_AUTO)
        if self.cfg.writeback and not self.cfg.readonly:
            want |= abi.InitFlag.WRITEBACK_CACHE
        else:
            want &= ~abi.InitFlag.WRITEBACK_CACHE
        conn.want = want & conn.capable
        self._writeback = bool(conn.want & abi.InitFlag.WRITEBACK_CACHE)

    def destroy(self) -> None:
        self.commit_all()

    def commit_all(self) -> int:
        """Upload every blob holding changes (at the end, and after failed releases); returns
        how many could not be."""
        failed = 0
        for blob in self.cache.all():
            if blob.needs_commit():
                try:
                    self._commit(blob)
                except OSError as e:
                    failed += 1
                    log.error("could not upload %r: %s", blob.path, e.strerror)
        return failed

    def shutdown(self) -> None:
        """The daemon is exiting: upload what is pending, then remove the staging files."""
        self.commit_all()
        with self._fh_lock:
            self._handles.clear()
        self.cache.close()

    # --- helpers ---------------------------------------------------------------------------

    def _rofs(self) -> None:
        if self.cfg.readonly:
            raise _err(errno.EROFS)

    def _name(self, name: bytes) -> str:
        if not name or b"/" in name or name in (b".", b".."):
            raise _err(errno.EINVAL, "invalid name")
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            # Object keys are UTF-8 strings.
            raise _err(errno.EINVAL, "name is not UTF-8") from None

    def _dir(self, ino: int) -> Node:
        node = self.inodes.get(ino)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if is_unlinked(node):
            raise _err(errno.ENOENT)
        return node

    def _expiry(self) -> float:
        return now() + self._timeout

    def _dir_meta(self, dirpath: str, last_modified_ns: int | None) -> Meta:
        return build(
            stat.S_IFDIR, 0, last_modified_ns, None, self.local.get(dirpath), self.defaults
        )

    def _file_meta(self, path: str, st: Stat) -> Meta:
        over = decode(st.user_metadata) if self.store.user_metadata else self.local.get(path)
        return build(stat.S_IFREG, st.size, st.last_modified_ns, st.version, over, self.defaults)

    def _attr(self, node: Node, meta: Meta) -> Attr:
        size = meta.size
        return Attr(
            node.ino,
            size,
            (size + 511) // 512,
            meta.atime_ns // _NS,
            meta.mtime_ns // _NS,
            meta.ctime_ns // _NS,
            meta.atime_ns % _NS,
            meta.mtime_ns % _NS,
            meta.ctime_ns % _NS,
            meta.mode,
            0 if is_unlinked(node) else (2 if node.is_dir else 1),
            meta.uid,
            meta.gid,
            0,
            BLKSIZE,
        )

    def _entry(self, node: Node, meta: Meta) -> Entry:
        return Entry(node.ino, self._attr(node, meta), self._timeout, self._timeout)

    @staticmethod
    def _local_state(blob: Blob | None) -> bool:
        """The blob, not the store, knows this file: written here and not yet committed, or
        open for writing."""
        return blob is not None and (blob.dirty or not blob.stored or blob.writers > 0 or blob.dax)

    def _new_fh(self, h: _FileHandle | _DirHandle) -> int:
        with self._fh_lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = h
        return fh

    def _file_handle(self, fh: int) -> _FileHandle:
        h = self._handles.get(fh)
        if not isinstance(h, _FileHandle):
            raise _err(errno.EBADF)
        return h

    def _dir_handle(self, fh: int) -> _DirHandle:
        h = self._handles.get(fh)
        if not isinstance(h, _DirHandle):
            raise _err(errno.EBADF)
        return h

    def _keep_dir(self, node: Node) -> None:
        """Make sure ``node``'s directory has a marker object before an entry leaves it: a
        directory that only exists as the prefix of its entries would vanish with the last."""
        if node.marker or node.ino == ROOT_INO:
            return
        self.store.create_dir(node.path)
        node.marker = True

    # --- names and inodes ------------------------------------------------------------------

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        pnode = self._dir(parent)
        if name == b".":
            return self._ref_dir(pnode.path)
        if name == b"..":
            return self._ref_dir(parent_of(pnode.path) if pnode.path else "")
        base = pnode.path + self._name(name)
        entry = self._lookup(base)
        if entry is None:
            if self._timeout > 0:
                return Entry.negative(self._timeout)
            raise _err(errno.ENOENT)
        return entry

    def _ref_dir(self, dirpath: str) -> Entry:
        node = self.inodes.find(dirpath)
        meta = node.meta if node is not None else self._dir_meta(dirpath, None)
        node = self.inodes.ref(dirpath, stat.S_IFDIR, meta, self._expiry())
        return self._entry(node, meta)

    def _lookup(self, base: str) -> Entry | None:
        """The entry of ``base`` (a path without trailing slash) with one more lookup."""
        blob = self.cache.peek(base)
        if self._local_state(blob):
            assert blob is not None
            meta = blob.current_meta()
            node = self.inodes.ref(base, stat.S_IFMT(meta.mode), meta, self._expiry())
            return self._entry(node, meta)
        t = now()
        for path in (base, base + "/"):
            node = self.inodes.find(path)
            if node is not None and node.fresh(t):
                node = self.inodes.ref(path, node.kind, node.meta, node.expires)
                return self._entry(node, node.meta)
        st = self.store.stat_name(base)
        if st is None:
            return None
        if st.is_dir:
            dirpath = base + "/"
            meta = self._dir_meta(dirpath, st.last_modified_ns)
            node = self.inodes.ref(dirpath, stat.S_IFDIR, meta, self._expiry())
        else:
            meta = self._file_meta(base, st)
            node = self.inodes.ref(base, stat.S_IFMT(meta.mode), meta, self._expiry())
        return self._entry(node, meta)

    def forget(self, ino: int, nlookup: int) -> None:
        self.inodes.forget(ino, nlookup)

    def _meta(self, node: Node, blob: Blob | None = None) -> Meta:
        """Current attributes: the blob's while it knows better, else cached within the
        timeout, else from the store."""
        if node.is_dir:
            if node.ino == ROOT_INO or node.fresh(now()) or is_unlinked(node):
                return node.meta
            st = self.store.stat_dir(node.path)
            if st is None and not self.cache.has_unstored(node.path):
                raise _err(errno.ENOENT)
            meta = self._dir_meta(node.path, st.last_modified_ns if st else None)
            node.meta, node.expires = meta, self._expiry()
            return meta
        if blob is None and not is_unlinked(node):
            blob = self.cache.peek(node.path)
        if self._local_state(blob) or (blob is not None and is_unlinked(node)):
            assert blob is not None
            return blob.current_meta()
        if node.fresh(now()) or is_unlinked(node):
            return node.meta
        st = self.store.stat_object(node.path)
        if st is None or st.is_dir:
            raise _err(errno.ENOENT)
        meta = self._file_meta(node.path, st)
        node.meta, node.expires = meta, self._expiry()
        return meta

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> tuple[Attr, float]:
        node = self.inodes.get(ino)
        blob = None
        if fh is not None:
            h = self._handles.get(fh)
            if isinstance(h, _FileHandle):
                blob = h.blob
        return self._attr(node, self._meta(node, blob)), self._timeout

    def setattr(self, ctx: Context, ino: int, changes: SetAttr) -> tuple[Attr, float]:
        self._rofs()
        node = self.inodes.get(ino)
        if node.is_dir:
            if changes.size is not None:
                raise _err(errno.EISDIR)
            meta = self._meta(node)
            new = _apply(meta, changes)
            if new != meta:
                self.local.set(node.path, overrides_of(new))
                node.meta = new
            return self._attr(node, new), self._timeout
        if changes.size is not None and node.kind != stat.S_IFREG:
            raise _err(errno.EINVAL)
        h = self._handles.get(changes.fh) if changes.fh is not None else None
        blob = h.blob if isinstance(h, _FileHandle) and h.node is node else None
        # References we take here and drop at the end: an open one, and a writer one.
        held = writer = False
        if blob is None and not is_unlinked(node) and self._local_state(self.cache.peek(node.path)):
            # Being written through another open file (the kernel sends no fh for fchmod or
            # futimens): the change joins what that file will commit.
            blob = self.cache.acquire(node.path)
            held = blob is not None
        try:
            meta = self._meta(node, blob)
            new = _apply(meta, changes)
            attrs_changed = new != meta
            if attrs_changed and not self.store.user_metadata and not is_unlinked(node):
                self.local.set(node.path, overrides_of(new))
            if changes.size is None and not (attrs_changed and self.store.user_metadata):
                # Nothing for the store: the attributes live in LocalAttrs for this service.
                if attrs_changed:
                    if blob is not None:
                        blob.set_meta(new, dirty=False)
                    node.meta = new
                return self._attr(node, new), self._timeout
            if blob is None:
                blob = self._open_blob(node, write=True)
                held = writer = True
            if changes.size is not None:
                blob.truncate(changes.size)
                self._resized(node, changes.size)
            if attrs_changed:
                blob.set_meta(new, dirty=self.store.user_metadata)
            # A file open for writing takes the change up with its next flush; otherwise
            # (truncate, chmod, utimes on a path) it goes up now, or nobody would.
            if blob.writers <= (1 if writer else 0):
                self._commit(blob)
            result = blob.current_meta()
        finally:
            if held and blob is not None:
                self._close_blob(blob, writer)
        node.meta = result
        return self._attr(node, result), self._timeout

    def readlink(self, ctx: Context, ino: int) -> bytes:
        node = self.inodes.get(ino)
        if node.kind != stat.S_IFLNK:
            raise _err(errno.EINVAL)
        if is_unlinked(node):
            raise _err(errno.ENOENT)
        return bytes(self.store.read_all(node.path))

    def _new_object(self, ctx: Context, parent: int, name: bytes, mode: int, data: bytes) -> Entry:
        self._rofs()
        pnode = self._dir(parent)
        base = pnode.path + self._name(name)
        t = now_ns()
        meta = Meta(mode, len(data), ctx.uid, ctx.gid, t, t, t, None)
        self.store.write(base, data, encode(meta))
        if not self.store.user_metadata:
            self.local.set(base, overrides_of(meta))
        node = self.inodes.ref(base, stat.S_IFMT(mode), meta, self._expiry())
        return self._entry(node, meta)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        if not self._symlinks:
            # The link would read back as a regular file after a restart.
            raise _err(errno.EPERM, "symlinks need a service with user metadata")
        return self._new_object(ctx, parent, name, stat.S_IFLNK | 0o777, target)

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        if not stat.S_ISREG(mode):
            raise _err(errno.EPERM, "only regular files can be stored as objects")
        return self._new_object(ctx, parent, name, mode, b"")

    def link(self, ctx: Context, ino: int, new_parent: int, new_name: bytes) -> Entry:
        # An object has one name; a second one would be a copy that silently diverges.
        raise _err(errno.EPERM, "hard links are not supported on object storage")

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        self._rofs()
        pnode = self._dir(parent)
        base = pnode.path + self._name(name)
        if self._local_state(self.cache.peek(base)):
            raise _err(errno.EEXIST)
        dirpath = base + "/"
        self.store.create_dir(dirpath)
        t = now_ns()
        meta = Meta(stat.S_IFDIR | (mode & 0o7777), 0, ctx.uid, ctx.gid, t, t, t, None)
        self.local.set(dirpath, overrides_of(meta))
        node = self.inodes.ref(dirpath, stat.S_IFDIR, meta, self._expiry())
        node.marker = True
        return self._entry(node, meta)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rofs()
        pnode = self._dir(parent)
        base = pnode.path + self._name(name)
        node = self.inodes.find(base)
        if node is None and self.inodes.find(base + "/") is not None:
            raise _err(errno.EISDIR)
        self._keep_dir(pnode)
        blob = self.cache.peek(base)
        if blob is not None:
            with blob.commit_lock:
                if blob.stored:
                    if blob.opens > 0:
                        # Still open: the data must outlive the object.
                        blob.fill_all(self.store)
                    self.store.delete(base)
                self.cache.detach(blob)
        else:
            self.store.delete(base)
        self.inodes.unlink(base)
        self.local.drop(base)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rofs()
        pnode = self._dir(parent)
        dirpath = pnode.path + self._name(name) + "/"
        if self.cache.has_unstored(dirpath) or self.store.has_children(dirpath):
            raise _err(errno.ENOTEMPTY)
        self._keep_dir(pnode)
        self.store.delete(dirpath)
        self.inodes.unlink(dirpath)
        self.local.drop(dirpath)

    def _kind(self, base: str) -> int | None:
        """What ``base`` is (S_IFDIR, S_IFREG, S_IFLNK), or None when nothing."""
        blob = self.cache.peek(base)
        if self._local_state(blob):
            assert blob is not None
            return stat.S_IFMT(blob.meta.mode)
        st = self.store.stat_name(base)
        if st is None:
            return None
        if st.is_dir:
            return stat.S_IFDIR
        node = self.inodes.find(base)
        return node.kind if node is not None else stat.S_IFREG

    def rename(
        self, ctx: Context, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._rofs()
        if flags & (RENAME_EXCHANGE | RENAME_WHITEOUT):
            raise _err(errno.EINVAL, "exchange and whiteout renames are not supported")
        sdir = self._dir(parent)
        ddir = self._dir(new_parent)
        src = sdir.path + self._name(name)
        dst = ddir.path + self._name(new_name)
        if src == dst:
            return
        skind = self._kind(src)
        if skind is None:
            raise _err(errno.ENOENT)
        dkind = self._kind(dst)
        if dkind is not None and flags & RENAME_NOREPLACE:
            raise _err(errno.EEXIST)
        self._keep_dir(sdir)
        if skind == stat.S_IFDIR:
            if dkind is not None and dkind != stat.S_IFDIR:
                raise _err(errno.ENOTDIR)
            if (dst + "/").startswith(src + "/"):
                raise _err(errno.EINVAL)
            if dkind == stat.S_IFDIR:
                if self.cache.has_unstored(dst + "/") or self.store.has_children(dst + "/"):
                    raise _err(errno.ENOTEMPTY)
                self.store.delete(dst + "/")
            self._rename_dir(src + "/", dst + "/")
        else:
            if dkind == stat.S_IFDIR:
                raise _err(errno.EISDIR)
            self._rename_file(src, dst)

    def _rename_file(self, src: str, dst: str) -> None:
        blob = self.cache.peek(src)
        if blob is not None:
            with blob.commit_lock:
                if blob.stored:
                    self.store.move(src, dst)
                self.cache.rename(src, dst)
        else:
            self.store.move(src, dst)
            self.cache.rename(src, dst)
        if not self.store.user_metadata:
            self.local.move(src, dst, tree=False)
        self.inodes.rename(src, dst)

    def _rename_dir(self, src: str, dst: str) -> None:
        """Move every object under ``src`` to ``dst``, one at a time (native rename, else copy
        and delete). Not atomic: interrupted, some objects are under each name, none is lost.
        Beyond ``dir_rename_limit`` objects, EXDEV (``mv`` then copies by itself)."""
        # Pending writes under the old name go up first, so that the move takes them along.
        for blob in self.cache.under(src):
            if blob.needs_commit():
                self._commit(blob)
        paths: list[str] = []
        for path in self.store.list_tree(src):
            paths.append(path)
            if len(paths) > self.cfg.dir_rename_limit:
                raise _err(errno.EXDEV, "directory too large to rename in place")
        self.store.create_dir(dst)
        old_dirs = []
        for path in paths:
            target = dst + path[len(src) :]
            if path.endswith("/"):
                self.store.create_dir(target)
                old_dirs.append(path)
            else:
                self.store.move(path, target)
        for path in reversed(old_dirs):
            self.store.delete(path)
        self.store.delete(src)
        self.cache.rename(src, dst)
        self.local.move(src, dst, tree=True)
        self.inodes.rename(src, dst)
        node = self.inodes.find(dst)
        if node is not None:
            node.marker = True

    # --- files -----------------------------------------------------------------------------

    def _open_blob(self, node: Node, write: bool) -> Blob:
        """The blob of a file, with an open reference (and a writer one with ``write``),
        revalidated against the store unless the cached attributes are still fresh."""
        if is_unlinked(node):
            raise _err(errno.ENOENT)
        path = node.path
        blob = self.cache.acquire(path)
        if blob is not None and not self._local_state(blob):
            # Attributes within their timeout are trusted (a lookup may just have fetched
            # them); either way the blob must hold the version they describe.
            try:
                meta = self._meta(node)
            except BaseException:
                self.cache.release(blob)
                raise
            if not blob.adopt_version(meta.version):
                # Changed in the store: a fresh copy; readers of the old one keep theirs.
                self.cache.release(blob)
                blob = None
        if blob is None:
            meta = self._meta(node)
            blob = self.cache.create(path, meta, stored=True)
        if write:
            with blob.lock:
                blob.writers += 1
        return blob

    def _close_blob(self, blob: Blob, write: bool) -> None:
        if write:
            with blob.lock:
                blob.writers -= 1
        self.cache.release(blob)

    def _commit(self, blob: Blob) -> None:
        blob.commit(self.store, self._committed)

    def _committed(self, blob: Blob, meta: Meta) -> None:
        path = blob.path
        if path is None:
            return
        if not self.store.user_metadata:
            self.local.set(path, overrides_of(meta))
        node = self.inodes.find(path)
        if node is not None:
            node.meta, node.expires = meta, self._expiry()

    def _file_open_flags(self) -> int:
        return FILE_OPEN_FLAGS[self.cfg.cache]

    def open(self, ctx: Context, ino: int, flags: int, kill_suidgid: bool) -> Opened:
        node = self.inodes.get(ino)
        if node.is_dir:
            raise _err(errno.EISDIR)
        if node.kind != stat.S_IFREG:
            raise _err(errno.ELOOP)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if self.cfg.readonly and (writable or flags & os.O_TRUNC):
            raise _err(errno.EROFS)
        blob = self._open_blob(node, writable)
        try:
            if flags & os.O_TRUNC and blob.size:
                blob.truncate(0)
                self._resized(node, 0)
        except BaseException:
            self._close_blob(blob, writable)
            raise
        self.inodes.opened(node)
        append = bool(flags & os.O_APPEND) and not self._writeback
        return Opened(
            self._new_fh(_FileHandle(node, blob, writable, append)), self._file_open_flags()
        )

    def create(
        self,
        ctx: Context,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        umask: int,
        kill_suidgid: bool,
    ) -> tuple[Entry, Opened]:
        self._rofs()
        pnode = self._dir(parent)
        base = pnode.path + self._name(name)
        entry: Entry | None = None
        if self.inodes.find(base) is not None or self.inodes.find(base + "/") is not None:
            entry = self._lookup(base)
        elif flags & os.O_EXCL or self.cache.peek(base) is not None:
            # The kernel asks because its entry is negative, but for O_EXCL the store must
            # have the last word (another client may have made the name since), and a blob
            # we still hold may be a file the kernel has forgotten.
            entry = self._lookup(base)
        if entry is not None:
            node = self.inodes.get(entry.ino)
            try:
                if node.is_dir:
                    raise _err(errno.EISDIR)
                if flags & os.O_EXCL:
                    raise _err(errno.EEXIST)
                opened = self.open(ctx, node.ino, flags & ~os.O_CREAT, kill_suidgid)
            except BaseException:
                self.inodes.forget(entry.ino, 1)
                raise
            return entry, opened
        # Otherwise the kernel's lookup has just found nothing: no second question to the
        # store (that would double the cost of creating small files).
        t = now_ns()
        meta = Meta(stat.S_IFREG | (mode & 0o7777), 0, ctx.uid, ctx.gid, t, t, t, None)
        blob = self.cache.create(base, meta, stored=False)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            with blob.lock:
                blob.writers += 1
        node = self.inodes.ref(base, stat.S_IFREG, meta, self._expiry())
        self.inodes.opened(node)
        append = bool(flags & os.O_APPEND) and not self._writeback
        fh = self._new_fh(_FileHandle(node, blob, writable, append))
        return self._entry(node, meta), Opened(fh, self._file_open_flags())

    def read(
        self, ctx: Context, ino: int, fh: int, offset: int, size: int, out: ReplyWriter
    ) -> None:
        blob = self._file_handle(fh).blob
        end = min(offset + size, blob.size)
        if end <= offset:
            return
        self._dax_flush(ino)
        blob.ensure(self.store, offset, end)
        out.read_from_fd(blob.fd, offset, end - offset)

    def write(
        self, ctx: Context, ino: int, fh: int, offset: int, data: WriteData, flags: int
    ) -> int:
        self._rofs()
        h = self._file_handle(fh)
        if not h.writable:
            raise _err(errno.EBADF)
        before = h.blob.size
        self._dax_flush(ino)
        n = h.blob.write(data, offset, h.append)
        if h.blob.size != before:
            self._resized(h.node, h.blob.size)
        return n

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        h = self._file_handle(fh)
        self._dax_flush(ino)
        if h.blob.needs_commit():
            self._commit(h.blob)

    def release(
        self,
        ctx: Context,
        ino: int,
        fh: int,
        flags: int,
        lock_owner: int,
        flush: bool,
        flock_release: bool,
    ) -> None:
        with self._fh_lock:
            h = self._handles.pop(fh, None)
        if not isinstance(h, _FileHandle):
            raise _err(errno.EBADF)
        try:
            self._dax_flush(ino)
            if h.blob.needs_commit():
                self._commit(h.blob)
        except OSError as e:
            # The blob stays dirty in the cache: the next open, fsync of it or the daemon's
            # exit tries again. The guest has already been told at flush (close).
            log.error("upload of %r failed at release: %s", h.blob.path, e.strerror)
        finally:
            self._close_blob(h.blob, h.writable)
            self.inodes.closed(h.node)

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        h = self._file_handle(fh)
        self._dax_flush(ino)
        if h.blob.needs_commit():
            self._commit(h.blob)

    # --- DAX -------------------------------------------------------------------------------

    def dax_fd(self, ino: int, fh: int | None, offset: int, length: int, writable: bool) -> int:
        """A file descriptor of the local copy of ``ino`` for a DAX mapping of
        [offset, offset+length), with that range filled from the store first; the caller owns
        (and closes) it. ``fh`` may be None or stale: the guest also maps after it released
        the file. A writable mapping makes every later flush, fsync and release upload the
        file, since writes through the mapping are invisible to us."""
        node = self.inodes.get(ino)
        if node.kind != stat.S_IFREG:
            raise _err(errno.EINVAL, "only regular files are mapped")
        if writable:
            self._rofs()
        h = self._handles.get(fh) if fh is not None else None
        if isinstance(h, _FileHandle) and h.node is node:
            return h.blob.dax_fd(self.store, offset, length, writable)
        blob = self._open_blob(node, write=False)
        try:
            return blob.dax_fd(self.store, offset, length, writable)
        finally:
            self._close_blob(blob, False)

    def setupmapping(
        self,
        ctx: Context,
        ino: int,
        fh: int,
        foffset: int,
        length: int,
        flags: int,
        moffset: int,
    ) -> None:
        dax_map(
            self._conn.dax_window, ino, foffset, length, flags, moffset,
            lambda writable: self.dax_fd(ino, fh, foffset, length, writable),
        )  # fmt: skip

    def removemapping(self, ctx: Context, ranges: list[tuple[int, int]]) -> None:
        dax_unmap(self._conn.dax_window, ranges)

    def _resized(self, node: Node, size: int) -> None:
        dax_resized(self._conn.dax_window, node.ino, size)

    def _dax_flush(self, ino: int) -> None:
        dax_flush(self._conn.dax_window, ino)

    # --- directories -----------------------------------------------------------------------

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        node = self._dir(ino)
        return Opened(self._new_fh(_DirHandle(node)), DIR_OPEN_FLAGS[self.cfg.cache])

    def _listing(self, dirpath: str) -> Iterator[tuple[str, bool, Listed | None]]:
        yield ".", True, None
        yield "..", True, None
        pending = set(self.cache.unstored_names(dirpath))
        last = None
        for entry in self.store.list(dirpath):
            if entry.name == last:
                # An object and a prefix of the same name: the object wins (lookup agrees).
                continue
            last = entry.name
            pending.discard(entry.name)
            yield entry.name, entry.is_dir, entry
        for name in sorted(pending):
            yield name, False, None

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, out: DirBuffer) -> None:
        h = self._dir_handle(fh)
        with h.lock:
            if h.source is None or offset != h.pos:
                h.source = self._listing(h.node.path)
                h.peeked = None
                h.pos = 0
                for _ in range(offset):
                    if next(h.source, None) is None:
                        return
                    h.pos += 1
            while True:
                item = h.peeked if h.peeked is not None else next(h.source, None)
                h.peeked = None
                if item is None:
                    return
                if not self._add_entry(h, item, out):
                    h.peeked = item
                    return
                h.pos += 1

    def _add_entry(
        self, h: _DirHandle, item: tuple[str, bool, Listed | None], out: DirBuffer
    ) -> bool:
        name, is_dir, listed = item
        raw = name.encode()
        off = h.pos + 1
        if name in (".", ".."):
            return out.add(h.node.ino if name == "." else ROOT_INO, off, _DT_DIR, raw)
        path = h.node.path + name + ("/" if is_dir else "")
        if not out.plus:
            node = self.inodes.find(path)
            ino = node.ino if node is not None else _pseudo_ino(path)
            dtype = _DT_DIR if is_dir else self._file_dtype(node)
            return out.add(ino, off, dtype, raw)
        if not out.fits(raw):
            return False
        meta = self._listed_meta(path, is_dir, listed)
        if meta is None:
            node = self.inodes.find(path)
            ino = node.ino if node is not None else _pseudo_ino(path)
            return out.add_plus(None, off, self._file_dtype(node), raw, ino)
        node = self.inodes.ref(path, stat.S_IFMT(meta.mode), meta, self._expiry())
        return out.add_plus(self._entry(node, meta), off, _dtype(meta.mode), raw)

    def _file_dtype(self, node: Node | None) -> int:
        if node is not None:
            return _dtype(node.kind)
        # With user metadata an object may be a symlink: say "unknown" rather than mislead
        # find -type and friends, which then stat.
        return _DT_UNKNOWN if self._symlinks and self.store.user_metadata else _DT_REG

    def _listed_meta(self, path: str, is_dir: bool, listed: Listed | None) -> Meta | None:
        """Attributes for a READDIRPLUS entry when they are known without asking the store
        again; None when only a stat would tell (the kernel then looks the name up)."""
        if is_dir:
            node = self.inodes.find(path)
            if node is not None and node.fresh(now()):
                return node.meta
            return self._dir_meta(path, listed.last_modified_ns if listed else None)
        blob = self.cache.peek(path)
        if self._local_state(blob):
            assert blob is not None
            return blob.current_meta()
        node = self.inodes.find(path)
        if node is not None and node.fresh(now()):
            return node.meta
        if listed is None or self.store.user_metadata:
            # A listing has no user metadata: mode, owner, even the type may differ.
            return None
        st = Stat(False, listed.size, listed.last_modified_ns, listed.etag, None)
        return self._file_meta(path, st)

    def releasedir(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        with self._fh_lock:
            self._handles.pop(fh, None)

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        # Every namespace change is in the store when its request returns.
        return None

    # --- file system -----------------------------------------------------------------------

    def syncfs(self, ctx: Context, ino: int) -> None:
        """sync(1) and syncfs(2): everything written here goes up now."""
        if self.commit_all():
            raise _err(errno.EIO)

    def statfs(self, ctx: Context, ino: int) -> StatVfs:
        root = self.cfg.options.get("root")
        if self.cfg.scheme == "fs" and root:
            try:
                st = StatVfs.from_os(os.statvfs(root))
                return st._replace(namelen=NAME_MAX)
            except OSError:
                pass
        # A bucket has no size: report a large, constant one (8 EiB would overflow some
        # tools' arithmetic; 1 PiB doesn't) and no inode limit worth showing.
        bsize = 4096
        blocks = (1 << 50) // bsize
        files = 1 << 32
        return StatVfs(blocks, blocks, blocks, files, files, bsize, NAME_MAX, bsize)


def _apply(meta: Meta, c: SetAttr) -> Meta:
    """``meta`` with a SETATTR's mode, owner and times (not size) applied."""
    t = now_ns()
    changed = False
    mode, uid, gid = meta.mode, meta.uid, meta.gid
    mtime, atime = meta.mtime_ns, meta.atime_ns
    if c.mode is not None:
        mode = stat.S_IFMT(meta.mode) | (c.mode & 0o7777)
        changed = True
    if c.uid is not None:
        uid = c.uid
        changed = True
    if c.gid is not None:
        gid = c.gid
        changed = True
    if c.atime is not None:
        atime = t if c.atime == SetAttr.NOW else c.atime
        changed = True
    if c.mtime is not None:
        mtime = t if c.mtime == SetAttr.NOW else c.mtime
        changed = True
    if not changed:
        return meta
    return meta._replace(mode=mode, uid=uid, gid=gid, mtime_ns=mtime, atime_ns=atime, ctime_ns=t)


def _pseudo_ino(path: str) -> int:
    # d_ino for a name the kernel has not looked up: stable, and outside the range of our
    # inode numbers so that it can't be mistaken for one.
    return (1 << 48) | zlib.crc32(path.encode())


__all__ = ["OpendalFs"]
