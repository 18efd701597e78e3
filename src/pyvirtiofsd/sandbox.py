"""Confine the daemon: a private mount namespace whose root holds only what it needs.

``--sandbox namespace`` (and ``chroot``, which here means the same: the daemon needs /proc, which
a bare chroot into the share would not give it) builds a new root on a private tmpfs with:

* ``/share``: the shared directory (a recursive bind mount), the only writable tree;
* ``/proc``: needed for the ``/proc/self/fd`` magic links the passthrough reopens files with;
* the Python runtime and the system libraries, read-only, at their usual paths, so that
  modules imported later still load;

then pivots into it and detaches the old root. Every other file of the host is out of reach,
whatever a bug in the daemon might try. Sockets and descriptors opened before stay usable. Run
it early, while the process has one thread: unshare(CLONE_NEWNS) refuses threaded processes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

from . import linux

SHARE = "/share"
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MS_REMOUNT = 0x20
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine(), 155)
#: Where the new root is assembled, in our namespace only (the host's /tmp is untouched).
_STAGE = "/tmp"

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc.mount(
        None if source is None else os.fsencode(source),
        os.fsencode(target),
        None if fstype is None else os.fsencode(fstype),
        ctypes.c_ulong(flags),
        os.fsencode(data) if data else None,
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _bind(fd: int, target: str, readonly: bool) -> None:
    """Bind what ``fd`` (an O_PATH fd) refers to on ``target`` in the new root. Going through
    the fd, sources stay reachable after the tmpfs hides the directory they are in."""
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
    if readonly:
        _mount(None, target, None, _MS_BIND | _MS_REMOUNT | linux.MS_RDONLY | _MS_REC)


def _runtime_paths() -> list[str]:
    """Directories the interpreter may still read from: its prefixes, sys.path, libraries."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path}
    paths |= {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/localtime", "/dev/log"}
    real = {os.path.realpath(p) for p in paths if p and os.path.exists(p)}
    # Keep the outermost of nested paths: binding a parent covers its children.
    keep = []
    for p in sorted(real):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in keep):
            keep.append(p)
    return keep


def enter(shared_dir: str) -> str:
    """Confine this process; returns where ``shared_dir`` is now."""
    sources = [(p, p, True) for p in _runtime_paths()]
    sources += [("/proc", "/proc", False), (os.path.realpath(shared_dir), SHARE, False)]
    linux.unshare(linux.CLONE_NEWNS)
    # Nothing we mount from here on propagates back to the host.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    # Opened in the new namespace (a bind mount's source must be one of its mounts).
    fds = [(os.open(src, os.O_PATH | os.O_CLOEXEC), dst, ro) for src, dst, ro in sources]
    try:
        _mount("tmpfs", _STAGE, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
        root = _STAGE
        for fd, dst, readonly in fds:
            _bind(fd, root + dst, readonly)
    finally:
        for fd, _, _ in fds:
            os.close(fd)
    os.mkdir(root + "/oldroot")
    os.chdir(root)
    if _libc.syscall(_SYS_PIVOT_ROOT, b".", b"oldroot") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    os.chdir("/")
    linux.umount2("/oldroot", linux.MNT_DETACH)
    os.rmdir("/oldroot")
    return SHARE
