"""The FUSE server against an in-memory file system, with well-formed and malformed requests;
and the reply-room rule (a request whose reply can't fit is refused before the file system runs)
against the real passthrough, whose effects on the host show."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse import server as server_module
from pyvirtiofsd.fuse.buffers import RequestReader
from pyvirtiofsd.fuse.filesystem import ROOT, Context, Filesystem, Lock, SecurityContext
from pyvirtiofsd.fuse.records import Attr, Entry, split_timeout
from pyvirtiofsd.fuse.server import OPS, LockWaiters, Server, ServerConfig, TransportCaps
from pyvirtiofsd.fuse.state import StateError, StateWriter
from pyvirtiofsd.testing.fuse_client import (
    FuseClient,
    decode_reply,
    direct,
    encode_request,
    groups_extension,
    secctx_extension,
)
from tests.memfs import MemFs
from tests.reply_room import CASES, HEADER, NO_REPLY, Env, host_state


@pytest.fixture
def server() -> Server:
    return Server(MemFs())


@pytest.fixture
def client(server: Server) -> FuseClient:
    c = FuseClient(direct(server))
    c.init()
    return c


def raw(server: Server, request: bytes, reply_size: int = 4096) -> tuple[int, int, bytes]:
    out = bytearray(reply_size)
    n = server.handle([memoryview(request)], [memoryview(out)])
    return decode_reply(bytes(out[:n])) if n else (None, None, b"")  # type: ignore[return-value]


def test_requests_before_init_get_eio(server: Server) -> None:
    c = FuseClient(direct(server))
    with pytest.raises(OSError) as e:
        c.getattr(ROOT)
    assert e.value.errno == errno.EIO


@pytest.mark.parametrize("major,minor", [(6, 45), (7, 26), (7, 0)])
def test_init_rejects_old_protocols(server: Server, major: int, minor: int) -> None:
    payload = abi.INIT_IN.pack(major, minor, 0, 0, 0, (0,) * 11)
    err, _, _ = raw(server, encode_request(abi.Opcode.INIT, 0, payload))
    assert err == errno.EPROTO
    assert not server.initialized


def test_init_negotiates(server: Server) -> None:
    c = FuseClient(direct(server))
    offered = abi.InitFlag.ASYNC_READ | abi.InitFlag.WRITEBACK_CACHE | abi.InitFlag.MAX_PAGES
    offered |= abi.InitFlag.SUBMOUNTS | abi.InitFlag.CREATE_SUPP_GROUP
    out = c.init(offered)
    assert (out.major, out.minor) == (7, abi.KERNEL_MINOR_VERSION)
    flags = out.flags | (out.flags2 << 32)
    assert flags & abi.InitFlag.ASYNC_READ
    assert flags & abi.InitFlag.CREATE_SUPP_GROUP
    assert not flags & abi.InitFlag.WRITEBACK_CACHE  # the file system did not ask for it
    assert not flags & abi.InitFlag.POSIX_LOCKS  # not offered by the kernel
    assert out.max_write == 1 << 20 and out.max_pages == 256
    assert server.proto_minor == abi.KERNEL_MINOR_VERSION


def test_init_with_older_minor_keeps_its_minor(server: Server) -> None:
    FuseClient(direct(server)).init(minor=31)
    assert server.proto_minor == 31


class _NoneForMissing(MemFs):
    """Answers a missing name with None, as a file system may instead of raising ENOENT."""

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry | None:
        if name.startswith(b"gone"):
            return None
        return super().lookup(ctx, parent, name)


@pytest.mark.parametrize("cut", [None, 42, 44])
def test_a_lookup_answered_none_is_enoent(cut: int | None) -> None:
    """None from lookup is ENOENT on the wire, whether the request was decoded in C (whole in
    one buffer) or in Python (cut inside its header or its name), and the request is over."""
    server = Server(_NoneForMissing())
    FuseClient(direct(server)).init()
    request = encode_request(abi.Opcode.LOOKUP, ROOT, b"gone\0", unique=77)
    parts = [request] if cut is None else [request[:cut], request[cut:]]
    out = bytearray(4096)
    n = server.handle([memoryview(p) for p in parts], [memoryview(out)])
    err, unique, payload = decode_reply(bytes(out[:n]))
    assert (err, unique, payload) == (errno.ENOENT, 77, b"")
    assert server.in_flight() == 0


def test_the_passthrough_answers_a_missing_name_with_none(tmp_path: Path) -> None:
    fs = PassthroughFs(PassthroughConfig(shared_dir=str(tmp_path)))
    ctx = Context(0, 0, 0, 1)
    assert fs.lookup(ctx, ROOT, b"missing") is None
    (tmp_path / "here").write_bytes(b"")
    entry = fs.lookup(ctx, ROOT, b"here")
    assert entry is not None and entry.ino != ROOT
    with pytest.raises(OSError) as got:
        fs.lookup(ctx, ROOT, b"x" * 300)
    assert got.value.errno == errno.ENAMETOOLONG
    fs.shutdown()


class _Timeouts(MemFs):
    """Answers each LOOKUP and GETATTR with the timeouts it is told to (a file system that
    computes them), for the replies' packing, which keeps what it packed per timeout."""

    entry_timeout = 1.0
    attr_timeout = 1.0

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        entry = super().lookup(ctx, parent, name)
        entry.entry_timeout, entry.attr_timeout = self.entry_timeout, self.attr_timeout
        return entry

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> tuple[Attr, float]:
        return super().getattr(ctx, ino, fh)[0], self.attr_timeout


def test_timeouts_reach_the_reply_as_the_file_system_gives_them() -> None:
    """Whole, fractional, zero and negative timeouts, and more distinct ones than the server
    keeps packed: each LOOKUP and GETATTR reply carries its own, split as the kernel reads them
    (seconds, then nanoseconds), with the node's id and attributes around them intact."""
    fs = _Timeouts()
    client = FuseClient(direct(Server(fs)))
    client.init()
    ino = client.create(ROOT, b"f", 0o600)[0].nodeid
    cases = [(1.0, 1.0), (0.0, 2.5), (-3.0, 0.25), (86400.0, 1e-9)]
    cases += [(i / 7, 100 + i / 3) for i in range(150)]
    for entry_timeout, attr_timeout in cases + cases[:5]:
        fs.entry_timeout, fs.attr_timeout = entry_timeout, attr_timeout
        ev, evn = split_timeout(entry_timeout)
        av, avn = split_timeout(attr_timeout)
        entry = client.lookup(ROOT, b"f")
        assert (entry.nodeid, entry.generation, entry.ino) == (ino, 0, ino)
        assert (entry.entry_valid, entry.entry_valid_nsec) == (ev, evn)
        assert (entry.attr_valid, entry.attr_valid_nsec) == (av, avn)
        attr = client.getattr(ino)
        assert (attr.attr_valid, attr.attr_valid_nsec, attr.dummy) == (av, avn, 0)
        assert attr.ino == ino and stat.S_ISREG(attr.mode)


