"""Options of the passthrough file system.

Rules: :class:`PassthroughConfig` is complete (everything the file system needs to start is in
it) and frozen (a changed share path, as the sandbox makes, is a new config); it is filled from
the command line by field name, so a field is named after its option. The cache modes and the
FOPEN flags they select are shared with every backend: :mod:`pyvirtiofsd.fuse.policy`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyvirtiofsd.fuse.policy import CachePolicy

__all__ = [
    "FileHandles",
    "MigrationMode",
    "MigrationOnError",
    "PassthroughConfig",
]


class FileHandles(enum.Enum):
    """How inodes are referenced: by an O_PATH fd each, or by a file handle."""

    NEVER = "never"
    PREFER = "prefer"
    MANDATORY = "mandatory"

    @classmethod
    def parse(cls, value: str) -> FileHandles:
        # virtiofsd's "fallback" is what "prefer" became.
        return cls("prefer" if value == "fallback" else value)


class MigrationMode(enum.Enum):
    """How a migration source tells the destination which file each inode is (virtiofsd's
    ``--migration-mode``): by its path in the share, or by its file handle."""

    FIND_PATHS = "find-paths"
    FILE_HANDLES = "file-handles"


class MigrationOnError(enum.Enum):
    """What a migration destination does with an inode it cannot find (virtiofsd's
    ``--migration-on-error``): refuse the migration, or let the guest get EIO for it."""

    ABORT = "abort"
    GUEST_ERROR = "guest-error"


@dataclass(frozen=True)
class PassthroughConfig:
    shared_dir: str
    cache: CachePolicy = CachePolicy.AUTO
    writeback: bool = False
    readonly: bool = False
    #: Extended attributes (always on with ``posix_acl``).
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
    #: Live migration, as a source: identify inodes by path or by file handle; attach file
    #: handles to paths for the destination to check (find-paths only); the paths are taken
    #: while the guest is stopped, so "confirm paths" holds anyway (accepted, no more to do).
    migration_mode: MigrationMode = MigrationMode.FIND_PATHS
    migration_verify_handles: bool = False
    migration_confirm_paths: bool = False
    #: Live migration, as a destination: what to do with an inode that can't be found.
    migration_on_error: MigrationOnError = MigrationOnError.ABORT

    def __post_init__(self) -> None:
        if self.posix_acl and not self.xattr:
            # ACLs are xattrs: asking for them asks for xattrs (frozen, hence the detour).
            object.__setattr__(self, "xattr", True)

    @property
    def timeout(self) -> float:
        return self.cache.timeout
