"""Run a file operation as the caller: its uid, gid and supplementary groups, on this thread.

File-system uid/gid (setfsuid/setfsgid) and the group list are per thread in Linux, so each
worker thread can act for a different caller at once. While the fsuid is not 0 the kernel also
drops the file capabilities of root (DAC override, fowner, fsetid, ...), so ownership of new files
and every permission check are the host kernel's, as for a local process.
"""

from __future__ import annotations

import os
import threading

from ... import linux
from ...fuse.filesystem import Context

_local = threading.local()


def _thread_fs_unshared() -> None:
    """Give this thread its own umask (shared by all threads of a process otherwise)."""
    if not getattr(_local, "fs_unshared", False):
        linux.unshare(linux.CLONE_FS)
        _local.fs_unshared = True


class Credentials:
    """``with Credentials(ctx, enabled, umask):`` switches and restores the thread's ids."""

    __slots__ = ("_ctx", "_switch", "_umask")

    def __init__(self, ctx: Context, enabled: bool, umask: int | None = None) -> None:
        self._ctx = ctx
        self._switch = enabled and (ctx.uid != 0 or ctx.gid != 0 or bool(ctx.groups))
        self._umask = umask

    def __enter__(self) -> None:
        if self._umask is not None:
            _thread_fs_unshared()
            os.umask(self._umask)
        if self._switch:
            ctx = self._ctx
            linux.setfsgid(ctx.gid)
            linux.thread_setgroups(ctx.groups)
            linux.setfsuid(ctx.uid)

    def __exit__(self, *exc: object) -> None:
        if self._switch:
            linux.setfsuid(0)
            linux.setfsgid(0)
            linux.thread_setgroups(_ROOT_GROUPS)
        if self._umask is not None:
            os.umask(0)


_ROOT_GROUPS: tuple[int, ...] = tuple(os.getgroups())


def can_switch() -> bool:
    """Only root can become the caller."""
    return os.geteuid() == 0