def test_file_round_trip(client: FuseClient) -> None:
    d = client.mkdir(ROOT, b"dir", 0o755)
    assert stat.S_ISDIR(d.mode)
    entry, opened = client.create(d.nodeid, b"f", 0o644)
    assert client.write(entry.nodeid, opened.fh, 0, b"hello world") == 11
    assert client.read(entry.nodeid, opened.fh, 6, 100) == b"world"
    assert client.getattr(entry.nodeid).size == 11
    assert client.lookup(d.nodeid, b"f").nodeid == entry.nodeid
    with pytest.raises(FileNotFoundError):
        client.lookup(d.nodeid, b"nope")


def test_readdir_and_readdirplus(client: FuseClient) -> None:
    for i in range(50):
        client.mkdir(ROOT, b"entry-%03d" % i)
    fh = client.opendir(ROOT).fh
    names: list[bytes] = []
    offset = 0
    while True:
        batch = client.readdir(ROOT, fh, offset, size=256)
        if not batch:
            break
        names += [name for _, _, _, name in batch]
        offset = batch[-1][1]
    assert names == [b"entry-%03d" % i for i in range(50)]
    plus = client.readdirplus(ROOT, fh, 0, size=4096)
    assert plus and all(e.nodeid == e.d_ino for e, _ in plus)
    assert len(plus) == 4096 // abi.direntplus_size(9)


def test_xattr_size_protocol(client: FuseClient) -> None:
    assert abi.GETXATTR_OUT.unpack(client.getxattr(ROOT, b"user.big", size=0)).size == 100
    assert client.getxattr(ROOT, b"user.big", size=100) == b"x" * 100
    with pytest.raises(OSError) as e:
        client.getxattr(ROOT, b"user.big", size=99)
    assert e.value.errno == errno.ERANGE
    with pytest.raises(OSError) as e:
        client.getxattr(ROOT, b"user.none")
    assert e.value.errno == errno.ENODATA


def test_defaults_answer_enosys(client: FuseClient) -> None:
    with pytest.raises(OSError) as e:
        client.readlink(ROOT)
    assert e.value.errno == errno.ENOSYS


def test_forget_gets_no_reply(server: Server, client: FuseClient) -> None:
    client.forget(5, 3)
    client.batch_forget([(6, 1), (7, 2)])
    assert server.fs.forgotten == [(5, 3), (6, 1), (7, 2)]  # type: ignore[attr-defined]


# --- malformed requests: an error reply, a log line, and the server keeps serving --------


def _still_serves(client: FuseClient) -> None:
    assert client.getattr(ROOT).mode & stat.S_IFDIR


@pytest.mark.parametrize("opcode", [7, 19, 54, 63, 64, 4096, 0xFFFFFFFF])
def test_unknown_opcodes(server: Server, client: FuseClient, opcode: int) -> None:
    err, unique, _ = raw(server, encode_request(opcode, ROOT, b"", unique=77))
    assert (err, unique) == (errno.ENOSYS, 77)
    _still_serves(client)


