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

Every mount of the new root, the share and the mounts below it included, is nodev and nosuid
(flags the mounts already have are kept). The daemon never opens a device node; a bug that made
it try (say, on a node a guest made with --allow-devices) would get EACCES, not a host device.
The guest still sees st_mode unchanged: these flags only stop the host side, through the
daemon, from using device nodes or set-id bits.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

from pyvirtiofsd import linux

__all__ = [
    "SHARE",
    "enter",
]

SHARE = "/share"
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MS_REMOUNT = 0x20
_MS_NOEXEC = 8
_MS_NOATIME = 1 << 10
_MS_NODIRATIME = 1 << 11
_MS_RELATIME = 1 << 21
#: statvfs f_flag bits -> the MS_* flags a remount must repeat not to clear them.
_KEEP = {
    os.ST_RDONLY: linux.MS_RDONLY,
    os.ST_NOSUID: linux.MS_NOSUID,
    os.ST_NODEV: linux.MS_NODEV,
    os.ST_NOEXEC: _MS_NOEXEC,
    os.ST_NOATIME: _MS_NOATIME,
    os.ST_NODIRATIME: _MS_NODIRATIME,
    os.ST_RELATIME: _MS_RELATIME,
}
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
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


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _restrict(target: str, readonly: bool) -> None:
    """Make the mount at ``target`` and every mount below it nodev, nosuid (and read-only if
    asked), keeping the flags they have."""
    attr = _MountAttr(
        _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOSUID | (_MOUNT_ATTR_RDONLY if readonly else 0)
    )
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(target),
        ctypes.c_uint(_AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if result == 0:
        return
    err = ctypes.get_errno()
    if err != errno.ENOSYS:
        raise OSError(err, f"mount_setattr {target}: {os.strerror(err)}")
    _remount(target, readonly)


def _remount(target: str, readonly: bool) -> None:
    """:func:`_restrict` before Linux 5.12, for the top mount only: a remount clears the flags
    it does not name (and a user namespace refuses that for locked ones), hence the repeat."""
    current = os.statvfs(target).f_flag
    keep = sum(ms for st, ms in _KEEP.items() if current & st)
    flags = keep | linux.MS_NODEV | linux.MS_NOSUID | (linux.MS_RDONLY if readonly else 0)
    _mount(None, target, None, _MS_BIND | _MS_REMOUNT | flags)


def _bind(fd: int, target: str, readonly: bool) -> None:
    """Bind what ``fd`` (an O_PATH fd) refers to on ``target`` in the new root. Going through
    the fd, sources stay reachable after the tmpfs hides the directory they are in."""
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
    _restrict(target, readonly)


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
