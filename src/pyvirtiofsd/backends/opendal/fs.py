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

Threads: the server calls in from several workers at once, and a hostile guest may race any
requests on any names and handles. The rules that keep what a name holds POSIX-true:

* Name locks (:mod:`.names`): every request that binds or unbinds a name's object, inode or
  local copy holds that name's lock, from the store call that tells it what is there to the
  binding. Blob creation in particular happens only under it, so an object has at most one
  bound local copy, and an inode that was unlinked or renamed away meanwhile is noticed
  (``node.path`` is checked again under the lock) instead of getting a copy at a name it no
  longer has.
* A bound blob with local state (open for writing, dirty, not yet stored, DAX-mapped) knows
  the file better than the store; it enters that state only under the name lock, so a
  revalidating stat made under the lock can't be overtaken by an upload of our own.
* Uploads hold the blob's ``commit_lock`` only (renames and unlinks take it before they move
  or end the blob's path); fetches of ranges hold nothing but pin what they read.
* File handles are counted while a request uses them (:mod:`..base`): RELEASE takes the
  handle out of the table, waits until no READ, WRITE, FLUSH, FSYNC, SETATTR or mapping is
  using it, and only then commits and drops the local copy.
* FORGET touches memory only; a directory handle's lock is held only by readdirs of that
  handle.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from pyvirtiofsd.backends.base import Backend, Handle, HandleTable, dax_flush, dax_resized, oserror
from pyvirtiofsd.backends.opendal.attrs import (
    Defaults,
    LocalAttrs,
    Meta,
    build,
    decode,
    encode,
    now_ns,
    overrides_of,
)
from pyvirtiofsd.backends.opendal.config import OpendalConfig
from pyvirtiofsd.backends.opendal.inodes import ROOT_INO, InodeTable, Node, is_unlinked, now
from pyvirtiofsd.backends.opendal.names import NameLocks
from pyvirtiofsd.backends.opendal.staging import Blob, BlobCache
from pyvirtiofsd.backends.opendal.store import Listed, Stat, Store, parent_of
from pyvirtiofsd.fuse import abi, policy
from pyvirtiofsd.fuse.filesystem import (
    NOW,
    Attr,
    ConnectionInfo,
    Context,
    Entry,
    Opened,
    SetAttr,
    StatVfs,
)
from pyvirtiofsd.linux import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT

if TYPE_CHECKING:
    from pyvirtiofsd.fuse.buffers import ReplyWriter, WriteData
    from pyvirtiofsd.fuse.filesystem import DirBuffer

log = logging.getLogger(__name__)

#: Services whose data lives in the daemon's memory: attributes kept in memory last exactly as
#: long as the data, so symlinks can be emulated there without user metadata.
VOLATILE_SCHEMES = frozenset({"memory", "dashmap", "moka", "mini_moka", "mini-moka"})
#: What st_blksize says: programs size their I/O by it, and each write() is one FUSE WRITE.
BLKSIZE = 1 << 20
NAME_MAX = 255
#: The slash as a byte value: a bytes operand of "in" is first tried as an integer, and the
#: error raised and cleared costs more than the search.
_SLASH = ord("/")
_NS = 1_000_000_000
_DT_UNKNOWN, _DT_DIR, _DT_REG, _DT_LNK = 0, 4, 8, 10
#: CREATE finds the name taken, then gone again when it looks: another client is busy with it.
_CREATE_TRIES = 5


