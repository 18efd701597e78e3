"""Linux system calls that Python's ``os`` module lacks, through ctypes.

Each wrapper raises ``OSError`` with the call's errno, as ``os`` functions do. Calls that must act
on the calling thread only (credentials, groups) go through ``syscall(2)`` directly, because
glibc's wrappers of some of them change every thread of the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = [
    "AT_EMPTY_PATH",
    "AT_FDCWD",
    "AT_REMOVEDIR",
    "AT_SYMLINK_FOLLOW",
    "AT_SYMLINK_NOFOLLOW",
    "CLONE_FS",
    "CLONE_NEWNS",
    "CLONE_NEWUSER",
    "MAX_HANDLE_SZ",
    "MNT_DETACH",
    "MS_NODEV",
    "MS_NOSUID",
    "MS_RDONLY",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "RENAME_WHITEOUT",
    "RESOLVE_BENEATH",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "UTIME_NOW",
    "UTIME_OMIT",
    "fallocate",
    "fchownat",
    "getdents64",
    "ioctl_buffer",
    "ioctl_int",
    "mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "openat2",
    "renameat2",
    "setfsgid",
    "setfsuid",
    "syncfs",
    "thread_setgroups",
    "umount2",
    "unshare",
    "utimensat",
]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_SYSCALLS = {
    "x86_64": {"setgroups": 116, "getdents64": 217, "openat2": 437, "renameat2": 316},
    "aarch64": {"setgroups": 159, "getdents64": 61, "openat2": 437, "renameat2": 276},
}
_NR = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

MS_NOSUID = 2
MS_NODEV = 4
MS_RDONLY = 1
MNT_DETACH = 2

MAX_HANDLE_SZ = 128

_libc.syscall.restype = ctypes.c_long


def _check(result: int, *context: object) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), *context)
    return result


def _path(path: str | bytes) -> bytes:
    return os.fsencode(path)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): open ``path`` below ``dirfd`` under the ``RESOLVE_*`` restrictions."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(
        _libc.syscall(
            _NR["openat2"],
            ctypes.c_int(dirfd),
            ctypes.c_char_p(_path(path)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        ),
        path,
    )


def renameat2(olddirfd: int, oldpath: bytes, newdirfd: int, newpath: bytes, flags: int = 0) -> None:
    _check(
        _libc.syscall(
            _NR["renameat2"],
            ctypes.c_int(olddirfd),
            ctypes.c_char_p(oldpath),
            ctypes.c_int(newdirfd),
            ctypes.c_char_p(newpath),
            ctypes.c_uint(flags),
        ),
        oldpath,
    )


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


def name_to_handle_at(dirfd: int, path: bytes, flags: int) -> tuple[bytes, int]:
    """The file handle of ``path`` (encoded as type + bytes) and the id of its mount."""
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    _check(
        _libc.name_to_handle_at(
            ctypes.c_int(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(fh),
            ctypes.byref(mount_id),
            ctypes.c_int(flags),
        ),
        path,
    )
    raw = fh.handle_type.to_bytes(4, "little", signed=True) + bytes(fh.f_handle)[: fh.handle_bytes]
    return raw, mount_id.value


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int) -> int:
    fh = _FileHandle()
    fh.handle_type = int.from_bytes(handle[:4], "little", signed=True)
    body = handle[4:]
    fh.handle_bytes = len(body)
    ctypes.memmove(fh.f_handle, body, len(body))
    return _check(
        _libc.open_by_handle_at(
            ctypes.c_int(mount_fd), ctypes.byref(fh), ctypes.c_int(flags | os.O_CLOEXEC)
        )
    )


def fchownat(dirfd: int, path: bytes, uid: int, gid: int, flags: int) -> None:
    _check(
        _libc.fchownat(
            ctypes.c_int(dirfd),
            ctypes.c_char_p(path),
            ctypes.c_uint(uid),
            ctypes.c_uint(gid),
            ctypes.c_int(flags),
        ),
        path,
    )


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _timespec(ns: int | None, now: bool) -> _Timespec:
    if now:
        return _Timespec(0, UTIME_NOW)
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


def utimensat(
    dirfd: int,
    path: bytes,
    atime: int | None,
    mtime: int | None,
    *,
    atime_now: bool = False,
    mtime_now: bool = False,
    flags: int = 0,
) -> None:
    """Set the times of ``path`` in nanoseconds; ``None`` leaves one alone."""
    times = (_Timespec * 2)(_timespec(atime, atime_now), _timespec(mtime, mtime_now))
    _check(
        _libc.utimensat(ctypes.c_int(dirfd), ctypes.c_char_p(path), times, ctypes.c_int(flags)),
        path,
    )


def setfsuid(uid: int) -> int:
    """Set this thread's file-system uid; returns the previous one (glibc's is per thread)."""
    return int(_libc.setfsuid(ctypes.c_uint(uid)))


def setfsgid(gid: int) -> int:
    return int(_libc.setfsgid(ctypes.c_uint(gid)))


def thread_setgroups(groups: tuple[int, ...] | list[int]) -> None:
    """Set the supplementary groups of the calling thread only."""
    arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
    _check(_libc.syscall(_NR["setgroups"], ctypes.c_int(len(groups)), arr))


def getdents64(fd: int, buf: ctypes.Array[ctypes.c_char]) -> int:
    """Fill ``buf`` with linux_dirent64 records; returns the byte count (0 at the end)."""
    return _check(
        _libc.syscall(_NR["getdents64"], ctypes.c_int(fd), buf, ctypes.c_size_t(len(buf)))
    )


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(
        _libc.fallocate(
            ctypes.c_int(fd), ctypes.c_int(mode), ctypes.c_int64(offset), ctypes.c_int64(length)
        )
    )


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(ctypes.c_int(fd)))


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)))


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    _check(
        _libc.mount(
            _path(source), _path(target), _path(fstype), ctypes.c_ulong(flags), _path(data)
        ),
        target,
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_path(target), ctypes.c_int(flags)), target)


def ioctl_buffer(fd: int, request: int, buf: bytearray) -> int:
    """ioctl(2) with a mutable buffer argument, returning the call's result."""
    cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
    return _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), cbuf))


def ioctl_int(fd: int, request: int, value: int) -> int:
    arg = ctypes.c_uint32(value)
    return _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.byref(arg)))
