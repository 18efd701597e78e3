"""A hostile front-end against the real daemon: ``python -m pyvirtiofsd`` serving a directory.

The project's own Python front-end (:mod:`pyvirtiofsd.testing.frontend`) plays QEMU and the
guest driver, and :class:`FuseClient` builds the valid FUSE traffic. Each test sends something
malformed at one layer (vhost-user messages, virtqueue descriptors, FUSE requests), checks that
it was refused, dropped or answered with an error and logged, and then that the next valid FUSE
request is still served. No VM is needed. The fixture checks at the end that the daemon exited
with status 0 when the front-end left and never logged a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.testing.frontend import DriverQueue, Frontend, FrontendError
from pyvirtiofsd.testing.fuse_client import FuseClient, decode_reply, encode_request
from pyvirtiofsd.vhost_user.messages import (
    HEADER,
    MAX_PAYLOAD,
    FrontendReq,
    MemoryRegionDesc,
    VringState,
    encode_mem_table,
    encode_u64,
)
from pyvirtiofsd.virtio.chain import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from tests.e2e.conftest import DaemonFactory, DaemonProcess

MiB = 1 << 20
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
ROOT = abi.ROOT_ID
HELLO = b"hello from the host\n"
RAM_SIZE = 64 * MiB
REPLY = 4096 + abi.OUT_HEADER.size


def transact(q: DriverQueue) -> FuseClient:
    """A FuseClient whose requests travel through ``q`` as the guest driver would send them:
    the request in device-readable buffers, room for the reply in a device-writable one."""

    def send(request: bytes, reply_size: int) -> bytes:
        return q.request([request], [reply_size] if reply_size else [])

    return FuseClient(send)


@dataclass
class Session:
    daemon: DaemonProcess
    fe: Frontend
    q: DriverQueue
    fuse: FuseClient

    def raw(self, readable: Sequence[bytes], writable: Sequence[int] = (REPLY,)) -> bytes:
        """One chain with hand-made contents; what the device wrote back."""
        return self.q.request(readable, writable)

    def check_serves(self, q: DriverQueue | None = None) -> None:
        """A full valid round: lookup, getattr, open, read, release, forget."""
        assert self.daemon.alive(), self.daemon.log_text()[-3000:]
        fuse = self.fuse if q is None else transact(q)
        entry = fuse.lookup(ROOT, b"hello.txt")
        assert fuse.getattr(entry.nodeid).size == len(HELLO)
        fh = fuse.open(entry.nodeid).fh
        assert fuse.read(entry.nodeid, fh, 0, 4096) == HELLO
        fuse.release(entry.nodeid, fh)
        fuse.forget(entry.nodeid, 1)


@pytest.fixture
def shared(workdir: Path) -> Path:
    d = workdir / "share"
    d.mkdir()
    (d / "hello.txt").write_bytes(HELLO)
    return d


def connect(daemon: DaemonProcess, *, init: bool = True) -> Session:
    fe = Frontend.connect(daemon.socket)
    q = fe.setup(queues=(0, 1), queue_size=128, ram_size=RAM_SIZE, arena_size=8 * MiB)[1]
    fuse = transact(q)
    if init:
        fuse.init()
    return Session(daemon, fe, q, fuse)


@pytest.fixture
def session(start_daemon: DaemonFactory, shared: Path) -> Iterator[Session]:
    s = connect(start_daemon(shared))
    s.check_serves()
    yield s
    s.check_serves()
    s.fe.close()
    s.daemon.finish(allow_warnings=True)


def _raw_chain(q: DriverQueue, descs: Sequence[tuple[int, int, int, int | None]]) -> int:
    """Write descriptors (addr, len, flags, next as a position in ``descs`` or None), publish
    the chain and kick; its head."""
    ids = q.reserve_descs(len(descs))
    for slot, (addr, length, flags, nxt) in zip(ids, descs, strict=True):
        q.write_desc(slot, addr, length, flags, 0 if nxt is None else ids[nxt])
    q.publish_raw(ids[0], ids)
    q.kick()
    return ids[0]


def _error_of(reply: bytes) -> tuple[int, int]:
    """(errno, unique) of a FUSE reply."""
    decoded = decode_reply(reply)
    return decoded.error, decoded.unique


def _getattr_request(unique: int = 4242) -> bytes:
    return encode_request(abi.Opcode.GETATTR, ROOT, abi.GETATTR_IN.pack(0, 0, 0), unique)


# -- the vhost-user control plane -------------------------------------------------------------


BAD_TABLES = {
    # (regions, how many of them get an fd)
    "missing-fd": ([MemoryRegionDesc(0, RAM_SIZE, 0x10_0000_0000, 0)] * 2, 1),
    "overlapping": (
        [
            MemoryRegionDesc(0, 2 * MiB, 0x10_0000_0000, 0),
            MemoryRegionDesc(MiB, 2 * MiB, 0x20_0000_0000, 0),
        ],
        2,
    ),
    "overflowing": ([MemoryRegionDesc(2**64 - MiB, 2 * MiB, 0x10_0000_0000, 0)], 1),
    "beyond-the-file": ([MemoryRegionDesc(0, 2**40, 0x10_0000_0000, 0)], 1),
    "too-many-regions": (
        [MemoryRegionDesc(i * MiB, MiB, 0x10_0000_0000 + i * 2 * MiB, i * MiB) for i in range(9)],
        9,
    ),
}


@pytest.mark.parametrize("kind", list(BAD_TABLES))
def test_bad_set_mem_table(session: Session, kind: str) -> None:
    regions, nfds = BAD_TABLES[kind]
    assert session.fe.ram is not None
    fd = session.fe.ram.fd
    status = session.fe.status_of(FrontendReq.SET_MEM_TABLE, encode_mem_table(regions), [fd] * nfds)
    assert status != 0
    session.daemon.wait_for_log("SET_MEM_TABLE refused")
    session.check_serves()  # the old table is still in force


def test_set_mem_table_with_a_socket_for_memory(session: Session) -> None:
    a, b = socket.socketpair()
    try:
        region = MemoryRegionDesc(0, RAM_SIZE, 0x10_0000_0000, 0)
        status = session.fe.status_of(
            FrontendReq.SET_MEM_TABLE, encode_mem_table([region]), [a.fileno()]
        )
    finally:
        a.close()
        b.close()
    assert status != 0
    session.daemon.wait_for_log("SET_MEM_TABLE refused")
    session.check_serves()


def test_ring_outside_memory(session: Session) -> None:
    fe = session.fe
    assert fe.ram is not None
    spare = DriverQueue(fe.ram, 2, 64, event_idx=True, arena_size=MiB)
    try:
        fe.set_vring_num(2, 64)
        fe.set_vring_addr(2, 0xDEAD_0000, 0xBEEF_0000, 0xF00D_0000)
        with pytest.raises(FrontendError):
            fe.set_vring_kick(2, spare.kick_fd)
        session.daemon.wait_for_log("ring outside shared memory")
        session.check_serves()
        # The same ring placed where it belongs serves FUSE like the first one.
        ua = fe.ram.user_addr
        fe.set_vring_addr(2, ua(spare.desc_addr), ua(spare.avail_addr), ua(spare.used_addr))
        fe.set_vring_call(2, spare.call_fd)
        fe.set_vring_kick(2, spare.kick_fd)
        fe.set_vring_enable(2, True)
        session.check_serves(spare)
    finally:
        fe.stop_queue(2)
        spare.close()


def _fd_count(daemon: DaemonProcess) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


@pytest.mark.parametrize(
    "size,sent",
    [(MAX_PAYLOAD + 1, 0), (MiB, MiB), (0xFFFF_FFFF, 64 * 1024)],
    ids=["just-too-big", "1m-sent", "4g-announced"],
)
def test_oversized_vhost_user_message(
    start_daemon: DaemonFactory, shared: Path, size: int, sent: int
) -> None:
    # No vhost-user message is that large: the header alone says the stream is garbage. The
    # daemon refuses it without allocating the announced size, closes the fds that came with
    # it, and ends the connection, exiting as it does when the front-end leaves.
    s = connect(start_daemon(shared))
    s.check_serves()
    fds = [os.eventfd(0) for _ in range(3)]
    try:
        header = HEADER.pack(FrontendReq.SET_CONFIG, 1, size)
        with contextlib.suppress(FrontendError):  # the daemon may hang up mid-payload
            s.fe.send_raw(header, fds)
            for _ in range(0, sent, 64 * 1024):
                s.fe.send_raw(bytes(64 * 1024))
    finally:
        for fd in fds:
            os.close(fd)
    log = s.daemon.finish(allow_warnings=True)
    assert f"announces a {size}-byte payload" in log
    s.fe.close()


def test_fds_on_messages_that_take_none_are_closed(session: Session) -> None:
    fe = session.fe
    baseline = _fd_count(session.daemon)
    fds = [os.eventfd(0) for _ in range(4)]
    try:
        for _ in range(3):
            assert fe.get_features()  # the reply comes; the fds are still attached
            fe.call(FrontendReq.GET_FEATURES, b"", fds)
            fe.call(FrontendReq.GET_QUEUE_NUM, b"", fds)
            assert fe.status_of(FrontendReq.SET_VRING_ENABLE, VringState(1, 1).encode(), fds) == 0
            assert fe.status_of(FrontendReq.SET_STATUS, encode_u64(0xF), fds) == 0
            assert fe.status_of(250, b"garbage", fds) != 0
            # One fd is taken, the others are not: all are closed.
            assert fe.status_of(FrontendReq.SET_VRING_KICK, encode_u64(5), fds) != 0
            # The fds come with the payload rather than the header.
            fe.send_raw(HEADER.pack(FrontendReq.SET_STATUS, 1 | 8, 8))
            fe.send_raw(encode_u64(0xF), fds)
            assert fe.recv().payload == encode_u64(0)
    finally:
        for fd in fds:
            os.close(fd)
    assert fe.get_queue_num() >= 2  # a round trip: everything before it has been handled
    assert _fd_count(session.daemon) == baseline


def test_unknown_vhost_user_request(session: Session) -> None:
    assert session.fe.status_of(250, b"garbage") != 0
    session.daemon.wait_for_log("request 250 refused")
    session.check_serves()


# -- virtqueue descriptors --------------------------------------------------------------------


BAD_CHAINS: dict[str, list[tuple[int, int, int, int | None]]] = {
    "loop": [(0x1000, 8, NEXT, 1), (0x1000, 8, NEXT, 0)],
    "outside-memory": [(0x1000, 64, NEXT, 1), (1 << 45, 4096, WRITE, None)],
    "huge-length": [(0x1000, 0xFFFF_FFFF, NEXT, 1), (0x2000, 4096, WRITE, None)],
    "across-the-end-of-memory": [(RAM_SIZE - 8, 64, 0, None)],
    "indirect-outside-memory": [(1 << 45, 64, INDIRECT, None)],
    "write-then-read": [(0x1000, 64, WRITE | NEXT, 1), (0x2000, 64, 0, None)],
}


@pytest.mark.parametrize("kind", list(BAD_CHAINS))
def test_bad_descriptor_chain(session: Session, kind: str) -> None:
    q = session.q
    head = _raw_chain(q, BAD_CHAINS[kind])
    assert q.wait(head) == 0  # returned unused
    q.result(head)
    session.daemon.wait_for_log(f"descriptor chain at head {head}")
    session.check_serves()


def test_next_index_out_of_range(session: Session) -> None:
    q = session.q
    (head,) = q.reserve_descs(1)
    q.write_desc(head, 0x1000, 64, NEXT, 60000)
    q.publish_raw(head, [head])
    q.kick()
    assert q.wait(head) == 0
    q.result(head)
    session.daemon.wait_for_log(f"descriptor chain at head {head}")
    session.check_serves()


def test_loop_inside_an_indirect_table(session: Session) -> None:
    ram = session.fe.ram
    assert ram is not None
    table = ram.carve(32, 16)
    view = ram.view(table, 32)
    DESC.pack_into(view, 0, 0x1000, 8, NEXT, 1)
    DESC.pack_into(view, 16, 0x1000, 8, NEXT, 0)
    view.release()
    head = _raw_chain(session.q, [(table, 32, INDIRECT, None)])
    assert session.q.wait(head) == 0
    session.q.result(head)
    session.daemon.wait_for_log("loop")
    session.check_serves()


def test_corrupt_ring_stops_only_that_ring(session: Session) -> None:
    fe = session.fe
    other = fe.start_queue(2, 64, arena_size=MiB)
    session.check_serves(other)
    err = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fe.set_vring_err(1, err)
        session.q.publish(4000, track=False)  # a head beyond the queue size
        session.q.kick()
        session.daemon.wait_for_log("ring is corrupt")
        session.check_serves(other)
        # The front-end resets the broken ring; it serves again.
        fe.stop_queue(1)
        session.q = fe.start_queue(1, 128, arena_size=8 * MiB)
        session.fuse = transact(session.q)
        session.check_serves()
    finally:
        os.close(err)
        fe.stop_queue(2)


def test_notifier_fds_keep_their_flags(session: Session) -> None:
    # The kick, call and err eventfds are open file descriptions shared with the front-end: the
    # daemon waits on them and signals them without touching their flags (O_NONBLOCK set on
    # them would make the front-end's own blocking reads fail with EAGAIN).
    fe, q = session.fe, session.q
    kick, call, err = (os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3))
    try:
        fe.set_vring_err(1, err)
        fe.set_vring_call(1, call)
        fe.set_vring_kick(1, kick)  # the ring restarts, waiting on the new kick fd
        os.close(q.kick_fd)
        q.kick_fd = kick
        os.close(q.replace_call_fd(call))
        for fd in (kick, call, err):
            assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        session.check_serves()
        for fd in (kick, call, err):
            assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(err)


# -- FUSE requests ----------------------------------------------------------------------------


def test_request_before_init(start_daemon: DaemonFactory, shared: Path) -> None:
    s = connect(start_daemon(shared), init=False)
    assert _error_of(s.raw([_getattr_request(7)])) == (errno.EIO, 7)
    s.fuse.init()
    s.check_serves()
    s.fe.close()
    s.daemon.finish(allow_warnings=True)


def test_truncated_fuse_header(session: Session) -> None:
    reply = session.raw([_getattr_request()[:20]])
    assert _error_of(reply) == (errno.EINVAL, 0)
    session.daemon.wait_for_log("shorter than the FUSE header")
    session.check_serves()


def test_truncated_header_across_buffers(session: Session) -> None:
    request = _getattr_request()
    reply = session.raw([request[:10], request[10:30]])
    assert _error_of(reply) == (errno.EINVAL, 0)
    session.check_serves()


@pytest.mark.parametrize("delta", [4096, 1 << 31], ids=["4k-more", "2g-more"])
def test_header_length_beyond_the_chain(session: Session, delta: int) -> None:
    request = bytearray(_getattr_request(99))
    struct.pack_into("<I", request, 0, len(request) + delta)
    assert _error_of(session.raw([bytes(request)])) == (errno.EINVAL, 99)
    session.daemon.wait_for_log("request 99 (opcode 3): header says")
    session.check_serves()


def test_header_length_shorter_than_the_header(session: Session) -> None:
    request = bytearray(_getattr_request(98))
    struct.pack_into("<I", request, 0, 10)
    assert _error_of(session.raw([bytes(request)])) == (errno.EINVAL, 98)
    session.check_serves()


def _scratch_file(session: Session) -> tuple[int, int]:
    entry, opened = session.fuse.create(ROOT, b"scratch", 0o644, os.O_RDWR)
    return entry.nodeid, opened.fh


def test_huge_write_size(session: Session) -> None:
    node, fh = _scratch_file(session)
    payload = abi.WRITE_IN.pack(fh, 0, 0xFFFF_FFFF, 0, 0, 0, 0) + b"only sixteen b.."
    request = encode_request(abi.Opcode.WRITE, node, payload, 555)
    assert _error_of(session.raw([request])) == (errno.EINVAL, 555)
    session.daemon.wait_for_log("malformed request 555")
    assert (session.daemon.shared_dir / "scratch").stat().st_size == 0
    assert session.fuse.write(node, fh, 0, b"fine") == 4
    session.fuse.release(node, fh)
    assert (session.daemon.shared_dir / "scratch").read_bytes() == b"fine"
    session.check_serves()


def test_write_beyond_max_write(session: Session) -> None:
    node, fh = _scratch_file(session)
    data = bytes(2 * MiB)  # the data is all there, but more than INIT's max_write
    payload = abi.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0)
    request = encode_request(abi.Opcode.WRITE, node, payload + data, 556)
    assert _error_of(session.raw([request[:64], request[64:]])) == (errno.EINVAL, 556)
    assert (session.daemon.shared_dir / "scratch").stat().st_size == 0
    session.fuse.release(node, fh)
    session.check_serves()


def test_huge_read_size(session: Session) -> None:
    entry = session.fuse.lookup(ROOT, b"hello.txt")
    fh = session.fuse.open(entry.nodeid).fh
    payload = abi.READ_IN.pack(fh, 0, 0xFFFF_FFFF, 0, 0, 0, 0)
    request = encode_request(abi.Opcode.READ, entry.nodeid, payload, 9)
    # 4 GiB asked for, 4 KiB of room: what fits is read, nothing is allocated for the rest.
    assert decode_reply(session.raw([request])) == (0, 9, HELLO)
    payload = abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)
    request = encode_request(abi.Opcode.READ, entry.nodeid, payload, 10)
    assert decode_reply(session.raw([request], [abi.OUT_HEADER.size + 4])) == (0, 10, HELLO[:4])
    session.fuse.release(entry.nodeid, fh)
    session.fuse.forget(entry.nodeid, 1)
    session.check_serves()


def test_request_with_no_room_for_its_reply(session: Session) -> None:
    assert session.raw([_getattr_request(77)], []) == b""
    session.daemon.wait_for_log("request 77 (opcode 3) has no room for a reply")
    session.check_serves()


def test_reply_buffer_too_small(session: Session) -> None:
    # Room for the reply header but not for fuse_attr_out: the error goes in the header.
    reply = session.raw([_getattr_request(78)], [abi.OUT_HEADER.size + 8])
    assert _error_of(reply) == (errno.EINVAL, 78)
    session.daemon.wait_for_log("request 78 (opcode 3) has no room for a reply")
    # Not even room for the header: nothing is written, the chain comes back empty.
    assert session.raw([_getattr_request(79)], [8]) == b""
    session.check_serves()


def test_unknown_opcode(session: Session) -> None:
    request = encode_request(63, ROOT, b"whatever", 61)
    assert _error_of(session.raw([request])) == (errno.ENOSYS, 61)
    request = encode_request(9999, ROOT, b"", 62)
    assert _error_of(session.raw([request])) == (errno.ENOSYS, 62)
    session.check_serves()


def test_name_without_terminator(session: Session) -> None:
    request = encode_request(abi.Opcode.LOOKUP, ROOT, b"hello.txt", 63)  # no NUL
    assert _error_of(session.raw([request])) == (errno.EINVAL, 63)
    session.check_serves()


def test_forget_of_unknown_inode(session: Session) -> None:
    session.fuse.forget(123456789, 5)
    session.fuse.batch_forget([(987654321, 1), (ROOT, 0)])
    session.check_serves()


def test_request_split_over_many_buffers(session: Session) -> None:
    # Valid, but awkward: every byte of a LOOKUP in its own descriptor, the reply in pieces.
    request = encode_request(abi.Opcode.LOOKUP, ROOT, b"hello.txt\0", 64)
    reply = session.raw([request[i : i + 1] for i in range(len(request))], [7, 9, 200])
    decoded = decode_reply(reply)
    assert decoded.error == 0 and decoded.unique == 64
    entry = abi.ENTRY_OUT.unpack(decoded.payload)
    assert entry.size == len(HELLO)
    session.fuse.forget(entry.nodeid, 1)
    session.check_serves()
