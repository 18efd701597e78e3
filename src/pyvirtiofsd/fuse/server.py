"""The FUSE server: one request in, one reply out, whatever carried them.

:meth:`Server.handle` decodes a request from readable buffers, calls the :class:`Filesystem`, and
encodes the reply into writable buffers. The same code serves /dev/fuse (one buffer each way)
and virtqueue descriptor chains (several); file data moves between the buffers and file
descriptors without being copied in Python. Nothing here does I/O of its own.

A malformed request (short header, lengths that disagree, a missing NUL, an unknown opcode) gets
an error reply and is logged; the server keeps serving.

Rules the server keeps for a hostile guest:

* A request runs only if its reply fits: the room each opcode's reply needs up front (the out
  header and the reply's fixed part, :data:`REPLY_ROOM`) is checked before the file system sees
  the request, so a CREATE whose reply could not be delivered creates nothing, opens nothing and
  takes no lookup reference. It gets EINVAL, or no reply at all when not even the out header
  fits. Variable parts (READ data, READDIR entries, READLINK, xattr values, IOCTL data) are
  fitted to the room by their handlers and have no side effects.
* Requests that wait (a SETLKW whose lock is held) wait on the threads of one bounded pool per
  connection (:data:`MAX_LOCK_WAITERS`); beyond it the request gets ENOLCK at once.
"""

from __future__ import annotations

import errno
import logging
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import abi
from .buffers import ReplyWriter, RequestReader, ShortBuffer, WriteData
from .filesystem import (
    ConnectionInfo,
    Context,
    DaxWindow,
    DirBuffer,
    Entry,
    Filesystem,
    Lock,
    Opened,
    SetAttr,
)

log = logging.getLogger(__name__)

#: Returned by handlers of requests that get no reply (FORGET, BATCH_FORGET, INTERRUPT).
NO_REPLY = -1
#: Returned by :meth:`Server.handle` when the reply will come later (:attr:`Server.deferred_reply`).
DEFERRED = -2

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // abi.PAGE_SIZE
#: Cap on the count of a BATCH_FORGET or REMOVEMAPPING, far above what the kernel sends.
MAX_BATCH = 1 << 16
#: Blocking lock waits (SETLKW that has to wait) one connection may have at once, each on a
#: thread of its own; one more gets ENOLCK. The guest kernel sends a SETLKW per waiting
#: process, so this is the number of guest processes that can wait for a lock together.
MAX_LOCK_WAITERS = 64
#: A lock-wait thread idle this long (seconds) ends; the pool starts threads again on demand.
LOCK_WAITER_IDLE = 30.0

_IN_HEADER = abi.IN_HEADER.struct
_IN_SIZE = abi.IN_HEADER.size
_WRITE = abi.Opcode.WRITE
_WRITE_IN_SIZE = abi.WRITE_IN.size
_OUT_HEADER = abi.OUT_HEADER.struct
_ENTRY_OUT = abi.ENTRY_OUT.struct
_ATTR_OUT = abi.ATTR_OUT.struct
_OPEN_OUT = abi.OPEN_OUT.struct
_U32 = abi.GETXATTR_OUT.struct

#: Flags the server offers whenever the kernel does; file systems add or remove in init().
DEFAULT_FLAGS = (
    abi.InitFlag.ASYNC_READ
    | abi.InitFlag.POSIX_LOCKS
    | abi.InitFlag.ATOMIC_O_TRUNC
    | abi.InitFlag.BIG_WRITES
    | abi.InitFlag.FLOCK_LOCKS
    | abi.InitFlag.AUTO_INVAL_DATA
    | abi.InitFlag.DO_READDIRPLUS
    | abi.InitFlag.READDIRPLUS_AUTO
    | abi.InitFlag.ASYNC_DIO
    | abi.InitFlag.PARALLEL_DIROPS
    | abi.InitFlag.MAX_PAGES
    | abi.InitFlag.SUBMOUNTS
    | abi.InitFlag.INIT_EXT
    | abi.InitFlag.CREATE_SUPP_GROUP
)

_HEADER = abi.OUT_HEADER.size

