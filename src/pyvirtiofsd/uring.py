"""A small io_uring: one ring of 128-byte submissions, used from one thread.

Only what FUSE over io_uring needs (:mod:`pyvirtiofsd.transport.fuse_uring`): commands to a
file (``IORING_OP_URING_CMD``) and reads, submitted in batches, and one system call that both
submits everything prepared and waits for completions. Python has no io_uring of its own; the
two system calls go through ctypes and the rings are read and written in place through ``mmap``.

Rules:

* One thread owns a :class:`Ring`: it prepares submissions, enters the kernel and reaps
  completions. Other threads never touch it; they wake its owner through a file descriptor the
  owner reads with the ring (an eventfd).
* A submission becomes visible to the kernel when the tail is stored after the entry is
  written; x86 and arm64 Linux order the entry's stores before the tail's through the system
  call that follows, and the kernel reads the tail with acquire order. A completion is read
  after its tail was loaded, and the head is stored only after every field of it was read.
* The ring is made with ``IORING_SETUP_SQE128`` (a uring command needs the long entry) and its
  SQ array (if the kernel has one) maps slot i to entry i once, at setup.
* :meth:`Ring.close` releases every view before it unmaps; nothing here outlives it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import struct
from typing import Final

__all__ = [
    "IORING_OP_READ",
    "IORING_OP_URING_CMD",
    "Ring",
    "supported",
]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
#: syscall(2) with seven long arguments: every argument goes whole into its register (untyped,
#: ctypes passes an int as a C int, whose register's upper half the kernel then reads).
_syscall = ctypes.CFUNCTYPE(ctypes.c_long, *[ctypes.c_long] * 7, use_errno=True)(
    ("syscall", _libc)
)

try:
    from pyvirtiofsd._uring import enter as _c_enter
except ImportError:  # the pure build
    _c_enter = None
#: The compiled build's io_uring_enter (``_uring.c``): no ctypes call per request. Bound Final.
_native_enter: Final = _c_enter

# The same numbers on every Linux architecture (the generic system call table).
_SYS_SETUP: Final = 425
_SYS_ENTER: Final = 426

IORING_OP_READ: Final = 22
IORING_OP_URING_CMD: Final = 46

_SETUP_SQE128: Final = 1 << 10
_SETUP_CQSIZE: Final = 1 << 3
_FEAT_SINGLE_MMAP: Final = 1 << 0
_ENTER_GETEVENTS: Final = 1
_OFF_SQ_RING: Final = 0
_OFF_CQ_RING: Final = 0x8000000
_OFF_SQES: Final = 0x10000000

SQE_SIZE: Final = 128
_CQE_SIZE: Final = 16

# struct io_uring_params: 10 u32 fields, then the SQ and CQ ring offsets (8 u32 and a u64 each).
_PARAMS: Final = struct.Struct("<10I8IQ8IQ")
#: An entry's first 48 bytes (opcode, flags, ioprio, fd, off or cmd_op and its pad, addr, len,
#: op flags, user_data, buf_index, personality, file_index), then 24 bytes of command: what
#: FUSE's uring command reads (struct fuse_uring_cmd_req: flags, commit_id, qid, padding).
_SQE_CMD: Final = struct.Struct("<BBHiQQIIQHHiQQH6x")
_CQE: Final = struct.Struct("<QiI")


def supported() -> bool:
    """Whether this kernel lets this process make a ring (io_uring may be disabled)."""
    try:
        Ring(1).close()
    except OSError:
        return False
    return True


class Ring:
    """An io_uring instance with ``entries`` submission slots (a power of two is taken)."""

    def __init__(self, entries: int, cq_entries: int = 0) -> None:
        params = bytearray(_PARAMS.size)
        flags = _SETUP_SQE128
        if cq_entries:
            flags |= _SETUP_CQSIZE
            struct.pack_into("<I", params, 4, cq_entries)
        struct.pack_into("<I", params, 8, flags)
        raw = (ctypes.c_char * len(params)).from_buffer(params)
        fd = _syscall(_SYS_SETUP, entries, ctypes.addressof(raw), 0, 0, 0, 0)
        del raw
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        p = _PARAMS.unpack(params)
        sq_entries, cq_size, _, _, _, features = p[:6]
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask, _, _, cqes = p[19:25]
        self.sq_entries = sq_entries
        sq_len = sq_array + 4 * sq_entries
        cq_len = cqes + _CQE_SIZE * cq_size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        share = mmap.MAP_SHARED | mmap.MAP_POPULATE
        try:
            if features & _FEAT_SINGLE_MMAP:
                self._sq_map = mmap.mmap(fd, max(sq_len, cq_len), share, prot, offset=_OFF_SQ_RING)
                self._cq_map = self._sq_map
            else:
                self._sq_map = mmap.mmap(fd, sq_len, share, prot, offset=_OFF_SQ_RING)
                self._cq_map = mmap.mmap(fd, cq_len, share, prot, offset=_OFF_CQ_RING)
            self._sqes = mmap.mmap(fd, SQE_SIZE * sq_entries, share, prot, offset=_OFF_SQES)
        except BaseException:
            os.close(fd)
            raise
        sq = memoryview(self._sq_map)
        cq = memoryview(self._cq_map)
        self._sq_mask = int.from_bytes(sq[sq_mask : sq_mask + 4], "little")
        self._cq_mask = int.from_bytes(cq[cq_mask : cq_mask + 4], "little")
        array = sq[sq_array : sq_array + 4 * sq_entries].cast("I")
        for i in range(sq_entries):
            array[i] = i
        array.release()
        self._sq_tail_v = sq[sq_tail : sq_tail + 4].cast("I")
        self._sq_head_v = sq[sq_head : sq_head + 4].cast("I")
        self._cq_head_v = cq[cq_head : cq_head + 4].cast("I")
        self._cq_tail_v = cq[cq_tail : cq_tail + 4].cast("I")
        self._cqes = cq[cqes : cqes + _CQE_SIZE * cq_size]
        self._sqe_v = memoryview(self._sqes)
        self._views = [sq, cq]
        self._tail = self._sq_tail_v[0]
        #: Prepared and not yet submitted: the count io_uring_enter must be given exactly (with
        #: more, it returns once they are submitted, without waiting).
        self._pending = 0
        self._cq_next = self._cq_head_v[0]

    def space(self) -> int:
        """Submission slots free now."""
        return self.sq_entries - ((self._tail - self._sq_head_v[0]) & 0xFFFFFFFF)

    def _slot(self) -> int:
        if not self.space() and self._pending:
            self.submit_and_wait(0)  # the kernel takes the prepared entries, freeing their slots
        if not self.space():
            raise OSError(errno.EBUSY, "io_uring: no free submission slot")
        return (self._tail & self._sq_mask) * SQE_SIZE

    def _publish(self) -> None:
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._sq_tail_v[0] = self._tail
        self._pending += 1

    def prepare_cmd(
        self,
        fd: int,
        cmd_op: int,
        user_data: int,
        addr: int = 0,
        length: int = 0,
        commit_id: int = 0,
        qid: int = 0,
    ) -> None:
        """A uring command to ``fd`` (``cmd_op`` in the low 32 bits of ``off``), its command
        area holding FUSE's flags (0), ``commit_id`` and ``qid``."""
        _SQE_CMD.pack_into(
            self._sqe_v, self._slot(), IORING_OP_URING_CMD, 0, 0, fd, cmd_op, addr, length,
            0, user_data, 0, 0, 0, 0, commit_id, qid,
        )  # fmt: skip
        self._publish()

    def prepare_read(self, fd: int, addr: int, length: int, user_data: int) -> None:
        """A read of ``length`` bytes at ``addr`` from ``fd`` at its current position."""
        _SQE_CMD.pack_into(
            self._sqe_v, self._slot(), IORING_OP_READ, 0, 0, fd, 0xFFFFFFFFFFFFFFFF, addr,
            length, 0, user_data, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        self._publish()

    def submit_and_wait(self, wait: int = 1) -> None:
        """Submit everything prepared and wait until ``wait`` completions are there (0: don't
        wait). A signal ends the wait early (the caller looks at the completions, then again)."""
        pending = self._pending
        flags = _ENTER_GETEVENTS if wait else 0
        if _native_enter is not None:
            result: int = _native_enter(self.fd, pending, wait, flags)
        else:
            result = _syscall(_SYS_ENTER, self.fd, pending, wait, flags, 0, 0)
        if result < 0:
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")
        elif result:
            self._pending = pending - result

    def completions(self) -> list[tuple[int, int]]:
        """Every completion there, as ``(user_data, res)``, in order; they are consumed."""
        tail = self._cq_tail_v[0]
        head = self._cq_next
        out: list[tuple[int, int]] = []
        if head == tail:
            return out
        cqes, mask = self._cqes, self._cq_mask
        while head != tail:
            user_data, res, _ = _CQE.unpack_from(cqes, (head & mask) * _CQE_SIZE)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_next = head
        self._cq_head_v[0] = head
        return out

    def close(self) -> None:
        if self.fd < 0:
            return
        for v in (self._sq_tail_v, self._sq_head_v, self._cq_head_v, self._cq_tail_v):
            v.release()
        self._cqes.release()
        self._sqe_v.release()
        for v in self._views:
            v.release()
        self._sqes.close()
        if self._cq_map is not self._sq_map:
            self._cq_map.close()
        self._sq_map.close()
        os.close(self.fd)
        self.fd = -1
