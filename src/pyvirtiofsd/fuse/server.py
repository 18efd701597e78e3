"""The FUSE server: one request in, one reply out, whatever carried them.

:meth:`Server.handle` decodes a request from readable buffers, calls the :class:`Filesystem`, and
encodes the reply into writable buffers. The same code serves /dev/fuse (one buffer each way)
and virtqueue descriptor chains (several); file data moves between the buffers and file
descriptors without being copied in Python. Nothing here does I/O of its own.

Decoding is table-driven: each opcode has one entry (:class:`Op`) giving the layout of its fixed
arguments, how many NUL-terminated names follow them, whether the handler takes the rest of the
request (WRITE data, xattr values, batches), and the room its reply needs. The handler receives
the decoded fields as arguments, in the layout's order. The compiled build decodes the header and
the fixed arguments in C (``_request.c``) where they lie whole in the buffers, and leaves every
other request to the decoding in Python, so that both builds answer alike.

What a transport gives the server, it gives once, at construction (:class:`TransportCaps`): the
largest write, the DAX window and its alignment, FUSE_PASSTHROUGH's backing files, and a way to
answer a request later. Requests that wait (a SETLKW whose lock is held) are answered that way:
:meth:`Server.handle` returns None, and a :class:`Completion` the transport made for the request
receives the reply once the wait ends.

Rules the server keeps for a hostile guest:

* A request runs only if its reply fits: the room each opcode's reply needs up front (the out
  header and the reply's fixed part) is checked before the file system sees the request, so a
  CREATE whose reply could not be delivered creates nothing, opens nothing and takes no lookup
  reference. It gets EINVAL, or no reply at all when not even the out header fits. Variable
  parts (READ data, READDIR entries, READLINK, xattr values, IOCTL data) are fitted to the room
  by their handlers and have no side effects.
* Arguments shorter than their layout, lengths that disagree, names without a NUL, unknown
  opcodes: an error reply and a log line; the server keeps serving. Extensions are checked
  whole before the file system sees the request: a security context comes only once
  FUSE_SECURITY_CTX is agreed, only with requests that make a file, at most one, laid out
  exactly as the kernel lays it out; anything else is EINVAL and nothing is made.
* Requests that wait do so on the threads of one bounded pool per connection
  (:data:`MAX_LOCK_WAITERS`); beyond it the request gets ENOLCK at once.
* A well-formed INTERRUPT is never answered, and reaches only a request that waits: one whose
  wait has not begun yet (it came on another queue) ends it as soon as it begins. At most
  :data:`_EARLY_INTERRUPTS` are kept for that, whatever a guest sends, and none outlives its
  session. Only requests that wait are tracked; no request is looked up by its unique
  otherwise.
* A request is the first ``readable_len`` bytes of its buffers when the transport says so;
  nothing after them is read.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

from pyvirtiofsd.carried import Carried
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.buffers import Buffer, ReplyWriter, RequestReader, ShortBuffer, WriteData
from pyvirtiofsd.fuse.dirents import DirentWriter
from pyvirtiofsd.fuse.filesystem import (
    NOW,
    Attr,
    ConnectionInfo,
    Context,
    DaxWindow,
    Entry,
    Filesystem,
    Lock,
    Opened,
    SecurityContext,
    SetAttr,
)
from pyvirtiofsd.fuse.records import entry_out, split_timeout
from pyvirtiofsd.fuse.state import StateError, StateReader, StateWriter

__all__ = [
    "DEFAULT_FLAGS",
    "MAX_LOCK_WAITERS",
    "MAX_WRITE",
    "OPS",
    "REPLY_ROOM",
    "Completion",
    "LockWaiters",
    "MalformedRequest",
    "Op",
    "Server",
    "ServerConfig",
    "TransportCaps",
]

log = logging.getLogger(__name__)

MAX_WRITE: Final = 1 << 20
#: Cap on the count of a BATCH_FORGET or REMOVEMAPPING, far above what the kernel sends.
MAX_BATCH: Final = 1 << 16
#: Blocking lock waits (SETLKW that has to wait) one connection may have at once, each on a
#: thread of its own; one more gets ENOLCK. The guest kernel sends a SETLKW per waiting
#: process, so this is the number of guest processes that can wait for a lock together.
MAX_LOCK_WAITERS: Final = 64
#: A lock-wait thread idle this long (seconds) ends; the pool starts threads again on demand.
LOCK_WAITER_IDLE: Final = 30.0

_IN_HEADER: Final = abi.IN_HEADER.struct
_IN_SIZE: Final = abi.IN_HEADER.size
_HEADER: Final = abi.OUT_HEADER.size
_ATTR_OUT_HEAD: Final = abi.ATTR_OUT_HEAD.struct
_OPEN_OUT: Final = abi.OPEN_OUT.struct
_U32: Final = abi.GETXATTR_OUT.struct

try:
    from pyvirtiofsd.fuse._request import split as _c_split
except ImportError:  # the pure build
    _c_split = None
#: Final: a compiled build reads it as a C variable, not from the module's dictionary.
_native_split: Final = _c_split

_GETATTR: Final = int(abi.Opcode.GETATTR)
_LOOKUP: Final = int(abi.Opcode.LOOKUP)
_READ: Final = int(abi.Opcode.READ)
_WRITE: Final = int(abi.Opcode.WRITE)
_FORGET: Final = int(abi.Opcode.FORGET)
_OPEN: Final = int(abi.Opcode.OPEN)
_CREATE: Final = int(abi.Opcode.CREATE)
_FLUSH: Final = int(abi.Opcode.FLUSH)
_RELEASE: Final = int(abi.Opcode.RELEASE)
_UNLINK: Final = int(abi.Opcode.UNLINK)

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


class MalformedRequest(Exception):
    """The request's bytes contradict themselves; it gets EINVAL."""


class Completion(Protocol):
    """A request answered later: the buffers its reply goes into, which stay valid until
    :meth:`complete` is called (once, from any thread) with the reply's length."""

    @property
    def writable(self) -> Sequence[memoryview]: ...

    def complete(self, length: int) -> None: ...


@dataclass(frozen=True, slots=True)
class TransportCaps:
    """What the transport carrying the requests offers the server."""

    #: Largest WRITE (and READ) the transport's buffers take.
    max_write: int = MAX_WRITE
    #: The DAX window (virtio-fs shared memory), handed to the file system at INIT.
    dax_window: DaxWindow | None = None
    #: log2 alignment of DAX mappings, offered with the window.
    map_alignment: int | None = None
    #: FUSE_PASSTHROUGH (/dev/fuse): register a backing file, and drop it.
    backing_open: Callable[[int], int] | None = None
    backing_close: Callable[[int], None] | None = None
    #: ``later(token)``, called while a request is being handled with the ``token`` the
    #: transport passed to :meth:`Server.handle`: a :class:`Completion` for that request.
    #: Without it, requests that wait block the thread that serves them.
    later: Callable[[Any], Completion] | None = None
    #: FUSE over io_uring (/dev/fuse): offered at INIT when the kernel offers it; the transport
    #: then looks at :attr:`Server.flags` once INIT is answered.
    io_uring: bool = False