def _dtype(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


class _FileHandle(Handle):
    """An open file: RELEASE waits until no request uses it, then commits and lets the local
    copy go (:meth:`HandleTable.remove_idle`)."""

    __slots__ = ("append", "blob", "node", "writable")

    def __init__(self, node: Node, blob: Blob, writable: bool, append: bool) -> None:
        self.node = node
        self.blob = blob
        self.writable = writable
        self.append = append


class _DirHandle(Handle):
    """An open directory: a listing in progress, which holds nothing to close."""

    __slots__ = ("changes", "lock", "node", "peeked", "pos", "source")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.lock = threading.Lock()
        #: Entries handed out so far (the READDIR offset of the next one).
        self.pos = 0
        self.source: Iterator[tuple[str, bool, Listed | None]] | None = None
        #: An entry taken from the listing that did not fit the last reply.
        self.peeked: tuple[str, bool, Listed | None] | None = None
        #: ``OpendalFs._changes`` when the listing began.
        self.changes = 0


class OpendalFs(Backend):
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
        self.names = NameLocks()
        self._handles: HandleTable[_FileHandle | _DirHandle] = HandleTable()
        #: Bumped by every change we make in the store (commit, create, unlink, rename): a
        #: listing taken before a change no longer describes the objects it names.
        self._changes = 0
        self._conn = ConnectionInfo()
        self._writeback = False

    # --- connection ------------------------------------------------------------------------

    def init(self, conn: ConnectionInfo) -> None:
        self._conn = conn
        want = conn.want
        # Locks stay in the kernel: the store has none to offer, and a guest is one client.
        want &= ~(abi.InitFlag.POSIX_LOCKS | abi.InitFlag.FLOCK_LOCKS)
        if not policy.readdirplus_allowed(self.cfg.cache, self.cfg.readdirplus):
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
        self._handles.remove_all()
        self.cache.close()

    # --- helpers ---------------------------------------------------------------------------

    def _rofs(self) -> None:
        if self.cfg.readonly:
            raise oserror(errno.EROFS)

    def _name(self, name: bytes) -> str:
        if not name or _SLASH in name or name in (b".", b".."):
            raise oserror(errno.EINVAL, "invalid name")
        if len(name) > NAME_MAX:
            raise oserror(errno.ENAMETOOLONG)
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            # Object keys are UTF-8 strings.
            raise oserror(errno.EINVAL, "name is not UTF-8") from None

    def _dir(self, ino: int) -> Node:
        node = self.inodes.get(ino)
        if not node.is_dir:
            raise oserror(errno.ENOTDIR)
        if is_unlinked(node):
            raise oserror(errno.ENOENT)
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

    def _take(self, fh: int | None) -> _FileHandle | None:
        """The file handle ``fh``, counted as in use (until ``self._handles.done()``); None for
        no handle, an unknown one or a directory's."""
        h = self._handles.use_if(fh)
        if h is not None and not isinstance(h, _FileHandle):
            self._handles.done(h)
            return None
        return h

    @contextmanager
    def _using(self, fh: int) -> Iterator[_FileHandle]:
        """The file handle ``fh``, counted as in use for the ``with`` block (EBADF when there
        is none)."""
        h = self._take(fh)
        if h is None:
            raise oserror(errno.EBADF)
        try:
            yield h
        finally:
            self._handles.done(h)

    @contextmanager
    def _maybe_using(self, fh: int | None) -> Iterator[_FileHandle | None]:
        """Like :meth:`_using`, but None for no handle or a stale one (GETATTR, SETATTR and
        mappings may name one that is gone)."""
        h = self._take(fh)
        try:
            yield h
        finally:
            if h is not None:
                self._handles.done(h)

    def _changed(self) -> None:
        # Only ever compared for inequality: an increment lost to a race still changes it.
        self._changes += 1

    @contextmanager
    def _node_locked(self, node: Node) -> Iterator[str | None]:
        """Hold the name lock of ``node``'s path, which is yielded (checked again under the
        lock: a rename may have moved the node while we waited); None for an unlinked node,
        which has no name to lock."""
        while True:
            path = node.path
            if is_unlinked(node):
                yield None
                return
            with self.names.hold(path):
                if node.path == path:
                    yield path
                    return

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
        with self.names.hold(base):
            entry = self._lookup(base)
        if entry is None:
            if self._timeout > 0:
                return Entry.negative(self._timeout)
            raise oserror(errno.ENOENT)
        return entry

    def _ref_dir(self, dirpath: str) -> Entry:
        with self.names.hold(dirpath):
            node = self.inodes.find(dirpath)
            meta = node.meta if node is not None else self._dir_meta(dirpath, None)
            node = self.inodes.ref(dirpath, stat.S_IFDIR, meta, self._expiry())
        return self._entry(node, meta)

    def _lookup(self, base: str) -> Entry | None:
        """The entry of ``base`` (a path without trailing slash) with one more lookup. The
        caller holds the name lock of ``base``."""
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

    def _known_meta(self, node: Node, blob: Blob | None) -> Meta | None:
        """A file's attributes when they are known without the store: the blob's while it
        knows better, the cached ones within the timeout; else None."""
        unlinked = is_unlinked(node)
        if blob is None and not unlinked:
            blob = self.cache.peek(node.path)
        if self._local_state(blob) or (blob is not None and unlinked):
            assert blob is not None
            return blob.current_meta()
        if node.fresh(now()) or unlinked:
            return node.meta
        return None

    def _meta(self, node: Node, blob: Blob | None = None) -> Meta:
        """Current attributes: the blob's while it knows better, else cached within the
        timeout, else from the store (asked under the name lock)."""
        if node.is_dir:
            return self._dir_node_meta(node)
        meta = self._known_meta(node, blob)
        if meta is not None:
            return meta
        with self._node_locked(node):
            return self._meta_locked(node, blob)

    def _meta_locked(self, node: Node, blob: Blob | None = None) -> Meta:
        """:meth:`_meta` for a caller holding the name lock of ``node`` (or an unlinked node):
        a stat made here is current, since nothing of ours can change the object meanwhile."""
        if node.is_dir:
            return self._dir_node_meta(node)
        meta = self._known_meta(node, blob)
        if meta is not None:
            return meta
        st = self.store.stat_object(node.path)
        if st is None or st.is_dir:
            raise oserror(errno.ENOENT)
        meta = self._file_meta(node.path, st)
        node.meta, node.expires = meta, self._expiry()
        return meta

    def _dir_node_meta(self, node: Node) -> Meta:
        if node.ino == ROOT_INO or node.fresh(now()) or is_unlinked(node):
            return node.meta
        st = self.store.stat_dir(node.path)
        if st is None and not self.cache.has_unstored(node.path):
            raise oserror(errno.ENOENT)
        meta = self._dir_meta(node.path, st.last_modified_ns if st else None)
        node.meta, node.expires = meta, self._expiry()
        return meta

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> tuple[Attr, float]:
        node = self.inodes.get(ino)
        with self._maybe_using(fh) as h:
            blob = h.blob if h is not None and h.node is node else None
            return self._attr(node, self._meta(node, blob)), self._timeout

    def setattr(self, ctx: Context, ino: int, changes: SetAttr) -> tuple[Attr, float]:
        self._rofs()
        node = self.inodes.get(ino)
        if node.is_dir:
            if changes.size is not None:
                raise oserror(errno.EISDIR)
            with self.names.hold(node.path):
                meta = self._dir_node_meta(node)
                new = _apply(meta, changes)
                if new != meta:
                    self.local.set(node.path, overrides_of(new))
                    node.meta = new
            return self._attr(node, new), self._timeout
        if changes.size is not None and node.kind != stat.S_IFREG:
            raise oserror(errno.EINVAL)
        with self._maybe_using(changes.fh) as h:
            blob = h.blob if h is not None and h.node is node else None
            return self._setattr_file(node, blob, changes)

    def _setattr_file(self, node: Node, blob: Blob | None, changes: SetAttr) -> tuple[Attr, float]:
        # An open reference we take here (not a writer one: a writer is an open file that
        # commits once more at its release, and this request commits now or never).
        held = False
        try:
            with self._node_locked(node) as path:
                if blob is not None and path is not None and blob.path != path:
                    # The handle's copy is no longer the name's (a fresh one replaced it after
                    # the object changed in the store): the change is the file's, so it goes
                    # to the current copy, as through the path; made on the detached one, it
                    # would be acknowledged and never stored.
                    blob = None
                if path is None and blob is None and changes.size is not None:
                    raise oserror(errno.ENOENT)
                if blob is None and path is not None and self._local_state(self.cache.peek(path)):
                    # Being written through another open file (the kernel sends no fh for
                    # fchmod or futimens): the change joins what that file will commit.
                    blob = self.cache.acquire(path)
                    held = blob is not None
                meta = self._meta_locked(node, blob)
                new = _apply(meta, changes)
                attrs_changed = new != meta
                if attrs_changed and not self.store.user_metadata and path is not None:
                    self.local.set(path, overrides_of(new))
                nothing_stored = not (attrs_changed and self.store.user_metadata)
                if changes.size is None and (nothing_stored or (blob is None and path is None)):
                    # Nothing for the store: the attributes live in LocalAttrs here (or the
                    # file is unlinked and closed: only its inode is left).
                    if attrs_changed:
                        if blob is not None:
                            blob.set_meta(new, dirty=False)
                        node.meta = new
                    return self._attr(node, new), self._timeout
                if blob is None:
                    assert path is not None
                    blob = self._open_blob(node, path, write=False)
                    held = True
                if changes.size is not None:
                    blob.truncate(changes.size)
                    dax_resized(self._conn.dax_window, node.ino, changes.size)
                if attrs_changed:
                    blob.set_meta(new, dirty=self.store.user_metadata)
                # A file open for writing takes the change up with its next flush (at the
                # latest its release, which stops counting as a writer before it commits);
                # otherwise (truncate, chmod, utimes on a path) it goes up now, still under
                # the name lock: no other change of the name comes between the two.
                if blob.writers == 0:
                    self._commit(blob)
                result = blob.current_meta()
                node.meta = result
        finally:
            if held and blob is not None:
                self._close_blob(blob, False)
        return self._attr(node, result), self._timeout

    def readlink(self, ctx: Context, ino: int) -> bytes:
        node = self.inodes.get(ino)
        if node.kind != stat.S_IFLNK:
            raise oserror(errno.EINVAL)
        if is_unlinked(node):
            raise oserror(errno.ENOENT)
        return bytes(self.store.read_all(node.path))

    def _new_object(self, ctx: Context, parent: int, name: bytes, mode: int, data: bytes) -> Entry:
        self._rofs()
        pnode = self._dir(parent)
        base = pnode.path + self._name(name)
        t = now_ns()
        meta = Meta(mode, len(data), ctx.uid, ctx.gid, t, t, t, None)
        with self.names.hold(base):
            if self._known_name(base) or not self._claim(base, data, meta):
                raise oserror(errno.EEXIST)
            if not self.store.user_metadata:
                self.local.set(base, overrides_of(meta))
            node = self.inodes.ref(base, stat.S_IFMT(mode), meta, self._expiry())
        return self._entry(node, meta)

    def _known_name(self, base: str) -> bool:
        """Something we know of is at ``base``: a local file, an inode bound to it."""
        return (
            self._local_state(self.cache.peek(base))
            or self.inodes.find(base) is not None
            or self.inodes.find(base + "/") is not None
        )

    def _claim(self, base: str, data: bytes, meta: Meta) -> bool:
        """Make the object ``base`` holding ``data`` unless the name is taken in the store:
        False then, and nothing is written. The caller holds the name lock."""
        if self.store.can_create_new:
            # One conditional write decides it, atomically against other clients too (it sees
            # objects only: a directory nobody here has looked up is not checked for).
            if not self.store.create(base, data, encode(meta)):
                return False
            self._changed()
            return True
        if self.store.stat_name(base) is not None:
            return False
        self.store.write(base, data, encode(meta))
        self._changed()
        return True

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        if not self._symlinks:
            # The link would read back as a regular file after a restart.
            raise oserror(errno.EPERM, "symlinks need a service with user metadata")
        return self._new_object(ctx, parent, name, stat.S_IFLNK | 0o777, target)

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        if not stat.S_ISREG(mode):
            raise oserror(errno.EPERM, "only regular files can be stored as objects")
        return self._new_object(ctx, parent, name, mode, b"")

    def link(self, ctx: Context, ino: int, new_parent: int, new_name: bytes) -> Entry:
        # An object has one name; a second one would be a copy that silently diverges.
        raise oserror(errno.EPERM, "hard links are not supported on object storage")

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        self._rofs()
        pnode = self._dir(parent)
        base = pnode.path + self._name(name)
        dirpath = base + "/"
        t = now_ns()
        meta = Meta(stat.S_IFDIR | (mode & 0o7777), 0, ctx.uid, ctx.gid, t, t, t, None)
        with self.names.hold(base):
            if self._local_state(self.cache.peek(base)):
                raise oserror(errno.EEXIST)
            self.store.create_dir(dirpath)
            self._changed()
            self.local.set(dirpath, overrides_of(meta))
            node = self.inodes.ref(dirpath, stat.S_IFDIR, meta, self._expiry())
            node.marker = True
        return self._entry(node, meta)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rofs()
        pnode = self._dir(parent)
        base = pnode.path + self._name(name)
        with self.names.hold(base):
            node = self.inodes.find(base)
            if node is None and self.inodes.find(base + "/") is not None:
                raise oserror(errno.EISDIR)
            blob = self.cache.peek(base)
            if node is None and blob is None:
                # Not a name the kernel has looked up (it always has before it unlinks): ask.
                st = self.store.stat_name(base)
                if st is None:
                    raise oserror(errno.ENOENT)
                if st.is_dir:
                    raise oserror(errno.EISDIR)
            self._keep_dir(pnode)
            if blob is not None:
                with blob.commit_lock, blob.pinned(0):
                    if blob.stored and blob.opens > 0:
                        # Still open: the data must outlive the object.
                        blob.fill_all(self.store)
                    # Whatever we think the store has, the name holds nothing afterwards.
                    self.store.delete(base)
                    self.cache.detach(blob)
            else:
                self.store.delete(base)
            self._changed()
            self.inodes.unlink(base)
            self.local.drop(base)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rofs()
        pnode = self._dir(parent)
        base = pnode.path + self._name(name)
        dirpath = base + "/"
        # Exclusive on the directory: nothing can be created in it meanwhile.
        with self.names.hold(base):
            if self.cache.has_unstored(dirpath) or self.store.has_children(dirpath):
                raise oserror(errno.ENOTEMPTY)
            self._keep_dir(pnode)
            self.store.delete(dirpath)
            self._changed()
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
            raise oserror(errno.EINVAL, "exchange and whiteout renames are not supported")
        sdir = self._dir(parent)
        ddir = self._dir(new_parent)
        src = sdir.path + self._name(name)
        dst = ddir.path + self._name(new_name)
        if src == dst:
            return
        with self.names.hold(src, dst):
            skind = self._kind(src)
            if skind is None:
                raise oserror(errno.ENOENT)
            dkind = self._kind(dst)
            if dkind is not None and flags & RENAME_NOREPLACE:
                raise oserror(errno.EEXIST)
            self._keep_dir(sdir)
            if skind == stat.S_IFDIR:
                if dkind is not None and dkind != stat.S_IFDIR:
                    raise oserror(errno.ENOTDIR)
                if (dst + "/").startswith(src + "/"):
                    raise oserror(errno.EINVAL)
                if dkind == stat.S_IFDIR:
                    if self.cache.has_unstored(dst + "/") or self.store.has_children(dst + "/"):
                        raise oserror(errno.ENOTEMPTY)
                    self.store.delete(dst + "/")
                self._rename_dir(src + "/", dst + "/")
            else:
                if dkind == stat.S_IFDIR:
                    raise oserror(errno.EISDIR)
                self._rename_file(src, dst, dkind is not None)
            self._changed()

    def _rename_file(self, src: str, dst: str, replaces: bool) -> None:
        """Move the file ``src`` over ``dst`` (``replaces``: something is there). Under the
        name locks of both; the ``commit_lock`` of both local copies keeps their uploads from
        landing at a name the move has just changed."""
        sblob = self.cache.peek(src)
        dblob = self.cache.peek(dst)
        with ExitStack() as stack:
            for blob in (sblob, dblob):
                if blob is not None:
                    stack.enter_context(blob.commit_lock)
            if dblob is not None and dblob.stored and dblob.opens > 0:
                # The file renamed over is still open: its data must outlive its object.
                stack.enter_context(dblob.pinned(0))
                dblob.fill_all(self.store)
            if sblob is None or sblob.stored:
                self.store.move(src, dst)
            elif replaces:
                # Not in the store yet: the move is local, but what the name held goes now,
                # or it would come back once this file is gone again.
                self.store.delete(dst)
            self.cache.rename(src, dst)
        if not self.store.user_metadata:
            self.local.move(src, dst, tree=False)
        self.inodes.rename(src, dst)

    def _rename_dir(self, src: str, dst: str) -> None:
        """Move every object under ``src`` to ``dst``, one at a time (native rename, else copy
        and delete). Not atomic: interrupted, some objects are under each name, none is lost.
        Beyond ``dir_rename_limit`` objects, EXDEV (``mv`` then copies by itself). The name
        locks of both directories exclude every request below them; the local copies under
        ``src`` are held (their ``commit_lock``) so that no upload lands under the old name."""
        with ExitStack() as stack:
            for blob in self.cache.under(src):
                stack.enter_context(blob.commit_lock)
                # Pending writes under the old name go up first, so that the move takes them.
                blob.commit_locked(self.store, self._committed)
            paths: list[str] = []
            for path in self.store.list_tree(src):
                paths.append(path)
                if len(paths) > self.cfg.dir_rename_limit:
                    raise oserror(errno.EXDEV, "directory too large to rename in place")
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

    def _open_blob(self, node: Node, path: str, write: bool) -> Blob:
        """The blob of a file, with an open reference (and a writer one with ``write``),
        revalidated against the store unless the cached attributes are still fresh. The caller
        holds the name lock of ``path``, which is ``node``'s: so no other copy can be made
        meanwhile, and the one found can't take on local state behind our back."""
        blob = self.cache.acquire(path)
        if blob is not None and not self._local_state(blob):
            # Attributes within their timeout are trusted (a lookup may just have fetched
            # them); either way the blob must hold the version they describe.
            try:
                meta = self._meta_locked(node)
                if not blob.adopt_version(meta.version):
                    # Changed in the store: a fresh copy; readers of the old one keep theirs.
                    fresh = self.cache.replace(blob, meta)
                    self.cache.release(blob)
                    blob = fresh
            except BaseException:
                self.cache.release(blob)
                raise
        if blob is None:
            meta = self._meta_locked(node)
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
        self._changed()
        path = blob.path
        if path is None:
            return
        if not self.store.user_metadata:
            self.local.set(path, overrides_of(meta))
        node = self.inodes.find(path)
        if node is not None:
            node.meta, node.expires = meta, self._expiry()

    def _file_open_flags(self) -> int:
        return policy.file_open_flags(self.cfg.cache)

    def open(self, ctx: Context, ino: int, flags: int, kill_suidgid: bool) -> Opened:
        node = self.inodes.get(ino)
        if node.is_dir:
            raise oserror(errno.EISDIR)
        if node.kind != stat.S_IFREG:
            raise oserror(errno.ELOOP)
        if self.cfg.readonly and policy.may_write(flags):
            raise oserror(errno.EROFS)
        with self._node_locked(node) as path:
            if path is None:
                raise oserror(errno.ENOENT)
            return self._open_locked(node, path, flags)

    def _open_locked(self, node: Node, path: str, flags: int) -> Opened:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        blob = self._open_blob(node, path, writable)
        try:
            if flags & os.O_TRUNC and blob.size:
                blob.truncate(0)
                dax_resized(self._conn.dax_window, node.ino, 0)
        except BaseException:
            self._close_blob(blob, writable)
            raise
        self.inodes.opened(node)
        append = bool(flags & os.O_APPEND) and not self._writeback
        return Opened(
            self._handles.add(_FileHandle(node, blob, writable, append)), self._file_open_flags()
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
        t = now_ns()
        meta = Meta(stat.S_IFREG | (mode & 0o7777), 0, ctx.uid, ctx.gid, t, t, t, None)
        with self.names.hold(base):
            # The kernel asks because its entry is negative, but that may be stale: another
            # client may have made the name since, or we may know it. An existing file is
            # opened (EEXIST with O_EXCL), never replaced by one we have not looked at.
            for _ in range(_CREATE_TRIES):
                entry = self._lookup(base) if self._known_name(base) else None
                if entry is None:
                    stored = self._create_object(base, meta)
                    if stored is not None:
                        return self._created(base, meta, stored, flags)
                    entry = self._lookup(base)
                if entry is not None:
                    return entry, self._open_existing(entry, flags)
            # Made and removed by someone else again and again.
            raise oserror(errno.EAGAIN)

    def _create_object(self, base: str, meta: Meta) -> bool | None:
        """Claim ``base`` for a new empty file: True when the store now has it, False when it
        will have it at the first commit (a service that can't store empty objects), None when
        the name is taken."""
        if self.store.can_write_empty:
            return True if self._claim(base, b"", meta) else None
        if self.store.stat_name(base) is not None:
            return None
        return False

    def _created(self, base: str, meta: Meta, stored: bool, flags: int) -> tuple[Entry, Opened]:
        if not self.store.user_metadata:
            self.local.set(base, overrides_of(meta))
        old = self.cache.peek(base)
        if old is not None:
            # A cached copy of an object another client has removed since (a copy with local
            # state would have made the name known): it is not this new file.
            self.cache.detach(old)
        blob = self.cache.create(base, meta, stored=stored)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            with blob.lock:
                blob.writers += 1
        node = self.inodes.ref(base, stat.S_IFREG, meta, self._expiry())
        self.inodes.opened(node)
        append = bool(flags & os.O_APPEND) and not self._writeback
        fh = self._handles.add(_FileHandle(node, blob, writable, append))
        return self._entry(node, meta), Opened(fh, self._file_open_flags())

    def _open_existing(self, entry: Entry, flags: int) -> Opened:
        """CREATE of a name that exists: open it (the lookup reference stays with the entry
        returned), under the name lock the caller holds."""
        node = self.inodes.get(entry.ino)
        try:
            if flags & os.O_EXCL:
                raise oserror(errno.EEXIST)
            if node.is_dir:
                raise oserror(errno.EISDIR)
            if node.kind != stat.S_IFREG:
                raise oserror(errno.ELOOP)
            return self._open_locked(node, node.path, flags & ~os.O_CREAT)
        except BaseException:
            self.inodes.forget(entry.ino, 1)
            raise

    def read(
        self, ctx: Context, ino: int, fh: int, offset: int, size: int, out: ReplyWriter
    ) -> None:
        with self._using(fh) as h:
            blob = h.blob
            end = min(offset + size, blob.size)
            if end <= offset:
                return
            dax_flush(self._conn.dax_window, h.node.ino)
            with blob.pinned(offset):
                blob.ensure(self.store, offset, end)
                # Clamped again to the size at the copy: a write that grew the file meanwhile
                # is read whole or not at all.
                blob.read_into(out, offset, offset + size)

    def write(
        self, ctx: Context, ino: int, fh: int, offset: int, data: WriteData, flags: int
    ) -> int:
        self._rofs()
        with self._using(fh) as h:
            if not h.writable:
                raise oserror(errno.EBADF)
            before = h.blob.size
            dax_flush(self._conn.dax_window, h.node.ino)
            n = h.blob.write(data, offset, h.append)
            if h.blob.size != before:
                dax_resized(self._conn.dax_window, h.node.ino, h.blob.size)
            return n

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        with self._using(fh) as h:
            dax_flush(self._conn.dax_window, h.node.ino)
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
        # Requests still using the handle finish first: their local file stays open and what
        # they write is in the commit below.
        h = self._handles.remove_idle(fh, _FileHandle)
        if not isinstance(h, _FileHandle):
            raise oserror(errno.EBADF)
        if h.writable:
            # No longer a writer before the last commit, not after it: a change made by path
            # meanwhile (truncate, chmod) sees no writer left to take it up, and goes up itself.
            with h.blob.lock:
                h.blob.writers -= 1
        try:
            dax_flush(self._conn.dax_window, h.node.ino)
            if h.blob.needs_commit():
                self._commit(h.blob)
        except OSError as e:
            # The blob stays dirty in the cache: the next open, fsync of it or the daemon's
            # exit tries again. The guest has already been told at flush (close).
            log.error("upload of %r failed at release: %s", h.blob.path, e.strerror)
        finally:
            self._close_blob(h.blob, False)
            self.inodes.closed(h.node)

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        with self._using(fh) as h:
            dax_flush(self._conn.dax_window, h.node.ino)
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
            raise oserror(errno.EINVAL, "only regular files are mapped")
        if writable:
            self._rofs()
        with self._maybe_using(fh) as h, self._node_locked(node) as path:
            # A mapping gives the blob local state: under the name lock, like an open.
            if h is not None and h.node is node:
                return h.blob.dax_fd(self.store, offset, length, writable)
            if path is None:
                raise oserror(errno.ENOENT)
            blob = self._open_blob(node, path, write=False)
            try:
                return blob.dax_fd(self.store, offset, length, writable)
            finally:
                self._close_blob(blob, False)

    # --- directories -----------------------------------------------------------------------

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        node = self._dir(ino)
        return Opened(self._handles.add(_DirHandle(node)), policy.dir_open_flags(self.cfg.cache))

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
        h = self._handles.use(fh)
        try:
            if not isinstance(h, _DirHandle):
                raise oserror(errno.EBADF)
            self._readdir(h, offset, out)
        finally:
            self._handles.done(h)

    def _readdir(self, h: _DirHandle, offset: int, out: DirBuffer) -> None:
        added = False
        with h.lock:
            try:
                if h.source is None or offset != h.pos:
                    h.changes = self._changes
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
                    added = True
            except OSError:
                # A listing that failed is over (a generator does not resume): the next
                # READDIR lists again, from where this one stopped. A reply that has entries
                # answers them rather than the error: in a READDIRPLUS they took lookups, which
                # the kernel could otherwise never forget; the next READDIR gets the error.
                h.source = None
                h.peeked = None
                if added:
                    return
                raise

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
        # The entry binds an inode to the name: under its lock, like a lookup.
        with self.names.hold(path):
            meta = self._listed_meta(path, is_dir, listed, h.changes)
            if meta is not None:
                node = self.inodes.ref(path, stat.S_IFMT(meta.mode), meta, self._expiry())
                return out.add_plus(self._entry(node, meta), off, _dtype(meta.mode), raw)
            node = self.inodes.find(path)
        ino = node.ino if node is not None else _pseudo_ino(path)
        return out.add_plus(None, off, self._file_dtype(node), raw, ino)

    def _file_dtype(self, node: Node | None) -> int:
        if node is not None:
            return _dtype(node.kind)
        # With user metadata an object may be a symlink: say "unknown" rather than mislead
        # find -type and friends, which then stat.
        return _DT_UNKNOWN if self._symlinks and self.store.user_metadata else _DT_REG

    def _listed_meta(
        self, path: str, is_dir: bool, listed: Listed | None, changes: int
    ) -> Meta | None:
        """Attributes for a READDIRPLUS entry when they are known without asking the store
        again; None when only a stat would tell (the kernel then looks the name up). What the
        listing says of an object is used only if we changed nothing in the store since it
        began (else it may describe an object we have replaced, moved or removed), and if we
        hold no copy of it."""
        if is_dir:
            node = self.inodes.find(path)
            if node is not None and node.fresh(now()):
                return node.meta
            if changes != self._changes:
                return None
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
        if changes != self._changes or blob is not None:
            return None
        st = Stat(False, listed.size, listed.last_modified_ns, listed.etag, None)
        return self._file_meta(path, st)

    def releasedir(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        # Only a directory's: a file handle ends with its RELEASE, which commits it.
        h = self._handles.remove(fh, _DirHandle)
        if h is not None:
            self._handles.done(h)

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        # Every namespace change is in the store when its request returns.
        return None

    # --- file system -----------------------------------------------------------------------

    def syncfs(self, ctx: Context, ino: int) -> None:
        """sync(1) and syncfs(2): everything written here goes up now."""
        if self.commit_all():
            raise oserror(errno.EIO)

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
        atime = t if c.atime == NOW else c.atime
        changed = True
    if c.mtime is not None:
        mtime = t if c.mtime == NOW else c.mtime
        changed = True
    if not changed:
        return meta
    return meta._replace(mode=mode, uid=uid, gid=gid, mtime_ns=mtime, atime_ns=atime, ctime_ns=t)


def _pseudo_ino(path: str) -> int:
    # d_ino for a name the kernel has not looked up: stable, and outside the range of our
    # inode numbers so that it can't be mistaken for one.
    return (1 << 48) | zlib.crc32(path.encode())


__all__ = ["OpendalFs"]
