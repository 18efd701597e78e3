"""The VMM's half of a shared memory region (a virtio-fs DAX window), for the Python front-end.

The window is reserved as inaccessible address space; each SHMEM_MAP from the back-end maps
the file it passes over part of it (MAP_SHARED | MAP_FIXED), and each SHMEM_UNMAP turns that
part back into inaccessible space. The rules are QEMU's: a map must land on unmapped space and
an unmap must name a whole earlier mapping. Tests read and write the window to check, byte by
byte, what the daemon mapped; a Python VMM could hand the same memory to a guest.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading

from pyvirtiofsd.vhost_user.messages import BackendReq, Message, MMapRequest

__all__ = ["FrontendDaxWindow"]

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_NORESERVE = 0x4000


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    result = _libc.mmap(addr, length, prot, flags, fd, offset)
    if result == _MAP_FAILED or result is None:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


class FrontendDaxWindow:
    """A window of ``size`` bytes served to one back-end channel as shared memory ``shmid``."""

    def __init__(self, size: int, shmid: int = 0) -> None:
        self.size = size
        self.shmid = shmid
        self.base = _mmap(
            None,
            size,
            _PROT_NONE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            -1,
            0,
        )
        #: offset -> (length, writable) of what is mapped now.
        self.mappings: dict[int, tuple[int, bool]] = {}
        self.log: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.base:
            _libc.munmap(self.base, self.size)
            self.base = 0

    # --- the back-end channel hook ---------------------------------------------------------

    def hook(self, msg: Message) -> int:
        """Serve SHMEM_MAP / SHMEM_UNMAP; 0 on success, an errno otherwise."""
        try:
            if msg.request == BackendReq.SHMEM_MAP:
                return self._map(MMapRequest.decode(msg.payload), msg.fds)
            if msg.request == BackendReq.SHMEM_UNMAP:
                return self._unmap(MMapRequest.decode(msg.payload))
            return errno.ENOSYS
        except (OSError, ValueError) as e:
            log.warning("back-end request %d refused: %s", msg.request, e)
            return getattr(e, "errno", None) or errno.EINVAL
        finally:
            msg.close_fds()

    def _check(self, req: MMapRequest) -> None:
        if req.shmid != self.shmid:
            raise OSError(errno.EINVAL, f"no shared memory region {req.shmid}")
        if req.length == 0 or req.shm_offset + req.length > self.size:
            raise OSError(errno.EFAULT, "range outside the window")
        if req.shm_offset % mmap.PAGESIZE or req.length % mmap.PAGESIZE:
            raise OSError(errno.EINVAL, "range not page aligned")

    def _map(self, req: MMapRequest, fds: list[int]) -> int:
        self._check(req)
        if len(fds) != 1:
            raise OSError(errno.EBADF, f"SHMEM_MAP with {len(fds)} fds")
        size = os.fstat(fds[0]).st_size
        if 0 < size < req.fd_offset + req.length:
            # QEMU maps a file only as far as it reaches.
            raise OSError(errno.EFAULT, "mapping longer than the file")
        with self._lock:
            end = req.shm_offset + req.length
            for off, (length, _) in self.mappings.items():
                if off < end and req.shm_offset < off + length:
                    raise OSError(errno.EEXIST, f"range overlaps the mapping at {off:#x}")
            writable = bool(req.flags & MMapRequest.WRITABLE)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            _mmap(
                self.base + req.shm_offset,
                req.length,
                prot,
                mmap.MAP_SHARED | _MAP_FIXED,
                fds[0],
                req.fd_offset,
            )
            self.mappings[req.shm_offset] = (req.length, writable)
            self.log.append(("map", req.shm_offset, req.length))
        return 0

    def _unmap(self, req: MMapRequest) -> int:
        self._check(req)
        with self._lock:
            if self.mappings.get(req.shm_offset, (None,))[0] != req.length:
                raise OSError(errno.EINVAL, "unmap of something that is not a whole mapping")
            _mmap(
                self.base + req.shm_offset,
                req.length,
                _PROT_NONE,
                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE,
                -1,
                0,
            )
            del self.mappings[req.shm_offset]
            self.log.append(("unmap", req.shm_offset, req.length))
        return 0

    # --- access, for tests -----------------------------------------------------------------

    def _covered(self, offset: int, length: int, write: bool) -> bool:
        pos, end = offset, offset + length
        while pos < end:
            for off, (mlen, writable) in self.mappings.items():
                if off <= pos < off + mlen and (writable or not write):
                    pos = off + mlen
                    break
            else:
                return False
        return True

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the window; only mapped parts can be read (the rest would fault)."""
        with self._lock:
            if not self._covered(offset, length, False):
                raise OSError(errno.EFAULT, f"window range {offset:#x}+{length:#x} is not mapped")
            return ctypes.string_at(self.base + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if not self._covered(offset, len(data), True):
                raise OSError(errno.EFAULT, "window range is not mapped writable")
            ctypes.memmove(self.base + offset, data, len(data))

    def msync(self, offset: int, length: int) -> None:
        if _libc.msync(ctypes.c_void_p(self.base + offset), ctypes.c_size_t(length), 4) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
