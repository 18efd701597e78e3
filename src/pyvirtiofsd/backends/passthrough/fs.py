"""Passthrough: serve a host directory, confined to it.

Confinement rests on three rules. Names from the guest are single path components (no "/", not
empty, "." and ".." only where lookup gives them their meaning). Every call works relative to an
O_PATH fd of an inode the daemon already holds (``*at()`` calls) and never follows a symlink:
``O_NOFOLLOW`` and ``AT_SYMLINK_NOFOLLOW`` on names, and ``/proc/self/fd/N`` magic links, which
resolve to the inode itself even when it is a symlink. And nothing ever walks a path given by the
guest. A symlink in the share pointing to /etc is therefore only ever a symlink to the daemon; the
guest's kernel may follow it, within the guest.

What the daemon opens is the other half. Other than with O_PATH, it opens only regular files
and directories: an existing inode only through :meth:`InodeStore.open`, which reopens an inode
it holds (never a name, which could be swapped) after checking the inode's type; and a name
only to make a new file (O_CREAT|O_EXCL, or O_TMPFILE in a directory it holds). A FIFO, socket
or device node in the share, whoever made it, is never opened: OPEN answers ENXIO (a symlink
ELOOP), GETLK/SETLK/SETLKW ENOLCK, and SYNCFS syncs its file system through another inode.
CREATE makes the file with O_EXCL as the caller; if the name is taken it is EEXIST when the
guest asked for O_EXCL, and otherwise the name is looked up and opened exactly as OPEN would.
OPEN with O_TMPFILE is EINVAL: unnamed files come only through FUSE_TMPFILE, as the caller.
MKNOD makes no character or block device unless ``allow_devices`` (made as root in the share,
a device node is one any host user who can reach the share could open). Lock files are read-only
for directories and on a read-only share, and so is the fd of a read-only DAX mapping wherever
a writable one would be refused.

Ids cross between guest and host in few places, and with ``--translate-uid``/``--translate-gid``
(:mod:`.idmap`) each goes through its table: the caller's uid, gid and supplementary groups
guest → host before the daemon acts as the caller (creating, and ACCESS, which the host kernel
checks for the translated caller), the owner a SETATTR gives guest → host before anything is
changed, and the owner and group of every attribute reply host → guest (:meth:`_attr`). A
refused guest id is EPERM.

Extended attributes pass through the xattr map when there is one (:mod:`.xattrmap`): a guest's
name becomes the host's name or is refused before the host is asked, and a listxattr shows the
guest only the names the map lets through, renamed back. A map that renames
``security.capability`` makes the daemon strip the renamed xattr wherever the kernel would strip
the real one (a write, a truncation, a chown, any setxattr), on regular files.

A new file's security label (FUSE_SECURITY_CTX) is there as soon as its name is: the file is
made unnamed (O_TMPFILE, for CREATE) or under a temporary dot-name, labelled, and only then
linked or renamed (RENAME_NOREPLACE) into its place, as the caller. Only where the file system
can do neither is it made under its name and labelled after, as virtiofsd does; whatever the
way, a file whose label fails is removed and the request fails. The label's name goes through
the map first, so a name the map refuses makes nothing at all.

Descriptors live as long as their users. File handles are reference-counted
(:class:`~pyvirtiofsd.backends.base.HandleTable`): RELEASE takes a handle out of the table, and
the last request using it (a READ, WRITE, READDIR, FSYNC, ... on another queue) closes its fd.
Inodes pin their descriptors the same way (:mod:`.inodes`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
from typing import Final

from pyvirtiofsd import linux
from pyvirtiofsd.backends.base import Backend, Handle, HandleTable, dax_flush, dax_resized, oserror
from pyvirtiofsd.backends.passthrough import locks, migration
from pyvirtiofsd.backends.passthrough.config import PassthroughConfig, SecurityLabel
from pyvirtiofsd.backends.passthrough.credentials import Credentials, can_switch
from pyvirtiofsd.backends.passthrough.idmap import IdMap
from pyvirtiofsd.backends.passthrough.inodes import (
    Inode,
    InodeStore,
    attr_of_fd,
    dir_entries,
    entry_of_fd,
    ident_of,
    open_at,
)
from pyvirtiofsd.backends.passthrough.xattrmap import Kind
from pyvirtiofsd.fuse import abi, policy
from pyvirtiofsd.fuse.buffers import ReplyWriter, WriteData
from pyvirtiofsd.fuse.filesystem import (
    NOW,
    Attr,
    ConnectionInfo,
    Context,
    DirBuffer,
    Entry,
    Lock,
    Opened,
    SetAttr,
    StatVfs,
)
from pyvirtiofsd.mutex import Mutex, new_mutex

__all__ = [
    "PassthroughFs",
]

log = logging.getLogger(__name__)

#: How a name is looked up: its own O_PATH descriptor, never following a symlink.
_LOOKUP_FLAGS: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: Open flags as Final ints: a compiled build would look each up among the os module's
#: attributes, and the connection's flags are an enum.IntFlag, whose operators run in Python.
_O_ACCMODE: Final = os.O_ACCMODE
_O_WRONLY: Final = os.O_WRONLY
_O_RDWR: Final = os.O_RDWR
_O_APPEND: Final = os.O_APPEND
_O_DIRECT: Final = os.O_DIRECT
_O_CLOEXEC: Final = os.O_CLOEXEC
_WRITEBACK_CACHE: Final = int(abi.InitFlag.WRITEBACK_CACHE)
#: What open_at answers for a name that is not there, and for one whose path has a non-directory
#: where a directory should be.
_NO_SUCH_NAME: Final = -errno.ENOENT
_NOT_A_DIR: Final = -errno.ENOTDIR
_ACL_XATTRS: Final = (b"system.posix_acl_access", b"system.posix_acl_default")
_NO_ID: Final = 0xFFFFFFFF
_SLASH: Final = ord("/")
#: Bound Final: a compiled build would look it up among the os module's attributes each time.
_open: Final = os.open
_dup: Final = os.dup
_utime: Final = os.utime
_close: Final = os.close


#: O_TMPFILE without the O_DIRECTORY it is spelled with (the kernel's __O_TMPFILE).
_O_TMPFILE_BIT: Final = os.O_TMPFILE & ~os.O_DIRECTORY
#: Guest open flags the daemon never passes on: it adds what it needs itself.
_DROPPED_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_PATH
#: Times CREATE tries again when a name it found taken is gone before it could look it up.
_CREATE_TRIES: Final = 3
#: Why opening a file for writing fails for root where opening it for reading may not.
_NOT_WRITABLE: Final = (errno.EROFS, errno.EACCES, errno.ETXTBSY, errno.EPERM)
#: Where a labelled file is made before it takes its name (followed by 16 random hex digits).
_LABEL_TEMP: Final = b".pyvirtiofsd-label-"
#: open(O_TMPFILE) on a file system that has no unnamed files.
_NO_TMPFILE: Final = (errno.EOPNOTSUPP, errno.EISDIR)
#: renameat2(RENAME_NOREPLACE) on a file system (or kernel) that can't.
_NO_NOREPLACE: Final = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
#: Flags that make a file; a file made another way is opened without them.
_MAKING_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_TRUNC
#: What CREATE adds to the guest's flags: make the name, never follow it.
_CREATE_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
_O_EXCL: Final = os.O_EXCL
_O_TRUNC: Final = os.O_TRUNC
_O_PATH_CLOEXEC: Final = os.O_PATH | os.O_CLOEXEC


def _set_label(target: int | str, name: bytes, value: bytes) -> None:
    """Store a new file's security label (the one place it is done, where tests stop a
    create to look at the share)."""
    os.setxattr(target, name, value)


def _check_name(name: bytes) -> None:
    # Compared one by one: a compiled build makes each a plain bytes comparison. The slash is
    # looked for as a byte value: a bytes operand of "in" is first tried as an integer, and the
    # error that raises and clears costs more than the rest of the check.
    if not name or name == b"." or name == b".." or _SLASH in name:
        raise oserror(errno.EINVAL, "invalid name")


class _Handle(Handle):
    """An open file or directory of the guest's: its fd is closed when the last user of the
    handle is done (see :mod:`..base`)."""

    __slots__ = ("backing_id", "fd", "flags", "flock", "inode", "lock")

    def __init__(self, fd: int, inode: Inode, flags: int, backing_id: int = 0) -> None:
        self.fd = fd
        self.inode = inode
        #: The guest's open flags (O_DIRECTORY for OPENDIR's handles).
        self.flags = flags
        self.backing_id = backing_id
        #: Held while the fd's offset matters (lseek, readdir). A Mutex: one is made for
        #: every OPEN, and threading.Lock() is looked up and called the generic way.
        self.lock: Mutex = new_mutex()
        #: The flock() the guest holds through this handle (LOCK_SH, LOCK_EX; 0: none).
        self.flock = 0


class PassthroughFs(Backend):
    def __init__(self, config: PassthroughConfig) -> None:
        #: Live migration: see :mod:`.migration`.
        self.migratable = True
        self.cfg = config
        self.inodes = InodeStore(config.shared_dir, config.inode_file_handles)
        self._handles: HandleTable[_Handle] = HandleTable(self._close_handle)
        self._timeout = config.timeout
        # Looked up once: the cache policy is an enum, whose hash runs in Python.
        self._file_fopen = policy.file_open_flags(config.cache)
        self._dir_fopen = policy.dir_open_flags(config.cache)
        self._allow_direct_io = config.allow_direct_io
        # Read by every attribute reply: taken out of the (frozen) config once.
        self._dax_file_size = config.dax_file_size
        self._readonly = config.readonly
        self._announce_submounts = config.announce_submounts
        self._switch = config.switch_credentials and can_switch()
        self._stopping = False
        self._conn = ConnectionInfo()
        self._passthrough = False
        #: fh -> flock() type a migration brought and not yet taken again (see .migration).
        self.pending_flocks: dict[int, int] = {}
        self.retaker: threading.Thread | None = None
        self._uids = IdMap("uid", config.translate_uid)
        self._gids = IdMap("gid", config.translate_gid)
        self._translate = not (self._uids.identity and self._gids.identity)
        #: GETATTR's attributes are fstat()'s as they are: no id translated, no DAX flag.
        self._stat_is_attr = not self._translate and self._dax_file_size is None
        if self._translate:
            log.info(
                "translating ids: %d uid and %d gid rules",
                len(config.translate_uid),
                len(config.translate_gid),
            )
            for line in self._uids.describe() + self._gids.describe():
                log.debug("  %s", line)
        self._xmap = config.xattrmap
        #: The host name of security.capability when the map renames it (see the module doc).
        self._capability = None if self._xmap is None else self._xmap.capability_name
        if self._xmap is not None:
            log.info("xattr map: %s", self._xmap)
        #: File systems (st_dev) found to refuse RENAME_NOREPLACE: labels there go virtiofsd's
        #: way at once.
        self._no_noreplace: set[int] = set()
        # Modes arrive already masked by the guest's umask (unless POSIX ACLs hand that job to
        # us); ours must not mask them a second time.
        os.umask(0)

    # --- connection ------------------------------------------------------------------------

    def init(self, conn: ConnectionInfo) -> None:
        cfg = self.cfg
        self._conn = conn
        want = conn.want
        if cfg.writeback:
            want |= abi.InitFlag.WRITEBACK_CACHE
        if not policy.readdirplus_allowed(cfg.cache, cfg.readdirplus):
            want &= ~(abi.InitFlag.DO_READDIRPLUS | abi.InitFlag.READDIRPLUS_AUTO)
        if not cfg.announce_submounts:
            want &= ~abi.InitFlag.SUBMOUNTS
        if cfg.killpriv_v2:
            want |= abi.InitFlag.HANDLE_KILLPRIV_V2
        if cfg.xattr:
            want |= abi.InitFlag.SETXATTR_EXT
        if cfg.posix_acl:
            want |= abi.InitFlag.POSIX_ACL | abi.InitFlag.DONT_MASK
        if cfg.allow_mmap:
            want |= abi.InitFlag.DIRECT_IO_ALLOW_MMAP
        if cfg.dax_file_size is not None:
            want |= abi.InitFlag.HAS_INODE_DAX
        if cfg.readonly:
            want &= ~abi.InitFlag.WRITEBACK_CACHE
        if cfg.security_label is not SecurityLabel.NEVER:
            if conn.capable & abi.InitFlag.SECURITY_CTX:
                want |= abi.InitFlag.SECURITY_CTX
            elif cfg.security_label is SecurityLabel.ALWAYS:
                log.error("--security-label: the guest's kernel does not offer FUSE_SECURITY_CTX")
                raise oserror(errno.EPROTO, "no FUSE_SECURITY_CTX")
            else:
                log.info("--security-label=auto: the guest's kernel does not send labels")
        self._passthrough = False
        if cfg.fuse_passthrough:
            if conn.backing_open is None or not conn.capable & abi.InitFlag.PASSTHROUGH:
                log.warning("FUSE passthrough is not available here; serving data ourselves")
            elif want & abi.InitFlag.WRITEBACK_CACHE:
                log.warning("FUSE passthrough does not combine with writeback; not using it")
            else:
                want |= abi.InitFlag.PASSTHROUGH
                self._passthrough = True
        conn.want = want & conn.capable

    def destroy(self) -> None:
        """The session ended: its open files and inode references are gone with it, and so
        are the locks a migration brought and had not taken again yet."""
        with self.inodes.lock_book:
            self.pending_flocks.clear()
            self.inodes.pending_locks.clear()
        retaker, self.retaker = self.retaker, None
        if retaker is not None and retaker is not threading.current_thread():
            # It ends at its next look, finding nothing pending; no session after this one
            # may share it.
            retaker.join()
        for h in self._handles.remove_all():
            self._handles.done(h)
        self.inodes.forget_all()

    # --- live migration (see .migration) ---------------------------------------------------

    @property
    def handle_table(self) -> HandleTable[_Handle]:
        return self._handles

    @property
    def stopping(self) -> bool:
        return self._stopping

    def reopen(self, inode: Inode, guest_flags: int) -> int:
        """A new fd of ``inode`` for a handle the guest opened with ``guest_flags`` elsewhere:
        as OPEN (or OPENDIR) opened it, less what happened once already (O_TRUNC)."""
        if guest_flags & os.O_DIRECTORY:
            return self.inodes.open(inode, os.O_RDONLY | os.O_DIRECTORY)
        flags = guest_flags & ~(os.O_TRUNC | _O_TMPFILE_BIT)
        if self.cfg.readonly and policy.may_write(flags):
            raise oserror(errno.EROFS)
        return self.inodes.open(inode, self._open_flags(flags))

    def insert_handle(self, fh: int, fd: int, inode: Inode, guest_flags: int) -> _Handle:
        """Put a reopened handle in under the number the guest has (ValueError if taken)."""
        h = _Handle(fd, inode, guest_flags)
        self._handles.insert(fh, h)
        return h

    def lock_opener(self, inode: Inode):  # type: ignore[no-untyped-def]
        return self._lock_opener(inode)

    def shutdown(self) -> None:
        """Release every fd (the daemon is exiting)."""
        self._stopping = True
        self.destroy()
        self.inodes.close_all()

    def save_state(self) -> bytes:
        return migration.save(self)

    def load_state(self, data: bytes) -> None:
        migration.load(self, data)

    # --- helpers ---------------------------------------------------------------------------

    def _rofs(self) -> None:
        if self._readonly:
            raise oserror(errno.EROFS)

    def _submount(self, inode: Inode, parent_dev: int | None) -> bool:
        """Whether ``inode``, reached from a directory on ``parent_dev``, is announced as the
        root of another mount."""
        return (
            parent_dev is not None
            and inode.mode == stat.S_IFDIR
            and inode.dev != parent_dev
            and self._announce_submounts
        )

    def _attr_flags(self, inode: Inode, st: os.stat_result, parent_dev: int | None) -> int:
        flags = abi.ATTR_SUBMOUNT if self._submount(inode, parent_dev) else 0
        size = self._dax_file_size
        if size is not None and inode.mode == stat.S_IFREG and st.st_size >= size:
            flags |= abi.ATTR_DAX
        return flags

    def _attr(self, st: os.stat_result, flags: int = 0) -> Attr:
        """The attributes of ``st`` as the guest sees them: owner and group translated."""
        uid, gid = st.st_uid, st.st_gid
        if self._translate:
            uid = self._uids.to_guest(uid)
            gid = self._gids.to_guest(gid)
        return Attr.from_stat(st, None, flags, uid, gid)

    def _fd_attr(self, inode: Inode, fd: int) -> Attr:
        """``inode``'s attributes as the guest sees them, through ``fd``, one of its own
        descriptors. Most shares take them from fstat() as they are (:attr:`_stat_is_attr`),
        which the compiled build does without an os.stat_result."""
        if self._stat_is_attr:
            return attr_of_fd(fd)
        st = os.fstat(fd)
        return self._attr(st, self._attr_flags(inode, st, None))

    def _caller(self, ctx: Context) -> Context:
        """``ctx`` with the host ids its caller acts as; EPERM if one of them is refused."""
        if not self._translate:
            return ctx
        try:
            return Context(
                self._uids.to_host(ctx.uid),
                self._gids.to_host(ctx.gid),
                ctx.pid,
                ctx.unique,
                tuple(self._gids.to_host(g) for g in ctx.groups),
                ctx.secctx,
                ctx.interrupted,
            )
        except PermissionError as e:
            log.debug("request %d: %s", ctx.unique, e.strerror)
            raise

    def _creds(self, ctx: Context, umask: int | None = None) -> Credentials:
        """Acting as the caller (its translated ids), with the guest's umask where the kernel
        left applying it to us (POSIX ACLs)."""
        return Credentials(self._caller(ctx), self._switch, umask if self.cfg.posix_acl else None)

    def _entry(self, parent: Inode, fd: int) -> tuple[Inode, Entry]:
        """The inode behind ``fd`` (an O_PATH fd this call consumes), with one more lookup,
        and its entry."""
        st: os.stat_result | None = None
        try:
            if self._stat_is_attr:
                attr, ident = entry_of_fd(fd)
            else:
                st = os.fstat(fd)
                ident = ident_of(st)
        except BaseException:
            os.close(fd)
            raise
        inode = self.inodes.add(fd, ident)
        if st is not None:
            attr = self._attr(st, self._attr_flags(inode, st, parent.dev))
        elif self._submount(inode, parent.dev):
            attr = attr.with_flags(abi.ATTR_SUBMOUNT)
        return inode, Entry(inode.nodeid, attr, self._timeout, self._timeout)

    def _own_handle(self, inode: Inode, fh: int | None) -> _Handle | None:
        """The handle ``fh``, counted as in use, if it is one of ``inode``'s file; None for no
        handle, an unknown one or one of another file. A guest may pair any handle with any
        inode: GETATTR and SETATTR, which answer with the inode's attributes (and keep its DAX
        mappings within its size), then do without it, as without a released one."""
        h = self._handles.use_if(fh)
        if h is not None and h.inode.key != inode.key:
            self._handles.done(h)
            return None
        return h

    def _lookup_inode(self, parent: Inode, name: bytes) -> tuple[Inode, Entry]:
        # path() without its with block, whose methods a compiled build calls the generic way.
        inodes = self.inodes
        pfd, owned = inodes.path_fd(parent)
        try:
            fd = _open(name, _LOOKUP_FLAGS, dir_fd=pfd)
        finally:
            inodes.done_path(parent, pfd, owned)
        return self._entry(parent, fd)

    def _lookup(self, parent: Inode, name: bytes) -> Entry:
        return self._lookup_inode(parent, name)[1]

    def _close_handle(self, h: _Handle) -> None:
        if h.backing_id and self._conn.backing_close is not None:
            try:
                self._conn.backing_close(h.backing_id)
            except OSError as e:
                log.debug("closing backing id %d: %s", h.backing_id, e)
        _close(h.fd)

    def _proc(self, fd: int) -> str:
        return f"/proc/self/fd/{fd}"

    def _kill_suidgid(self, fd: int, path: bool) -> None:
        """Drop set-user-ID, and set-group-ID where group execution makes it meaningful."""
        st = os.stat(self._proc(fd)) if path else os.fstat(fd)
        mode = st.st_mode
        drop = stat.S_ISUID
        if mode & stat.S_IXGRP:
            drop |= stat.S_ISGID
        if mode & drop and stat.S_ISREG(mode):
            new = stat.S_IMODE(mode) & ~drop
            if path:
                os.chmod(self._proc(fd), new)
            else:
                os.fchmod(fd, new)

    # --- names and inodes ------------------------------------------------------------------

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry | None:
        pinode = self.inodes.get(parent)
        if pinode.mode != stat.S_IFDIR:
            # Nothing is found in what is no directory, "." and ".." included (the openat()
            # below answers so for other names; these two are answered here).
            raise oserror(errno.ENOTDIR)
        if name == b"." or (name == b".." and pinode is self.inodes.root):
            self.inodes.ref(pinode)
            with self.inodes.path(pinode) as pfd:
                st = os.fstat(pfd)
            return Entry(pinode.nodeid, self._attr(st), self._timeout, self._timeout)
        if name != b"..":
            _check_name(name)
        # _lookup_inode's steps, with the open answering a failure as a number: a missing
        # name is answered None, without an exception (see open_at).
        inodes = self.inodes
        pfd, owned = inodes.path_fd(pinode)
        try:
            fd = open_at(pfd, name, _LOOKUP_FLAGS)
        finally:
            inodes.done_path(pinode, pfd, owned)
        if fd < 0:
            if fd == _NO_SUCH_NAME:
                return None
            raise oserror(-fd)
        return self._entry(pinode, fd)[1]

    def forget(self, ino: int, nlookup: int) -> None:
        self.inodes.forget(ino, nlookup)

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> tuple[Attr, float]:
        inode = self.inodes.get(ino)
        h = self._own_handle(inode, fh)
        if h is not None:
            try:
                attr = self._fd_attr(inode, h.fd)
            finally:
                self._handles.done(h)
        elif self._stat_is_attr:
            attr = self.inodes.attr(inode)
        else:
            st = self.inodes.stat(inode)
            attr = self._attr(st, self._attr_flags(inode, st, None))
        window = self._conn.dax_window
        if window is not None:
            dax_resized(window, ino, attr.size)
        return attr, self._timeout

    def setattr(self, ctx: Context, ino: int, changes: SetAttr) -> tuple[Attr, float]:
        self._rofs()
        # Before anything changes: a refused owner changes nothing.
        owner = self._new_owner(changes)
        inode = self.inodes.get(ino)
        handle = self._own_handle(inode, changes.fh)
        try:
            return self._setattr(ino, inode, handle, changes, owner)
        finally:
            if handle is not None:
                self._handles.done(handle)

    def _new_owner(self, changes: SetAttr) -> tuple[int, int] | None:
        """The host (uid, gid) a chown gives, -1 for the one it leaves; None: no chown."""
        if changes.uid is None and changes.gid is None:
            return None
        try:
            uid = _NO_ID if changes.uid is None else self._host_id(self._uids, changes.uid)
            gid = _NO_ID if changes.gid is None else self._host_id(self._gids, changes.gid)
        except PermissionError as e:
            log.debug("chown: %s", e.strerror)
            raise
        return uid, gid

    def _host_id(self, ids: IdMap, guest_id: int) -> int:
        return ids.to_host(guest_id) if self._translate else guest_id

    def _setattr(
        self,
        ino: int,
        inode: Inode,
        handle: _Handle | None,
        changes: SetAttr,
        owner: tuple[int, int] | None,
    ) -> tuple[Attr, float]:
        with self.inodes.path(inode) as pfd:
            proc = self._proc(pfd)
            if changes.size is not None or changes.uid is not None or changes.gid is not None:
                self._drop_capability(inode, proc if handle is None else handle.fd)
            if changes.mode is not None:
                if handle is not None:
                    os.fchmod(handle.fd, changes.mode)
                elif inode.is_symlink():
                    raise oserror(errno.EOPNOTSUPP)
                else:
                    os.chmod(proc, changes.mode)
            if owner is not None:
                uid, gid = owner
                linux.fchownat(pfd, b"", uid, gid, linux.AT_EMPTY_PATH | linux.AT_SYMLINK_NOFOLLOW)
            if changes.size is not None:
                dax_flush(self._conn.dax_window, ino)
                if handle is not None:
                    os.ftruncate(handle.fd, changes.size)
                elif inode.mode != stat.S_IFREG:
                    raise oserror(errno.EINVAL if inode.is_dir() is False else errno.EISDIR)
                else:
                    os.truncate(proc, changes.size)
            atime = changes.atime
            mtime = changes.mtime
            if atime is not None and mtime is not None and atime != NOW and mtime != NOW:
                # Both times given (utimes(), tar): the same utimensat(AT_FDCWD, proc, times,
                # 0) through os.utime, without the ctypes call's cost.
                _utime(proc, ns=(atime, mtime))
            elif atime is not None or mtime is not None:
                linux.utimensat(
                    linux.AT_FDCWD,
                    proc.encode(),
                    None if atime == NOW else atime,
                    None if mtime == NOW else mtime,
                    atime_now=atime == NOW,
                    mtime_now=mtime == NOW,
                )
            if changes.kill_suidgid and changes.mode is None:
                self._kill_suidgid(pfd, True)
            attr = self._fd_attr(inode, pfd if handle is None else handle.fd)
        if changes.size is not None:
            dax_resized(self._conn.dax_window, ino, attr.size)
        return attr, self._timeout

    def readlink(self, ctx: Context, ino: int) -> bytes:
        inode = self.inodes.get(ino)
        if not inode.is_symlink():
            raise oserror(errno.EINVAL)
        with self.inodes.path(inode) as fd:
            # readlinkat() with an empty name reads the symlink an O_PATH fd refers to.
            return os.readlink(b"", dir_fd=fd)

    def _create_entry(  # type: ignore[no-untyped-def]
        self, ctx: Context, parent: int, name: bytes, umask: int, kind: int, make
    ) -> Entry:
        """Make ``name`` (of type ``kind``) in ``parent`` with ``make(dir_fd, name)``, as the
        caller, labelled if the guest sent a label; its entry."""
        self._rofs()
        _check_name(name)
        label = self._label(ctx)
        pinode = self.inodes.get(parent)
        creds = self._creds(ctx, umask)
        with self.inodes.path(pinode) as pfd:
            if label is not None:
                fd = self._make_labelled(pfd, name, kind, creds, make, label, pinode.dev)
            else:
                with creds:
                    make(pfd, name)
                fd = os.open(name, _LOOKUP_FLAGS, dir_fd=pfd)
        return self._entry(pinode, fd)[1]

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        return self._create_entry(
            ctx, parent, name, 0, stat.S_IFLNK, lambda d, n: os.symlink(target, n, dir_fd=d)
        )

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        self._rofs()
        kind = stat.S_IFMT(mode)
        # A whiteout (character device 0/0, which overlayfs makes) is no device to open.
        whiteout = kind == stat.S_IFCHR and rdev == 0
        if kind in (stat.S_IFCHR, stat.S_IFBLK) and not whiteout and not self.cfg.allow_devices:
            raise oserror(errno.EPERM, "device nodes need --allow-devices")
        return self._create_entry(
            ctx,
            parent,
            name,
            umask,
            kind or stat.S_IFREG,  # mknod(2) makes a regular file of a mode without a type
            lambda d, n: os.mknod(n, mode, rdev, dir_fd=d),
        )

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        return self._create_entry(
            ctx, parent, name, umask, stat.S_IFDIR, lambda d, n: os.mkdir(n, mode, dir_fd=d)
        )

    # --- security labels -------------------------------------------------------------------

    def _label(self, ctx: Context) -> tuple[bytes, bytes] | None:
        """The xattr (its host name) and value that label the file ``ctx`` makes, or None.
        A name the map or the ACL setting refuses fails the request here, before anything is
        made."""
        sec = ctx.secctx
        if sec is None:
            return None
        return self._host_xattr(sec.name, errno.EPERM), sec.value

    def _open_made(self, pfd: int, name: bytes, kind: int) -> int:
        """An O_PATH fd of the ``kind`` of file just made under ``name``; ENOENT if the name
        now holds something else (swapped meanwhile: never labelled, never opened)."""
        fd = os.open(name, _LOOKUP_FLAGS, dir_fd=pfd)
        if stat.S_IFMT(os.fstat(fd).st_mode) != kind:
            os.close(fd)
            raise oserror(errno.ENOENT, "the new file was replaced before it was labelled")
        return fd

    def _open_made_or_remove(self, pfd: int, name: bytes, kind: int) -> int:
        """:meth:`_open_made`, removing the new file if it can't be opened; not when the
        name is gone or holds something else, which this request did not make."""
        try:
            return self._open_made(pfd, name, kind)
        except BaseException as e:
            if not (isinstance(e, OSError) and e.errno == errno.ENOENT):
                self._remove(pfd, name, kind)
            raise

    def _remove(self, pfd: int, name: bytes, kind: int) -> None:
        """Take back a file this request made and could not finish."""
        try:
            if kind == stat.S_IFDIR:
                os.rmdir(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
        except OSError as e:
            log.warning("could not remove %r after a failed label: %s", name, e)

    def _make_labelled(  # type: ignore[no-untyped-def]
        self, pfd: int, name: bytes, kind: int, creds: Credentials, make, label, dev: int
    ) -> int:
        """Make ``name`` as :meth:`_create_entry` does, with its label in place before the
        name exists: made (as the caller) under a temporary name, labelled (as the daemon: the
        caller may lack write permission on what it just made), renamed into place (as the
        caller) without replacing anything. An O_PATH fd of the new file. Where the file
        system ``dev`` refuses such a rename, :meth:`_make_then_label` (from then on)."""
        if dev in self._no_noreplace:
            return self._make_then_label(pfd, name, kind, creds, make, label)
        host_name, value = label
        temp = b""
        for _ in range(_CREATE_TRIES):
            temp = _LABEL_TEMP + secrets.token_hex(8).encode()
            try:
                with creds:
                    make(pfd, temp)
                break
            except FileExistsError:
                continue
        else:
            raise oserror(errno.EEXIST, "no free temporary name")
        fd = self._open_made_or_remove(pfd, temp, kind)
        try:
            _set_label(self._proc(fd), host_name, value)
        except BaseException:
            os.close(fd)
            self._remove(pfd, temp, kind)
            raise
        try:
            with creds:
                linux.renameat2(pfd, temp, pfd, name, linux.RENAME_NOREPLACE)
        except BaseException as e:
            os.close(fd)
            self._remove(pfd, temp, kind)
            if not (isinstance(e, OSError) and e.errno in _NO_NOREPLACE):
                raise
            log.info("no RENAME_NOREPLACE on device %#x: labels follow their file there", dev)
            self._no_noreplace.add(dev)
            return self._make_then_label(pfd, name, kind, creds, make, label)
        return fd

    def _make_then_label(  # type: ignore[no-untyped-def]
        self, pfd: int, name: bytes, kind: int, creds: Credentials, make, label
    ) -> int:
        """virtiofsd's way, where the file system can't rename without replacing: make
        ``name``, label it, remove it again if the label fails."""
        with creds:
            make(pfd, name)
        fd = self._open_made_or_remove(pfd, name, kind)
        try:
            _set_label(self._proc(fd), *label)
        except BaseException:
            os.close(fd)
            self._remove(pfd, name, kind)
            raise
        return fd

    def _create_labelled(  # type: ignore[no-untyped-def]
        self, pfd: int, name: bytes, oflags: int, mode: int, creds: Credentials, label, dev: int
    ) -> int:
        """CREATE of a labelled file: an fd of it open with ``oflags`` (less what makes a
        file). It is made unnamed (O_TMPFILE, as the caller), labelled, and linked under
        ``name`` (as the caller; EEXIST if taken), so it never has a name without its label.
        Where the file system has no unnamed files, as :meth:`_make_labelled` does."""
        flags = oflags & ~_MAKING_FLAGS
        read_only = flags & os.O_ACCMODE == os.O_RDONLY
        # O_TMPFILE needs write access; a file the guest opens read-only is reopened so.
        tmp_flags = (flags & ~os.O_ACCMODE) | os.O_RDWR if read_only else flags
        try:
            with creds:
                fd = os.open(self._proc(pfd), tmp_flags | os.O_TMPFILE, mode)
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
            path_fd = self._make_labelled(
                pfd,
                name,
                stat.S_IFREG,
                creds,
                lambda d, n: os.mknod(n, stat.S_IFREG | stat.S_IMODE(mode), dir_fd=d),
                label,
                dev,
            )
            try:
                return os.open(self._proc(path_fd), flags)
            finally:
                os.close(path_fd)
        try:
            _set_label(fd, *label)
            with creds:
                os.link(self._proc(fd), name, dst_dir_fd=pfd, follow_symlinks=True)
            if read_only:
                reopened = os.open(self._proc(fd), flags)
                os.close(fd)
                fd = reopened
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rofs()
        _check_name(name)
        with self.inodes.path(self.inodes.get(parent)) as pfd:
            os.unlink(name, dir_fd=pfd)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rofs()
        _check_name(name)
        with self.inodes.path(self.inodes.get(parent)) as pfd:
            os.rmdir(name, dir_fd=pfd)

    def rename(
        self, ctx: Context, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._rofs()
        _check_name(name)
        _check_name(new_name)
        src = self.inodes.get(parent)
        dst = self.inodes.get(new_parent)
        with self.inodes.path(src) as sfd, self.inodes.path(dst) as dfd:
            if flags:
                linux.renameat2(sfd, name, dfd, new_name, flags)
            else:
                os.rename(name, new_name, src_dir_fd=sfd, dst_dir_fd=dfd)

    def link(self, ctx: Context, ino: int, new_parent: int, new_name: bytes) -> Entry:
        self._rofs()
        _check_name(new_name)
        inode = self.inodes.get(ino)
        pinode = self.inodes.get(new_parent)
        with self.inodes.path(inode) as fd, self.inodes.path(pinode) as pfd:
            os.link(self._proc(fd), new_name, dst_dir_fd=pfd, follow_symlinks=True)
        return self._lookup(pinode, new_name)

    # --- files -----------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        """What to open a file with for the guest's ``flags`` (EINVAL for O_TMPFILE, which
        only FUSE_TMPFILE may ask for)."""
        if flags & _O_TMPFILE_BIT:
            raise oserror(errno.EINVAL, "O_TMPFILE only through FUSE_TMPFILE")
        flags &= ~_DROPPED_FLAGS
        want: int = self._conn.want
        if want & _WRITEBACK_CACHE:
            # The guest's page cache may read back pages of a write-only file, and it does
            # O_APPEND itself, at the offsets it sends.
            if flags & _O_ACCMODE == _O_WRONLY:
                flags = (flags & ~_O_ACCMODE) | _O_RDWR
            flags &= ~_O_APPEND
        if not self._allow_direct_io:
            flags &= ~_O_DIRECT
        return flags | _O_CLOEXEC

    def _file_open_flags(self, guest_flags: int) -> int:
        flags = self._file_fopen
        if guest_flags & _O_DIRECT and self._allow_direct_io:
            flags |= abi.FOPEN_DIRECT_IO
        return flags

    def _opened(self, fd: int, inode: Inode, guest_flags: int) -> Opened:
        flags = self._file_open_flags(guest_flags)
        backing_id = 0
        if self._passthrough and self._conn.backing_open is not None:
            try:
                backing_id = self._conn.backing_open(fd)
                flags = (flags & ~abi.FOPEN_DIRECT_IO) | abi.FOPEN_PASSTHROUGH
            except OSError as e:
                log.debug("no passthrough for inode %d: %s", inode.nodeid, e)
        return Opened(
            self._handles.add(_Handle(fd, inode, guest_flags, backing_id)), flags, backing_id
        )

    def open(self, ctx: Context, ino: int, flags: int, kill_suidgid: bool) -> Opened:
        return self._open_inode(self.inodes.get(ino), flags, kill_suidgid)

    def _open_inode(self, inode: Inode, flags: int, kill_suidgid: bool) -> Opened:
        oflags = self._open_flags(flags)
        if self.cfg.readonly and policy.may_write(flags):
            raise oserror(errno.EROFS)
        fd = self.inodes.open(inode, oflags)
        try:
            if flags & _O_TRUNC:
                if kill_suidgid:
                    self._kill_suidgid(fd, False)
                self._drop_capability(inode, fd)
                dax_resized(self._conn.dax_window, inode.nodeid, 0)
            return self._opened(fd, inode, flags)
        except BaseException:
            os.close(fd)
            raise

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
        _check_name(name)
        oflags = self._open_flags(flags) | _CREATE_FLAGS
        label = self._label(ctx)
        pinode = self.inodes.get(parent)
        creds = self._creds(ctx, umask)
        for _ in range(_CREATE_TRIES):
            try:
                with self.inodes.path(pinode) as pfd:
                    if label is not None:
                        fd = self._create_labelled(
                            pfd, name, oflags, mode, creds, label, pinode.dev
                        )
                    else:
                        with creds:
                            fd = _open(name, oflags, mode, dir_fd=pfd)
            except FileExistsError:
                if flags & _O_EXCL:
                    raise
            else:
                return self._created(pinode, fd, flags, kill_suidgid)
            # The name is taken: open what it names as OPEN would (never by the name, which
            # may be a FIFO or a device node, or be swapped for one).
            try:
                inode, entry = self._lookup_inode(pinode, name)
            except FileNotFoundError:
                continue
            try:
                if inode.is_dir():
                    # as open(2) has it for O_CREAT, whatever the access mode
                    raise oserror(errno.EISDIR)
                return entry, self._open_inode(inode, flags, kill_suidgid)
            except BaseException:
                self.inodes.forget(inode.nodeid, 1)
                raise
        raise oserror(errno.ENOENT, "the name keeps coming and going")

    def _created(
        self, pinode: Inode, fd: int, flags: int, kill_suidgid: bool
    ) -> tuple[Entry, Opened]:
        try:
            if kill_suidgid and flags & _O_TRUNC:
                self._kill_suidgid(fd, False)
            inode, entry = self._entry(pinode, _open(self._proc(fd), _O_PATH_CLOEXEC))
        except BaseException:
            _close(fd)
            raise
        return entry, self._opened(fd, inode, flags)

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int
    ) -> tuple[Entry, Opened]:
        self._rofs()
        label = self._label(ctx)
        pinode = self.inodes.get(parent)
        if not pinode.is_dir():
            raise oserror(errno.ENOTDIR)
        oflags = self._open_flags(flags & ~os.O_TMPFILE) | os.O_TMPFILE
        if oflags & os.O_ACCMODE == os.O_RDONLY:
            oflags |= os.O_RDWR
        creds = self._creds(ctx, umask)
        with self.inodes.path(pinode) as pfd, creds:
            # O_TMPFILE opens the directory only to make a new regular file in it.
            fd = os.open(self._proc(pfd), oflags, mode)
        try:
            if label is not None:
                # Unnamed until the guest links it: labelled before anyone can see it.
                _set_label(fd, *label)
            inode, entry = self._entry(pinode, os.open(self._proc(fd), os.O_PATH | os.O_CLOEXEC))
        except BaseException:
            os.close(fd)
            raise
        return entry, self._opened(fd, inode, flags)

    def read(
        self, ctx: Context, ino: int, fh: int, offset: int, size: int, out: ReplyWriter
    ) -> None:
        # The window checks stay inline here and below: a call each costs as much as the
        # rest of a small request's Python work does (no window is the common case).
        handles = self._handles
        h = handles.use(fh)
        try:
            # The handle's file, whatever inode the guest names with it.
            window = self._conn.dax_window
            if window is not None:
                dax_flush(window, h.inode.nodeid)
            if not size:
                # Nothing to read, but the file still says whether it may be read (a handle
                # opened write-only: EBADF), as a read of 0 bytes on the host does. At offset
                # 0: any offset, even past what a file offset holds, reads nothing.
                os.pread(h.fd, 0, 0)
            out.read_from_fd(h.fd, offset, size)
        finally:
            handles.done(h)

    def write(
        self, ctx: Context, ino: int, fh: int, offset: int, data: WriteData, flags: int
    ) -> int:
        if self._readonly:
            raise oserror(errno.EROFS)
        handles = self._handles
        h = handles.use(fh)
        try:
            window = self._conn.dax_window
            if window is not None:
                dax_flush(window, h.inode.nodeid)
            if self._capability is not None:
                self._drop_capability(h.inode, h.fd)
            written = data.to_fd(h.fd, offset)
            if flags & abi.WRITE_KILL_SUIDGID:
                self._kill_suidgid(h.fd, False)
            if window is not None:
                dax_resized(window, h.inode.nodeid, fd=h.fd)
        finally:
            handles.done(h)
        return written

    def flush(self, ctx: Context, ino: int, fh: int, lock_owner: int) -> None:
        h = self._handles.use(fh)
        try:
            window = self._conn.dax_window
            if window is not None:
                dax_flush(window, h.inode.nodeid)
            self._release_locks(h.inode, lock_owner)
            # Closing a duplicate is what close() in the guest means to the host: it flushes
            # what network file systems buffer, and ends POSIX locks held through this file.
            _close(_dup(h.fd))
        finally:
            self._handles.done(h)

    def _release_locks(self, inode: Inode, owner: int) -> None:
        """``owner``'s POSIX locks on ``inode`` dropped, as a close() in the guest drops them.
        Most files never had one: for them nothing is pinned or looked up. A lock the owner
        takes on another queue after this look is one taken after the close, as it may be."""
        if inode.lock_fds or inode.lock_pids or inode.lock_ranges:
            locks.release_owner(self.inodes, inode, owner)

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
        lost = self._handles.lost(fh)
        h = self._handles.remove(fh)
        if h is None:
            if lost:
                return
            raise oserror(errno.EBADF)
        try:
            window = self._conn.dax_window
            if window is not None:
                dax_flush(window, h.inode.nodeid)
            if flush:
                self._release_locks(h.inode, lock_owner)
        finally:
            self._handles.done(h)

    def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        h = self._handles.use(fh)
        try:
            dax_flush(self._conn.dax_window, h.inode.nodeid)
            if datasync:
                os.fdatasync(h.fd)
            else:
                os.fsync(h.fd)
        finally:
            self._handles.done(h)

    def fallocate(
        self, ctx: Context, ino: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        self._rofs()
        h = self._handles.use(fh)
        try:
            linux.fallocate(h.fd, mode, offset, length)
            dax_resized(self._conn.dax_window, h.inode.nodeid, fd=h.fd)
        finally:
            self._handles.done(h)

    def lseek(self, ctx: Context, ino: int, fh: int, offset: int, whence: int) -> int:
        h = self._handles.use(fh)
        try:
            with h.lock:
                return os.lseek(h.fd, offset, whence)
        finally:
            self._handles.done(h)

    def copy_file_range(
        self,
        ctx: Context,
        ino_in: int,
        fh_in: int,
        off_in: int,
        ino_out: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
    ) -> int:
        self._rofs()
        src = self._handles.use(fh_in)
        try:
            dst = self._handles.use(fh_out)
            try:
                dax_flush(self._conn.dax_window, src.inode.nodeid)
                dax_flush(self._conn.dax_window, dst.inode.nodeid)
                copied = os.copy_file_range(src.fd, dst.fd, length, off_in, off_out)
                dax_resized(self._conn.dax_window, dst.inode.nodeid, fd=dst.fd)
            finally:
                self._handles.done(dst)
        finally:
            self._handles.done(src)
        return copied

    # --- directories -----------------------------------------------------------------------

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        inode = self.inodes.get(ino)
        if not inode.is_dir():
            raise oserror(errno.ENOTDIR)
        fd = self.inodes.open(inode, os.O_RDONLY | os.O_DIRECTORY)
        opened = self._handles.add(_Handle(fd, inode, flags | os.O_DIRECTORY))
        return Opened(opened, self._dir_fopen)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, out: DirBuffer) -> None:
        h = self._handles.use(fh)
        try:
            self._readdir(h, offset, out)
        finally:
            self._handles.done(h)

    def _readdir(self, h: _Handle, offset: int, out: DirBuffer) -> None:
        plus = out.plus
        # Once an entry of this reply took a lookup, a failure ends the reply with what it
        # has rather than answering an error, which would throw those lookups away unseen
        # (the kernel could never forget them). The next READDIRPLUS starts where this one
        # stopped and gets the error.
        looked_up = False
        with h.lock:
            os.lseek(h.fd, offset, os.SEEK_SET)
            while True:
                try:
                    found = dir_entries(h.fd)
                except OSError:
                    if looked_up:
                        return
                    raise
                if not found:
                    return
                for d_ino, d_off, dtype, name in found:
                    if not plus:
                        if not out.add(d_ino, d_off, dtype, name):
                            return
                        continue
                    if name == b"." or name == b"..":
                        if not out.add_plus(None, d_off, dtype, name, d_ino):
                            return
                        continue
                    if not out.fits(name):
                        return
                    # Through the open directory itself, which this handle keeps open (no pin
                    # of the inode's own descriptor for each name), failing without an
                    # exception (see open_at).
                    fd = open_at(h.fd, name, _LOOKUP_FLAGS)
                    if fd < 0:
                        # Gone since getdents saw it: leave it out, like a later readdir would.
                        if fd in (_NO_SUCH_NAME, _NOT_A_DIR):
                            continue
                        if looked_up:
                            return
                        raise oserror(-fd)
                    try:
                        entry = self._entry(h.inode, fd)[1]
                    except OSError as e:
                        # As for the open: its fstat can find the name gone too.
                        if e.errno in (errno.ENOENT, errno.ENOTDIR):
                            continue
                        if looked_up:
                            return
                        raise
                    out.add_plus(entry, d_off, dtype, name)
                    looked_up = True

    def releasedir(self, ctx: Context, ino: int, fh: int, flags: int) -> None:
        h = self._handles.remove(fh)
        if h is not None:
            self._handles.done(h)

    def fsyncdir(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        h = self._handles.use(fh)
        try:
            if datasync:
                os.fdatasync(h.fd)
            else:
                os.fsync(h.fd)
        finally:
            self._handles.done(h)

    # --- file system -----------------------------------------------------------------------

    def statfs(self, ctx: Context, ino: int) -> StatVfs:
        with self.inodes.path(self.inodes.get(ino)) as fd:
            return StatVfs.from_os(os.statvfs(self._proc(fd)))

    def syncfs(self, ctx: Context, ino: int) -> None:
        # Through a regular file or directory on the same file system: a FIFO, socket or
        # device node is never opened (and the open of a FIFO would block).
        inode = self.inodes.syncable(self.inodes.get(ino))
        try:
            fd = self.inodes.open(inode, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.EBADF or inode is self.inodes.root:
                raise
            # forgotten meanwhile
            fd = self.inodes.open(self.inodes.root, os.O_RDONLY | os.O_NONBLOCK)
        try:
            linux.syncfs(fd)
        finally:
            os.close(fd)

    def access(self, ctx: Context, ino: int, mask: int) -> None:
        inode = self.inodes.get(ino)
        creds = Credentials(self._caller(ctx), self._switch)
        with self.inodes.path(inode) as fd, creds:
            if not os.access(self._proc(fd), mask, effective_ids=True):
                raise oserror(errno.EACCES)

    # --- extended attributes ---------------------------------------------------------------

    def _xattr_allowed(self, name: bytes | None) -> None:
        if not self.cfg.xattr:
            raise oserror(errno.ENOSYS)
        if name is not None and name in _ACL_XATTRS and not self.cfg.posix_acl:
            raise oserror(errno.EOPNOTSUPP)

    def _host_xattr(self, name: bytes, bad: int) -> bytes:
        """The host's name for the guest's xattr ``name``. ACL names with ACLs off are
        ENOTSUP (checked first, on the guest's name, as virtiofsd does); then the map decides:
        a ``bad`` rule is ``bad`` (EPERM, or ENODATA for getxattr), ``unsupported`` ENOTSUP."""
        self._xattr_allowed(name)
        if self._xmap is None:
            return name
        host = self._xmap.to_host(name)
        if isinstance(host, bytes):
            return host
        raise oserror(bad if host is Kind.BAD else errno.EOPNOTSUPP, f"xattr map: {host.value}")

    def _drop_capability(self, inode: Inode, target: int | str) -> None:
        """Strip the renamed ``security.capability`` from a regular file where the kernel
        would strip the real one: the kernel only knows the real name."""
        name = self._capability
        if name is None or inode.mode != stat.S_IFREG:
            return
        try:
            os.removexattr(target, name)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise

    def setxattr(
        self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int, setxattr_flags: int
    ) -> None:
        host = self._host_xattr(name, errno.EPERM)
        self._rofs()
        inode = self.inodes.get(ino)
        with self.inodes.path(inode) as fd:
            self._drop_capability(inode, self._proc(fd))
            os.setxattr(self._proc(fd), host, value, flags)
            if setxattr_flags & abi.SETXATTR_ACL_KILL_SGID and inode.mode != stat.S_IFLNK:
                mode = os.stat(self._proc(fd)).st_mode
                if mode & stat.S_ISGID:
                    os.chmod(self._proc(fd), stat.S_IMODE(mode) & ~stat.S_ISGID)

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        host = self._host_xattr(name, errno.ENODATA)
        with self.inodes.path(self.inodes.get(ino)) as fd:
            return os.getxattr(self._proc(fd), host)

    def listxattr(self, ctx: Context, ino: int) -> list[bytes]:
        """The names the guest may see, under its names. The server answers a size query
        with this list's exact length (virtiofsd answers with the host list's, unmapped)."""
        self._xattr_allowed(None)
        with self.inodes.path(self.inodes.get(ino)) as fd:
            names = [os.fsencode(n) for n in os.listxattr(self._proc(fd))]
        if self._xmap is not None:
            names = self._xmap.list_to_guest(names)
        if not self.cfg.posix_acl:
            names = [n for n in names if n not in _ACL_XATTRS]
        return names

    def removexattr(self, ctx: Context, ino: int, name: bytes) -> None:
        host = self._host_xattr(name, errno.EPERM)
        self._rofs()
        with self.inodes.path(self.inodes.get(ino)) as fd:
            os.removexattr(self._proc(fd), host)

    # --- locks -----------------------------------------------------------------------------

    def _lock_inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if not inode.openable():
            # A FIFO, socket, device or symlink: nothing to open for its locks.
            raise oserror(errno.ENOLCK)
        return inode

    def _lock_opener(self, inode: Inode):  # type: ignore[no-untyped-def]
        """How to open ``inode``'s lock files: read-only for directories and on a read-only
        share (where a write lock then fails with EBADF, as POSIX has it)."""

        def open_lock_file() -> int:
            if self.cfg.readonly or inode.is_dir():
                return self.inodes.open(inode, os.O_RDONLY)
            try:
                return self.inodes.open(inode, os.O_RDWR)
            except OSError as e:
                if e.errno not in _NOT_WRITABLE:
                    raise
                return self.inodes.open(inode, os.O_RDONLY)

        return open_lock_file

    def getlk(self, ctx: Context, ino: int, fh: int, owner: int, lock: Lock) -> Lock:
        inode = self._lock_inode(ino)
        return locks.getlk(self.inodes, inode, owner, lock, self._lock_opener(inode))

    def setlk(
        self,
        ctx: Context,
        ino: int,
        fh: int,
        owner: int,
        lock: Lock,
        sleep: bool,
        flock: bool,
    ) -> None:
        inode = self._lock_inode(ino)
        if flock:
            h = self._handles.use(fh)
            try:
                if self.pending_flocks:
                    # The guest's own call decides over one a migration brought.
                    with self.inodes.lock_book:
                        self.pending_flocks.pop(fh, None)
                locks.flock(ctx, h.fd, lock, sleep, self._is_stopping)
                op = locks.flock_op(lock.type)
                h.flock = 0 if op == fcntl.LOCK_UN else op
            finally:
                self._handles.done(h)
        else:
            opener = self._lock_opener(inode)
            locks.setlk(ctx, self.inodes, inode, owner, lock, sleep, opener, self._is_stopping)

    def _is_stopping(self) -> bool:
        return self._stopping

    # --- DAX window ------------------------------------------------------------------------

    def dax_fd(self, ino: int, fh: int | None, offset: int, length: int, writable: bool) -> int:
        """An fd of ``ino`` for a DAX mapping: by inode, not by fh, which the guest may have
        released (it then sends fh = FUSE_INVALID_FH).

        A read-only mapping gets a read-only fd whenever a writable mapping of the file would
        be refused (a --readonly share, a file root can't open for writing): whatever the
        front-end does with the fd, the guest can't write through it. Otherwise it gets a
        read-write one, as QEMU 11.1 needs: for a SHMEM_MAP without the RW flag it still mmaps
        the fd PROT_READ|PROT_WRITE and MAP_SHARED (RAM_READONLY_FD without RAM_READONLY),
        which a read-only fd refuses. That grants the guest nothing it could not have asked
        for with the WRITE flag."""
        inode = self.inodes.get(ino)
        if inode.mode != stat.S_IFREG:
            raise oserror(errno.EINVAL, "only regular files are mapped")
        if writable:
            self._rofs()
            return self.inodes.open(inode, os.O_RDWR)
        if self.cfg.readonly:
            return self.inodes.open(inode, os.O_RDONLY)
        try:
            return self.inodes.open(inode, os.O_RDWR)
        except OSError as e:
            if e.errno not in _NOT_WRITABLE:
                raise
            return self.inodes.open(inode, os.O_RDONLY)
