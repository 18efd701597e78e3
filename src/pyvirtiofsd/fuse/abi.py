"""The FUSE kernel ABI (Linux ``include/uapi/linux/fuse.h``, protocol 7.45).

Opcodes, flag words and the wire layouts of every request and reply structure. Everything is
little-endian (the only byte order FUSE is spoken in on the hosts we run on). Nothing here does
I/O: each :class:`Layout` packs values into bytes and unpacks bytes into a named tuple, and its
precompiled :attr:`Layout.struct` serves the hot path, which unpacks into plain tuples.
"""

from __future__ import annotations

import enum
import struct
from collections import namedtuple
from typing import Any, Final

__all__ = [
    "ACCESS_IN",
    "ATTR",
    "ATTR_DAX",
    "ATTR_OUT",
    "ATTR_OUT_HEAD",
    "ATTR_SUBMOUNT",
    "BACKING_MAP",
    "BATCH_FORGET_IN",
    "BMAP_IN",
    "BMAP_OUT",
    "COMPAT_22_INIT_OUT_SIZE",
    "COMPAT_ATTR_OUT_SIZE",
    "COMPAT_ENTRY_OUT_SIZE",
    "COMPAT_INIT_OUT_SIZE",
    "COMPAT_MKNOD_IN_SIZE",
    "COMPAT_SETXATTR_IN_SIZE",
    "COMPAT_STATFS_SIZE",
    "COMPAT_WRITE_IN_SIZE",
    "COPY_FILE_RANGE_IN",
    "COPY_FILE_RANGE_OUT",
    "CREATE_IN",
    "DEV_IOC_BACKING_CLOSE",
    "DEV_IOC_BACKING_OPEN",
    "DIRENT",
    "DIRENTPLUS",
    "ENTRY_OUT",
    "ENTRY_OUT_HEAD",
    "EXT_GROUPS",
    "EXT_HEADER",
    "EXT_MAX_NR_SECCTX",
    "FALLOCATE_IN",
    "FATTR_ATIME",
    "FATTR_ATIME_NOW",
    "FATTR_CTIME",
    "FATTR_FH",
    "FATTR_GID",
    "FATTR_KILL_SUIDGID",
    "FATTR_LOCKOWNER",
    "FATTR_MODE",
    "FATTR_MTIME",
    "FATTR_MTIME_NOW",
    "FATTR_SIZE",
    "FATTR_UID",
    "FILE_LOCK",
    "FLUSH_IN",
    "FOPEN_CACHE_DIR",
    "FOPEN_DIRECT_IO",
    "FOPEN_KEEP_CACHE",
    "FOPEN_NOFLUSH",
    "FOPEN_NONSEEKABLE",
    "FOPEN_PARALLEL_DIRECT_WRITES",
    "FOPEN_PASSTHROUGH",
    "FOPEN_STREAM",
    "FORGET_IN",
    "FORGET_ONE",
    "FSYNC_FDATASYNC",
    "FSYNC_IN",
    "GETATTR_FH",
    "GETATTR_IN",
    "GETXATTR_IN",
    "GETXATTR_OUT",
    "INIT_IN",
    "INIT_OUT",
    "INTERRUPT_IN",
    "INVALID_FH",
    "IN_HEADER",
    "IOCTL_IN",
    "IOCTL_IOVEC",
    "IOCTL_OUT",
    "KERNEL_MINOR_VERSION",
    "KERNEL_VERSION",
    "KSTATFS",
    "LAYOUTS",
    "LINK_IN",
    "LK_FLOCK",
    "LK_IN",
    "LK_OUT",
    "LSEEK_IN",
    "LSEEK_OUT",
    "MIN_KERNEL_MINOR_VERSION",
    "MKDIR_IN",
    "MKNOD_IN",
    "NOTIFY_DELETE_OUT",
    "NOTIFY_INVAL_ENTRY_OUT",
    "NOTIFY_INVAL_INODE_OUT",
    "NOTIFY_POLL_WAKEUP_OUT",
    "NOTIFY_RETRIEVE_IN",
    "NOTIFY_RETRIEVE_OUT",
    "NOTIFY_STORE_OUT",
    "OPEN_IN",
    "OPEN_KILL_SUIDGID",
    "OPEN_OUT",
    "OUT_HEADER",
    "PAGE_SIZE",
    "POLL_IN",
    "POLL_OUT",
    "READ_IN",
    "READ_LOCKOWNER",
    "RELEASE_FLOCK_UNLOCK",
    "RELEASE_FLUSH",
    "RELEASE_IN",
    "REMOVEMAPPING_IN",
    "REMOVEMAPPING_ONE",
    "RENAME2_IN",
    "RENAME_IN",
    "ROOT_ID",
    "SECCTX",
    "SECCTX_HEADER",
    "SETATTR_IN",
    "SETUPMAPPING_FLAG_READ",
    "SETUPMAPPING_FLAG_WRITE",
    "SETUPMAPPING_IN",
    "SETXATTR_ACL_KILL_SGID",
    "SETXATTR_IN",
    "STATFS_OUT",
    "STATX",
    "STATX_IN",
    "STATX_OUT",
    "SUPP_GROUPS",
    "SX_TIME",
    "SYNCFS_IN",
    "UNIQUE_RESEND",
    "WRITE_CACHE",
    "WRITE_IN",
    "WRITE_KILL_SUIDGID",
    "WRITE_LOCKOWNER",
    "WRITE_OUT",
    "InitFlag",
    "Layout",
    "NotifyCode",
    "Opcode",
    "dirent_size",
    "direntplus_size",
]

