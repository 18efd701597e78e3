"""The FUSE policy every storage backend applies: cache modes and what they tell the kernel.

A cache mode (virtiofsd's ``--cache``) decides three things the guest's kernel is told: how long
it may trust an entry or attributes (:attr:`CachePolicy.timeout`), which ``FOPEN_*`` flags
files and directories get at open time (:func:`file_open_flags`, :func:`dir_open_flags`), and
whether READDIRPLUS is worth offering (:func:`readdirplus_allowed`). Open requests are judged by
the same rules in every backend (:func:`may_write`).

Rules: this module is pure policy (tables and small functions of their arguments); it does no
I/O and knows no backend, transport or command line. A backend takes its mode from its own
config and asks here, so that the same ``--cache`` means the same thing whatever is served.
"""

from __future__ import annotations

import enum
import os

from pyvirtiofsd.fuse import abi

__all__ = [
    "DIR_OPEN_FLAGS",
    "FILE_OPEN_FLAGS",
    "TIMEOUTS",
    "CachePolicy",
    "dir_open_flags",
    "file_open_flags",
    "may_write",
    "readdirplus_allowed",
]


class CachePolicy(enum.Enum):
    NEVER = "never"
    AUTO = "auto"
    ALWAYS = "always"
    METADATA = "metadata"

    @classmethod
    def parse(cls, value: str) -> CachePolicy:
        # virtiofsd's old "-o cache=none" spelling is still what libvirt emits.
        return cls("never" if value == "none" else value)

    @property
    def timeout(self) -> float:
        """Seconds the kernel may keep an entry or attributes without asking again."""
        return TIMEOUTS[self]


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


def file_open_flags(cache: CachePolicy) -> int:
    """The FOPEN_* flags a regular file gets when opened under ``cache``."""
    return FILE_OPEN_FLAGS[cache]


def dir_open_flags(cache: CachePolicy) -> int:
    """The FOPEN_* flags a directory gets when opened under ``cache``."""
    return DIR_OPEN_FLAGS[cache]


def readdirplus_allowed(cache: CachePolicy, readdirplus: bool) -> bool:
    """Whether to offer READDIRPLUS: not when switched off, nor with ``cache=never``, where
    the entries it hands out would expire at once and only cost the lookups they replace."""
    return readdirplus and cache is not CachePolicy.NEVER


#: Open flags asking for write access.
_WRITE_ACCESS = os.O_WRONLY | os.O_RDWR


def may_write(flags: int) -> bool:
    """Whether an open with ``flags`` may change the file (write access, or truncation): what
    a read-only share refuses with EROFS."""
    return bool(flags & _WRITE_ACCESS or flags & os.O_TRUNC)