#: Writable bytes each opcode's reply needs before the request may run: the out header plus the
#: fixed part of its reply (one lookup and one comparison per request). Requests that never get
#: a reply (FORGET, BATCH_FORGET, INTERRUPT) need none.
REPLY_ROOM = [_HEADER] * 64
for _op, _fixed in {
    abi.Opcode.LOOKUP: abi.ENTRY_OUT.size,
    abi.Opcode.GETATTR: abi.ATTR_OUT.size,
    abi.Opcode.SETATTR: abi.ATTR_OUT.size,
    abi.Opcode.SYMLINK: abi.ENTRY_OUT.size,
    abi.Opcode.MKNOD: abi.ENTRY_OUT.size,
    abi.Opcode.MKDIR: abi.ENTRY_OUT.size,
    abi.Opcode.LINK: abi.ENTRY_OUT.size,
    abi.Opcode.OPEN: abi.OPEN_OUT.size,
    abi.Opcode.WRITE: abi.WRITE_OUT.size,
    abi.Opcode.STATFS: abi.KSTATFS.size,
    abi.Opcode.INIT: abi.INIT_OUT.size,
    abi.Opcode.OPENDIR: abi.OPEN_OUT.size,
    abi.Opcode.GETLK: abi.LK_OUT.size,
    abi.Opcode.CREATE: abi.ENTRY_OUT.size + abi.OPEN_OUT.size,
    abi.Opcode.BMAP: abi.BMAP_OUT.size,
    abi.Opcode.IOCTL: abi.IOCTL_OUT.size,
    abi.Opcode.POLL: abi.POLL_OUT.size,
    abi.Opcode.LSEEK: abi.LSEEK_OUT.size,
    abi.Opcode.COPY_FILE_RANGE: abi.WRITE_OUT.size,
    abi.Opcode.TMPFILE: abi.ENTRY_OUT.size + abi.OPEN_OUT.size,
    abi.Opcode.STATX: abi.STATX_OUT.size,
    abi.Opcode.COPY_FILE_RANGE_64: abi.COPY_FILE_RANGE_OUT.size,
}.items():
    REPLY_ROOM[_op] = _HEADER + _fixed
for _op in (abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT):
    REPLY_ROOM[_op] = 0
del _op, _fixed

#: Requests that may carry a FUSE_EXT_GROUPS extension.
_CREATING = frozenset(
    {
        abi.Opcode.MKNOD,
        abi.Opcode.MKDIR,
        abi.Opcode.SYMLINK,
        abi.Opcode.CREATE,
        abi.Opcode.TMPFILE,
    }
)


class MalformedRequest(Exception):
    """The request's bytes contradict themselves; it gets EINVAL."""


def _timeout(seconds: float) -> tuple[int, int]:
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, int((seconds - whole) * 1_000_000_000)


def _name(body: Any, offset: int) -> tuple[bytes, int]:
    """A NUL-terminated name at ``offset`` and the offset after its NUL."""
    raw = bytes(body[offset:])
    end = raw.find(b"\0")
    if end < 0:
        raise MalformedRequest("name without NUL")
    return raw[:end], offset + end + 1


def _pack_entry(out: ReplyWriter, entry: Entry) -> None:
    ev, evn = _timeout(entry.entry_timeout)
    av, avn = _timeout(entry.attr_timeout)
    out.pack(_ENTRY_OUT, entry.ino, entry.generation, ev, av, evn, avn, *entry.attr.values())


def _pack_open(out: ReplyWriter, opened: Opened) -> None:
    out.pack(_OPEN_OUT, opened.fh, opened.flags, opened.backing_id)


