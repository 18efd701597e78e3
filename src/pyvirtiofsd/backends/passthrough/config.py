"""Options of the passthrough file system.

Rules: :class:`PassthroughConfig` is complete (everything the file system needs to start is in
it) and frozen (a changed share path, as the sandbox makes, is a new config); it is filled from
the command line by field name, so a field is named after its option. The cache modes and the
FOPEN flags they select are shared with every backend: :mod:`pyvirtiofsd.fuse.policy`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyvirtiofsd.backends.passthrough.idmap import IdMap, IdRule
from pyvirtiofsd.backends.passthrough.xattrmap import XattrMap
from pyvirtiofsd.fuse.policy import CachePolicy

__all__ = [
    "FileHandles",
    "PassthroughConfig",
    "SecurityLabel",
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


class SecurityLabel(enum.Enum):
    """Whether to take the security context the guest sends with each new file
    (FUSE_SECURITY_CTX): never, when the guest offers it, or always (INIT fails without it)."""

    NEVER = "never"
    AUTO = "auto"
    ALWAYS = "always"

    @classmethod
    def parse(cls, value: str | bool) -> SecurityLabel:
        # virtiofsd's -o security_label / no_security_label are switches.
        if isinstance(value, bool):
            return cls.ALWAYS if value else cls.NEVER
        return cls(value)


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
    #: ``--translate-uid``/``--translate-gid`` rules: guest ids to host ids and back, inside
    #: the daemon (:mod:`.idmap`). A set that collides is refused here.
    translate_uid: tuple[IdRule, ...] = ()
    translate_gid: tuple[IdRule, ...] = ()
    #: virtiofsd's --xattrmap: how xattr names are renamed, passed, hidden or refused between
    #: guest and host (None: all pass unchanged).
    xattrmap: XattrMap | None = None
    #: Label each new file with the security context the guest sends (--security-label).
    security_label: SecurityLabel = SecurityLabel.NEVER

    def __post_init__(self) -> None:
        wants_xattrs = (
            self.posix_acl
            or self.xattrmap is not None
            or self.security_label is not SecurityLabel.NEVER
        )
        if wants_xattrs and not self.xattr:
            # ACLs, a map and labels are all xattrs: asking for them asks for xattrs (as with
            # virtiofsd). Frozen, hence the detour.
            object.__setattr__(self, "xattr", True)
        if self.posix_acl and (self.translate_uid or self.translate_gid):
            # An ACL names ids in its xattr's value, which no translation reaches: a guest's
            # ACL entry for its user 1000 would grant host user 1000.
            raise ValueError(
                "--translate-uid/--translate-gid and --posix-acl exclude each other: "
                "the ids inside ACLs are not translated"
            )
        IdMap("uid", self.translate_uid)
        IdMap("gid", self.translate_gid)

    @property
    def timeout(self) -> float:
        return self.cache.timeout
