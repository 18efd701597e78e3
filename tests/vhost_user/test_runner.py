"""The runner and its server loop, driven by the test front-end over a real Unix socket."""

from __future__ import annotations

import logging
import mmap
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pyvirtiofsd.testing.frontend import DriverQueue, Frontend, FrontendError
from pyvirtiofsd.testing.testdevice import UppercaseDevice
from pyvirtiofsd.vhost_user.connection import Listener
from pyvirtiofsd.vhost_user.messages import (
    HEADER,
    VHOST_F_LOG_ALL,
    FrontendReq,
    MemoryRegionDesc,
    Message,
    MMapRequest,
    VringAddr,
    VringState,
    encode_mem_table,
    encode_u64,
)
from pyvirtiofsd.vhost_user.runner import VhostUserServer
from pyvirtiofsd.virtio.chain import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from pyvirtiofsd.virtio.device import Completion, later
from pyvirtiofsd.virtio.dirtylog import word_masks
from tests.vhost_user.conftest import DaemonFactory

MiB = 1 << 20
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


def check_serves(q: DriverQueue, text: bytes = b"still alive") -> None:
    assert q.request([text], [64]) == text.upper()


# -- normal operation ------------------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_requests(daemon: DaemonFactory, event_idx: bool, indirect: bool) -> None:
    d = daemon()
    fe = d.connect()
    q = fe.setup(queues=(0, 1), queue_size=64, event_idx=event_idx)[1]
    assert q.request([b"hello, ", b"world"], [5, 100], indirect=indirect) == b"HELLO, WORLD"
    assert q.request([b"!forget"], [16], indirect=indirect) == b""  # used length 0
    for i in range(200):  # more than the queue size: indices and descriptors recycle
        payload = f"request {i}".encode()
        assert q.request([payload], [len(payload)], indirect=indirect) == payload.upper()
    fe.close()
    assert d.wait_exit() == [0, 202, 0, 0]


def test_many_requests_in_flight(daemon: DaemonFactory) -> None:
    d = daemon()
    q = d.connect().setup(queues=(1,), queue_size=256)[1]
    for _round in range(5):
        heads = {q.submit([f"n{i}".encode()], [8]): i for i in range(100)}
        q.kick()
        for head, i in heads.items():
            q.wait(head)
            assert q.result(head) == (len(f"n{i}"), f"N{i}".encode())
    assert not q.stray_used


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_queues_in_parallel(daemon: DaemonFactory, event_idx: bool) -> None:
    d = daemon()
    fe = d.connect()
    queues = fe.setup(queues=(0, 1, 2, 3), queue_size=64, event_idx=event_idx)
    errors: list[BaseException] = []

    def drive(q: DriverQueue) -> None:
        try:
            for i in range(300):
                payload = f"q{q.index} r{i}".encode()
                batch = [q.submit([payload], [32], indirect=bool(i % 2)) for _ in range(3)]
                q.kick()
                for head in batch:
                    q.wait(head)
                    assert q.result(head) == (len(payload), payload.upper())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=drive, args=(q,)) for q in queues.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    fe.close()
    assert d.wait_exit() == [900, 900, 900, 900]


def test_thread_pool_serves_in_parallel(daemon: DaemonFactory) -> None:
    # Each request waits until four are running: eight complete only if the pool of four
    # really serves them at the same time.
    device = UppercaseDevice(num_queues=2, barrier=threading.Barrier(4))
    d = daemon(device, thread_pool_size=4)
    q = d.connect().setup(queues=(1,), queue_size=64)[1]
    heads = [q.submit([f"slow {i}".encode()], [16]) for i in range(8)]
    q.kick()
    for i, head in enumerate(heads):
        q.wait(head, timeout=60)
        assert q.result(head)[1] == f"SLOW {i}".encode()
    assert len(device.threads_seen) == 4
    device.barrier = None
    check_serves(q)  # a lone request is served inline


