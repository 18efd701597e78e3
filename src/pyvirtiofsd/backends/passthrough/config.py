"""Options of the passthrough file system, and the cache policy table they select."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ...fuse import abi


class CachePolicy(enum.Enum):
    NEVER = "never"
    AUTO = "auto"
    ALWAYS = "always"
    METADATA = "metadata"

    @classmethod
    def parse(cls, value: str) -> CachePolicy:
        # virtiofsd's old "-o cache=none" spelling is still what libvirt emits.
        return cls("never" if value == "none" else value)


#: Entry/attribute timeouts in seconds, as virtiofsd has them.
TIMEOUTS = {
    CachePolicy.NEVER: 0.0,
    CachePolicy.AUTO: 1.0,
    CachePolicy.ALWAYS: 86400.0,
    CachePolicy.METADATA: 86400.0,
}

#: FOPEN_* flags given to regular files and to directories at open time.
FILE_OPEN_FLAGS = {
    CachePolicy.NEVER: abi.FOPEN_DIRECT_IO,
    CachePolicy.AUTO: 0,
    CachePolicy.ALWAYS: abi.FOPEN_KEEP_CACHE,
    CachePolicy.METADATA: abi.FOPEN_DIRECT_IO,
}
DIR_OPEN_FLAGS = {
    CachePolicy.NEVER: 0,
    CachePolicy.AUTO: 0,
    CachePolicy.ALWAYS: abi.FOPEN_CACHE_DIR,
    CachePolicy.METADATA: abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE,
}


class FileHandles(enum.Enum):
    """How inodes are referenced: by an O_PATH fd each, or by a file handle."""

    NEVER = "never"
    PREFER = "prefer"
    MANDATORY = "mandatory"


@dataclass
class PassthroughConfig:
    shared_dir: str
    cache: CachePolicy = CachePolicy.AUTO
    writeback: bool = False
    readonly: bool = False
    xattr: bool = False
    posix_acl: bool = False
    readdirplus: bool = True
    announce_submounts: bool = True
    killpriv_v2: bool = False
    allow_direct_io: bool = False
    allow_mmap: bool = False
    inode_file_handles: FileHandles = FileHandles.NEVER
    #: Serve file data through the kernel's FUSE_PASSTHROUGH (/dev/fuse only).
    fuse_passthrough: bool = False
    #: Switch to the caller's uid/gid/groups for operations that create files.
    switch_credentials: bool = True
    #: ``dax=inode``: files at least this large get FUSE_ATTR_DAX (None: no per-inode DAX).
    dax_file_size: int | None = None
    #: Let MKNOD make character and block devices. Off, it answers EPERM: made as root in the
    #: share, a device node is a host device that any host user who can reach the share
    #: could open. (The daemon itself never opens one either way.)
    allow_devices: bool = False

    def __post_init__(self) -> None:
        if self.posix_acl:
            self.xattr = True

    @property
    def timeout(self) -> float:
        return TIMEOUTS[self.cache]