def test_short_header(server: Server, client: FuseClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        err, unique, _ = raw(server, b"\x01\x02\x03")
    assert err == errno.EINVAL and unique == 0
    assert "shorter than the FUSE header" in caplog.text
    _still_serves(client)


@pytest.mark.parametrize("delta", [1, 1000, 1 << 31])
def test_length_mismatch(server: Server, client: FuseClient, delta: int) -> None:
    req = bytearray(encode_request(abi.Opcode.LOOKUP, ROOT, b"name\0", unique=9))
    abi.IN_HEADER.struct.pack_into(
        req, 0, (len(req) + delta) & 0xFFFFFFFF, *abi.IN_HEADER.unpack(req)[1:]
    )
    err, unique, _ = raw(server, bytes(req))
    assert (err, unique) == (errno.EINVAL, 9)
    _still_serves(client)


def test_length_below_header(server: Server, client: FuseClient) -> None:
    req = bytearray(encode_request(abi.Opcode.GETATTR, ROOT, bytes(16), unique=3))
    abi.IN_HEADER.struct.pack_into(req, 0, 10, *abi.IN_HEADER.unpack(req)[1:])
    assert raw(server, bytes(req))[0] == errno.EINVAL
    _still_serves(client)


def test_extension_longer_than_request(server: Server, client: FuseClient) -> None:
    req = bytearray(encode_request(abi.Opcode.MKDIR, ROOT, abi.MKDIR_IN.pack(0o755, 0) + b"d\0"))
    fields = list(abi.IN_HEADER.unpack(req))
    fields[7] = 100  # total_extlen in 8-byte units
    abi.IN_HEADER.struct.pack_into(req, 0, *fields)
    assert raw(server, bytes(req))[0] == errno.EINVAL
    _still_serves(client)


def test_name_without_nul(server: Server, client: FuseClient) -> None:
    err, _, _ = raw(server, encode_request(abi.Opcode.LOOKUP, ROOT, b"no-terminator"))
    assert err == errno.EINVAL
    _still_serves(client)


def test_truncated_arguments(server: Server, client: FuseClient) -> None:
    err, _, _ = raw(server, encode_request(abi.Opcode.READ, ROOT, b"\0" * 8))
    assert err == errno.EINVAL
    _still_serves(client)


def test_write_longer_than_its_data(server: Server, client: FuseClient) -> None:
    entry, opened = client.create(ROOT, b"w")
    payload = abi.WRITE_IN.pack(opened.fh, 0, 1 << 20, 0, 0, 0, 0) + b"short"
    assert raw(server, encode_request(abi.Opcode.WRITE, entry.nodeid, payload))[0] == errno.EINVAL
    _still_serves(client)


def test_removemapping_count_overflow(server: Server, client: FuseClient) -> None:
    payload = abi.REMOVEMAPPING_IN.pack(0xFFFFFFFF) + bytes(16)
    assert raw(server, encode_request(abi.Opcode.REMOVEMAPPING, ROOT, payload))[0] == errno.EINVAL
    _still_serves(client)


def test_batch_forget_count_is_capped(server: Server, client: FuseClient) -> None:
    payload = abi.BATCH_FORGET_IN.pack(1 << 30, 0) + abi.FORGET_ONE.pack(9, 1)
    assert raw(server, encode_request(abi.Opcode.BATCH_FORGET, 0, payload))[0] is None
    assert server.fs.forgotten == [(9, 1)]  # type: ignore[attr-defined]
    _still_serves(client)


def test_reply_buffer_too_small(server: Server, client: FuseClient) -> None:
    req = encode_request(abi.Opcode.GETATTR, ROOT, abi.GETATTR_IN.pack(0, 0, 0), unique=5)
    err, unique, _ = raw(server, req, reply_size=40)
    assert (err, unique) == (errno.EINVAL, 5)
    assert raw(server, req, reply_size=8) == (None, None, b"")
    _still_serves(client)


def test_filesystem_bug_gives_eio(client: FuseClient, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(MemFs):
        def getattr(self, ctx, ino, fh):  # type: ignore[no-untyped-def]
            raise RuntimeError("oops")

    c = FuseClient(direct(Server(Broken())))
    c.init()
    with caplog.at_level(logging.ERROR), pytest.raises(OSError) as e:
        c.getattr(ROOT)
    assert e.value.errno == errno.EIO
    assert "oops" in caplog.text


def test_interrupt_is_never_answered(server: Server, client: FuseClient) -> None:
    """An INTERRUPT of a request that isn't waiting gets no reply: EAGAIN would have the kernel
    send it again at once, for as long as the request runs."""
    for target in (12345, 0, 2**64 - 1):
        req = encode_request(abi.Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(target))
        assert raw(server, req) == (None, None, b"")


def test_interrupts_kept_for_later_are_bounded(server: Server, client: FuseClient) -> None:
    """A guest that sends INTERRUPTs for requests that never come grows nothing: the oldest of
    those kept for a wait that may begin later are dropped."""
    for target in range(100_000):
        req = encode_request(abi.Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(target))
        assert raw(server, req)[0] is None
    assert len(server._early) == server_module._EARLY_INTERRUPTS
    assert server.in_flight() == 0


@pytest.mark.parametrize("later", [True, False], ids=["later", "inline"])
def test_interrupt_that_comes_before_the_wait_ends_it_at_once(later: bool) -> None:
    """The INTERRUPT of a blocking lock may be served (on another queue) before the lock
    request begins to wait: the wait then ends with EINTR as soon as it begins, whether it
    runs on a waiter thread or on the transport's own."""
    seen: list[bool] = []

    class LockFs(Filesystem):
        def setlk(self, ctx: Context, ino, fh, owner, lock: Lock, sleep, flock):  # type: ignore[no-untyped-def]
            if not sleep:
                raise OSError(errno.EAGAIN, "held")
            seen.append(ctx.interrupted)
            if ctx.interrupted:
                raise OSError(errno.EINTR, "interrupted")

    replies: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    caps = TransportCaps(later=lambda token: _Later(replies)) if later else TransportCaps()
    server = Server(LockFs(), caps=caps)
    FuseClient(direct(server)).init()
    interrupt = encode_request(abi.Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(44))
    assert raw(server, interrupt)[0] is None
    payload = abi.LK_IN.pack(1, 2, 0, 10, 1, os.getpid(), 0, 0)
    out = bytearray(64)
    n = server.handle(
        [memoryview(encode_request(abi.Opcode.SETLKW, ROOT, payload, unique=44))],
        [memoryview(out)],
    )
    reply = decode_reply(replies.get(timeout=10) if later else bytes(out[:n]))
    assert reply == (errno.EINTR, 44, b"")
    assert seen == [True]
    assert server.in_flight() == 0
    assert 44 not in server._early


class _Later:
    """A reply that comes later, into a buffer of its own, handed to a queue when complete."""

    def __init__(self, done: queue.SimpleQueue[bytes]) -> None:
        self._buf = bytearray(64)
        self.writable = [memoryview(self._buf)]
        self._done = done

    def complete(self, length: int) -> None:
        self._done.put(bytes(self._buf[:length]))


@pytest.mark.parametrize("end", ["reset", "destroy"])
def test_interrupts_kept_for_later_end_with_their_session(end: str) -> None:
    """INTERRUPTs a guest sent for waits that never began don't reach the next session's
    requests, which a new driver numbers from the start again: its lock wait waits."""
    started = threading.Event()
    free = threading.Event()

    class LockFs(Filesystem):
        def setlk(self, ctx: Context, ino, fh, owner, lock: Lock, sleep, flock):  # type: ignore[no-untyped-def]
            if not sleep:
                raise OSError(errno.EAGAIN, "held")
            started.set()
            while not free.is_set():
                if ctx.interrupted:
                    raise OSError(errno.EINTR, "interrupted")
                time.sleep(0.01)

    replies: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    server = Server(LockFs(), caps=TransportCaps(later=lambda token: _Later(replies)))
    FuseClient(direct(server)).init()
    for target in range(40, 50):
        interrupt = encode_request(abi.Opcode.INTERRUPT, 0, abi.INTERRUPT_IN.pack(target))
        assert raw(server, interrupt)[0] is None
    if end == "reset":
        server.reset()
    else:
        assert raw(server, encode_request(abi.Opcode.DESTROY, 0, b""))[0] == 0
    FuseClient(direct(server)).init()
    payload = abi.LK_IN.pack(1, 2, 0, 10, 1, os.getpid(), 0, 0)
    request = encode_request(abi.Opcode.SETLKW, ROOT, payload, unique=44)
    assert server.handle([memoryview(request)], [memoryview(bytearray(64))]) is None
    assert started.wait(10)
    time.sleep(0.1)
    assert replies.empty()  # still waiting: no INTERRUPT of the last session reached it
    free.set()
    assert decode_reply(replies.get(timeout=10)) == (0, 44, b"")


def test_a_second_wait_under_one_unique_takes_no_place() -> None:
    """A guest that sends SETLKW again under the unique of one that waits gets EINVAL, and the
    refused requests take none of the pool's places: the waits of others still find one."""
    server, fs, replies = _lock_server(places=2)
    assert _setlkw(server, 5)[0] is None
    for _ in range(10):
        assert decode_reply(_setlkw(server, 5)[1]).error == errno.EINVAL
    assert server.lock_waiters.busy == 1
    assert _setlkw(server, 6)[0] is None  # the second place is still free
    fs.free.set()
    assert sorted(decode_reply(replies.get(timeout=30)).unique for _ in range(2)) == [5, 6]


def test_blocking_lock_is_deferred() -> None:
    class LockFs(Filesystem):
        def setlk(self, ctx: Context, ino, fh, owner, lock: Lock, sleep, flock):  # type: ignore[no-untyped-def]
            if not sleep:
                raise OSError(errno.EAGAIN, "held")
            assert not ctx.interrupted

    tokens: list[str] = []
    replies: queue.SimpleQueue[bytes] = queue.SimpleQueue()

    def later(token: str) -> _Later:
        tokens.append(token)
        return _Later(replies)

    server = Server(LockFs(), caps=TransportCaps(later=later))
    FuseClient(direct(server)).init()
    payload = abi.LK_IN.pack(1, 2, 0, 10, 1, os.getpid(), 0, 0)
    out = bytearray(64)
    n = server.handle(
        [memoryview(encode_request(abi.Opcode.SETLKW, ROOT, payload, unique=44))],
        [memoryview(out)],
        token="chain",
    )
    assert n is None
    assert tokens == ["chain"]
    assert decode_reply(replies.get(timeout=10)) == (0, 44, b"")


def test_disabled_flags_are_never_agreed() -> None:
    server = Server(MemFs(), ServerConfig(posix_locks=False, flock_locks=False))
    out = FuseClient(direct(server)).init(abi.InitFlag.POSIX_LOCKS | abi.InitFlag.FLOCK_LOCKS)
    assert not out.flags & (abi.InitFlag.POSIX_LOCKS | abi.InitFlag.FLOCK_LOCKS)
    out = FuseClient(direct(Server(MemFs()))).init(abi.InitFlag.POSIX_LOCKS)
    assert out.flags & abi.InitFlag.POSIX_LOCKS


class _HeldLock(Filesystem):
    """A lock held elsewhere until :attr:`free` is set: SETLK is EAGAIN, SETLKW waits."""

    def __init__(self) -> None:
        super().__init__()
        self.free = threading.Event()

    def setlk(self, ctx: Context, ino, fh, owner, lock: Lock, sleep, flock):  # type: ignore[no-untyped-def]
        if not self.free.is_set() and not sleep:
            raise OSError(errno.EAGAIN, "held")
        assert self.free.wait(30)


def _lock_server(places: int) -> tuple[Server, _HeldLock, queue.SimpleQueue[bytes]]:
    """A server over a :class:`_HeldLock` whose lock waits have ``places``, and where the
    replies answered later arrive."""
    fs = _HeldLock()
    replies: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    server = Server(fs, caps=TransportCaps(later=lambda token: _Later(replies)))
    server.lock_waiters = LockWaiters(size=places)
    FuseClient(direct(server)).init()
    return server, fs, replies


def _setlkw(server: Server, unique: int) -> tuple[int | None, bytes]:
    """SETLKW of owner ``unique``: what handle() returned, and the reply it wrote."""
    payload = abi.LK_IN.pack(1, unique, 0, 10, 1, 0, 0, 0)
    out = bytearray(64)
    request = encode_request(abi.Opcode.SETLKW, ROOT, payload, unique=unique)
    n = server.handle([memoryview(request)], [memoryview(out)])
    return n, bytes(out[: n or 0])


def test_lock_waits_are_bounded() -> None:
    """More blocking lock requests than the pool has places: the rest get ENOLCK at once; the
    waiting ones are answered when the lock frees, and their places serve new waits."""
    server, fs, replies = _lock_server(places=4)
    free = fs.free
    assert [_setlkw(server, u)[0] for u in range(1, 5)] == [None] * 4
    for unique in (5, 6):
        assert decode_reply(_setlkw(server, unique)[1]) == (errno.ENOLCK, unique, b"")
    assert server.lock_waiters.threads == 4
    free.set()
    assert sorted(decode_reply(replies.get(timeout=30)).unique for _ in range(4)) == [1, 2, 3, 4]
    free.clear()
    deadline = time.monotonic() + 30
    while server.lock_waiters.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [_setlkw(server, u)[0] for u in range(7, 11)] == [None] * 4
    assert decode_reply(_setlkw(server, 11)[1]).error == errno.ENOLCK
    free.set()
    assert sorted(decode_reply(replies.get(timeout=30)).unique for _ in range(4)) == [7, 8, 9, 10]


def test_a_lock_wait_without_a_thread_is_answered_once_through_its_completion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No thread can be started for a wait: it is answered ENOLCK through the completion it took
    (never by a reply returned for a request the transport has moved on from), once, and its
    place is free again."""
    server, fs, replies = _lock_server(places=4)

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    assert _setlkw(server, 1)[0] is None
    assert decode_reply(replies.get(timeout=5)) == (errno.ENOLCK, 1, b"")
    assert server.lock_waiters.busy == 0 and server.lock_waiters.threads == 0
    monkeypatch.undo()
    assert _setlkw(server, 2)[0] is None  # a thread now: the wait is served
    fs.free.set()
    assert decode_reply(replies.get(timeout=30)).unique == 2
    assert replies.empty()


# --- extensions: supplementary groups and security contexts --------------------------------


class LabelFs(MemFs):
    """Agrees to FUSE_SECURITY_CTX when ``labels`` and records, for every create-like
    request that reaches it, the context and groups the server decoded (then fails it with
    EDQUOT, which no malformed request gets)."""

    def __init__(self, labels: bool = True) -> None:
        super().__init__()
        self.labels = labels
        self.seen: list[tuple[str, Any, tuple[int, ...]]] = []

    def init(self, conn: Any) -> None:
        if self.labels:
            conn.want |= conn.capable & abi.InitFlag.SECURITY_CTX

    def _record(self, op: str, ctx: Context) -> Any:
        self.seen.append((op, ctx.secctx, ctx.groups))
        raise OSError(errno.EDQUOT, "recorded")

    def create(self, ctx, *args):  # type: ignore[no-untyped-def]
        return self._record("create", ctx)

    def mknod(self, ctx, *args):  # type: ignore[no-untyped-def]
        return self._record("mknod", ctx)

    def mkdir(self, ctx, *args):  # type: ignore[no-untyped-def]
        return self._record("mkdir", ctx)

    def symlink(self, ctx, *args):  # type: ignore[no-untyped-def]
        return self._record("symlink", ctx)

    def tmpfile(self, ctx, *args):  # type: ignore[no-untyped-def]
        return self._record("tmpfile", ctx)

    def lookup(self, ctx, *args):  # type: ignore[no-untyped-def]
        return self._record("lookup", ctx)


LABEL = (b"security.selinux", b"system_u:object_r:etc_t:s0\0")
#: A create-like request of each kind, with its fixed arguments and names.
MAKERS = {
    "create": (abi.Opcode.CREATE, abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"f\0"),
    "mknod": (abi.Opcode.MKNOD, abi.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0, 0) + b"p\0"),
    "mkdir": (abi.Opcode.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"d\0"),
    "symlink": (abi.Opcode.SYMLINK, b"l\0target\0"),
    "tmpfile": (abi.Opcode.TMPFILE, abi.CREATE_IN.pack(os.O_RDWR, 0o600, 0, 0)),
}


def labelled(labels: bool = True) -> tuple[Server, FuseClient, LabelFs]:
    fs = LabelFs(labels)
    server = Server(fs)
    c = FuseClient(direct(server))
    c.init(abi.InitFlag.SECURITY_CTX | abi.InitFlag.CREATE_SUPP_GROUP)
    assert bool(c.flags & abi.InitFlag.SECURITY_CTX) is labels
    return server, c, fs


def make(server: Server, op: str, ext: bytes) -> int:
    opcode, payload = MAKERS[op]
    return raw(server, encode_request(opcode, ROOT, payload, unique=5, ext=ext))[0]


@pytest.mark.parametrize("op", list(MAKERS))
def test_security_context_reaches_the_file_system(op: str) -> None:
    server, _, fs = labelled()
    assert make(server, op, secctx_extension([LABEL])) == errno.EDQUOT
    assert fs.seen == [(op, SecurityContext(*LABEL), ())]


@pytest.mark.parametrize("op", list(MAKERS))
def test_no_context_is_none(op: str) -> None:
    # A guest without a security module sends the header with nr_secctx = 0.
    server, _, fs = labelled()
    assert make(server, op, secctx_extension([])) == errno.EDQUOT
    assert make(server, op, b"") == errno.EDQUOT
    assert fs.seen == [(op, None, ()), (op, None, ())]


def test_context_and_groups_in_either_order() -> None:
    server, _, fs = labelled()
    ctx, groups = secctx_extension([LABEL]), groups_extension([7, 8])
    assert make(server, "mkdir", ctx + groups) == errno.EDQUOT
    assert make(server, "mkdir", groups + ctx) == errno.EDQUOT
    assert fs.seen == [("mkdir", SecurityContext(*LABEL), (7, 8))] * 2


def test_context_sizes_as_the_kernel_pads_them() -> None:
    # Name and value lengths that land on every padding: the block is always a multiple of 8.
    server, _, fs = labelled()
    for n in range(1, 17):
        label = (b"security." + b"n" * n, b"v" * n)
        ext = secctx_extension([label])
        assert len(ext) % 8 == 0
        assert make(server, "create", ext) == errno.EDQUOT
        assert fs.seen[-1][1] == SecurityContext(*label)


def _with(block: bytes, **fields: int) -> bytes:
    """``block`` with header fields (size, nr) or the first context's (ctxlen) rewritten."""
    out = bytearray(block)
    size, nr = abi.SECCTX_HEADER.unpack(out)
    abi.SECCTX_HEADER.struct.pack_into(out, 0, fields.get("size", size), fields.get("nr", nr))
    if "ctxlen" in fields:
        abi.SECCTX.struct.pack_into(out, 8, fields["ctxlen"], 0)
    return bytes(out)


ONE = secctx_extension([LABEL])
#: What a hostile guest may send instead of a kernel's security context.
HOSTILE = {
    "two-contexts": secctx_extension([LABEL, LABEL]),
    "count-says-two": _with(ONE, nr=2),
    "count-31": _with(secctx_extension([LABEL] * 2), nr=31),
    "zero-size-value": secctx_extension([(b"security.selinux", b"")]),
    "value-overruns-block": _with(ONE, ctxlen=len(LABEL[1]) + 64),
    "value-shorter-than-block": _with(ONE, ctxlen=1),
    "huge-value": _with(ONE, ctxlen=0xFFFFFFFF),
    "block-overruns-extensions": _with(ONE, size=len(ONE) + 8),
    "block-size-unaligned": _with(ONE, size=len(ONE) - 4),
    "block-size-below-header": _with(ONE, size=4),
    "block-size-zero": _with(ONE, size=0),
    "count-without-context": _with(secctx_extension([]) + bytes(8), size=16, nr=1),
    "empty-block-with-room": _with(ONE, nr=0),
    "empty-name": secctx_extension([(b"", b"value")]),
    "name-without-nul": abi.SECCTX_HEADER.pack(24, 1) + abi.SECCTX.pack(3, 0) + b"x" * 8,
    "name-too-long": secctx_extension([(b"security." + b"n" * 300, b"v")]),
    "two-blocks": ONE + ONE,
    "empty-block-twice": secctx_extension([]) * 2,
    "header-cut": ONE + bytes(4),  # 4 bytes: not even an extension header
}


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("op", ["create", "mkdir", "symlink"])
def test_hostile_context_shapes_are_refused_before_the_file_system(op: str, case: str) -> None:
    server, client, fs = labelled()
    assert make(server, op, HOSTILE[case]) == errno.EINVAL
    assert fs.seen == []
    _still_serves(client)


def test_context_without_security_ctx_agreed_is_refused() -> None:
    server, client, fs = labelled(labels=False)
    for op in MAKERS:
        assert make(server, op, ONE) == errno.EINVAL
        assert make(server, op, secctx_extension([])) == errno.EINVAL
    assert fs.seen == []
    # Groups alone still come through.
    assert make(server, "mkdir", groups_extension([3])) == errno.EDQUOT
    assert fs.seen == [("mkdir", None, (3,))]
    _still_serves(client)


def test_context_on_a_request_that_makes_nothing_is_refused() -> None:
    server, client, fs = labelled()
    err, _, _ = raw(server, encode_request(abi.Opcode.LOOKUP, ROOT, b"f\0", ext=ONE))
    assert err == errno.EINVAL
    payload = abi.LINK_IN.pack(ROOT) + b"hard\0"
    err, _, _ = raw(server, encode_request(abi.Opcode.LINK, ROOT, payload, ext=ONE))
    assert err == errno.EINVAL
    assert fs.seen == []
    _still_serves(client)


# --- reply room -----------------------------------------------------------------------------
# A request whose reply cannot fit the room the guest gave for it is refused before the file
# system runs: EINVAL when the out header fits, no reply at all when it does not, and in both
# cases no call into the file system, so no file created, no handle or fd opened, no lookup
# reference taken, nothing changed in the share. The file system is the real passthrough over a
# scratch directory, wrapped to record the calls the server makes into it.


#: Cases whose request, once it has room, visibly changes the share.
CHANGES_SHARE = {
    "setattr",
    "symlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "rename",
    "rename2",
    "link",
    "write",
    "setxattr",
    "removexattr",
    "create",
    "fallocate",
    "copy_file_range",
    "copy_file_range_64",
}


#: Cases whose request, once it has room, opens or closes descriptors in the daemon.
CHANGES_FDS = {
    "lookup",
    "open",
    "release",
    "opendir",
    "releasedir",
    "getlk",
    "setlk",
    "setlkw",
    "create",
    "tmpfile",
}


class Recorder(Filesystem):
    """A file system that notes the name of every method the server calls on it, and has
    ``fs`` do it. It is a :class:`Filesystem`, as the server asks (the compiled build checks),
    whose every public attribute is ``fs``'s."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name == "calls":
            return object.__getattribute__(self, name)
        attr = getattr(object.__getattribute__(self, "_fs"), name)
        if not callable(attr):
            return attr

        def record(*args: Any, **kwargs: Any) -> Any:
            object.__getattribute__(self, "calls").append(name)
            return attr(*args, **kwargs)

        return record


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def share(open_tmp: Path) -> Path:
    d = open_tmp / "share"
    d.mkdir()
    return d


@pytest.fixture
def session(share: Path) -> Iterator[tuple[Server, Recorder, Env]]:
    fs = PassthroughFs(PassthroughConfig(shared_dir=str(share), xattr=True))
    recorder = Recorder(fs)
    server = Server(recorder)  # type: ignore[arg-type]
    fuse = FuseClient(direct(server))
    fuse.init()
    try:
        yield server, recorder, Env(share, fuse)
    finally:
        fs.shutdown()


def send(server: Server, opcode: int, nodeid: int, payload: bytes, room: int) -> bytes:
    """One request with ``room`` writable bytes (none at all for 0); what came back."""
    request = encode_request(opcode, nodeid, payload, unique=9000 + room)
    out = bytearray(room)
    n = server.handle([memoryview(request)], [memoryview(out)] if room else [])
    return bytes(out[: max(n, 0)])


def too_small(fixed: int) -> list[int]:
    """Writable room that can't hold a reply with ``fixed`` bytes after the header."""
    rooms = [0, 8, HEADER - 1]
    if fixed:
        rooms += [HEADER, HEADER + fixed // 2, HEADER + fixed - 1]
    return rooms


@pytest.mark.parametrize("name", list(CASES))
def test_no_side_effect_without_room_for_the_reply(
    session: tuple[Server, Recorder, Env], name: str
) -> None:
    server, fs, env = session
    case = CASES[name]
    nodeid, payload = case.build(env)
    fds, state = fd_count(), host_state(env.share)
    fs.calls.clear()
    for room in too_small(case.fixed):
        reply = send(server, case.opcode, nodeid, payload, room)
        if room < HEADER:
            assert reply == b"", room  # not even an error fits
        else:
            assert decode_reply(reply).error == errno.EINVAL, room
        assert fs.calls == [], f"{fs.calls} ran with {room} bytes of room"
        assert fd_count() == fds
        assert host_state(env.share) == state
    # With room for it, the very same request reaches the file system and does its work.
    reply = send(server, case.opcode, nodeid, payload, HEADER + case.fixed)
    decoded = decode_reply(reply)
    assert fs.calls, decoded
    if name in CHANGES_SHARE:
        assert decoded.error == 0, os.strerror(decoded.error)
        assert host_state(env.share) != state
    if name in CHANGES_FDS:
        assert decoded.error == 0, os.strerror(decoded.error)
        assert fd_count() != fds


def test_init_without_room_for_its_reply(share: Path) -> None:
    fs = Recorder(PassthroughFs(PassthroughConfig(shared_dir=str(share))))
    server = Server(fs)  # type: ignore[arg-type]
    payload = abi.INIT_IN.pack(
        abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, 1 << 17, abi.InitFlag.INIT_EXT, 0, (0,) * 11
    )
    try:
        for room in too_small(abi.INIT_OUT.size):
            reply = send(server, abi.Opcode.INIT, 0, payload, room)
            assert reply == b"" if room < HEADER else decode_reply(reply).error == errno.EINVAL
            assert not server.initialized and fs.calls == []
        reply = send(server, abi.Opcode.INIT, 0, payload, HEADER + abi.INIT_OUT.size)
        assert decode_reply(reply).error == 0
        assert server.initialized and fs.calls == ["init"]
    finally:
        fs._fs.shutdown()


def test_every_replying_opcode_is_covered() -> None:
    served = set(OPS)
    covered = {case.opcode for case in CASES.values()} | NO_REPLY | {abi.Opcode.INIT}
    assert served <= covered, sorted(abi.Opcode(op).name for op in served - covered)


def test_forget_needs_no_room(session: tuple[Server, Recorder, Env]) -> None:
    server, fs, env = session
    _, node = env.host_file()
    fs.calls.clear()
    assert send(server, abi.Opcode.FORGET, node, abi.FORGET_IN.pack(1), 0) == b""
    assert fs.calls == ["forget"]


def test_many_creates_with_a_tiny_reply_buffer(session: tuple[Server, Recorder, Env]) -> None:
    # The review's case: 100 CREATEs with 32 bytes of room left 100 files and 200 fds behind.
    server, _, env = session
    fds = fd_count()
    for i in range(100):
        payload = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"c%d\0" % i
        reply = send(server, abi.Opcode.CREATE, abi.ROOT_ID, payload, 32)
        assert decode_reply(reply).error == errno.EINVAL
    assert os.listdir(env.share) == []
    assert fd_count() == fds


# --- live migration: the negotiated session -------------------------------------------------


class XattrFs(Filesystem):
    """Wants SETXATTR_EXT (or not), and records what SETXATTR it gets."""

    def __init__(self, ext: bool = True) -> None:
        self.ext = ext
        self.inits = 0
        self.calls: list[tuple[bytes, bytes, int, int]] = []

    def init(self, conn: Any) -> None:
        self.inits += 1
        if self.ext:
            conn.want |= abi.InitFlag.SETXATTR_EXT

    def setxattr(
        self, ctx: Context, ino: int, name: bytes, value: bytes, flags: int, setxattr_flags: int
    ) -> None:
        self.calls.append((name, value, flags, setxattr_flags))


OFFERED = abi.InitFlag.INIT_EXT | abi.InitFlag.SETXATTR_EXT | abi.InitFlag.POSIX_LOCKS


def test_a_session_goes_on_elsewhere_without_init() -> None:
    source = Server(XattrFs())
    c = FuseClient(direct(source))
    c.init(flags=OFFERED)
    saved = source.save_state()
    assert source.initialized  # the source keeps its session

    fs = XattrFs()
    destination = Server(fs)
    destination.load_state(saved)
    assert destination.initialized and fs.inits == 1
    assert destination.flags == source.flags and destination.proto_minor == source.proto_minor
    assert destination.flags & abi.InitFlag.SETXATTR_EXT
    # The guest's kernel goes on with the long SETXATTR layout it agreed on with the source.
    c2 = FuseClient(direct(destination))
    c2.flags = source.flags
    c2.setxattr(ROOT, b"user.x", b"value", flags=1)
    assert fs.calls == [(b"user.x", b"value", 1, 0)]


def test_a_session_never_started_stays_so() -> None:
    destination = Server(XattrFs())
    destination.load_state(Server(XattrFs()).save_state())
    assert not destination.initialized
    status, _, _ = raw(
        destination, encode_request(abi.Opcode.GETATTR, ROOT, abi.GETATTR_IN.pack(0, 0, 0))
    )
    assert status == errno.EIO


def test_a_destination_with_other_options_refuses_the_session() -> None:
    source = Server(XattrFs())
    FuseClient(direct(source)).init(flags=OFFERED)
    destination = Server(XattrFs(ext=False))
    with pytest.raises(StateError, match="only on the source: SETXATTR_EXT; only here: none"):
        destination.load_state(source.save_state())
    assert not destination.initialized


def test_a_session_is_only_taken_over_by_a_fresh_server() -> None:
    source = Server(XattrFs())
    FuseClient(direct(source)).init(flags=OFFERED)
    with pytest.raises(StateError, match="serves a FUSE session already"):
        source.load_state(source.save_state())
    small = Server(XattrFs(), caps=TransportCaps(max_write=4096))
    with pytest.raises(StateError, match="largest write is 1048576 bytes"):
        small.load_state(source.save_state())
    with pytest.raises(StateError, match="section b'virtio-fs'"):
        Server(XattrFs()).load_state(StateWriter().section(b"virtio-fs", 1, b"").getvalue())


def _session(*fields: int) -> bytes:
    body = StateWriter()
    for f in fields:
        body.uint(f)
    return StateWriter().section(b"fuse-session", 1, body).getvalue()


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        (_session(2), "mounted 2 out of range"),
        (_session(1, 7, 1 << 32, 0, 0, 0, 4096), "INIT field 4294967296 out of range"),
        (_session(1, 8, abi.KERNEL_MINOR_VERSION, 0, 0, 0, 4096), "speaks FUSE 8."),
        (_session(1, 7, 1, 0, 0, 0, 4096), r"speaks FUSE 7\.1$"),
        (_session(1, 7, abi.KERNEL_MINOR_VERSION, 0, 0, 0, 0), "largest write is 0 bytes"),
        (_session(1, 7, abi.KERNEL_MINOR_VERSION, 0, 0, 0, 1 << 40), "largest write 1099"),
        (_session(1, 7, abi.KERNEL_MINOR_VERSION, 0, 0, 0), "truncated"),
        (_session(1, 7, abi.KERNEL_MINOR_VERSION, 0, 0, 0, 4096, 0), "past the end"),
    ],
)
def test_a_hostile_session_is_a_state_error(saved: bytes, message: str) -> None:
    """The saved session passed through the front-end: each field out of its range is
    refused, and the server is left as it was (no session, its own largest write)."""
    fs = XattrFs()
    destination = Server(fs)
    own = destination.max_write
    with pytest.raises(StateError, match=message):
        destination.load_state(saved)
    assert not destination.initialized and destination.max_write == own
    assert fs.inits == 0


def test_a_reset_forgets_the_largest_write_a_session_brought() -> None:
    source = Server(XattrFs(), caps=TransportCaps(max_write=8192))
    FuseClient(direct(source)).init(flags=OFFERED)
    destination = Server(XattrFs())
    destination.load_state(source.save_state())
    assert destination.max_write == 8192
    destination.reset()
    assert destination.max_write == destination.caps.max_write > 8192


# --- where a request's bytes lie, and the C decoding of the compiled build (``_request.c``) ----
#
# A request is answered the same however its bytes are cut into buffers: in one, header and
# arguments apart (as a Linux driver sends them), or cut anywhere. The compiled build decodes the
# header and fixed arguments in C where they lie whole; everywhere else the server decodes them
# in Python, and both must give what one buffer gives.


def _cuts(request: bytes, cuts: list[int]) -> list[memoryview]:
    """``request`` cut at ``cuts``; a cut given twice leaves an empty buffer there."""
    at = sorted(c for c in cuts if 0 < c < len(request))
    bounds = [0, *at, len(request)]
    return [memoryview(request[a:b]) for a, b in itertools.pairwise(bounds)]


def _answers(
    request: bytes, cuts: list[int], reply_size: int = 4096, after: bytes | None = None
) -> tuple[int, ...]:
    """How the server answers ``request`` cut at ``cuts``, or with ``after``, whole in one
    buffer followed by those bytes, told its length."""
    server = Server(MemFs())
    FuseClient(direct(server)).init()
    out = bytearray(reply_size)
    if after is None:
        n = server.handle(_cuts(request, cuts), [memoryview(out)])
    else:
        buffer = [memoryview(request + after)]
        n = server.handle(buffer, [memoryview(out)], None, len(request), reply_size)
    assert n is not None
    if not n:
        return 0, 0, 0, 0
    error, unique, payload = decode_reply(bytes(out[:n]))
    # Not the payload itself: each server's file system has its own times.
    return n, error, unique, len(payload)


def _requests() -> list[bytes]:
    getattr_in = abi.GETATTR_IN.pack(0, 0, 0)
    read_in = abi.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0)
    write_in = abi.WRITE_IN.pack(7, 0, 5, 0, 0, 0, 0)
    return [
        encode_request(abi.Opcode.GETATTR, abi.ROOT_ID, getattr_in),
        encode_request(abi.Opcode.GETATTR, abi.ROOT_ID, getattr_in[:8]),
        encode_request(abi.Opcode.GETATTR, abi.ROOT_ID, getattr_in + b"newer"),
        encode_request(abi.Opcode.GETATTR, 99, getattr_in),
        encode_request(abi.Opcode.READ, abi.ROOT_ID, read_in),
        encode_request(abi.Opcode.WRITE, abi.ROOT_ID, write_in + b"hello"),
        encode_request(abi.Opcode.WRITE, abi.ROOT_ID, write_in),
        encode_request(abi.Opcode.WRITE, abi.ROOT_ID, write_in[:20]),
        encode_request(abi.Opcode.LOOKUP, abi.ROOT_ID, b"nothing\0"),
        encode_request(abi.Opcode.LOOKUP, abi.ROOT_ID, b"a\0after the name"),
        encode_request(abi.Opcode.LOOKUP, abi.ROOT_ID, b"\0"),
        encode_request(abi.Opcode.LOOKUP, abi.ROOT_ID, b"no terminator"),
        encode_request(abi.Opcode.LOOKUP, abi.ROOT_ID, b""),
        encode_request(abi.Opcode.UNLINK, abi.ROOT_ID, b"gone\0"),
        encode_request(abi.Opcode.MKDIR, abi.ROOT_ID, abi.MKDIR_IN.pack(0o755, 0) + b"d\0"),
        encode_request(abi.Opcode.MKDIR, abi.ROOT_ID, abi.MKDIR_IN.pack(0o755, 0)),
        encode_request(abi.Opcode.GETXATTR, abi.ROOT_ID, abi.GETXATTR_IN.pack(0, 0) + b"user.x\0"),
        encode_request(abi.Opcode.OPENDIR, abi.ROOT_ID, abi.OPEN_IN.pack(0, 0)),
        encode_request(abi.Opcode.SETATTR, abi.ROOT_ID, bytes(abi.SETATTR_IN.size)),
        encode_request(abi.Opcode.FORGET, 5, abi.FORGET_IN.pack(1)),
        encode_request(abi.Opcode.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(0, 0)),
        encode_request(63, abi.ROOT_ID, getattr_in),
        encode_request(4000, abi.ROOT_ID, getattr_in),
    ]