def _until_a_kick_is_not_asked(q: DriverQueue, tries: int = 50) -> int:
    """Requests, each kicked and answered, until one goes without a kick: the worker batches
    the queue now. That one's head, which may still wait for its batch."""
    for i in range(tries):
        head = q.submit([f"r{i}".encode()], [8])
        if not q.kick():
            return head
        q.wait(head)
        q.result(head)
        # The reply comes before the worker re-arms: the next kick is decided on the re-arm.
        q.wait_armed()
    raise AssertionError(f"{tries} requests in a row each asked for a kick")


def test_a_queue_served_in_batches_asks_for_a_kick_per_batch(daemon: DaemonFactory) -> None:
    # A minute's wait: every chain here is served because a kick was asked for.
    d = daemon(UppercaseDevice(num_queues=2, kick_batch=(4, 60.0)))
    fe = d.connect()
    q = fe.setup(queues=(1,), queue_size=64)[1]
    heads = [_until_a_kick_is_not_asked(q)]
    # The kick comes within four more chains (three, unless the worker took the first while
    # it re-armed), and then every chain is served.
    while True:
        heads.append(q.submit([f"more {len(heads)}".encode()], [16]))
        if q.kick():
            break
        assert len(heads) <= 5, "five chains waiting and still no kick asked for"
    for i, head in enumerate(heads[1:], 1):
        q.wait(head, timeout=10)
        assert q.result(head)[1] == f"MORE {i}".encode()
    q.wait(heads[0], timeout=10)
    assert not q.stray_used
    # Stopped while batched, the ring is left asking for a kick at its next chain, as whoever
    # serves it next may expect.
    q.wait_armed()
    assert q._used[2 + 4 * q.size] != q.avail_idx
    fe.stop_queue(1)
    assert q._used[2 + 4 * q.size] == q.avail_idx


def test_a_chain_left_without_a_kick_is_served_when_the_wait_is_over(
    daemon: DaemonFactory,
) -> None:
    d = daemon(UppercaseDevice(num_queues=2, kick_batch=(4, 0.2)))
    q = d.connect().setup(queues=(1,), queue_size=64)[1]
    waiting = _until_a_kick_is_not_asked(q)
    q.wait(waiting, timeout=10)  # served once the wait is over, without a kick
    # The look that found the wait over puts the queue back to a kick per chain, so an idle
    # worker sleeps without a timeout: the next chain asks for its kick.
    q.wait_taken()
    head = q.submit([b"next"], [8])
    assert q.kick() is True
    q.wait(head)
    assert q.result(head) == (4, b"NEXT")


def test_without_event_idx_a_batched_queue_serves_every_chain_at_once(
    daemon: DaemonFactory,
) -> None:
    # Without EVENT_IDX the driver can't be asked to hold its kicks: none of these waits for
    # the device's minute.
    d = daemon(UppercaseDevice(num_queues=2, kick_batch=(4, 60.0)))
    q = d.connect().setup(queues=(1,), queue_size=64, event_idx=False)[1]
    for i in range(50):
        head = q.submit([f"r{i}".encode()], [8])
        q.kick()
        q.wait(head, timeout=10)
        assert q.result(head)[1] == f"R{i}".encode()


def test_regions_added_one_by_one_and_buffers_across_them(daemon: DaemonFactory) -> None:
    d = daemon()
    fe = d.connect()
    q = fe.setup(queues=(1,), regions=2, mem_slots=True, ram_size=8 * MiB, arena_size=MiB)[1]
    ram = fe.ram
    assert ram is not None
    boundary = ram.regions[1].guest_addr
    ram.write(boundary - 3, b"abc")
    ram.write(boundary, b"def")
    out = ram.carve(16)
    a, b = q.reserve_descs(2)
    q.write_desc(a, boundary - 3, 6, NEXT, b)
    q.write_desc(b, out, 16, WRITE, 0)
    q.publish_raw(a, [a, b])
    q.kick()
    assert q.wait(a) == 6
    assert ram.read(out, 6) == b"ABCDEF"
    q.result(a)
    check_serves(q)