class LockWaiters:
    """The bounded pool of threads on which blocking lock requests wait.

    :meth:`reserve` a place first (False: the pool is full), then :meth:`run` the wait there, or
    :meth:`unreserve` if it is not needed after all. Threads start as waits need them, up to
    ``size``, and end after ``idle`` seconds without one. They are daemon threads: a wait stuck
    in the backend does not keep the process from exiting.
    """

    def __init__(self, size: int = MAX_LOCK_WAITERS, idle: float = LOCK_WAITER_IDLE) -> None:
        self.size = size
        self._idle = idle
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._busy = 0  # reserved places: waits queued or running
        self._threads = 0

    @property
    def busy(self) -> int:
        """Places taken: waits queued or running."""
        return self._busy

    @property
    def threads(self) -> int:
        return self._threads

    def reserve(self) -> bool:
        with self._lock:
            if self._busy >= self.size:
                return False
            self._busy += 1
            return True

    def unreserve(self) -> None:
        with self._lock:
            self._busy -= 1

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on a pool thread, in a place taken with :meth:`reserve`."""
        with self._lock:
            # Put under the lock: a thread ending for idleness checks the queue under it too,
            # so no job is left without a thread.
            self._jobs.put(job)
            start = self._busy > self._threads
            if start:
                self._threads += 1
        if start:
            threading.Thread(target=self._serve, name="fuse-lock-wait", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._threads -= 1
                        return
                continue
            try:
                job()
            except Exception:
                log.exception("lock wait failed")
            finally:
                del job
                with self._lock:
                    self._busy -= 1


@dataclass(frozen=True)
class ServerConfig:
    """What the server agrees to whatever the file system wants (filled from the command line
    by field name)."""

    #: Serve POSIX record locks in the daemon (off: the guest's kernel keeps them local).
    posix_locks: bool = True
    #: Serve flock() locks in the daemon (off: local to the guest).
    flock_locks: bool = True

    @property
    def disabled_flags(self) -> int:
        """INIT flags never to agree to (:class:`Server`'s ``disabled_flags``)."""
        flags = 0
        if not self.posix_locks:
            flags |= abi.InitFlag.POSIX_LOCKS
        if not self.flock_locks:
            flags |= abi.InitFlag.FLOCK_LOCKS
        return flags


class Server:
    """Serves one FUSE connection for one :class:`Filesystem`.

    Thread-safe: transports call :meth:`handle` from as many threads as they like.
    """

    def __init__(
        self,
        fs: Filesystem,
        *,
        max_write: int = MAX_WRITE,
        map_alignment: int | None = None,
        backing_open: Callable[[int], int] | None = None,
        backing_close: Callable[[int], None] | None = None,
        dax_window: DaxWindow | None = None,
        disabled_flags: int = 0,
    ) -> None:
        self.fs = fs
        self.max_write = max_write
        #: log2 alignment of DAX mappings, offered when the transport has a DAX window.
        self.map_alignment = map_alignment
        #: The transport's FUSE_PASSTHROUGH hooks (/dev/fuse), handed to the file system at INIT.
        self.backing_open = backing_open
        self.backing_close = backing_close
        #: The transport's DAX window, handed to the file system at INIT.
        self.dax_window = dax_window
        #: INIT flags never to agree to, whatever the file system wants (e.g. POSIX_LOCKS
        #: when the user asked for local locks).
        self.disabled_flags = disabled_flags
        self.initialized = False
        self.proto_minor = 0
        self.flags = 0
        #: Requests being served, by unique, so that INTERRUPT can reach them.
        self._inflight: dict[int, Context] = {}
        #: Deferred requests waiting (blocking locks), which a reset or shutdown interrupts.
        self._waiting: dict[int, Context] = {}
        #: Per-opcode request counts (observability).
        self.counts = [0] * 64
        #: How a request that waits (a blocking lock) is answered later, off the thread that
        #: serves requests: ``deferred_reply(token)``, called on that thread while the request
        #: is being handled, returns ``deliver(reply_bytes)``, which the waiting thread calls
        #: once. Without it, such requests block in place.
        self.deferred_reply: Callable[[Any], Callable[[bytes], None]] | None = None
        #: Where those waits run.
        self.lock_waiters = LockWaiters()
        self._init_lock = threading.Lock()
        self._ops: list[Callable[..., int] | None] = [None] * 64
        for op in abi.Opcode:
            fn = getattr(self, "_op_" + op.name.lower(), None)
            if fn is not None and op < 64:
                self._ops[op] = fn

    # --- entry point -----------------------------------------------------------------------

    def handle(
        self,
        readable: Sequence[memoryview],
        writable: Sequence[memoryview],
        token: Any = None,
    ) -> int:
        """Serve one request; returns the reply length written into ``writable`` (0 for none)
        or :data:`DEFERRED` when the reply will be delivered later (:attr:`deferred_reply`)."""
        out = ReplyWriter(writable) if writable else None
        reader: RequestReader | None = None
        if len(readable) == 1:
            # /dev/fuse, and front-ends that put a request in one buffer: slice, don't copy.
            buf = readable[0]
            total = len(buf)
            if total < _IN_SIZE:
                log.warning("request shorter than the FUSE header (%d bytes)", total)
                return self._error(out, errno.EINVAL, 0)
            header: Any = buf
        else:
            reader = RequestReader(readable)
            total = reader.remaining
            try:
                header = reader.read(_IN_SIZE)
            except ShortBuffer:
                log.warning("request shorter than the FUSE header (%d bytes)", total)
                return self._error(out, errno.EINVAL, 0)
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _IN_HEADER.unpack_from(header)
        args_len = length - _IN_SIZE - extlen * 8
        if length > total or args_len < 0:
            log.warning(
                "request %d (opcode %d): header says %d bytes, %d arrived",
                unique,
                opcode,
                length,
                total,
            )
            return self._error(out, errno.EINVAL, unique)
        handler = self._ops[opcode] if opcode < 64 else None
        if opcode < 64:
            self.counts[opcode] += 1
        if handler is None:
            log.debug("unsupported opcode %d", opcode)
            return self._error(out, errno.ENOSYS, unique)
        if not self.initialized and opcode != abi.Opcode.INIT:
            log.warning("opcode %d before INIT", opcode)
            return self._error(out, errno.EIO, unique)
        room = REPLY_ROOM[opcode]
        if room and (out is None or out.capacity < room):
            # Refused before it runs: whatever it did, the guest could not be told.
            log.warning(
                "request %d (opcode %d) has no room for a reply (%d of %d bytes)",
                unique,
                opcode,
                0 if out is None else out.capacity,
                room,
            )
            return self._error(out, errno.EINVAL, unique)

        ctx = Context(uid, gid, pid, unique)
        inflight = self._inflight
        inflight[unique] = ctx
        try:
            body_len = min(args_len, _WRITE_IN_SIZE) if opcode == _WRITE else args_len
            if reader is None:
                body: Any = buf[_IN_SIZE : _IN_SIZE + body_len]
                if opcode == _WRITE:
                    reader = RequestReader([buf[_IN_SIZE + body_len : length]])
            else:
                reader.remaining = length - _IN_SIZE
                body = reader.read(body_len)
            if extlen and opcode in _CREATING:
                if len(readable) == 1:
                    ext: Any = buf[length - extlen * 8 : length]
                else:
                    ext = reader.read(extlen * 8)
                ctx.groups = self._groups(ext)
            result = handler(ctx, nodeid, body, reader, out, token)
        except OSError as e:
            inflight.pop(unique, None)
            return self._error(out, e.errno or errno.EIO, unique)
        except (MalformedRequest, ShortBuffer, struct.error, ValueError, OverflowError) as e:
            inflight.pop(unique, None)
            log.warning("malformed request %d (opcode %d): %s", unique, opcode, e)
            return self._error(out, errno.EINVAL, unique)
        except Exception:
            inflight.pop(unique, None)
            log.exception("request %d (opcode %d) failed", unique, opcode)
            return self._error(out, errno.EIO, unique)
        if result == DEFERRED:
            # The waiter removes the request from _inflight when it is done.
            return DEFERRED
        inflight.pop(unique, None)
        if result == NO_REPLY:
            return 0
        assert out is not None
        return out.finish(_OUT_HEADER, 0, unique)

    def fail(self, readable: Sequence[memoryview], writable: Sequence[memoryview], err: int) -> int:
        """Answer a request that can't be served (some of its buffers are out of reach)
        with ``err``, when its header and room for a reply header are there."""
        try:
            header = RequestReader(readable).read(_IN_SIZE)
        except ShortBuffer:
            return 0
        _, opcode, unique = _IN_HEADER.unpack_from(header)[:3]
        if opcode in (abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT):
            return 0
        log.warning("request %d (opcode %d) answered %s", unique, opcode, errno.errorcode[err])
        return self._error(ReplyWriter(writable) if writable else None, err, unique)

    def in_flight(self) -> int:
        """Requests being served now: after the transport has stopped, those still running in
        the backend (stuck there, or waiting for a lock)."""
        return len(self._inflight)

    def interrupt_waiting(self) -> None:
        """End every deferred wait (they answer EINTR): the queue or connection is going."""
        for ctx in list(self._waiting.values()):
            ctx.interrupted = True

    def reset(self) -> None:
        """The session ended without DESTROY (the guest's driver reset the device): forget
        it, and expect a new INIT."""
        self.interrupt_waiting()
        if self.initialized:
            self.initialized = False
            self.fs.destroy()

    def _error(self, out: ReplyWriter | None, err: int, unique: int) -> int:
        if out is None or out.capacity < ReplyWriter.HEADER:
            return 0
        out.reset()
        return out.finish(_OUT_HEADER, -err, unique)

    @staticmethod
    def _groups(ext: Any) -> tuple[int, ...]:
        """Supplementary groups from the request's extension headers."""
        pos = 0
        while pos + abi.EXT_HEADER.size <= len(ext):
            size, kind = abi.EXT_HEADER.struct.unpack_from(ext, pos)
            if size < abi.EXT_HEADER.size or pos + size > len(ext):
                raise MalformedRequest("bad extension header")
            if kind == abi.EXT_GROUPS:
                (count,) = abi.SUPP_GROUPS.struct.unpack_from(ext, pos + 8)
                if 12 + 4 * count > size:
                    raise MalformedRequest("supplementary groups overrun their extension")
                return tuple(
                    int.from_bytes(ext[pos + 12 + 4 * i : pos + 16 + 4 * i], "little")
                    for i in range(count)
                )
            pos += size
        return ()

    def reply_bytes(self, unique: int, error: int = 0, payload: bytes = b"") -> bytes:
        """A whole reply as bytes, for deferred requests."""
        return _OUT_HEADER.pack(16 + len(payload), -error, unique) + payload

    # --- session ---------------------------------------------------------------------------

    def _op_init(self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any) -> int:
        raw = bytes(body[: abi.INIT_IN.size]).ljust(abi.INIT_IN.size, b"\0")
        major, minor, max_readahead, flags, flags2 = abi.INIT_IN.struct.unpack_from(raw)[:5]
        if not flags & abi.InitFlag.INIT_EXT or len(body) < 20:
            flags2 = 0
        if major < abi.KERNEL_VERSION:
            log.error("kernel speaks FUSE %d.%d, too old", major, minor)
            raise OSError(errno.EPROTO, "FUSE major version too old")
        if major > abi.KERNEL_VERSION:
            # Tell the kernel our major; it sends a new INIT if it can speak it.
            out.write(abi.INIT_OUT.pack(major=abi.KERNEL_VERSION, minor=abi.KERNEL_MINOR_VERSION))
            return 0
        if minor < abi.MIN_KERNEL_MINOR_VERSION:
            log.error(
                "kernel speaks FUSE 7.%d; 7.%d or newer needed", minor, abi.MIN_KERNEL_MINOR_VERSION
            )
            raise OSError(errno.EPROTO, "FUSE minor version too old")
        capable = flags | (flags2 << 32)
        conn = ConnectionInfo(
            major=major,
            minor=min(minor, abi.KERNEL_MINOR_VERSION),
            capable=capable,
            want=capable & DEFAULT_FLAGS,
            max_readahead=max_readahead,
            max_write=self.max_write,
            map_alignment=self.map_alignment or 0,
            backing_open=self.backing_open,
            backing_close=self.backing_close,
            dax_window=self.dax_window,
        )
        if self.map_alignment is not None:
            conn.want |= capable & abi.InitFlag.MAP_ALIGNMENT
        with self._init_lock:
            self.fs.init(conn)
            want = conn.want & capable & ~self.disabled_flags
            if not flags & abi.InitFlag.INIT_EXT:
                want &= 0xFFFFFFFF
            self.flags = want
            self.proto_minor = conn.minor
            self.initialized = True
        max_stack_depth = 1 if want & abi.InitFlag.PASSTHROUGH else 0
        reply = abi.INIT_OUT.pack(
            abi.KERNEL_VERSION,
            abi.KERNEL_MINOR_VERSION,
            max_readahead,
            want & 0xFFFFFFFF,
            0xFFFF,  # max_background
            0xBFFD,  # congestion_threshold: 3/4 of max_background
            self.max_write,
            1,  # time_gran: nanoseconds
            self.max_write // abi.PAGE_SIZE,
            conn.map_alignment if want & abi.InitFlag.MAP_ALIGNMENT else 0,
            want >> 32,
            max_stack_depth,
            0,
            (0,) * 11,
        )
        if minor < 5:
            reply = reply[: abi.COMPAT_INIT_OUT_SIZE]
        elif minor < 23:
            reply = reply[: abi.COMPAT_22_INIT_OUT_SIZE]
        out.write(reply)
        log.info("FUSE session 7.%d, flags %#x, max_write %d", conn.minor, want, self.max_write)
        return 0

    def _op_destroy(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        self.fs.destroy()
        self.initialized = False
        return 0

    def _op_interrupt(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        (target,) = abi.INTERRUPT_IN.struct.unpack_from(body)
        victim = self._inflight.get(target)
        if victim is not None:
            victim.interrupted = True
            return NO_REPLY
        # Not seen yet (or already answered): EAGAIN makes the kernel send it again.
        if out is None:
            return NO_REPLY
        raise OSError(errno.EAGAIN, "interrupted request not found")

    def _op_forget(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        (nlookup,) = abi.FORGET_IN.struct.unpack_from(body)
        self.fs.forget(nodeid, nlookup)
        return NO_REPLY

    def _op_batch_forget(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        count, _ = abi.BATCH_FORGET_IN.struct.unpack_from(body)
        size = abi.FORGET_ONE.size
        count = min(count, (len(body) - abi.BATCH_FORGET_IN.size) // size)
        unpack = abi.FORGET_ONE.struct.unpack_from
        base = abi.BATCH_FORGET_IN.size
        self.fs.batch_forget([unpack(body, base + i * size) for i in range(count)])
        return NO_REPLY

    # --- inodes ----------------------------------------------------------------------------

    def _op_lookup(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        name, _ = _name(body, 0)
        _pack_entry(out, self.fs.lookup(ctx, nodeid, name))
        return 0

    def _pack_attr(self, out: ReplyWriter, attr_and_timeout: tuple[Any, float]) -> None:
        attr, timeout = attr_and_timeout
        av, avn = _timeout(timeout)
        out.pack(_ATTR_OUT, av, avn, 0, *attr.values())

    def _op_getattr(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        flags, _, fh = abi.GETATTR_IN.struct.unpack_from(body)
        self._pack_attr(out, self.fs.getattr(ctx, nodeid, fh if flags & abi.GETATTR_FH else None))
        return 0

    def _op_setattr(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        s = abi.SETATTR_IN.unpack(body)
        valid = s.valid
        changes = SetAttr(
            mode=s.mode if valid & abi.FATTR_MODE else None,
            uid=s.uid if valid & abi.FATTR_UID else None,
            gid=s.gid if valid & abi.FATTR_GID else None,
            size=s.size if valid & abi.FATTR_SIZE else None,
            fh=s.fh if valid & abi.FATTR_FH else None,
            lock_owner=s.lock_owner if valid & abi.FATTR_LOCKOWNER else None,
            kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID),
        )
        if valid & abi.FATTR_ATIME_NOW:
            changes.atime = SetAttr.NOW
        elif valid & abi.FATTR_ATIME:
            changes.atime = s.atime * 1_000_000_000 + s.atimensec
        if valid & abi.FATTR_MTIME_NOW:
            changes.mtime = SetAttr.NOW
        elif valid & abi.FATTR_MTIME:
            changes.mtime = s.mtime * 1_000_000_000 + s.mtimensec
        if valid & abi.FATTR_CTIME:
            changes.ctime = s.ctime * 1_000_000_000 + s.ctimensec
        self._pack_attr(out, self.fs.setattr(ctx, nodeid, changes))
        return 0

    def _op_statx(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        getattr_flags, _, fh, sx_flags, sx_mask = abi.STATX_IN.struct.unpack_from(body)
        fields, timeout = self.fs.statx(
            ctx, nodeid, fh if getattr_flags & abi.GETATTR_FH else None, sx_flags, sx_mask
        )
        av, avn = _timeout(timeout)
        out.write(abi.STATX_OUT.pack(attr_valid=av, attr_valid_nsec=avn, **fields))
        return 0

    def _op_readlink(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        out.write(self.fs.readlink(ctx, nodeid))
        return 0

    def _op_symlink(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        name, pos = _name(body, 0)
        target, _ = _name(body, pos)
        _pack_entry(out, self.fs.symlink(ctx, nodeid, name, target))
        return 0

    def _op_mknod(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        mode, rdev, umask, _ = abi.MKNOD_IN.struct.unpack_from(body)
        name, _ = _name(body, abi.MKNOD_IN.size)
        _pack_entry(out, self.fs.mknod(ctx, nodeid, name, mode, rdev, umask))
        return 0

    def _op_mkdir(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        mode, umask = abi.MKDIR_IN.struct.unpack_from(body)
        name, _ = _name(body, abi.MKDIR_IN.size)
        _pack_entry(out, self.fs.mkdir(ctx, nodeid, name, mode, umask))
        return 0

    def _op_unlink(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        self.fs.unlink(ctx, nodeid, _name(body, 0)[0])
        return 0

    def _op_rmdir(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        self.fs.rmdir(ctx, nodeid, _name(body, 0)[0])
        return 0

    def _op_rename(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        (newdir,) = abi.RENAME_IN.struct.unpack_from(body)
        old, pos = _name(body, abi.RENAME_IN.size)
        new, _ = _name(body, pos)
        self.fs.rename(ctx, nodeid, old, newdir, new, 0)
        return 0

    def _op_rename2(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        newdir, flags, _ = abi.RENAME2_IN.struct.unpack_from(body)
        old, pos = _name(body, abi.RENAME2_IN.size)
        new, _ = _name(body, pos)
        self.fs.rename(ctx, nodeid, old, newdir, new, flags)
        return 0

    def _op_link(self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any) -> int:
        (oldnodeid,) = abi.LINK_IN.struct.unpack_from(body)
        name, _ = _name(body, abi.LINK_IN.size)
        _pack_entry(out, self.fs.link(ctx, oldnodeid, nodeid, name))
        return 0

    # --- files -----------------------------------------------------------------------------

    def _op_open(self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any) -> int:
        flags, open_flags = abi.OPEN_IN.struct.unpack_from(body)
        opened = self.fs.open(ctx, nodeid, flags, bool(open_flags & abi.OPEN_KILL_SUIDGID))
        _pack_open(out, opened)
        return 0

    def _op_create(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        flags, mode, umask, open_flags = abi.CREATE_IN.struct.unpack_from(body)
        name, _ = _name(body, abi.CREATE_IN.size)
        entry, opened = self.fs.create(
            ctx, nodeid, name, mode, flags, umask, bool(open_flags & abi.OPEN_KILL_SUIDGID)
        )
        _pack_entry(out, entry)
        _pack_open(out, opened)
        return 0

    def _op_tmpfile(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        flags, mode, umask, _ = abi.CREATE_IN.struct.unpack_from(body)
        entry, opened = self.fs.tmpfile(ctx, nodeid, mode, flags, umask)
        _pack_entry(out, entry)
        _pack_open(out, opened)
        return 0

    def _op_read(self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any) -> int:
        fh, offset, size = abi.READ_IN.struct.unpack_from(body)[:3]
        self.fs.read(ctx, nodeid, fh, offset, min(size, self.max_write, out.space()), out)
        return 0

    def _op_write(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        if len(body) < abi.WRITE_IN.size:
            # Kernels before 7.9 sent a 24-byte write_in; pad the missing fields with zeros.
            body = bytes(body).ljust(abi.WRITE_IN.size, b"\0")
        fh, offset, size, write_flags = abi.WRITE_IN.struct.unpack_from(body)[:4]
        if size > reader.remaining:
            raise MalformedRequest(f"WRITE of {size} bytes carries {reader.remaining}")
        if size > self.max_write:
            raise OSError(errno.EINVAL, "write larger than max_write")
        data = WriteData(reader.views(size), size)
        written = self.fs.write(ctx, nodeid, fh, offset, data, write_flags)
        out.pack(abi.WRITE_OUT.struct, written, 0)
        return 0

    def _op_flush(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, _, _, lock_owner = abi.FLUSH_IN.struct.unpack_from(body)
        self.fs.flush(ctx, nodeid, fh, lock_owner)
        return 0

    def _op_release(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, flags, release_flags, lock_owner = abi.RELEASE_IN.struct.unpack_from(body)
        self.fs.release(
            ctx,
            nodeid,
            fh,
            flags,
            lock_owner,
            bool(release_flags & abi.RELEASE_FLUSH),
            bool(release_flags & abi.RELEASE_FLOCK_UNLOCK),
        )
        return 0

    def _op_fsync(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, fsync_flags, _ = abi.FSYNC_IN.struct.unpack_from(body)
        self.fs.fsync(ctx, nodeid, fh, bool(fsync_flags & abi.FSYNC_FDATASYNC))
        return 0

    def _op_fallocate(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.struct.unpack_from(body)
        self.fs.fallocate(ctx, nodeid, fh, mode, offset, length)
        return 0

    def _op_lseek(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, offset, whence, _ = abi.LSEEK_IN.struct.unpack_from(body)
        out.pack(abi.LSEEK_OUT.struct, self.fs.lseek(ctx, nodeid, fh, offset, whence))
        return 0

    def _copy_file_range(self, nodeid: int, ctx: Context, body: Any) -> int:
        fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = (
            abi.COPY_FILE_RANGE_IN.struct.unpack_from(body)
        )
        return self.fs.copy_file_range(
            ctx, nodeid, fh_in, off_in, nodeid_out, fh_out, off_out, length, flags
        )

    def _op_copy_file_range(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        # The 32-bit reply can't say more than 4 GiB - 1: the kernel loops for the rest.
        copied = self._copy_file_range(nodeid, ctx, body)
        out.pack(abi.WRITE_OUT.struct, min(copied, 0xFFFFFFFF), 0)
        return 0

    def _op_copy_file_range_64(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        out.pack(abi.COPY_FILE_RANGE_OUT.struct, self._copy_file_range(nodeid, ctx, body))
        return 0

    # --- directories -----------------------------------------------------------------------

    def _op_opendir(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        flags, _ = abi.OPEN_IN.struct.unpack_from(body)
        _pack_open(out, self.fs.opendir(ctx, nodeid, flags))
        return 0

    def _readdir(self, ctx: Context, nodeid: int, body: Any, out: Any, plus: bool) -> int:
        fh, offset, size = abi.READ_IN.struct.unpack_from(body)[:3]
        self.fs.readdir(ctx, nodeid, fh, offset, DirBuffer(out, size, plus))
        return 0

    def _op_readdir(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        return self._readdir(ctx, nodeid, body, out, False)

    def _op_readdirplus(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        return self._readdir(ctx, nodeid, body, out, True)

    def _op_releasedir(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, flags, _, _ = abi.RELEASE_IN.struct.unpack_from(body)
        self.fs.releasedir(ctx, nodeid, fh, flags)
        return 0

    def _op_fsyncdir(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, fsync_flags, _ = abi.FSYNC_IN.struct.unpack_from(body)
        self.fs.fsyncdir(ctx, nodeid, fh, bool(fsync_flags & abi.FSYNC_FDATASYNC))
        return 0

    # --- file system -----------------------------------------------------------------------

    def _op_statfs(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        st = self.fs.statfs(ctx, nodeid)
        out.write(
            abi.KSTATFS.pack(
                st.blocks,
                st.bfree,
                st.bavail,
                st.files,
                st.ffree,
                st.bsize,
                st.namelen,
                st.frsize,
                0,
                (0,) * 6,
            )
        )
        return 0

    def _op_syncfs(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        self.fs.syncfs(ctx, nodeid)
        return 0

    def _op_access(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        mask, _ = abi.ACCESS_IN.struct.unpack_from(body)
        self.fs.access(ctx, nodeid, mask)
        return 0

    # --- extended attributes ---------------------------------------------------------------

    def _op_setxattr(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        if self.flags & abi.InitFlag.SETXATTR_EXT:
            size, flags, setxattr_flags, _ = abi.SETXATTR_IN.struct.unpack_from(body)
            pos = abi.SETXATTR_IN.size
        else:
            size, flags = abi.GETXATTR_IN.struct.unpack_from(body)
            setxattr_flags, pos = 0, abi.COMPAT_SETXATTR_IN_SIZE
        name, pos = _name(body, pos)
        value = bytes(body[pos : pos + size])
        if len(value) != size:
            raise MalformedRequest("xattr value shorter than its size")
        self.fs.setxattr(ctx, nodeid, name, value, flags, setxattr_flags)
        return 0

    def _sized_reply(self, out: ReplyWriter, size: int, value: bytes) -> None:
        """The getxattr/listxattr convention: size 0 asks for the length only."""
        if size == 0:
            out.pack(_U32, len(value), 0)
        elif len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        else:
            out.write(value)

    def _op_getxattr(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        size, _ = abi.GETXATTR_IN.struct.unpack_from(body)
        name, _ = _name(body, abi.GETXATTR_IN.size)
        self._sized_reply(out, size, self.fs.getxattr(ctx, nodeid, name))
        return 0

    def _op_listxattr(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        size, _ = abi.GETXATTR_IN.struct.unpack_from(body)
        names = self.fs.listxattr(ctx, nodeid)
        self._sized_reply(out, size, b"".join(n + b"\0" for n in names))
        return 0

    def _op_removexattr(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        self.fs.removexattr(ctx, nodeid, _name(body, 0)[0])
        return 0

    # --- locks -----------------------------------------------------------------------------

    def _op_getlk(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, owner, start, end, ltype, pid, _, _ = abi.LK_IN.struct.unpack_from(body)
        lock = self.fs.getlk(ctx, nodeid, fh, owner, Lock(start, end, ltype, pid))
        out.pack(abi.LK_OUT.struct, lock.start, lock.end, lock.type, lock.pid)
        return 0

    def _setlk(self, ctx: Context, nodeid: int, body: Any, token: Any, sleep: bool) -> int:
        fh, owner, start, end, ltype, pid, lk_flags, _ = abi.LK_IN.struct.unpack_from(body)
        lock = Lock(start, end, ltype, pid)
        flock = bool(lk_flags & abi.LK_FLOCK)
        if not sleep or self.deferred_reply is None:
            self.fs.setlk(ctx, nodeid, fh, owner, lock, sleep, flock)
            return 0
        try:
            self.fs.setlk(ctx, nodeid, fh, owner, lock, False, flock)
            return 0
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        # The lock is held elsewhere: wait for it off this thread, so that the request that
        # will release it can still be served.
        unique = ctx.unique
        waiters = self.lock_waiters
        if not waiters.reserve():
            log.warning("request %d: %d lock waits already; ENOLCK", unique, self.lock_waiters.size)
            raise OSError(errno.ENOLCK, "too many lock waits")
        try:
            deliver = self.deferred_reply(token)
        except BaseException:
            waiters.unreserve()
            raise
        self._waiting[unique] = ctx

        def wait() -> None:
            try:
                self.fs.setlk(ctx, nodeid, fh, owner, lock, True, flock)
                reply = self.reply_bytes(unique)
            except OSError as e:
                reply = self.reply_bytes(unique, e.errno or errno.EIO)
            except Exception:
                log.exception("blocking lock request %d failed", unique)
                reply = self.reply_bytes(unique, errno.EIO)
            finally:
                self._inflight.pop(unique, None)
                self._waiting.pop(unique, None)
            deliver(reply)

        waiters.run(wait)
        return DEFERRED

    def _op_setlk(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, token: Any
    ) -> int:
        return self._setlk(ctx, nodeid, body, token, False)

    def _op_setlkw(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, token: Any
    ) -> int:
        return self._setlk(ctx, nodeid, body, token, True)

    # --- DAX window ------------------------------------------------------------------------

    def _op_setupmapping(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, foffset, length, flags, moffset = abi.SETUPMAPPING_IN.struct.unpack_from(body)
        self.fs.setupmapping(ctx, nodeid, fh, foffset, length, flags, moffset)
        return 0

    def _op_removemapping(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        (count,) = abi.REMOVEMAPPING_IN.struct.unpack_from(body)
        size = abi.REMOVEMAPPING_ONE.size
        base = abi.REMOVEMAPPING_IN.size
        if count > MAX_BATCH or base + count * size > len(body):
            raise MalformedRequest(f"REMOVEMAPPING of {count} ranges in {len(body)} bytes")
        unpack = abi.REMOVEMAPPING_ONE.struct.unpack_from
        self.fs.removemapping(ctx, [unpack(body, base + i * size) for i in range(count)])
        return 0

    # --- the rest --------------------------------------------------------------------------

    def _op_bmap(self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any) -> int:
        block, blocksize, _ = abi.BMAP_IN.struct.unpack_from(body)
        out.pack(abi.BMAP_OUT.struct, self.fs.bmap(ctx, nodeid, blocksize, block))
        return 0

    def _op_poll(self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any) -> int:
        fh, kh, flags, events = abi.POLL_IN.struct.unpack_from(body)
        out.pack(abi.POLL_OUT.struct, self.fs.poll(ctx, nodeid, fh, kh, flags, events), 0)
        return 0

    def _op_ioctl(
        self, ctx: Context, nodeid: int, body: Any, reader: Any, out: Any, _t: Any
    ) -> int:
        fh, flags, cmd, arg, in_size, out_size = abi.IOCTL_IN.struct.unpack_from(body)
        data = bytes(body[abi.IOCTL_IN.size : abi.IOCTL_IN.size + in_size])
        # Ask the file system for no more data than fits after the fixed part.
        out_size = min(out_size, out.space() - abi.IOCTL_OUT.size)
        result, reply = self.fs.ioctl(ctx, nodeid, fh, flags, cmd, arg, data, out_size)
        out.pack(abi.IOCTL_OUT.struct, result, 0, 0, 0)
        out.write(reply[:out_size])
        return 0