@settings(max_examples=300, deadline=None)
@given(
    which=st.integers(0, len(_requests()) - 1),
    cuts=st.lists(st.integers(1, 120), max_size=4),
    extlen=st.integers(0, 3),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, -40]),
)
def test_a_request_is_answered_the_same_however_its_bytes_are_cut(
    which: int, cuts: list[int], extlen: int, length_delta: int
) -> None:
    request = bytearray(_requests()[which])
    # Hostile headers too: extensions the request may not have room for, a wrong length.
    request[36:38] = extlen.to_bytes(2, "little")
    request += bytes(8 * extlen)
    request[0:4] = max(0, len(request) + length_delta).to_bytes(4, "little")
    whole = _answers(bytes(request), [])
    assert _answers(bytes(request), cuts) == whole
    assert _answers(bytes(request), [abi.IN_HEADER.size, *cuts]) == whole
    assert _answers(bytes(request), [abi.IN_HEADER.size, abi.IN_HEADER.size, *cuts]) == whole


@settings(max_examples=300, deadline=None)
@given(
    which=st.integers(0, len(_requests()) - 1),
    keep=st.integers(0, 140),
    after=st.sampled_from([b"", b"\0", b"x" * 64, b"hello\0" + bytes(200), bytes(4096)]),
    length_delta=st.sampled_from([0, 0, -1, 1, 8, 4096]),
)
def test_what_a_buffer_holds_after_the_request_is_never_read(
    which: int, keep: int, after: bytes, length_delta: int
) -> None:
    """A transport's buffer, reused, holds the request and then whatever came before: the
    answer is the request's alone, also when its header claims more than arrived (the rest
    of it then lies in the buffer, after what the transport said it holds)."""
    request = bytearray(_requests()[which])
    request[0:4] = max(0, len(request) + length_delta).to_bytes(4, "little")
    arrived = bytes(request[:keep])
    rest = bytes(request[keep:]) + after
    assert _answers(arrived, [], after=rest) == _answers(arrived, [])


