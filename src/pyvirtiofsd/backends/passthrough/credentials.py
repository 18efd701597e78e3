"""Run a file operation as the caller: its uid, gid and supplementary groups, on this thread.

File-system uid/gid (setfsuid/setfsgid) and the group list are per thread in Linux, so each
worker thread can act for a different caller at once. While the fsuid is not 0 the kernel also
drops the file capabilities of root (DAC override, fowner, fsetid, ...), so ownership of new files
and every permission check are the host kernel's, as for a local process.

A switch that does not take must never leave the thread acting as the daemon: setfsuid and
setfsgid ignore an id the kernel cannot take without failing, so such ids are refused (EPERM)
before the switch, or the switch is checked after it. (uid_t)-1 is never an id; in a user
namespace that maps only some ids, an unmapped one isn't either.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from typing import Final

from pyvirtiofsd import linux
from pyvirtiofsd.fuse.filesystem import Context

__all__ = [
    "Credentials",
    "can_switch",
]

_local = threading.local()
#: (uid_t)-1, which chown and setfsuid read as "leave it alone".
_NO_ID: Final = 0xFFFFFFFF


def _thread_fs_unshared() -> None:
    """Give this thread its own umask (shared by all threads of a process otherwise)."""
    if not getattr(_local, "fs_unshared", False):
        linux.unshare(linux.CLONE_FS)
        _local.fs_unshared = True


class _Process:
    """What the switch depends on, read at the first request, once the daemon has settled (a
    user namespace changes its groups and which ids exist at all)."""

    def __init__(self) -> None:
        self.groups = tuple(os.getgroups())
        # In a user namespace that maps only some ids, setfsuid/setfsgid to an unmapped id
        # silently change nothing: the switch must be checked, or the caller would act as root.
        self.partial = _read("/proc/self/uid_map").split() != ["0", "0", "4294967295"]
        # An unprivileged namespace may have given up setgroups for good.
        self.groups_fixed = _read("/proc/self/setgroups").strip() == "deny"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


@functools.cache
def _settled() -> _Process:
    return _Process()


class Credentials:
    """``with Credentials(ctx, enabled, umask):`` switches and restores the thread's ids.

    A caller whose ids the daemon can't take ((uid_t)-1, or unmapped in its user namespace)
    gets EPERM."""

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
            if _NO_ID in (ctx.uid, ctx.gid) or _NO_ID in ctx.groups:
                self._umask_off()
                raise PermissionError(errno.EPERM, "(uid_t)-1 is no id to act as")
            proc = _settled()
            try:
                linux.setfsgid(ctx.gid)
                if not proc.groups_fixed:
                    linux.thread_setgroups(ctx.groups)
                linux.setfsuid(ctx.uid)
                # Asking again returns the id in force: the one asked for if the switch took.
                if proc.partial and (
                    linux.setfsuid(ctx.uid) != ctx.uid or linux.setfsgid(ctx.gid) != ctx.gid
                ):
                    raise PermissionError(errno.EPERM, "caller's ids are not mapped here")
            except OSError as e:
                self._restore(proc)
                self._umask_off()
                if proc.partial:
                    raise PermissionError(errno.EPERM, os.strerror(errno.EPERM)) from e
                raise

    def __exit__(self, typ: object, value: object, tb: object) -> None:
        if self._switch:
            self._restore(_settled())
        self._umask_off()

    def _umask_off(self) -> None:
        if self._umask is not None:
            os.umask(0)

    @staticmethod
    def _restore(proc: _Process) -> None:
        linux.setfsuid(0)
        linux.setfsgid(0)
        if not proc.groups_fixed:
            linux.thread_setgroups(proc.groups)


def can_switch() -> bool:
    """Only root can become the caller."""
    return os.geteuid() == 0