@dataclass(frozen=True)
class ServerConfig:
    """What the server agrees to, whatever the file system wants (filled from the command line
    by field name)."""

    #: Serve POSIX record locks in the daemon (off: the guest's kernel keeps them local).
    posix_locks: bool = True
    #: Serve flock() locks in the daemon (off: local to the guest).
    flock_locks: bool = True

    @property
    def disabled_flags(self) -> int:
        flags = 0
        if not self.posix_locks:
            flags |= abi.InitFlag.POSIX_LOCKS
        if not self.flock_locks:
            flags |= abi.InitFlag.FLOCK_LOCKS
        return flags


class Op(NamedTuple):
    """How one opcode is decoded and answered."""

    name: str
    #: Its fixed arguments (None: none).
    args: struct.Struct | None
    #: NUL-terminated names after the fixed arguments.
    names: int
    #: The handler also gets a reader over the rest of the arguments.
    tail: bool
    #: Writable bytes its reply needs before it may run (0: it never replies).
    room: int
    #: Shorter arguments are zero-filled (INIT, whose layout grew) rather than refused.
    pad: bool


#: A row of the server's dispatch table (see :meth:`Server.__init__`).
_Dispatch = tuple[Op, Callable[..., Any], struct.Struct | None, int, int, int]
#: What the C decoding gives: the header's fields, the fixed arguments (and name) or None, and
#: the buffer and offset where the bytes after them begin.
_Split = tuple[int, int, int, int, int, int, int, int, "tuple[Any, ...] | None", int, int]
_INIT: Final = int(abi.Opcode.INIT)
#: The fixed size in the dispatch table of requests with one name after their fixed fields:
#: what the C decoding gives them is whole, whatever their length.
_NAMED: Final = -2

#: A handler's return value: the reply comes later, through a Completion.
_LATER: Final = 1
#: A handler's return value: no reply at all (FORGET, INTERRUPT).
_SILENT: Final = 2
#: A handler's return value: ENOENT, which the file system answered without an exception.
_NOENT: Final = 3
#: INTERRUPTs kept for requests that may begin to wait later; a guest that sends more loses
#: its oldest.
_EARLY_INTERRUPTS: Final = 256
_ENOENT: Final = errno.ENOENT

_OPS: dict[int, tuple[Op, str, tuple[Any, ...]]] = {}