def test_ring_stop_and_restart(daemon: DaemonFactory) -> None:
    d = daemon()
    fe = d.connect()
    q = fe.setup(queues=(1,), queue_size=16)[1]
    for _ in range(5):
        check_serves(q)
    assert fe.stop_queue(1) == 5
    head = q.submit([b"queued while stopped"], [32])
    q.kick(force=True)
    with pytest.raises(FrontendError):
        q.wait(head, timeout=0.2)
    fe.set_vring_base(1, 5)
    fe.set_vring_kick(1, q.kick_fd)  # no kick afterwards: the daemon must look anyway
    q.wait(head)
    assert q.result(head)[1] == b"QUEUED WHILE STOPPED"
    check_serves(q)


def test_disabled_ring_waits_for_enable(daemon: DaemonFactory) -> None:
    d = daemon()
    fe = d.connect()
    q = fe.setup(queues=(1,), queue_size=16)[1]
    fe.set_vring_enable(1, False)
    head = q.submit([b"later"], [8])
    q.kick(force=True)
    with pytest.raises(FrontendError):
        q.wait(head, timeout=0.2)
    fe.set_vring_enable(1, True)
    q.wait(head)
    assert q.result(head)[1] == b"LATER"


def test_call_fd_replaced_while_running(daemon: DaemonFactory) -> None:
    d = daemon()
    fe = d.connect()
    q = fe.setup(queues=(1,), queue_size=16)[1]
    check_serves(q)
    new_call = os.eventfd(0, os.EFD_NONBLOCK)
    old_call = q.replace_call_fd(new_call)
    fe.set_vring_call(1, new_call)
    os.close(old_call)
    check_serves(q)


def test_config_and_status_over_the_socket(daemon: DaemonFactory) -> None:
    tag = b"myfs".ljust(36, b"\0") + (1).to_bytes(4, "little")
    d = daemon(UppercaseDevice(config=tag))
    fe = d.connect()
    fe.negotiate()
    assert fe.get_config(0, 40) == tag
    assert fe.get_config(36, 4) == (1).to_bytes(4, "little")
    assert fe.get_queue_num() == 2
    fe.set_status(0xF)
    assert fe.get_status() == 0xF


def test_backend_channel_shmem_requests(daemon: DaemonFactory) -> None:
    device = UppercaseDevice(shmem_sizes=[2 * MiB])
    d = daemon(device)
    fe = d.connect()
    fe.negotiate()
    assert fe.get_shmem_config() == [2 * MiB]
    seen: list[tuple[int, MMapRequest, int]] = []

    def hook(msg: Message) -> int:
        fds = msg.take_fds()
        seen.append((msg.request, MMapRequest.decode(msg.payload), len(fds)))
        for fd in fds:
            os.close(fd)
        return 0 if msg.request == 9 else 7

    fe.open_backend_channel(hook)
    deadline = time.monotonic() + 5
    while device.channel is None and time.monotonic() < deadline:
        time.sleep(0.01)
    channel = device.channel
    assert channel is not None
    memfd = os.memfd_create("file")
    try:
        assert channel.shmem_map(0, memfd, 4096, 2 * MiB - 8192, 8192, True) == 0
        assert channel.shmem_unmap(0, 2 * MiB - 8192, 8192) == 7
    finally:
        os.close(memfd)
    assert seen == [
        (9, MMapRequest(0, 4096, 2 * MiB - 8192, 8192, 1), 1),
        (10, MMapRequest(0, 0, 2 * MiB - 8192, 8192, 0), 0),
    ]