KERNEL_VERSION: Final = 7
#: The minor version this server speaks; a kernel speaking less is answered with its own minor.
KERNEL_MINOR_VERSION: Final = 45
#: Oldest minor accepted: 7.27 is what virtiofsd requires too (fuse_attr, init_out as today).
MIN_KERNEL_MINOR_VERSION: Final = 27
ROOT_ID: Final = 1
#: ``fh`` the guest sends in SETUPMAPPING once the file was released (mapping by inode).
INVALID_FH: Final = 0xFFFF_FFFF_FFFF_FFFF
#: Bit set in ``unique`` of a request that the kernel resends after a daemon restart.
UNIQUE_RESEND: Final = 1 << 63


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53
    CUSE_INIT = 4096
    CUSE_INIT_BSWAP_RESERVED = 1048576
    FUSE_INIT_BSWAP_RESERVED = 436207616


class NotifyCode(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


class InitFlag(enum.IntFlag):
    """INIT flags; bits 32..63 travel in ``flags2`` when INIT_EXT is set."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


# fuse_setattr_in.valid
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6
FATTR_ATIME_NOW: Final = 1 << 7
FATTR_MTIME_NOW: Final = 1 << 8
FATTR_LOCKOWNER: Final = 1 << 9
FATTR_CTIME: Final = 1 << 10
FATTR_KILL_SUIDGID: Final = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_NONSEEKABLE: Final = 1 << 2
FOPEN_CACHE_DIR: Final = 1 << 3
FOPEN_STREAM: Final = 1 << 4
FOPEN_NOFLUSH: Final = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES: Final = 1 << 6
FOPEN_PASSTHROUGH: Final = 1 << 7

# fuse_open_in.open_flags / fuse_create_in.open_flags
OPEN_KILL_SUIDGID: Final = 1 << 0

# fuse_release_in.release_flags
RELEASE_FLUSH: Final = 1 << 0
RELEASE_FLOCK_UNLOCK: Final = 1 << 1

# fuse_getattr_in.getattr_flags
GETATTR_FH: Final = 1 << 0

# fuse_lk_in.lk_flags
LK_FLOCK: Final = 1 << 0

# fuse_write_in.write_flags
WRITE_CACHE: Final = 1 << 0
WRITE_LOCKOWNER: Final = 1 << 1
WRITE_KILL_SUIDGID: Final = 1 << 2

# fuse_read_in.read_flags
READ_LOCKOWNER: Final = 1 << 1

# fuse_fsync_in.fsync_flags
FSYNC_FDATASYNC: Final = 1 << 0

# fuse_attr.flags
ATTR_SUBMOUNT: Final = 1 << 0
ATTR_DAX: Final = 1 << 1

# fuse_setxattr_in.setxattr_flags
SETXATTR_ACL_KILL_SGID: Final = 1 << 0

# fuse_setupmapping_in.flags
SETUPMAPPING_FLAG_WRITE: Final = 1 << 0
SETUPMAPPING_FLAG_READ: Final = 1 << 1

# fuse_ext_header.type (0..31 are security-context counts)
EXT_MAX_NR_SECCTX: Final = 31
EXT_GROUPS: Final = 32

#: ioctl on /dev/fuse registering a backing file for FUSE_PASSTHROUGH (_IOW(229, 1, 16 bytes)).
DEV_IOC_BACKING_OPEN: Final = 0x4010E501
#: ioctl on /dev/fuse dropping a backing id (_IOW(229, 2, u32)).
DEV_IOC_BACKING_CLOSE: Final = 0x4004E502

# Replies shorter than today's structures, for kernels speaking older minors.
COMPAT_ENTRY_OUT_SIZE: Final = 120
COMPAT_ATTR_OUT_SIZE: Final = 96
COMPAT_MKNOD_IN_SIZE: Final = 8
COMPAT_WRITE_IN_SIZE: Final = 24
COMPAT_STATFS_SIZE: Final = 48
COMPAT_SETXATTR_IN_SIZE: Final = 8
COMPAT_INIT_OUT_SIZE: Final = 8
COMPAT_22_INIT_OUT_SIZE: Final = 24

_CODES = {"u8": "B", "u16": "H", "u32": "I", "i32": "i", "u64": "Q", "i64": "q"}


class Layout:
    """One C structure: its field names, its byte size, a pack and an unpack.

    Fields are given as ``"u32 major, u32 minor, ..."``; an array is ``"u32 unused[11]"`` and
    unpacks into a tuple under one name.
    """

    def __init__(self, name: str, fields: str) -> None:
        self.name = name
        fmt = "<"
        names: list[str] = []
        self._arrays: dict[str, int] = {}
        for field in fields.split(","):
            ctype, fname = field.split()
            count = 1
            if "[" in fname:
                fname, _, rest = fname.partition("[")
                count = int(rest.rstrip("]"))
                self._arrays[fname] = count
            fmt += f"{count}{_CODES[ctype]}" if count > 1 else _CODES[ctype]
            names.append(fname)
        self.fields: tuple[str, ...] = tuple(names)
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size
        self.tuple: Any = namedtuple(name, names)  # type: ignore[misc]

    def _flat(self, values: tuple[Any, ...]) -> list[Any]:
        flat: list[Any] = []
        for fname, value in zip(self.fields, values, strict=True):
            if fname in self._arrays:
                flat.extend(value)
            else:
                flat.append(value)
        return flat

    def pack(self, *args: Any, **kwargs: Any) -> bytes:
        """Pack by position or by name; unnamed fields are zero."""
        if args:
            values: tuple[Any, ...] = args
        else:
            values = tuple(
                kwargs.pop(f, (0,) * self._arrays[f] if f in self._arrays else 0)
                for f in self.fields
            )
            if kwargs:
                raise TypeError(f"{self.name}: unknown fields {sorted(kwargs)}")
        return self.struct.pack(*self._flat(values))

    def unpack(self, buf: Any, offset: int = 0) -> Any:
        raw = self.struct.unpack_from(buf, offset)
        if not self._arrays:
            return self.tuple._make(raw)
        out: list[Any] = []
        i = 0
        for fname in self.fields:
            n = self._arrays.get(fname)
            if n is None:
                out.append(raw[i])
                i += 1
            else:
                out.append(tuple(raw[i : i + n]))
                i += n
        return self.tuple._make(out)

    def __repr__(self) -> str:
        return f"<Layout {self.name} {self.size} bytes>"


_ATTR_FIELDS = (
    "u64 ino, u64 size, u64 blocks, u64 atime, u64 mtime, u64 ctime, u32 atimensec,"
    " u32 mtimensec, u32 ctimensec, u32 mode, u32 nlink, u32 uid, u32 gid, u32 rdev,"
    " u32 blksize, u32 flags"
)
_ENTRY_FIELDS = (
    "u64 nodeid, u64 generation, u64 entry_valid, u64 attr_valid, u32 entry_valid_nsec,"
    " u32 attr_valid_nsec, " + _ATTR_FIELDS
)
_SX_TIME = "i64 {0}_sec, u32 {0}_nsec, i32 {0}_reserved"
_STATX_FIELDS = (
    "u32 mask, u32 blksize, u64 attributes, u32 nlink, u32 uid, u32 gid, u16 mode,"
    " u16 spare0, u64 ino, u64 size, u64 blocks, u64 attributes_mask, "
    + ", ".join(_SX_TIME.format(t) for t in ("atime", "btime", "ctime", "mtime"))
    + ", u32 rdev_major, u32 rdev_minor, u32 dev_major, u32 dev_minor, u64 spare2[14]"
)

IN_HEADER: Final = Layout(
    "InHeader",
    "u32 len, u32 opcode, u64 unique, u64 nodeid, u32 uid, u32 gid, u32 pid,"
    " u16 total_extlen, u16 padding",
)
OUT_HEADER: Final = Layout("OutHeader", "u32 len, i32 error, u64 unique")
ATTR: Final = Layout("Attr", _ATTR_FIELDS)
KSTATFS: Final = Layout(
    "Kstatfs",
    "u64 blocks, u64 bfree, u64 bavail, u64 files, u64 ffree, u32 bsize, u32 namelen,"
    " u32 frsize, u32 padding, u32 spare[6]",
)
FILE_LOCK: Final = Layout("FileLock", "u64 start, u64 end, u32 type, u32 pid")
ENTRY_OUT: Final = Layout("EntryOut", _ENTRY_FIELDS)
FORGET_IN: Final = Layout("ForgetIn", "u64 nlookup")
FORGET_ONE: Final = Layout("ForgetOne", "u64 nodeid, u64 nlookup")
BATCH_FORGET_IN: Final = Layout("BatchForgetIn", "u32 count, u32 dummy")
GETATTR_IN: Final = Layout("GetattrIn", "u32 getattr_flags, u32 dummy, u64 fh")
_ATTR_OUT_HEAD_FIELDS = "u64 attr_valid, u32 attr_valid_nsec, u32 dummy"
ATTR_OUT: Final = Layout("AttrOut", _ATTR_OUT_HEAD_FIELDS + ", " + _ATTR_FIELDS)
#: The parts of fuse_attr_out and fuse_entry_out before their fuse_attr (replies pack these,
#: then copy the attributes as they are: see :class:`pyvirtiofsd.fuse.records.Attr`).
ATTR_OUT_HEAD: Final = Layout("AttrOutHead", _ATTR_OUT_HEAD_FIELDS)
ENTRY_OUT_HEAD: Final = Layout("EntryOutHead", _ENTRY_FIELDS[: -len(_ATTR_FIELDS) - 2])
SX_TIME: Final = Layout("SxTime", "i64 tv_sec, u32 tv_nsec, i32 reserved")
STATX: Final = Layout("Statx", _STATX_FIELDS)
STATX_IN: Final = Layout(
    "StatxIn", "u32 getattr_flags, u32 reserved, u64 fh, u32 sx_flags, u32 sx_mask"
)
STATX_OUT: Final = Layout(
    "StatxOut", "u64 attr_valid, u32 attr_valid_nsec, u32 flags, u64 spare[2], " + _STATX_FIELDS
)
MKNOD_IN: Final = Layout("MknodIn", "u32 mode, u32 rdev, u32 umask, u32 padding")
MKDIR_IN: Final = Layout("MkdirIn", "u32 mode, u32 umask")
RENAME_IN: Final = Layout("RenameIn", "u64 newdir")
RENAME2_IN: Final = Layout("Rename2In", "u64 newdir, u32 flags, u32 padding")
LINK_IN: Final = Layout("LinkIn", "u64 oldnodeid")
SETATTR_IN: Final = Layout(
    "SetattrIn",
    "u32 valid, u32 padding, u64 fh, u64 size, u64 lock_owner, u64 atime, u64 mtime, u64 ctime,"
    " u32 atimensec, u32 mtimensec, u32 ctimensec, u32 mode, u32 unused4, u32 uid, u32 gid,"
    " u32 unused5",
)
OPEN_IN: Final = Layout("OpenIn", "u32 flags, u32 open_flags")
CREATE_IN: Final = Layout("CreateIn", "u32 flags, u32 mode, u32 umask, u32 open_flags")
OPEN_OUT: Final = Layout("OpenOut", "u64 fh, u32 open_flags, i32 backing_id")
RELEASE_IN: Final = Layout("ReleaseIn", "u64 fh, u32 flags, u32 release_flags, u64 lock_owner")
FLUSH_IN: Final = Layout("FlushIn", "u64 fh, u32 unused, u32 padding, u64 lock_owner")
READ_IN: Final = Layout(
    "ReadIn",
    "u64 fh, u64 offset, u32 size, u32 read_flags, u64 lock_owner, u32 flags, u32 padding",
)
WRITE_IN: Final = Layout(
    "WriteIn",
    "u64 fh, u64 offset, u32 size, u32 write_flags, u64 lock_owner, u32 flags, u32 padding",
)
WRITE_OUT: Final = Layout("WriteOut", "u32 size, u32 padding")
STATFS_OUT: Final = KSTATFS
FSYNC_IN: Final = Layout("FsyncIn", "u64 fh, u32 fsync_flags, u32 padding")
SETXATTR_IN: Final = Layout("SetxattrIn", "u32 size, u32 flags, u32 setxattr_flags, u32 padding")
GETXATTR_IN: Final = Layout("GetxattrIn", "u32 size, u32 padding")
GETXATTR_OUT: Final = Layout("GetxattrOut", "u32 size, u32 padding")
LK_IN: Final = Layout(
    "LkIn",
    "u64 fh, u64 owner, u64 start, u64 end, u32 type, u32 pid, u32 lk_flags, u32 padding",
)
LK_OUT: Final = Layout("LkOut", "u64 start, u64 end, u32 type, u32 pid")
ACCESS_IN: Final = Layout("AccessIn", "u32 mask, u32 padding")
INIT_IN: Final = Layout(
    "InitIn", "u32 major, u32 minor, u32 max_readahead, u32 flags, u32 flags2, u32 unused[11]"
)
INIT_OUT: Final = Layout(
    "InitOut",
    "u32 major, u32 minor, u32 max_readahead, u32 flags, u16 max_background,"
    " u16 congestion_threshold, u32 max_write, u32 time_gran, u16 max_pages,"
    " u16 map_alignment, u32 flags2, u32 max_stack_depth, u16 request_timeout, u16 unused[11]",
)
INTERRUPT_IN: Final = Layout("InterruptIn", "u64 unique")
BMAP_IN: Final = Layout("BmapIn", "u64 block, u32 blocksize, u32 padding")
BMAP_OUT: Final = Layout("BmapOut", "u64 block")
IOCTL_IN: Final = Layout(
    "IoctlIn", "u64 fh, u32 flags, u32 cmd, u64 arg, u32 in_size, u32 out_size"
)
IOCTL_IOVEC: Final = Layout("IoctlIovec", "u64 base, u64 len")
IOCTL_OUT: Final = Layout("IoctlOut", "i32 result, u32 flags, u32 in_iovs, u32 out_iovs")
POLL_IN: Final = Layout("PollIn", "u64 fh, u64 kh, u32 flags, u32 events")
POLL_OUT: Final = Layout("PollOut", "u32 revents, u32 padding")
NOTIFY_POLL_WAKEUP_OUT: Final = Layout("NotifyPollWakeupOut", "u64 kh")
FALLOCATE_IN: Final = Layout("FallocateIn", "u64 fh, u64 offset, u64 length, u32 mode, u32 padding")
DIRENT: Final = Layout("Dirent", "u64 ino, u64 off, u32 namelen, u32 type")
DIRENTPLUS: Final = Layout(
    "Direntplus", _ENTRY_FIELDS + ", u64 d_ino, u64 d_off, u32 d_namelen, u32 d_type"
)
NOTIFY_INVAL_INODE_OUT: Final = Layout("NotifyInvalInodeOut", "u64 ino, i64 off, i64 len")
NOTIFY_INVAL_ENTRY_OUT: Final = Layout("NotifyInvalEntryOut", "u64 parent, u32 namelen, u32 flags")
NOTIFY_DELETE_OUT: Final = Layout(
    "NotifyDeleteOut", "u64 parent, u64 child, u32 namelen, u32 padding"
)
NOTIFY_STORE_OUT: Final = Layout("NotifyStoreOut", "u64 nodeid, u64 offset, u32 size, u32 padding")
NOTIFY_RETRIEVE_OUT: Final = Layout(
    "NotifyRetrieveOut", "u64 notify_unique, u64 nodeid, u64 offset, u32 size, u32 padding"
)
NOTIFY_RETRIEVE_IN: Final = Layout(
    "NotifyRetrieveIn",
    "u64 dummy1, u64 offset, u32 size, u32 dummy2, u64 dummy3, u64 dummy4",
)
LSEEK_IN: Final = Layout("LseekIn", "u64 fh, i64 offset, u32 whence, u32 padding")
LSEEK_OUT: Final = Layout("LseekOut", "i64 offset")
COPY_FILE_RANGE_IN: Final = Layout(
    "CopyFileRangeIn",
    "u64 fh_in, i64 off_in, u64 nodeid_out, u64 fh_out, i64 off_out, u64 len, u64 flags",
)
COPY_FILE_RANGE_OUT: Final = Layout("CopyFileRangeOut", "u64 bytes_copied")
SETUPMAPPING_IN: Final = Layout(
    "SetupmappingIn", "u64 fh, u64 foffset, u64 len, u64 flags, u64 moffset"
)
REMOVEMAPPING_IN: Final = Layout("RemovemappingIn", "u32 count")
REMOVEMAPPING_ONE: Final = Layout("RemovemappingOne", "u64 moffset, u64 len")
SYNCFS_IN: Final = Layout("SyncfsIn", "u64 padding")
SECCTX: Final = Layout("Secctx", "u32 size, u32 padding")
SECCTX_HEADER: Final = Layout("SecctxHeader", "u32 size, u32 nr_secctx")
EXT_HEADER: Final = Layout("ExtHeader", "u32 size, u32 type")
SUPP_GROUPS: Final = Layout("SuppGroups", "u32 nr_groups")
BACKING_MAP: Final = Layout("BackingMap", "i32 fd, u32 flags, u64 padding")

#: Every layout above, for tests and documentation.
LAYOUTS: tuple[Layout, ...] = tuple(v for v in globals().values() if isinstance(v, Layout))

#: Page size the kernel's FUSE client assumes on the hosts we serve (x86-64, arm64 4K pages).
PAGE_SIZE: Final = 4096


def dirent_size(namelen: int) -> int:
    """Bytes one fuse_dirent takes with its name, padded to 8 bytes."""
    return (DIRENT.size + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    return (DIRENTPLUS.size + namelen + 7) & ~7