native_split = pytest.mark.skipif(
    server_module._native_split is None, reason="pure build: no C decoding (it comes with mypyc's)"
)


@native_split
@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=200),
    opcode=st.sampled_from([*OPS, 0, 7, 63, 64, 1 << 31]),
    cut=st.integers(0, 200),
    third=st.booleans(),
)
def test_the_c_decoding_answers_only_what_struct_reads(
    data: bytes, opcode: int, cut: int, third: bool
) -> None:
    server = Server(MemFs())
    layouts = server._layouts
    raw = bytearray(data.ljust(abi.IN_HEADER.size, b"\0"))
    raw[4:8] = (opcode & 0xFFFFFFFF).to_bytes(4, "little")
    raw = bytes(raw)
    pieces = [raw[:cut], raw[cut:]] + ([b"tail"] if third else [])
    split = server_module._native_split([memoryview(p) for p in pieces], layouts)
    if cut < abi.IN_HEADER.size:
        assert split is None
        return
    assert split is not None
    header = abi.IN_HEADER.struct.unpack_from(raw)
    assert split[:8] == header[:8]
    layout = layouts[opcode] if opcode < 64 else None
    if layout is None:
        assert split[8] is None
        return
    where = raw[abi.IN_HEADER.size : cut] if cut > abi.IN_HEADER.size else pieces[1]
    assert split[8] == _reference_args(layout, header, where)
    _check_rest(split, pieces, layout, header)