def test_inherited_listening_fd(tmp_path: Path) -> None:
    path = str(tmp_path / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.detach()
    result: list[Sequence[int]] = []
    t = threading.Thread(
        target=lambda: result.append(
            VhostUserServer(UppercaseDevice(), Listener.inherit(fd)).run()
        ),
        daemon=True,
    )
    t.start()
    with Frontend.connect(path) as fe:
        check_serves(fe.setup(queues=(1,))[1])
    t.join(10)
    assert result == [[0, 1]]


def test_stop_before_a_front_end_connects(tmp_path: Path) -> None:
    path = tmp_path / "s"
    listener = Listener.bind(str(path))
    daemon = VhostUserServer(UppercaseDevice(), listener)
    t = threading.Thread(target=daemon.run, daemon=True)
    t.start()
    time.sleep(0.05)
    daemon.stop()
    t.join(5)
    assert not t.is_alive()
    assert path.is_socket(), "the loop removed a socket it does not own"
    listener.close()
    assert not path.exists()


def test_stop_while_serving(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    listener = Listener.bind(path)
    daemon = VhostUserServer(UppercaseDevice(), listener)
    result: list[list[int]] = []
    t = threading.Thread(target=lambda: result.append(daemon.run()), daemon=True)
    t.start()
    with Frontend.connect(path) as fe:
        q = fe.setup(queues=(1,))[1]
        check_serves(q)
        daemon.stop()
        t.join(5)
        assert result == [[0, 1]]
        with pytest.raises(FrontendError):
            fe.get_queue_num()
    listener.close()


@pytest.mark.parametrize("keep_listening", [False, True], ids=["once", "keep_listening"])
@pytest.mark.parametrize("connected", [False, True], ids=["accepting", "connected"])
def test_stop_from_a_signal_handler(tmp_path: Path, connected: bool, keep_listening: bool) -> None:
    path = str(tmp_path / "s")
    listener = Listener.bind(path)
    daemon = VhostUserServer(UppercaseDevice(), listener, keep_listening=keep_listening)
    frontends: list[Frontend] = []
    if connected:
        threading.Thread(target=lambda: frontends.append(Frontend.connect(path))).start()
    old = signal.signal(signal.SIGALRM, lambda signum, frame: daemon.stop())
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        assert daemon.run() == [0, 0]  # blocks in accept() or recvmsg() on this thread
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for fe in frontends:
            fe.close()
        listener.close()
    assert len(frontends) == int(connected)


# -- one front-end after another (--keep-listening) -------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.01)


class _KeepLoop:
    """A server that keeps listening, run on a thread of the test."""

    def __init__(self, path: Path, device: UppercaseDevice, thread_pool_size: int = 0) -> None:
        self.path = str(path)
        self.device = device
        self.listener = Listener.bind(self.path)
        self.server = VhostUserServer(
            device, self.listener, thread_pool_size=thread_pool_size, keep_listening=True
        )
        self.result: list[list[int]] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(self.server.run()), daemon=True
        )

    def stop(self) -> list[int]:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.listener.close()
        return self.result[0]


def test_keep_listening_serves_one_front_end_after_another(tmp_path: Path) -> None:
    device = UppercaseDevice(num_queues=3)
    loop = _KeepLoop(tmp_path / "s", device, thread_pool_size=2)
    ident = os.stat(loop.path).st_ino
    fds, threads = _fds(), threading.active_count()
    loop.thread.start()
    for _ in range(3):
        with Frontend.connect(loop.path) as fe:
            qs = fe.setup(queues=(0, 1, 2), queue_size=64)
            fe.open_backend_channel()
            err = os.eventfd(0)
            fe.set_vring_err(1, err)
            os.close(err)  # the daemon has its own
            check_serves(qs[1])
            check_serves(qs[2])
            assert device.channel is not None
        # Gone: the device is reset once everything of that front-end is.
        _until(lambda: device.resets == loop.server.front_ends, "the device reset")
        assert device.channel is None
        assert _fds() == fds, "a front-end's fds outlived it"
        assert threading.active_count() == threads + 1, "a front-end's threads outlived it"
        assert os.stat(loop.path).st_ino == ident, "the socket was made anew"
    assert loop.server.front_ends == 3
    assert loop.stop() == [0, 3, 3]
    assert device.resets == 3  # none for the stop


def test_keep_listening_refuses_a_second_front_end_while_one_is_served(
    tmp_path: Path,
) -> None:
    loop = _KeepLoop(tmp_path / "s", UppercaseDevice())
    loop.thread.start()
    with Frontend.connect(loop.path) as first:
        q = first.setup(queues=(1,))[1]
        # Closed at once, not left waiting in the backlog: a hang-up or a reset, depending on
        # whether its first message had arrived.
        with (
            Frontend.connect(loop.path, timeout=10) as second,
            pytest.raises((FrontendError, ConnectionError)),
        ):
            second.get_queue_num()
        check_serves(q)
    with Frontend.connect(loop.path) as third:  # served once the first has gone
        check_serves(third.setup(queues=(1,))[1])
    assert loop.stop() == [0, 2]
    assert loop.server.front_ends == 2


def test_keep_listening_stops_while_waiting_for_the_next(tmp_path: Path) -> None:
    device = UppercaseDevice()
    loop = _KeepLoop(tmp_path / "s", device)
    loop.thread.start()
    with Frontend.connect(loop.path) as fe:
        check_serves(fe.setup(queues=(1,))[1])
    _until(lambda: device.resets == 1, "the device reset after the front-end left")
    loop.server.stop()
    loop.thread.join(10)
    assert not loop.thread.is_alive()
    assert loop.result == [[0, 1]]
    assert Path(loop.path).is_socket(), "the loop removed a socket it does not own"
    loop.listener.close()


# -- hostile front-ends and drivers ----------------------------------------------------------


@pytest.fixture
def running(daemon: DaemonFactory) -> tuple[Frontend, DriverQueue, DriverQueue]:
    d = daemon()
    fe = d.connect()
    queues = fe.setup(queues=(1, 2), queue_size=16)
    return fe, queues[1], queues[2]


def test_memory_table_with_a_missing_fd(
    running: tuple[Frontend, DriverQueue, DriverQueue], caplog: pytest.LogCaptureFixture
) -> None:
    fe, q, _ = running
    assert fe.ram is not None
    with caplog.at_level(logging.WARNING):
        status = fe.status_of(
            FrontendReq.SET_MEM_TABLE, encode_mem_table(fe.ram.descs() * 2), [fe.ram.fd]
        )
    assert status != 0
    assert "2 regions but 1 fds" in caplog.text
    check_serves(q)


@pytest.mark.parametrize(
    "regions",
    [
        [
            MemoryRegionDesc(0, 2 * MiB, 0x10_0000_0000, 0),
            MemoryRegionDesc(MiB, 2 * MiB, 0x20_0000_0000, 0),
        ],
        [MemoryRegionDesc(2**64 - MiB, 2 * MiB, 0x10_0000_0000, 0)],
        [MemoryRegionDesc(0, 2**40, 0x10_0000_0000, 0)],
    ],
    ids=["overlapping", "overflowing", "beyond-the-file"],
)
def test_bad_memory_tables(
    running: tuple[Frontend, DriverQueue, DriverQueue],
    caplog: pytest.LogCaptureFixture,
    regions: list[MemoryRegionDesc],
) -> None:
    fe, q, _ = running
    assert fe.ram is not None
    with caplog.at_level(logging.WARNING):
        status = fe.status_of(
            FrontendReq.SET_MEM_TABLE, encode_mem_table(regions), [fe.ram.fd] * len(regions)
        )
    assert status != 0
    assert "SET_MEM_TABLE refused" in caplog.text
    check_serves(q)


def test_ring_outside_memory(
    running: tuple[Frontend, DriverQueue, DriverQueue], caplog: pytest.LogCaptureFixture
) -> None:
    fe, q, _ = running
    assert fe.ram is not None
    ram = fe.ram
    spare = DriverQueue(ram, 3, 16, event_idx=True, arena_size=64 * 1024)
    try:
        fe.set_vring_num(3, 16)
        fe.set_vring_addr(3, 0xDEAD_0000, 0xBEEF_0000, 0xF00D_0000)
        with caplog.at_level(logging.WARNING), pytest.raises(FrontendError):
            fe.set_vring_kick(3, spare.kick_fd)
        assert "ring outside shared memory" in caplog.text
        check_serves(q)
        # the same ring with sane addresses starts fine
        ua = ram.user_addr
        fe.set_vring_addr(3, ua(spare.desc_addr), ua(spare.avail_addr), ua(spare.used_addr))
        fe.set_vring_call(3, spare.call_fd)
        fe.set_vring_kick(3, spare.kick_fd)
        fe.set_vring_enable(3, True)
        check_serves(spare)
    finally:
        fe.stop_queue(3)
        spare.close()


def _raw_chain(q: DriverQueue, descs: Sequence[tuple[int, int, int, int | None]]) -> int:
    """Write descriptors (addr, len, flags, next-as-position-or-None) and publish them."""
    ids = q.reserve_descs(len(descs))
    for slot, (addr, length, flags, nxt) in zip(ids, descs, strict=True):
        q.write_desc(slot, addr, length, flags, 0 if nxt is None else ids[nxt])
    q.publish_raw(ids[0], ids)
    q.kick()
    return ids[0]


BAD_CHAINS = {
    "loop": [(0x1000, 8, NEXT, 1), (0x1000, 8, NEXT, 0)],
    "outside-memory": [(0x1000, 8, NEXT, 1), (1 << 45, 64, WRITE, None)],
    "huge-length": [(0x1000, 0xFFFF_FFFF, 0, None)],
    "end-of-memory": [(64 * MiB - 4, 8, WRITE, None)],
    "indirect-out-of-range": [(1 << 45, 64, INDIRECT, None)],
    "indirect-bad-length": [(0x1000, 20, INDIRECT, None)],
    "write-then-read": [(0x1000, 8, WRITE | NEXT, 1), (0x2000, 8, 0, None)],
}


@pytest.mark.parametrize("kind", list(BAD_CHAINS))
def test_bad_chains_are_returned_unused(
    running: tuple[Frontend, DriverQueue, DriverQueue],
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    _, q, _ = running
    with caplog.at_level(logging.WARNING):
        head = _raw_chain(q, BAD_CHAINS[kind])
        assert q.wait(head) == 0
    assert f"descriptor chain at head {head}" in caplog.text
    assert "returned unused" in caplog.text
    q.result(head)
    check_serves(q)


def test_loop_inside_an_indirect_table(
    running: tuple[Frontend, DriverQueue, DriverQueue], caplog: pytest.LogCaptureFixture
) -> None:
    fe, q, _ = running
    assert fe.ram is not None
    table = fe.ram.carve(32, 16)
    from pyvirtiofsd.virtio.chain import DESC

    view = fe.ram.view(table, 32)
    DESC.pack_into(view, 0, 0x1000, 8, NEXT, 1)
    DESC.pack_into(view, 16, 0x1000, 8, NEXT, 0)
    with caplog.at_level(logging.WARNING):
        head = _raw_chain(q, [(table, 32, INDIRECT, None)])
        assert q.wait(head) == 0
    assert "loop" in caplog.text
    q.result(head)
    check_serves(q)


def test_corrupt_ring_stops_only_that_ring(
    running: tuple[Frontend, DriverQueue, DriverQueue], caplog: pytest.LogCaptureFixture
) -> None:
    fe, q, other = running
    err = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fe.set_vring_err(1, err)
        with caplog.at_level(logging.ERROR):
            q.publish(4000, track=False)  # a head beyond the queue size
            q.kick()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "ring is corrupt" not in caplog.text:
                time.sleep(0.01)
        assert "ring is corrupt" in caplog.text
        assert os.eventfd_read(err) == 1
        check_serves(other)
        # the front-end resets the ring and it works again
        base = fe.stop_queue(1)
        assert base == 1
        fresh = fe.start_queue(1, 16)
        check_serves(fresh)
    finally:
        os.close(err)


def test_handler_exception_is_contained(
    daemon: DaemonFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class Grumpy(UppercaseDevice):
        def handler(self, queue_index: int):  # type: ignore[no-untyped-def]
            inner = super().handler(queue_index)

            def handle(chain):  # type: ignore[no-untyped-def]
                if bytes(chain.readable[0][:4]) == b"boom":
                    raise RuntimeError("handler bug")
                return 10**9 if bytes(chain.readable[0][:4]) == b"huge" else inner(chain)

            return handle

    d = daemon(Grumpy())
    q = d.connect().setup(queues=(1,))[1]
    with caplog.at_level(logging.ERROR):
        assert q.request([b"boom"], [8]) == b""
        assert q.request([b"huge"], [8]) == b""
    assert "handler failed" in caplog.text and "used length" in caplog.text
    check_serves(q)


class _Patient(UppercaseDevice):
    """Keeps chains that start with "later" to answer them from elsewhere; chains that start
    with "lost" it keeps without asking (a device bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: queue.SimpleQueue[Completion] = queue.SimpleQueue()

    def handler(self, queue_index: int):  # type: ignore[no-untyped-def]
        inner = super().handler(queue_index)

        def handle(chain):  # type: ignore[no-untyped-def]
            start = bytes(chain.readable[0][:5])
            if start == b"later":
                self.kept.put(later(chain))
                return None
            if start == b"lost.":
                return None
            return inner(chain)

        return handle


def test_a_chain_answered_later(daemon: DaemonFactory) -> None:
    """A handler keeps a chain; the queue serves others meanwhile; the chain is returned when
    the device completes it, from another thread, with what it wrote."""
    device = _Patient()
    q = daemon(device).connect().setup(queues=(1,))[1]
    head = q.submit([b"later please"], [8])
    q.kick()
    completion = device.kept.get(timeout=10)
    check_serves(q)
    assert head not in q.completed
    completion.writable[0][:4] = b"done"
    threading.Thread(target=completion.complete, args=(4,)).start()
    assert q.wait(head, timeout=10) == 4
    assert q.result(head) == (4, b"done")
    with pytest.raises(RuntimeError):
        completion.complete(4)


def test_a_chain_kept_without_later_is_returned(
    daemon: DaemonFactory, caplog: pytest.LogCaptureFixture
) -> None:
    q = daemon(_Patient()).connect().setup(queues=(1,))[1]
    with caplog.at_level(logging.ERROR):
        assert q.request([b"lost."], [8]) == b""
    assert "kept a chain without later()" in caplog.text
    check_serves(q)


def test_unknown_request_id(
    running: tuple[Frontend, DriverQueue, DriverQueue], caplog: pytest.LogCaptureFixture
) -> None:
    fe, q, _ = running
    with caplog.at_level(logging.WARNING):
        assert fe.status_of(250, b"whatever") != 0
        fe.send(251)  # without NEED_REPLY: no answer, only a log line
        assert fe.get_queue_num() == 4  # a round trip: 251 has been handled by now
    assert "request 250 refused" in caplog.text
    assert "request 251 refused" in caplog.text
    check_serves(q)


def test_truncated_message(
    running: tuple[Frontend, DriverQueue, DriverQueue], caplog: pytest.LogCaptureFixture
) -> None:
    fe, q, _ = running
    with caplog.at_level(logging.WARNING):
        assert fe.status_of(FrontendReq.SET_VRING_NUM, b"\1\0\0\0") != 0
        assert fe.status_of(FrontendReq.SET_VRING_ADDR, VringState(1, 1).encode()) != 0
    assert "payload of 4 bytes" in caplog.text
    check_serves(q)


def test_oversized_message_ends_the_connection(
    daemon: DaemonFactory, caplog: pytest.LogCaptureFixture
) -> None:
    d = daemon()
    fe = d.connect()
    q = fe.setup(queues=(1,))[1]
    check_serves(q)
    with caplog.at_level(logging.WARNING):
        fe.send_raw(HEADER.pack(FrontendReq.SET_CONFIG, 1 | 8, 1 << 20))
        d.wait_exit()
    assert "announces a 1048576-byte payload" in caplog.text
    with pytest.raises(FrontendError):
        fe.get_queue_num()


def test_garbage_then_disconnect(daemon: DaemonFactory) -> None:
    d = daemon()
    fe = d.connect()
    fe.send_raw(b"\xff" * 7)  # half a header
    fe.close()
    assert d.wait_exit() == [0, 0, 0, 0]


def test_get_vring_base_waits_for_in_flight_requests(daemon: DaemonFactory) -> None:
    device = UppercaseDevice(num_queues=2, delay=0.2)
    d = daemon(device, thread_pool_size=2)
    fe = d.connect()
    q = fe.setup(queues=(1,))[1]
    heads = [q.submit([b"in flight"], [16]) for _ in range(2)]
    q.kick()
    time.sleep(0.05)
    assert fe.stop_queue(1) == 2  # returns only once both are done
    assert q.reap() == 2
    for head in heads:
        assert q.result(head)[1] == b"IN FLIGHT"


def test_set_features_refusal_over_the_socket(daemon: DaemonFactory) -> None:
    d = daemon()
    fe = d.connect()
    fe.negotiate()
    with pytest.raises(FrontendError):
        fe.set_features(1 << 50)
    assert fe.status_of(FrontendReq.SET_FEATURES, encode_u64(fe.features)) == 0


# -- dirty logging --------------------------------------------------------------------------------


class GatedDevice(UppercaseDevice):
    """Holds each request in its handler until the test lets it go."""

    def __init__(self) -> None:
        super().__init__(num_queues=2, migratable=True)
        self.entered = threading.Event()
        self.go = threading.Event()
        self.go.set()

    def handler(self, queue_index: int):  # type: ignore[no-untyped-def]
        inner = super().handler(queue_index)

        def handle(chain):  # type: ignore[no-untyped-def]
            self.entered.set()
            assert self.go.wait(GUARD)
            return inner(chain)

        return handle


GUARD = 30.0


def start_logging(fe: Frontend, q: DriverQueue) -> mmap.mmap:
    """Share a dirty log as QEMU does when a migration begins; return a view of it."""
    assert fe.ram is not None
    size = fe.ram.size // 4096 // 8
    fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    view = mmap.mmap(fd, size)
    fe.set_log_base(fd, size)
    os.close(fd)
    fe.set_features(fe.features | 1 << VHOST_F_LOG_ALL)
    ua = fe.ram.user_addr
    fe.set_vring_addr(
        q.index,
        ua(q.desc_addr),
        ua(q.avail_addr),
        ua(q.used_addr),
        VringAddr.LOG_FLAG,
        q.used_addr,
    )
    return view


def logged_pages(view: mmap.mmap) -> set[int]:
    words = memoryview(view).cast("Q").tolist()
    return {64 * w + b for w, m in enumerate(words) for b in range(64) if m >> b & 1}


def pages_of(ranges: list[tuple[int, int]]) -> set[int]:
    return {64 * w + b for w, m in word_masks(ranges).items() for b in range(64) if m >> b & 1}


def test_pages_written_while_logging_are_marked(daemon: DaemonFactory) -> None:
    d = daemon(UppercaseDevice(num_queues=2, migratable=True))
    fe = d.connect()
    q = fe.setup(queues=(1,), queue_size=1024)[1]
    check_serves(q)
    view = start_logging(fe, q)
    assert logged_pages(view) == set()
    head = q.submit([b"abcdef"], [8192])
    reply_gpa = q._pending[head].buffers[1][0]
    q.kick()
    q.wait(head)
    assert q.result(head) == (6, b"ABCDEF")
    slot = 1  # the second chain of the ring
    expected = pages_of(
        [
            (reply_gpa, 6),  # the reply: its 6 bytes, not the whole 8 KiB buffer
            (q.used_addr + 4 + 8 * slot, 8),  # the used entry
            (q.used_addr + 2, 2),  # used->idx
            (q.used_addr + 4 + 8 * 1024, 2),  # avail_event
        ]
    )
    # avail_event is set once the reply is pushed, when the worker re-arms notifications; a
    # stop that comes first ends the worker before it re-arms, so wait for it.
    q.wait_taken(GUARD)
    fe.stop_queue(1)
    assert logged_pages(view) == expected
    view.close()


def test_a_reply_to_a_request_taken_before_logging_began_is_marked(
    daemon: DaemonFactory,
) -> None:
    device = GatedDevice()
    d = daemon(device)
    fe = d.connect()
    q = fe.setup(queues=(1,), queue_size=256)[1]
    device.go.clear()
    head = q.submit([b"xyz"], [64])
    reply_gpa = q._pending[head].buffers[1][0]
    q.kick()
    assert device.entered.wait(GUARD)  # the chain was walked without logging
    view = start_logging(fe, q)
    device.go.set()
    q.wait(head)
    assert q.result(head) == (3, b"XYZ")
    fe.stop_queue(1)
    assert pages_of([(reply_gpa, 3)]) <= logged_pages(view)
    view.close()