def _op(
    opcode: abi.Opcode,
    args: abi.Layout | None = None,
    *,
    names: int = 0,
    tail: bool = False,
    reply: abi.Layout | int | None = 0,
    pad: bool = False,
    bind: tuple[Any, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a handler: ``reply`` is the layout of its fixed reply (or its size; None when
    the request never gets a reply). One handler may serve several opcodes; ``bind`` are the
    values that tell them apart, passed before everything else."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        size = reply if isinstance(reply, int) or reply is None else reply.size
        room = 0 if size is None else _HEADER + size
        layout = args.struct if args is not None else None
        _OPS[opcode] = (Op(opcode.name, layout, names, tail, room, pad), fn.__name__, bind)
        return fn

    return mark


def _names(raw: bytes, count: int) -> list[bytes]:
    """``count`` NUL-terminated names from the start of ``raw``."""
    if count == 1:
        # LOOKUP, UNLINK, MKDIR... one name, and the most frequent requests with one.
        end = raw.find(b"\0")
        if end < 0:
            raise MalformedRequest("name without NUL")
        return [raw[:end]]
    out = []
    pos = 0
    for _ in range(count):
        end = raw.find(b"\0", pos)
        if end < 0:
            raise MalformedRequest("name without NUL")
        out.append(raw[pos:end])
        pos = end + 1
    return out


#: Requests the kernel sends a security context with (those that make a file).
_SECCTX_OPS = frozenset(
    (
        abi.Opcode.CREATE,
        abi.Opcode.MKNOD,
        abi.Opcode.MKDIR,
        abi.Opcode.SYMLINK,
        abi.Opcode.TMPFILE,
    )
)
#: Longest xattr name and value Linux takes (XATTR_NAME_MAX, XATTR_SIZE_MAX).
_XATTR_NAME_MAX: Final = 255
_XATTR_SIZE_MAX: Final = 1 << 16
#: The smallest largest-write a kernel agrees on (it raises a smaller max_write to this).
_MIN_MAX_WRITE: Final = 4096


def _secctx(block: Any, count: int) -> SecurityContext | None:
    """The context in a security-context extension (``fuse_secctx_header``, then per context
    a ``fuse_secctx``, the xattr name with its NUL, the value, zeroes to 8 bytes), exactly as
    the kernel lays it out: at most one context, and nothing before, after or inside it that
    the layout does not account for."""
    size = len(block)
    if count == 0:
        if size != abi.SECCTX_HEADER.size:
            raise MalformedRequest(f"empty security context block of {size} bytes")
        return None
    if count > 1:
        raise MalformedRequest(f"{count} security contexts; the kernel sends one")
    start = abi.SECCTX_HEADER.size + abi.SECCTX.size
    if size < start:
        raise MalformedRequest("security context shorter than its header")
    (length, _) = abi.SECCTX.struct.unpack_from(block, abi.SECCTX_HEADER.size)
    end = bytes(block[start : start + _XATTR_NAME_MAX + 1]).find(b"\0")
    if end <= 0:
        raise MalformedRequest("security context name empty, too long or without NUL")
    name = bytes(block[start : start + end])
    if not 0 < length <= _XATTR_SIZE_MAX:
        raise MalformedRequest(f"security context of {length} bytes")
    value_at = start + end + 1
    if size != abi.SECCTX_HEADER.size + ((abi.SECCTX.size + end + 1 + length + 7) & ~7):
        raise MalformedRequest(f"security context of {length} bytes in a block of {size}")
    return SecurityContext(name, bytes(block[value_at : value_at + length]))


#: The head of an ATTR_OUT reply (validity, padding) per timeout, packed once: a file system
#: answers with the few timeouts it was configured with. The attributes follow it.
_ATTR_HEADS: Final[dict[float, bytes]] = {}
#: The last timeout packed, with its head (NaN matches none): compared as a float, where a
#: look-up in the table boxes and hashes it. Replaced whole, as records._LAST_TIMES is.
_LAST_HEAD: Final[list[tuple[float, bytes]]] = [(math.nan, b"")]


def _attr_head(timeout: float) -> bytes:
    last = _LAST_HEAD[0]
    if last[0] == timeout:
        return last[1]
    head = _ATTR_HEADS.get(timeout)
    if head is None:
        av, avn = split_timeout(timeout)
        head = _ATTR_OUT_HEAD.pack(av, avn, 0)
        if len(_ATTR_HEADS) < 64:
            _ATTR_HEADS[timeout] = head
    _LAST_HEAD[0] = (timeout, head)
    return head


#: abi.WRITE_OUT's struct, as a module constant of this module.
_WRITE_OUT: Final = abi.WRITE_OUT.struct


def _pack_entry(out: ReplyWriter, entry: Entry) -> None:
    out.write(entry_out(entry))


def _nanoseconds(seconds: int, nsec: int) -> int:
    """A SETATTR time in nanoseconds since the epoch. The kernel sends the seconds signed, in
    two's complement (a time before 1970 arrives above 2**63), and nanoseconds below a second;
    more is EINVAL, as utimensat() answers it, rather than carried into the seconds."""
    if nsec >= 1_000_000_000:
        raise MalformedRequest(f"SETATTR time with {nsec} nanoseconds")
    if seconds >= 1 << 63:
        seconds -= 1 << 64
    return seconds * 1_000_000_000 + nsec


def _flag_names(flags: int) -> str:
    if not flags:
        return "none"
    names = []
    for bit in range(64):
        if flags >> bit & 1:
            try:
                names.append(abi.InitFlag(1 << bit).name or hex(1 << bit))
            except ValueError:
                names.append(hex(1 << bit))
    return ", ".join(names)


def _pack_open(out: ReplyWriter, opened: Opened) -> None:
    # Not through out.pack(), as WRITE's reply is not: every OPEN and CREATE answers this.
    out.write(_OPEN_OUT.pack(opened.fh, opened.flags, opened.backing_id))


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
        """Run ``job`` on a pool thread, in a place taken with :meth:`reserve`. RuntimeError
        when a thread it needs can't be started: ``job`` then never runs."""
        with self._lock:
            start = self._busy > self._threads
            if start:
                self._threads += 1
        if start:
            # Started before the job is put, so that a failure leaves no job behind that some
            # thread might still run after the caller has answered for it.
            try:
                threading.Thread(target=self._serve, name="fuse-lock-wait", daemon=True).start()
            except RuntimeError:
                with self._lock:
                    self._threads -= 1
                raise
        with self._lock:
            # Put under the lock: a thread ending for idleness checks the queue under it too,
            # so no job is left without a thread.
            self._jobs.put(job)

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


class Server:
    """Serves one FUSE connection for one :class:`Filesystem`.

    Thread-safe: transports call :meth:`handle` from as many threads as they like.
    """

    def __init__(
        self,
        fs: Filesystem,
        config: ServerConfig | None = None,
        caps: TransportCaps | None = None,
    ) -> None:
        self.fs = fs
        self.config = config or ServerConfig()
        self.caps = caps or TransportCaps()
        self.max_write = self.caps.max_write
        self.initialized = False
        self.proto_minor = 0
        self.flags = 0
        #: What the kernel offered at INIT: (major, minor, max_readahead, flags).
        self._offered = (0, 0, 0, 0)
        #: Requests that wait (blocking locks), by unique: what INTERRUPT, a reset or a
        #: shutdown ends. Requests that don't wait are not tracked: they can't be interrupted.
        self._waiting: dict[int, Context] = {}
        #: INTERRUPTs that found no waiting request, oldest first: the request may not have
        #: begun to wait yet (it came on another queue), and then it ends as soon as it does.
        self._early: dict[int, None] = {}
        self._wait_lock = threading.Lock()
        #: Per-opcode request counts (observability).
        self.counts = [0] * 64
        #: Where requests that wait are served.
        self.lock_waiters = LockWaiters()
        self._init_lock = threading.Lock()
        #: opcode -> (decoding, bound handler, the layout of requests that are exactly their
        #: fixed arguments or None, its size (-1: none; _NAMED: one name after them), the
        #: size of the fixed arguments before the rest a handler reads itself or -1, the
        #: reply's room); the one table requests are dispatched by. The decoding's fields are
        #: copied out once here: a request then reads plain tuple items rather than a
        #: NamedTuple's attributes.
        self._table: list[_Dispatch | None] = [None] * 64
        layouts: list[bytes | None] = [None] * 64
        for opcode, (op, method, bind) in _OPS.items():
            handler = getattr(self, method)
            if bind:
                handler = functools.partial(handler, *bind)
            fixed = op.args if not op.names and not op.tail else None
            size = -1 if fixed is None else fixed.size
            tail = op.args.size if op.tail and op.args is not None else -1
            if op.args is not None and not op.names and not op.pad:
                layouts[opcode] = op.args.format.encode()
            elif op.names == 1 and not op.tail and not op.pad:
                # Its fixed fields and its one name, which the C decoding gives as the last
                # argument.
                layouts[opcode] = (op.args.format if op.args is not None else "<").encode() + b"z"
                size = _NAMED
            self._table[opcode] = (op, handler, fixed, size, tail, op.room)
        #: The fixed arguments the C decoding decodes with the header (see _request.c).
        self._layouts = tuple(layouts)

    # --- entry point -----------------------------------------------------------------------

    def handle(
        self,
        readable: Sequence[Buffer],
        writable: Sequence[memoryview],
        token: Any = None,
        readable_len: int | None = None,
        writable_len: int | None = None,
    ) -> int | None:
        """Serve one request. Returns the reply's length in ``writable`` (0: no reply), or
        None when the reply will come later through ``caps.later(token)``. A transport that
        knows how many bytes the buffers hold says so (``readable_len``, ``writable_len``),
        sparing the server a pass over them. One readable buffer may hold more than
        ``readable_len`` (a transport's buffer, reused): the request is its first bytes, and
        nothing after them is read."""
        out: ReplyWriter | None = ReplyWriter(writable, writable_len) if writable else None
        total = readable_len if readable_len is not None else sum(map(len, readable))
        # Typed, so that a compiled build checks and compares them as machine integers.
        length: int
        opcode: int
        unique: int
        extlen: int
        nodeid: int
        reader: RequestReader | None = None
        split: _Split | None = None
        if _native_split is not None and total >= _IN_SIZE:
            split = _native_split(readable, self._layouts)
        if split is not None:
            (
                length,
                opcode,
                unique,
                nodeid,
                uid,
                gid,
                pid,
                extlen,
                in_place,
                rest_index,
                rest_offset,
            ) = split
        else:
            in_place = None
            rest_index = rest_offset = 0
            reader = RequestReader(readable, None, total)
            try:
                buf, pos = reader.take(_IN_SIZE)
            except ShortBuffer:
                log.warning("request shorter than the FUSE header (%d bytes)", total)
                return self._error(out, errno.EINVAL, 0)
            header = _IN_HEADER.unpack_from(buf, pos)
            length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = header
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
        entry = self._table[opcode] if opcode < 64 else None
        if entry is None:
            log.debug("unsupported opcode %d", opcode)
            return self._error(out, errno.ENOSYS, unique)
        # Added and stored apart: a compiled build adds "+=" on a list item the generic way.
        counts = self.counts
        counts[opcode] = counts[opcode] + 1
        op, handler, fixed, fixed_size, tail_size, room = entry
        if not self.initialized and opcode != _INIT:
            log.warning("opcode %d before INIT", opcode)
            return self._error(out, errno.EIO, unique)
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
        try:
            args: tuple[Any, ...]
            if in_place is not None and (args_len == fixed_size or fixed_size == _NAMED):
                # Most requests: exactly their fixed arguments, or those and one name, decoded
                # with the header.
                args = in_place
            elif in_place is not None and 0 <= tail_size <= args_len:
                # WRITE and the others whose handler reads the rest of the request itself,
                # from where the C decoding says the fixed arguments end.
                reader = RequestReader(readable, None, total)
                reader.resume(rest_index, rest_offset, _IN_SIZE + tail_size)
                reader.remaining = args_len - tail_size
                # Concatenated: a compiled build makes (*in_place, reader) through a list.
                args = in_place + (reader,)  # noqa: RUF005
            else:
                if reader is None:
                    reader = RequestReader(readable, None, total)
                    reader.skip(_IN_SIZE)
                if args_len == fixed_size and fixed is not None:
                    buf, pos = reader.take(args_len)
                    args = fixed.unpack_from(buf, pos)
                else:
                    args = self._decode(op, reader, args_len)
            if extlen and not op.tail:
                # Extensions follow the arguments (only create-like requests carry them).
                if reader is None:
                    reader = RequestReader(readable, None, total)
                    reader.skip(_IN_SIZE + args_len)
                reader.remaining = extlen * 8
                self._extensions(ctx, opcode, reader.read(extlen * 8))
            # The requests a guest sends most are called by name, which a compiled build makes
            # a direct call: through the table each would pack its arguments into a tuple and
            # be called the generic way (about 1,000 instructions). FORGET comes without
            # room for a reply.
            if opcode == _FORGET:
                self._forget(ctx, nodeid, out, token, args[0])
                result = None
            elif out is None:
                result = handler(ctx, nodeid, out, token, *args)
            elif opcode == _GETATTR:
                flags, pad, fh = args
                self._getattr(ctx, nodeid, out, token, flags, pad, fh)
                result = None
            elif opcode == _READ:
                fh, offset, size, flags, owner, open_flags, pad = args
                self._read(ctx, nodeid, out, token, fh, offset, size, flags, owner, open_flags, pad)
                result = None
            elif opcode == _WRITE:
                fh, offset, size, flags, owner, open_flags, pad, rest = args
                self._write(
                    ctx, nodeid, out, token, fh, offset, size, flags, owner, open_flags, pad, rest
                )
                result = None
            elif opcode == _LOOKUP:
                result = self._lookup(ctx, nodeid, out, token, args[0])
            elif opcode == _FLUSH:
                fh, unused, pad, owner = args
                self._flush(ctx, nodeid, out, token, fh, unused, pad, owner)
                result = None
            elif opcode == _RELEASE:
                fh, flags, release_flags, owner = args
                self._release(ctx, nodeid, out, token, fh, flags, release_flags, owner)
                result = None
            elif opcode == _OPEN:
                flags, open_flags = args
                self._open(ctx, nodeid, out, token, flags, open_flags)
                result = None
            elif opcode == _CREATE:
                flags, mode, umask, open_flags, name = args
                self._create(ctx, nodeid, out, token, flags, mode, umask, open_flags, name)
                result = None
            elif opcode == _UNLINK:
                self._unlink(ctx, nodeid, out, token, args[0])
                result = None
            else:
                result = handler(ctx, nodeid, out, token, *args)
        except OSError as e:
            return self._error(out, e.errno or errno.EIO, unique)
        except (MalformedRequest, ShortBuffer, struct.error, ValueError, OverflowError) as bad:
            log.warning("malformed request %d (opcode %d): %s", unique, opcode, bad)
            return self._error(out, errno.EINVAL, unique)
        except Exception:
            log.exception("request %d (opcode %d) failed", unique, opcode)
            return self._error(out, errno.EIO, unique)
        if result is not None:
            # Only the few handlers that answer later, not at all, or with ENOENT without an
            # exception return anything.
            if result == _LATER:
                return None
            if result == _SILENT:
                return 0
            if result == _NOENT:
                return self._error(out, _ENOENT, unique)
        if not room:
            return 0
        assert out is not None
        return out.finish(0, unique)

    def handle_carried(self, request: Carried) -> int | None:
        """:meth:`handle` for a request that carries its buffers and is its own token: a
        transport passes this method itself as its per-request handler, so that no function
        of its own runs between the ring and the server for each request."""
        return self.handle(
            request.readable,
            request.writable,
            request,
            request.readable_len,
            request.writable_len,
        )

    @staticmethod
    def _decode(op: Op, reader: RequestReader, args_len: int) -> tuple[Any, ...]:
        """The handler's arguments after (ctx, nodeid, out, token): the fixed fields, the
        names, and the reader over the rest, as the opcode's :class:`Op` says."""
        layout = op.args
        if layout is None:
            args: list[Any] = []
            used = 0
        else:
            size = layout.size
            if args_len >= size:
                args = list(layout.unpack_from(*reader.take(size)))
                used = size
            elif op.pad:
                raw = bytes(reader.read(args_len)).ljust(size, b"\0")
                args = list(layout.unpack_from(raw))
                used = args_len
            else:
                raise MalformedRequest(f"{op.name} arguments of {args_len} bytes, need {size}")
        rest = args_len - used
        if op.names:
            args += _names(bytes(reader.read(rest)), op.names)
        elif op.tail:
            reader.remaining = rest
            args.append(reader)
        elif rest:
            reader.read(rest)  # arguments newer than ours: ignored
        return tuple(args)

    def fail(self, readable: Sequence[Buffer], writable: Sequence[memoryview], err: int) -> int:
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
        """Requests waiting for a lock now (the transports know which others still run)."""
        return len(self._waiting)

    def interrupt_waiting(self) -> None:
        """End every wait of a request answered later (they answer EINTR): the queue or
        connection is going."""
        with self._wait_lock:
            for ctx in self._waiting.values():
                ctx.interrupted = True

    def reset(self) -> None:
        """The session ended without DESTROY (the guest's driver reset the device): forget
        it, and expect a new INIT."""
        self.interrupt_waiting()
        # A session taken over (live migration) may have brought its own.
        self.max_write = self.caps.max_write
        self._forget_early_interrupts()
        if self.initialized:
            self.initialized = False
            self.fs.destroy()

    def _error(self, out: ReplyWriter | None, err: int, unique: int) -> int:
        if out is None or out.capacity < _HEADER:
            return 0
        out.reset()
        return out.finish(-err, unique)

    def _extensions(self, ctx: Context, opcode: int, ext: Any) -> None:
        """The request's extensions, into ``ctx``: supplementary groups, and the new file's
        security context. Each is a ``fuse_ext_header`` and its body, 8-byte aligned; types
        other than these are ignored."""
        pos = 0
        secctx_seen = False
        groups_seen = False
        while pos < len(ext):
            if pos + abi.EXT_HEADER.size > len(ext):
                raise MalformedRequest("extension header overruns the extensions")
            size, kind = abi.EXT_HEADER.struct.unpack_from(ext, pos)
            if size < abi.EXT_HEADER.size or size % 8 or size > len(ext) - pos:
                raise MalformedRequest(f"extension of {size} bytes at {pos} of {len(ext)}")
            if kind <= abi.EXT_MAX_NR_SECCTX:
                # The secctx header shares its layout with fuse_ext_header: "type" is the
                # number of contexts.
                if not self.flags & abi.InitFlag.SECURITY_CTX:
                    raise MalformedRequest("security context without FUSE_SECURITY_CTX")
                if opcode not in _SECCTX_OPS:
                    raise MalformedRequest(f"security context on opcode {opcode}")
                if secctx_seen:
                    raise MalformedRequest("two security context blocks")
                secctx_seen = True
                ctx.secctx = _secctx(ext[pos : pos + size], kind)
            elif kind == abi.EXT_GROUPS and not groups_seen:
                groups_seen = True
                (count,) = abi.SUPP_GROUPS.struct.unpack_from(ext, pos + 8)
                if 12 + 4 * count > size:
                    raise MalformedRequest("supplementary groups overrun their extension")
                ctx.groups = tuple(
                    int.from_bytes(ext[pos + 12 + 4 * i : pos + 16 + 4 * i], "little")
                    for i in range(count)
                )
            pos += size

    # --- session ---------------------------------------------------------------------------

    @_op(abi.Opcode.INIT, abi.INIT_IN, reply=abi.INIT_OUT, pad=True)
    def _init(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        major: int,
        minor: int,
        max_readahead: int,
        flags: int,
        flags2: int,
        *unused: int,
    ) -> None:
        if not flags & abi.InitFlag.INIT_EXT:
            flags2 = 0
        if major < abi.KERNEL_VERSION:
            log.error("kernel speaks FUSE %d.%d, too old", major, minor)
            raise OSError(errno.EPROTO, "FUSE major version too old")
        if major > abi.KERNEL_VERSION:
            # Tell the kernel our major; it sends a new INIT if it can speak it.
            out.write(abi.INIT_OUT.pack(major=abi.KERNEL_VERSION, minor=abi.KERNEL_MINOR_VERSION))
            return
        if minor < abi.MIN_KERNEL_MINOR_VERSION:
            log.error(
                "kernel speaks FUSE 7.%d; 7.%d or newer needed", minor, abi.MIN_KERNEL_MINOR_VERSION
            )
            raise OSError(errno.EPROTO, "FUSE minor version too old")
        conn, want = self._negotiate(major, minor, max_readahead, flags | (flags2 << 32))
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

    def _negotiate(
        self, major: int, minor: int, max_readahead: int, capable: int
    ) -> tuple[ConnectionInfo, int]:
        """Agree on a session with the file system from what the kernel offered at INIT (or
        what a saved session says it offered); the flags in force."""
        caps = self.caps
        conn = ConnectionInfo(
            major=major,
            minor=min(minor, abi.KERNEL_MINOR_VERSION),
            capable=capable,
            want=capable & DEFAULT_FLAGS,
            max_readahead=max_readahead,
            max_write=self.max_write,
            map_alignment=caps.map_alignment or 0,
            backing_open=caps.backing_open,
            backing_close=caps.backing_close,
            dax_window=caps.dax_window,
        )
        if caps.map_alignment is not None:
            conn.want |= capable & abi.InitFlag.MAP_ALIGNMENT
        if caps.io_uring:
            conn.want |= capable & abi.InitFlag.OVER_IO_URING
        with self._init_lock:
            self.fs.init(conn)
            want = conn.want & capable & ~self.config.disabled_flags
            if not capable & abi.InitFlag.INIT_EXT:
                want &= 0xFFFFFFFF
            self.flags = want
            self.proto_minor = conn.minor
            self._offered = (major, minor, max_readahead, capable)
            self._forget_early_interrupts()
            self.initialized = True
        return conn, want

    # --- live migration ----------------------------------------------------------------------

    def save_state(self) -> bytes:
        """The negotiated session (what INIT agreed, and what the kernel offered), for a server
        on another daemon to go on with it without an INIT (live migration). The file system's
        own state is apart (:meth:`Filesystem.save_state`)."""
        body = StateWriter()
        if not self.initialized:
            body.uint(0)
        else:
            major, minor, max_readahead, capable = self._offered
            body.uint(1).uint(major).uint(minor).uint(max_readahead).uint(capable)
            body.uint(self.flags).uint(self.max_write)
        return StateWriter().section(b"fuse-session", 1, body).getvalue()

    def load_state(self, data: bytes) -> None:
        """Take over a session :meth:`save_state` gave: the file system is initialised as the
        source's was by INIT, and the flags that agrees on must be the source's (StateError
        otherwise: the two daemons run with different options). Call it before the file
        system's own :meth:`Filesystem.load_state`, on a server that has no session yet."""
        if self.initialized:
            raise StateError("this daemon serves a FUSE session already")
        reader = StateReader(data, "FUSE session")
        _, body = reader.section(b"fuse-session", (1,))
        reader.end()
        if not body.uint_below(2, "mounted"):
            body.end()
            return  # the guest had not mounted the file system
        major, minor, max_readahead = (body.uint_below(1 << 32, "INIT field") for _ in range(3))
        capable, flags = body.uint(), body.uint()
        max_write = body.uint_below(1 << 32, "largest write")
        body.end()
        if major != abi.KERNEL_VERSION or minor < abi.MIN_KERNEL_MINOR_VERSION:
            raise StateError(f"the saved session speaks FUSE {major}.{minor}")
        if not _MIN_MAX_WRITE <= max_write <= self.caps.max_write:
            raise StateError(
                f"the source's largest write is {max_write} bytes; this transport takes "
                f"{_MIN_MAX_WRITE} to {self.caps.max_write}"
            )
        self.max_write = max_write
        try:
            _, want = self._negotiate(major, minor, max_readahead, capable)
        except BaseException:
            self.max_write = self.caps.max_write
            raise
        if want != flags:
            self.reset()
            raise StateError(
                "the destination's options agree on other FUSE flags than the source's did "
                f"(only on the source: {_flag_names(flags & ~want)}; only here: "
                f"{_flag_names(want & ~flags)}): start both daemons with the same options"
            )
        log.info("FUSE session 7.%d taken over, flags %#x", self.proto_minor, want)

    @_op(abi.Opcode.DESTROY)
    def _destroy(self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any) -> None:
        self.fs.destroy()
        self.initialized = False
        self._forget_early_interrupts()

    def _forget_early_interrupts(self) -> None:
        """A session ends: INTERRUPTs its guest sent for waits to come must not reach the next
        session's requests, numbered from the start again."""
        with self._wait_lock:
            self._early.clear()

    @_op(abi.Opcode.INTERRUPT, abi.INTERRUPT_IN, reply=None)
    def _interrupt(
        self, ctx: Context, nodeid: int, out: ReplyWriter | None, token: Any, target: int
    ) -> int:
        # Never answered. EAGAIN would have the kernel send it again at once, and again, for
        # as long as the request runs; one that doesn't wait can't be interrupted anyway.
        with self._wait_lock:
            victim = self._waiting.get(target)
            if victim is not None:
                victim.interrupted = True
            else:
                early = self._early
                early[target] = None
                if len(early) > _EARLY_INTERRUPTS:
                    del early[next(iter(early))]
        return _SILENT

    def _wait_begins(self, ctx: Context) -> None:
        """``ctx``'s request waits from now on: INTERRUPT, reset and shutdown can end it (at
        once if its INTERRUPT came first). A unique that is waiting already (a hostile guest's
        second request under it) is EINVAL: the first wait must stay where a stop finds it."""
        with self._wait_lock:
            if ctx.unique in self._waiting:
                raise OSError(errno.EINVAL, "a request with this unique is waiting already")
            self._waiting[ctx.unique] = ctx
            if ctx.unique in self._early:
                del self._early[ctx.unique]
                ctx.interrupted = True

    def _wait_ends(self, ctx: Context) -> None:
        with self._wait_lock:
            if self._waiting.get(ctx.unique) is ctx:
                del self._waiting[ctx.unique]

    def _forget(
        self, ctx: Context, nodeid: int, out: ReplyWriter | None, token: Any, nlookup: int
    ) -> None:
        self.fs.forget(nodeid, nlookup)

    @_op(abi.Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN, tail=True, reply=None)
    def _batch_forget(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter | None,
        token: Any,
        count: int,
        dummy: int,
        rest: RequestReader,
    ) -> None:
        size = abi.FORGET_ONE.size
        count = min(min(count, rest.remaining // size), MAX_BATCH)  # two by two: see _read
        raw = rest.read(count * size)
        unpack = abi.FORGET_ONE.struct.unpack_from
        self.fs.batch_forget([unpack(raw, i * size) for i in range(count)])

    # --- inodes ----------------------------------------------------------------------------

    # Declared below the class, with the other requests called by name.
    def _lookup(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, name: bytes
    ) -> int | None:
        entry = self.fs.lookup(ctx, nodeid, name)
        if entry is None:
            return _NOENT
        _pack_entry(out, entry)
        return None

    def _pack_attr(self, out: ReplyWriter, attr_and_timeout: tuple[Attr, float]) -> None:
        attr, timeout = attr_and_timeout
        out.write(_attr_head(timeout) + attr.raw)

    # Declared below the class, with the other requests called by name.
    def _getattr(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        getattr_flags: int,
        dummy: int,
        fh: int,
    ) -> None:
        fh_or_none = fh if getattr_flags & abi.GETATTR_FH else None
        self._pack_attr(out, self.fs.getattr(ctx, nodeid, fh_or_none))

    @_op(abi.Opcode.SETATTR, abi.SETATTR_IN, reply=abi.ATTR_OUT)
    def _setattr(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        valid: int,
        padding: int,
        fh: int,
        size: int,
        lock_owner: int,
        atime: int,
        mtime: int,
        ctime: int,
        atimensec: int,
        mtimensec: int,
        ctimensec: int,
        mode: int,
        unused4: int,
        uid: int,
        gid: int,
        unused5: int,
    ) -> None:
        changes = SetAttr(
            mode=mode if valid & abi.FATTR_MODE else None,
            uid=uid if valid & abi.FATTR_UID else None,
            gid=gid if valid & abi.FATTR_GID else None,
            size=size if valid & abi.FATTR_SIZE else None,
            fh=fh if valid & abi.FATTR_FH else None,
            lock_owner=lock_owner if valid & abi.FATTR_LOCKOWNER else None,
            kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID),
        )
        if valid & abi.FATTR_ATIME_NOW:
            changes.atime = NOW
        elif valid & abi.FATTR_ATIME:
            changes.atime = _nanoseconds(atime, atimensec)
        if valid & abi.FATTR_MTIME_NOW:
            changes.mtime = NOW
        elif valid & abi.FATTR_MTIME:
            changes.mtime = _nanoseconds(mtime, mtimensec)
        if valid & abi.FATTR_CTIME:
            changes.ctime = _nanoseconds(ctime, ctimensec)
        self._pack_attr(out, self.fs.setattr(ctx, nodeid, changes))

    @_op(abi.Opcode.STATX, abi.STATX_IN, reply=abi.STATX_OUT)
    def _statx(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        getattr_flags: int,
        reserved: int,
        fh: int,
        sx_flags: int,
        sx_mask: int,
    ) -> None:
        fh_or_none = fh if getattr_flags & abi.GETATTR_FH else None
        fields, timeout = self.fs.statx(ctx, nodeid, fh_or_none, sx_flags, sx_mask)
        av, avn = split_timeout(timeout)
        out.write(abi.STATX_OUT.pack(attr_valid=av, attr_valid_nsec=avn, **fields))

    @_op(abi.Opcode.READLINK)
    def _readlink(self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any) -> None:
        out.write(self.fs.readlink(ctx, nodeid))

    @_op(abi.Opcode.SYMLINK, names=2, reply=abi.ENTRY_OUT)
    def _symlink(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, name: bytes, target: bytes
    ) -> None:
        _pack_entry(out, self.fs.symlink(ctx, nodeid, name, target))

    @_op(abi.Opcode.MKNOD, abi.MKNOD_IN, names=1, reply=abi.ENTRY_OUT)
    def _mknod(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        mode: int,
        rdev: int,
        umask: int,
        padding: int,
        name: bytes,
    ) -> None:
        _pack_entry(out, self.fs.mknod(ctx, nodeid, name, mode, rdev, umask))

    @_op(abi.Opcode.MKDIR, abi.MKDIR_IN, names=1, reply=abi.ENTRY_OUT)
    def _mkdir(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        mode: int,
        umask: int,
        name: bytes,
    ) -> None:
        _pack_entry(out, self.fs.mkdir(ctx, nodeid, name, mode, umask))

    def _unlink(self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, name: bytes) -> None:
        self.fs.unlink(ctx, nodeid, name)

    @_op(abi.Opcode.RMDIR, names=1)
    def _rmdir(self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, name: bytes) -> None:
        self.fs.rmdir(ctx, nodeid, name)

    @_op(abi.Opcode.RENAME, abi.RENAME_IN, names=2)
    def _rename(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        newdir: int,
        old: bytes,
        new: bytes,
    ) -> None:
        self.fs.rename(ctx, nodeid, old, newdir, new, 0)

    @_op(abi.Opcode.RENAME2, abi.RENAME2_IN, names=2)
    def _rename2(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        newdir: int,
        flags: int,
        padding: int,
        old: bytes,
        new: bytes,
    ) -> None:
        self.fs.rename(ctx, nodeid, old, newdir, new, flags)

    @_op(abi.Opcode.LINK, abi.LINK_IN, names=1, reply=abi.ENTRY_OUT)
    def _link(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, oldnodeid: int, name: bytes
    ) -> None:
        _pack_entry(out, self.fs.link(ctx, oldnodeid, nodeid, name))

    # --- files -----------------------------------------------------------------------------

    def _open(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, flags: int, open_flags: int
    ) -> None:
        opened = self.fs.open(ctx, nodeid, flags, bool(open_flags & abi.OPEN_KILL_SUIDGID))
        _pack_open(out, opened)

    def _create(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        flags: int,
        mode: int,
        umask: int,
        open_flags: int,
        name: bytes,
    ) -> None:
        kill = bool(open_flags & abi.OPEN_KILL_SUIDGID)
        entry, opened = self.fs.create(ctx, nodeid, name, mode, flags, umask, kill)
        _pack_entry(out, entry)
        _pack_open(out, opened)

    @_op(abi.Opcode.TMPFILE, abi.CREATE_IN, reply=abi.ENTRY_OUT.size + abi.OPEN_OUT.size)
    def _tmpfile(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        flags: int,
        mode: int,
        umask: int,
        open_flags: int,
    ) -> None:
        entry, opened = self.fs.tmpfile(ctx, nodeid, mode, flags, umask)
        _pack_entry(out, entry)
        _pack_open(out, opened)

    # Declared below the class, with the other requests called by name.
    def _read(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        offset: int,
        size: int,
        read_flags: int,
        lock_owner: int,
        flags: int,
        padding: int,
    ) -> None:
        # Compared by hand: a compiled build calls a min() of three the generic way.
        room = out.space()
        if size > room:
            size = room
        if size > self.max_write:
            size = self.max_write
        self.fs.read(ctx, nodeid, fh, offset, size, out)

    # Declared below the class, with the other requests called by name.
    def _write(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        offset: int,
        size: int,
        write_flags: int,
        lock_owner: int,
        flags: int,
        padding: int,
        data: RequestReader,
    ) -> None:
        if size > data.remaining:
            raise MalformedRequest(f"WRITE of {size} bytes carries {data.remaining}")
        if size > self.max_write:
            raise OSError(errno.EINVAL, "write larger than max_write")
        written = self.fs.write(
            ctx, nodeid, fh, offset, WriteData(data.views(size), size), write_flags
        )
        # Packed here rather than through out.pack(), whose arguments a compiled build passes
        # on the generic way: every WRITE answers this.
        out.write(_WRITE_OUT.pack(written, 0))

    def _flush(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        unused: int,
        padding: int,
        lock_owner: int,
    ) -> None:
        self.fs.flush(ctx, nodeid, fh, lock_owner)

    def _release(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        flags: int,
        release_flags: int,
        lock_owner: int,
    ) -> None:
        self.fs.release(
            ctx,
            nodeid,
            fh,
            flags,
            lock_owner,
            bool(release_flags & abi.RELEASE_FLUSH),
            bool(release_flags & abi.RELEASE_FLOCK_UNLOCK),
        )

    @_op(abi.Opcode.FSYNC, abi.FSYNC_IN)
    def _fsync(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        fsync_flags: int,
        padding: int,
    ) -> None:
        self.fs.fsync(ctx, nodeid, fh, bool(fsync_flags & abi.FSYNC_FDATASYNC))

    @_op(abi.Opcode.FALLOCATE, abi.FALLOCATE_IN)
    def _fallocate(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        offset: int,
        length: int,
        mode: int,
        padding: int,
    ) -> None:
        self.fs.fallocate(ctx, nodeid, fh, mode, offset, length)

    @_op(abi.Opcode.LSEEK, abi.LSEEK_IN, reply=abi.LSEEK_OUT)
    def _lseek(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        offset: int,
        whence: int,
        padding: int,
    ) -> None:
        out.pack(abi.LSEEK_OUT.struct, self.fs.lseek(ctx, nodeid, fh, offset, whence))

    @_op(abi.Opcode.COPY_FILE_RANGE, abi.COPY_FILE_RANGE_IN, reply=abi.WRITE_OUT, bind=(False,))
    @_op(
        abi.Opcode.COPY_FILE_RANGE_64,
        abi.COPY_FILE_RANGE_IN,
        reply=abi.COPY_FILE_RANGE_OUT,
        bind=(True,),
    )
    def _copy_file_range(
        self,
        wide: bool,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh_in: int,
        off_in: int,
        nodeid_out: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
    ) -> None:
        copied = self.fs.copy_file_range(
            ctx, nodeid, fh_in, off_in, nodeid_out, fh_out, off_out, length, flags
        )
        if wide:
            out.pack(abi.COPY_FILE_RANGE_OUT.struct, copied)
        else:
            # The 32-bit reply can't say more than 4 GiB - 1: the kernel loops for the rest.
            out.pack(abi.WRITE_OUT.struct, min(copied, 0xFFFFFFFF), 0)

    # --- directories -----------------------------------------------------------------------

    @_op(abi.Opcode.OPENDIR, abi.OPEN_IN, reply=abi.OPEN_OUT)
    def _opendir(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, flags: int, open_flags: int
    ) -> None:
        _pack_open(out, self.fs.opendir(ctx, nodeid, flags))

    @_op(abi.Opcode.READDIR, abi.READ_IN, bind=(False,))
    @_op(abi.Opcode.READDIRPLUS, abi.READ_IN, bind=(True,))
    def _readdir(
        self,
        plus: bool,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        offset: int,
        size: int,
        *unused: int,
    ) -> None:
        self.fs.readdir(ctx, nodeid, fh, offset, DirentWriter(out, size, plus))

    @_op(abi.Opcode.RELEASEDIR, abi.RELEASE_IN)
    def _releasedir(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        flags: int,
        release_flags: int,
        lock_owner: int,
    ) -> None:
        self.fs.releasedir(ctx, nodeid, fh, flags)

    @_op(abi.Opcode.FSYNCDIR, abi.FSYNC_IN)
    def _fsyncdir(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        fsync_flags: int,
        padding: int,
    ) -> None:
        self.fs.fsyncdir(ctx, nodeid, fh, bool(fsync_flags & abi.FSYNC_FDATASYNC))

    # --- file system -----------------------------------------------------------------------

    @_op(abi.Opcode.STATFS, reply=abi.KSTATFS)
    def _statfs(self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any) -> None:
        st = self.fs.statfs(ctx, nodeid)
        out.pack(
            abi.KSTATFS.struct,
            st.blocks,
            st.bfree,
            st.bavail,
            st.files,
            st.ffree,
            st.bsize,
            st.namelen,
            st.frsize,
            0,
            *(0,) * 6,
        )

    @_op(abi.Opcode.SYNCFS, abi.SYNCFS_IN)
    def _syncfs(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, padding: int
    ) -> None:
        self.fs.syncfs(ctx, nodeid)

    @_op(abi.Opcode.ACCESS, abi.ACCESS_IN)
    def _access(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, mask: int, padding: int
    ) -> None:
        self.fs.access(ctx, nodeid, mask)

    # --- extended attributes ---------------------------------------------------------------

    @_op(abi.Opcode.SETXATTR, tail=True)
    def _setxattr(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, rest: RequestReader
    ) -> None:
        # The layout depends on what INIT agreed: SETXATTR_EXT adds a flags word.
        if self.flags & abi.InitFlag.SETXATTR_EXT:
            size, flags, setxattr_flags, _ = abi.SETXATTR_IN.struct.unpack_from(
                rest.read(abi.SETXATTR_IN.size)
            )
        else:
            size, flags = abi.GETXATTR_IN.struct.unpack_from(rest.read(abi.GETXATTR_IN.size))
            setxattr_flags = 0
        raw = bytes(rest.read(rest.remaining))
        (name,) = _names(raw, 1)
        value = raw[len(name) + 1 : len(name) + 1 + size]
        if len(value) != size:
            raise MalformedRequest("xattr value shorter than its size")
        self.fs.setxattr(ctx, nodeid, name, value, flags, setxattr_flags)

    def _sized_reply(self, out: ReplyWriter, size: int, value: bytes) -> None:
        """The getxattr/listxattr convention: size 0 asks for the length only."""
        if size == 0:
            out.pack(_U32, len(value), 0)
        elif len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        else:
            out.write(value)

    @_op(abi.Opcode.GETXATTR, abi.GETXATTR_IN, names=1)
    def _getxattr(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        size: int,
        padding: int,
        name: bytes,
    ) -> None:
        self._sized_reply(out, size, self.fs.getxattr(ctx, nodeid, name))

    @_op(abi.Opcode.LISTXATTR, abi.GETXATTR_IN)
    def _listxattr(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, size: int, padding: int
    ) -> None:
        names = self.fs.listxattr(ctx, nodeid)
        self._sized_reply(out, size, b"".join(n + b"\0" for n in names))

    @_op(abi.Opcode.REMOVEXATTR, names=1)
    def _removexattr(
        self, ctx: Context, nodeid: int, out: ReplyWriter, token: Any, name: bytes
    ) -> None:
        self.fs.removexattr(ctx, nodeid, name)

    # --- locks -----------------------------------------------------------------------------

    @_op(abi.Opcode.GETLK, abi.LK_IN, reply=abi.LK_OUT)
    def _getlk(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        owner: int,
        start: int,
        end: int,
        ltype: int,
        pid: int,
        lk_flags: int,
        padding: int,
    ) -> None:
        lock = self.fs.getlk(ctx, nodeid, fh, owner, Lock(start, end, ltype, pid))
        out.pack(abi.LK_OUT.struct, lock.start, lock.end, lock.type, lock.pid)

    @_op(abi.Opcode.SETLK, abi.LK_IN, bind=(False,))
    @_op(abi.Opcode.SETLKW, abi.LK_IN, bind=(True,))
    def _setlk(
        self,
        sleep: bool,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        owner: int,
        start: int,
        end: int,
        ltype: int,
        pid: int,
        lk_flags: int,
        padding: int,
    ) -> int | None:
        lock = Lock(start, end, ltype, pid)
        flock = bool(lk_flags & abi.LK_FLOCK)
        later = self.caps.later
        if not sleep:
            self.fs.setlk(ctx, nodeid, fh, owner, lock, False, flock)
            return None
        if later is None:
            self._wait_begins(ctx)
            try:
                self.fs.setlk(ctx, nodeid, fh, owner, lock, True, flock)
            finally:
                self._wait_ends(ctx)
            return None
        try:
            self.fs.setlk(ctx, nodeid, fh, owner, lock, False, flock)
            return None
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        # The lock is held elsewhere: wait for it off this thread, so that the request that
        # will release it can still be served.
        unique = ctx.unique
        waiters = self.lock_waiters
        # Registered first: a unique already waiting is refused before it takes a place.
        self._wait_begins(ctx)
        if not waiters.reserve():
            self._wait_ends(ctx)
            log.warning("request %d: %d lock waits already; ENOLCK", unique, waiters.size)
            raise OSError(errno.ENOLCK, "too many lock waits")
        try:
            completion = later(token)
        except BaseException:
            self._wait_ends(ctx)
            waiters.unreserve()
            raise

        def wait() -> None:
            error = 0
            try:
                self.fs.setlk(ctx, nodeid, fh, owner, lock, True, flock)
            except OSError as e:
                error = e.errno or errno.EIO
            except Exception:
                log.exception("blocking lock request %d failed", unique)
                error = errno.EIO
            finally:
                self._wait_ends(ctx)
            reply = ReplyWriter(completion.writable)
            completion.complete(reply.finish(-error, unique))

        try:
            waiters.run(wait)
        except RuntimeError as no_thread:
            # The wait never runs: answered here, through its completion (the transport has
            # moved on from this request; a reply returned now would go nowhere, or elsewhere).
            log.warning("request %d: no thread for the lock wait (%s); ENOLCK", unique, no_thread)
            self._wait_ends(ctx)
            waiters.unreserve()
            completion.complete(ReplyWriter(completion.writable).finish(-errno.ENOLCK, unique))
        return _LATER

    # --- DAX window ------------------------------------------------------------------------

    @_op(abi.Opcode.SETUPMAPPING, abi.SETUPMAPPING_IN)
    def _setupmapping(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        foffset: int,
        length: int,
        flags: int,
        moffset: int,
    ) -> None:
        self.fs.setupmapping(ctx, nodeid, fh, foffset, length, flags, moffset)

    @_op(abi.Opcode.REMOVEMAPPING, abi.REMOVEMAPPING_IN, tail=True)
    def _removemapping(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        count: int,
        rest: RequestReader,
    ) -> None:
        size = abi.REMOVEMAPPING_ONE.size
        if count > MAX_BATCH or count * size > rest.remaining:
            raise MalformedRequest(f"REMOVEMAPPING of {count} ranges in {rest.remaining} bytes")
        raw = rest.read(count * size)
        unpack = abi.REMOVEMAPPING_ONE.struct.unpack_from
        self.fs.removemapping(ctx, [unpack(raw, i * size) for i in range(count)])

    # --- the rest --------------------------------------------------------------------------

    @_op(abi.Opcode.BMAP, abi.BMAP_IN, reply=abi.BMAP_OUT)
    def _bmap(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        block: int,
        blocksize: int,
        padding: int,
    ) -> None:
        out.pack(abi.BMAP_OUT.struct, self.fs.bmap(ctx, nodeid, blocksize, block))

    @_op(abi.Opcode.POLL, abi.POLL_IN, reply=abi.POLL_OUT)
    def _poll(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        kh: int,
        flags: int,
        events: int,
    ) -> None:
        out.pack(abi.POLL_OUT.struct, self.fs.poll(ctx, nodeid, fh, kh, flags, events), 0)

    @_op(abi.Opcode.IOCTL, abi.IOCTL_IN, tail=True, reply=abi.IOCTL_OUT)
    def _ioctl(
        self,
        ctx: Context,
        nodeid: int,
        out: ReplyWriter,
        token: Any,
        fh: int,
        flags: int,
        cmd: int,
        arg: int,
        in_size: int,
        out_size: int,
        rest: RequestReader,
    ) -> None:
        data = bytes(rest.read(min(in_size, rest.remaining)))
        # Ask the file system for no more data than fits after the fixed part.
        out_size = min(out_size, out.space() - abi.IOCTL_OUT.size)
        result, reply = self.fs.ioctl(ctx, nodeid, fh, flags, cmd, arg, data, out_size)
        out.pack(abi.IOCTL_OUT.struct, result, 0, 0, 0)
        out.write(reply[:out_size])


# The handlers Server.handle calls by name, declared here rather than decorated: a compiled
# build calls a decorated method the generic way (a lookup, then its arguments parsed), an
# undecorated one as a C function.
_op(abi.Opcode.LOOKUP, names=1, reply=abi.ENTRY_OUT)(Server._lookup)
_op(abi.Opcode.GETATTR, abi.GETATTR_IN, reply=abi.ATTR_OUT)(Server._getattr)
_op(abi.Opcode.READ, abi.READ_IN)(Server._read)
_op(abi.Opcode.WRITE, abi.WRITE_IN, tail=True, reply=abi.WRITE_OUT)(Server._write)
_op(abi.Opcode.FORGET, abi.FORGET_IN, reply=None)(Server._forget)
_op(abi.Opcode.UNLINK, names=1)(Server._unlink)
_op(abi.Opcode.OPEN, abi.OPEN_IN, reply=abi.OPEN_OUT)(Server._open)
_op(abi.Opcode.CREATE, abi.CREATE_IN, names=1, reply=abi.ENTRY_OUT.size + abi.OPEN_OUT.size)(
    Server._create
)
_op(abi.Opcode.FLUSH, abi.FLUSH_IN)(Server._flush)
_op(abi.Opcode.RELEASE, abi.RELEASE_IN)(Server._release)

#: The opcodes the server serves, and how each is decoded and answered.
OPS: dict[int, Op] = {opcode: spec for opcode, (spec, _, _) in sorted(_OPS.items())}
#: Writable bytes each opcode's reply needs before the request may run (0: never replies, or
#: unknown opcode).
REPLY_ROOM = [0] * 64
for _opcode, _spec in OPS.items():
    REPLY_ROOM[_opcode] = _spec.room
del _opcode, _spec