def _check_rest(
    split: tuple[Any, ...], pieces: list[bytes], layout: bytes, header: tuple[int, ...]
) -> None:
    """Where the C decoding says the bytes after the arguments begin is where a reader that
    skipped the header and the arguments stands (0, 0 when it decoded none)."""
    if split[8] is None:
        assert split[9:] == (0, 0)
        return
    if layout.endswith(b"z"):
        size = header[0] - abi.IN_HEADER.size - 8 * header[7]
    else:
        size = struct.calcsize(layout)
    reader = RequestReader([memoryview(p) for p in pieces])
    reader.skip(abi.IN_HEADER.size + size)
    assert split[9:] == (reader._index, reader._offset)


def _reference_args(layout: bytes, header: tuple[int, ...], where: bytes) -> tuple[Any, ...] | None:
    """What the C decoding gives as a request's arguments when they lie in ``where``: its fixed
    fields, and for a layout ending in "z" the name after them, up to its NUL (the arguments the
    header declares, at most 1,024 bytes of name, all in ``where``); None when they don't."""
    if not layout.endswith(b"z"):
        size = struct.calcsize(layout)
        return struct.unpack_from(layout, where) if len(where) >= size else None
    fixed = layout[:-1]
    size = struct.calcsize(fixed)
    declared = header[0] - abi.IN_HEADER.size - 8 * header[7]
    if not size < declared <= size + 1024 or len(where) < declared:
        return None
    name, nul, _ = where[size:declared].partition(b"\0")
    return (*struct.unpack_from(fixed, where), name) if nul else None


@native_split
@settings(max_examples=500, deadline=None)
@given(
    opcode=st.sampled_from([o for o, op in OPS.items() if op.names == 1]),
    fixed=st.binary(min_size=0, max_size=24),
    name=st.binary(min_size=0, max_size=40),
    after=st.binary(min_size=0, max_size=8),
    extlen=st.integers(0, 2),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, -8, 1024, 2000]),
    cut=st.integers(0, 120),
    apart=st.booleans(),
)
def test_the_c_decoding_gives_a_name_as_struct_and_find_do(
    opcode: int,
    fixed: bytes,
    name: bytes,
    after: bytes,
    extlen: int,
    length_delta: int,
    cut: int,
    apart: bool,
) -> None:
    """Requests with one name (LOOKUP, MKDIR, UNLINK...): the name is what the arguments hold up
    to their first NUL, within the length the header declares, or nothing is decoded."""
    server = Server(MemFs())
    layouts = server._layouts
    layout = layouts[opcode]
    assert layout is not None and layout.endswith(b"z")
    args = fixed + name + after
    request = bytearray(encode_request(opcode, abi.ROOT_ID, args))
    request[36:38] = extlen.to_bytes(2, "little")
    request += bytes(8 * extlen)
    request[0:4] = max(0, len(request) + length_delta).to_bytes(4, "little")
    raw = bytes(request)
    header = abi.IN_HEADER.struct.unpack_from(raw)
    # As Linux sends it (header and arguments apart), or cut anywhere after the header.
    at = abi.IN_HEADER.size if apart else max(abi.IN_HEADER.size, cut)
    pieces = [raw[:at], raw[at:]]
    split = server_module._native_split([memoryview(p) for p in pieces], layouts)
    assert split is not None
    where = pieces[0][abi.IN_HEADER.size :] if at > abi.IN_HEADER.size else pieces[1]
    assert split[8] == _reference_args(layout, header, where)
    _check_rest(split, pieces, layout, header)
    # The server answers the same whichever decoding took the request.
    assert _answers(raw, [at]) == _answers(raw, [abi.IN_HEADER.size + 1])


@native_split
def test_the_c_decoding_leaves_what_it_cannot_read_to_python() -> None:
    server = Server(MemFs())
    layouts = server._layouts
    request = encode_request(abi.Opcode.GETATTR, 1, abi.GETATTR_IN.pack(0, 0, 0))
    released = memoryview(bytearray(request))
    released.release()
    for readable in (
        [],
        [released],
        [memoryview(request)[::2]],
        [memoryview(bytearray(request)).cast("I")],
        [memoryview(bytearray(request)).cast("B", (7, 8))],
        [object()],
        iter([memoryview(request)]),
        (memoryview(request),),
    ):
        got = server_module._native_split(readable, layouts)
        assert got is None or readable.__class__ is tuple
    with pytest.raises(TypeError):
        server_module._native_split([memoryview(request)], layouts[:10])


def test_setattr_times_are_signed_and_their_nanoseconds_below_a_second(tmp_path: Path) -> None:
    """SETATTR's seconds come signed in two's complement (a time before 1970 arrives above
    2**63): they are set as such, the last nanosecond of 1969 included, which is no "now".
    Nanoseconds of a second or more are EINVAL, as utimensat() answers, and change nothing."""
    (tmp_path / "f").write_bytes(b"")
    server = Server(PassthroughFs(PassthroughConfig(shared_dir=str(tmp_path))))
    client = FuseClient(direct(server))
    client.init()
    node = client.lookup(abi.ROOT_ID, b"f").nodeid
    both = abi.FATTR_ATIME | abi.FATTR_MTIME

    def times(seconds: int, nsec: int) -> dict[str, int]:
        raw = seconds & (1 << 64) - 1
        return {"valid": both, "atime": raw, "mtime": raw, "atimensec": nsec, "mtimensec": nsec}

    client.setattr(node, **times(-10, 5))
    assert os.stat(tmp_path / "f").st_mtime_ns == -10 * 10**9 + 5
    client.setattr(node, **times(-1, 999_999_999))
    st = os.stat(tmp_path / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (-1, -1)
    for nsec in (10**9, 2**32 - 1):
        with pytest.raises(OSError) as e:
            client.setattr(node, **times(7, nsec))
        assert e.value.errno == errno.EINVAL
        assert os.stat(tmp_path / "f").st_mtime_ns == -1
