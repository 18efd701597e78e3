from __future__ import annotations

import os
import threading

import pytest

from pyvirtiofsd.testing.frontend import DriverQueue, GuestRam
from pyvirtiofsd.virtio import queue as queue_module
from pyvirtiofsd.virtio.chain import VRING_DESC_F_NEXT, InvalidChain
from pyvirtiofsd.virtio.dirtylog import LOG_PAGE_SIZE, DirtyLog, word_masks
from pyvirtiofsd.virtio.memory import GuestMemory
from pyvirtiofsd.virtio.queue import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    QueueBroken,
    SplitQueue,
    full_fence,
)
from tests.virtio.conftest import MakeDriver


def device_queue(
    memory: GuestMemory, ram: GuestRam, dq: DriverQueue, *, next_avail: int = 0
) -> SplitQueue:
    return SplitQueue.from_user(
        memory,
        dq.size,
        ram.user_addr(dq.desc_addr),
        ram.user_addr(dq.avail_addr),
        ram.user_addr(dq.used_addr),
        event_idx=dq.event_idx,
        indirect=True,
        next_avail=next_avail,
    )


def serve_all(q: SplitQueue) -> int:
    """Uppercase every available chain; return how many were served."""
    n = 0
    while (chain := q.pop()) is not None:
        data = b"".join(chain.readable).upper()
        chain.writable[0][: len(data)] = data
        q.push_used(chain.head, len(data))
        n += 1
    return n


def test_pop_push_round_trip(ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver) -> None:
    dq = make_driver(ram)
    q = device_queue(memory, ram, dq)
    assert q.pop() is None
    heads = [dq.submit([b"abc"], [16]), dq.submit([b"de", b"f"], [8], indirect=True)]
    assert q.available() == 2
    assert serve_all(q) == 2
    assert dq.reap() == 2
    assert [dq.result(h) for h in heads] == [(3, b"ABC"), (3, b"DEF")]


def test_from_guest_addresses(ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver) -> None:
    dq = make_driver(ram)
    q = SplitQueue.from_guest(memory, dq.size, dq.desc_addr, dq.avail_addr, dq.used_addr)
    head = dq.submit([b"x"], [1])
    assert serve_all(q) == 1
    dq.reap()
    assert dq.result(head) == (1, b"X")


def test_indices_wrap_around(ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver) -> None:
    dq = make_driver(ram, 8)
    dq.restart_at(65533)
    q = device_queue(memory, ram, dq, next_avail=65533)
    for round_ in range(5):
        heads = [dq.submit([bytes([97 + round_])], [1]) for _ in range(3)]
        assert serve_all(q) == 3
        dq.reap()
        assert [dq.result(h)[1] for h in heads] == [bytes([65 + round_])] * 3
    assert q.next_avail == dq.avail_idx == (65533 + 15) & 0xFFFF


def test_notifications_without_event_idx(
    ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver
) -> None:
    dq = make_driver(ram, event_idx=False)
    q = device_queue(memory, ram, dq)
    q.disable_notification()
    assert dq._used[0] == VRING_USED_F_NO_NOTIFY
    head = dq.submit([b"a"], [1])
    assert dq.kick() is False  # the device said it is polling
    assert q.enable_notification() is True  # the chain arrived meanwhile
    assert dq._used[0] == 0
    serve_all(q)
    assert q.needs_notification() is True
    assert q.needs_notification() is False  # nothing new since
    dq._avail[0] = VRING_AVAIL_F_NO_INTERRUPT
    dq.submit([b"b"], [1])
    serve_all(q)
    assert q.needs_notification() is False
    dq.reap()
    dq.result(head)


def test_event_idx(ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver) -> None:
    dq = make_driver(ram, event_idx=True)
    q = device_queue(memory, ram, dq)
    assert q.enable_notification() is False
    assert dq._used[2 + 4 * dq.size] == 0  # avail_event: kick me at the next chain
    dq.submit([b"a"], [1])
    assert dq.kick() is True
    dq.submit([b"b"], [1])
    assert dq.kick() is False  # avail_event still 0: the device has not caught up yet
    assert serve_all(q) == 2
    # used_event is still 0 (the driver has reaped nothing): it asked for an interrupt
    # when entry 0 was used, which happened in this batch.
    assert q.needs_notification() is True
    dq.reap()  # the driver now asks to hear about used entry 2
    dq.submit([b"c"], [1])
    serve_all(q)
    assert q.needs_notification() is True
    dq.submit([b"d"], [1])
    serve_all(q)
    assert q.needs_notification() is False  # the driver has not reaped entry 2 yet
    assert q.enable_notification() is False
    assert dq._used[2 + 4 * dq.size] == 4


def test_a_kick_asked_for_only_once_several_chains_wait(
    ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver
) -> None:
    dq = make_driver(ram, event_idx=True)
    q = device_queue(memory, ram, dq)
    assert q.enable_notification(4) is False
    assert dq._used[2 + 4 * dq.size] == 3  # avail_event: kick me when the fourth is there
    for name in (b"a", b"b", b"c"):
        dq.submit([name], [1])
        assert dq.kick() is False
    dq.submit([b"d"], [1])
    assert dq.kick() is True
    assert serve_all(q) == 4
    # The index wraps with the ring's: asked 4 ahead at 0xFFFE, the driver kicks at 0x0002.
    q.next_avail = 0xFFFE
    q.enable_notification(4)
    assert dq._used[2 + 4 * dq.size] == 0x0001


def test_without_event_idx_every_chain_may_kick(
    ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver
) -> None:
    dq = make_driver(ram)
    q = device_queue(memory, ram, dq)
    assert q.enable_notification(4) is False
    dq.submit([b"a"], [1])
    assert dq.kick() is True


def test_invalid_chain_is_consumed(
    ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver
) -> None:
    dq = make_driver(ram)
    q = device_queue(memory, ram, dq)
    a, b = dq.reserve_descs(2)
    dq.write_desc(a, 0x1000, 4, VRING_DESC_F_NEXT, b)
    dq.write_desc(b, 0x1000, 4, VRING_DESC_F_NEXT, a)
    dq.publish_raw(a, [a, b])
    good = dq.submit([b"ok"], [2])
    with pytest.raises(InvalidChain) as e:
        q.pop()
    assert e.value.head == a
    q.push_used(a, 0)
    assert serve_all(q) == 1
    dq.reap()
    assert dq.result(a) == (0, b"")
    assert dq.result(good) == (2, b"OK")


def test_head_out_of_range_breaks_the_queue(
    ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver
) -> None:
    dq = make_driver(ram)
    q = device_queue(memory, ram, dq)
    dq.publish(dq.size + 3, track=False)
    with pytest.raises(QueueBroken, match="head"):
        q.pop()


def test_avail_index_jump_breaks_the_queue(
    ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver
) -> None:
    dq = make_driver(ram)
    q = device_queue(memory, ram, dq)
    dq.set_avail_idx(dq.size + 1)
    with pytest.raises(QueueBroken, match="ahead"):
        q.pop()


@pytest.mark.parametrize("size", [0, 3, 65536])
def test_bad_sizes(ram: GuestRam, memory: GuestMemory, size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        SplitQueue.from_guest(memory, size, 0, 0x1000, 0x2000)


@pytest.mark.parametrize(
    ("desc", "avail", "used", "match"),
    [
        (8, 0x1000, 0x2000, "misaligned"),
        (0, 0x1001, 0x2000, "misaligned"),
        (0, 0x1000, 0x2002, "misaligned"),
        (8 << 20, 0x1000, 0x2000, "outside"),
        (0, 0x1000, (8 << 20) - 16, "outside"),
        (2**64 - 256, 0x1000, 0x2000, "outside"),
    ],
)
def test_rings_outside_memory(
    memory: GuestMemory, desc: int, avail: int, used: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        SplitQueue.from_guest(memory, 16, desc, avail, used)


def test_release_lets_memory_be_unmapped(ram: GuestRam, make_driver: MakeDriver) -> None:
    from tests.virtio.conftest import map_ram

    memory = map_ram(ram)
    dq = make_driver(ram)
    q = device_queue(memory, ram, dq)
    head = dq.submit([b"x"], [1])
    chain = q.pop()
    assert chain is not None
    chain.release()
    q.push_used(head, 0)
    q.release()
    assert all(region.close() for region in memory.regions)


# --- dirty logging ------------------------------------------------------------------------------


def _log(ram: GuestRam) -> DirtyLog:
    fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
    try:
        size = ram.size // LOG_PAGE_SIZE // 8
        os.ftruncate(fd, size)
        return DirtyLog(fd, size)
    finally:
        os.close(fd)


def _pages(ranges: list[tuple[int, int]]) -> set[int]:
    return {64 * w + b for w, m in word_masks(ranges).items() for b in range(64) if m >> b & 1}


def _logged(log: DirtyLog) -> set[int]:
    return {64 * w + b for w, m in enumerate(log.words()) for b in range(64) if m >> b & 1}


@pytest.mark.parametrize("event_idx", [True, False])
def test_what_the_device_writes_is_logged(
    ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver, event_idx: bool
) -> None:
    dq = make_driver(ram, size=1024, event_idx=event_idx)
    q = device_queue(memory, ram, dq)
    log = _log(ram)
    q.set_logging(log, log, dq.used_addr)
    dq.submit([b"x" * 5000], [3000, 6000])
    dq.kick()
    q.disable_notification()
    chain = q.pop()
    assert chain is not None and chain.gpas is not None and len(chain.gpas) == 2
    data = b"y" * 5000
    chain.writable[0][:] = data[:3000]
    chain.writable[1][:2000] = data[3000:]
    written = chain.written(5000)
    q.push_used(chain.head, 5000, written)
    assert q.enable_notification() is False
    used = [(dq.used_addr + 4, 8), (dq.used_addr + 2, 2)]
    if event_idx:
        used.append((dq.used_addr + 4 + 8 * 1024, 2))  # avail_event
    else:
        used.append((dq.used_addr, 2))  # flags
    # Exactly those pages: nothing the driver wrote (the request, the rings' other parts).
    assert _logged(log) == _pages(written + used)
    log.close()


def test_nothing_is_logged_when_logging_is_off(
    ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver
) -> None:
    dq = make_driver(ram, event_idx=True)
    q = device_queue(memory, ram, dq)
    log = _log(ram)
    q.set_logging(log, log, dq.used_addr)
    q.set_logging(None, None)
    dq.submit([b"abc"], [16])
    chain = q.pop()
    assert chain is not None and chain.gpas is None
    q.push_used(chain.head, 3)
    q.enable_notification()
    assert _logged(log) == set()
    log.close()


def test_used_ring_logging_without_data_logging(
    ram: GuestRam, memory: GuestMemory, make_driver: MakeDriver
) -> None:
    dq = make_driver(ram, event_idx=True)
    q = device_queue(memory, ram, dq)
    log = _log(ram)
    q.set_logging(None, log, dq.used_addr)
    dq.submit([b"abc"], [16])
    chain = q.pop()
    assert chain is not None and chain.gpas is None  # no data log: the walk keeps nothing
    q.push_used(chain.head, 3, [(0x12345000, 3)])
    assert _logged(log) == _pages([(dq.used_addr + 2, 10)])
    log.close()


def test_the_fence_is_the_builds_own_and_waits_for_a_lock_held_elsewhere() -> None:
    """The compiled build fences with one instruction (``_ring.c``); the pure one takes a
    lock, trying it first without blocking. A try that fails (another queue fencing) orders
    nothing, so that fence waits for the lock rather than returning unordered."""
    if os.environ.get("PYVIRTIOFSD_TEST_BUILD") == "mypyc":
        assert queue_module._native_fence is not None
    if queue_module._native_fence is not None:
        full_fence()
        return
    done = threading.Event()
    with queue_module._fence_lock:
        fencer = threading.Thread(target=lambda: (full_fence(), done.set()))
        fencer.start()
        assert not done.wait(0.2)
    assert done.wait(10)
    fencer.join()
    full_fence()
    assert queue_module._fence_lock.acquire(False)
    queue_module._fence_lock.release()


@pytest.mark.skipif(queue_module._native_push is None, reason="pure build: no C push")
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_the_c_push_stores_what_the_casts_store(offset: int) -> None:
    """``_ring.push`` stores the used entry and index where and as the casts store them, on an
    aligned ring and on one a driver misplaced, and refuses an entry outside the ring without
    storing anything."""
    size = 8
    backing = bytearray(offset + 6 + 8 * size)
    used = memoryview(backing)[offset:]
    for n in range(3 * size):
        slot = 1 + 2 * (n & (size - 1))
        queue_module._native_push(used, slot, n + 100, 4096 + n, (n + 1) & 0xFFFF)
        expect = bytearray(used)
        expect[4 * slot : 4 * slot + 8] = (n + 100).to_bytes(4, "little") + (4096 + n).to_bytes(
            4, "little"
        )
        expect[2:4] = (n + 1).to_bytes(2, "little")
        assert bytes(used) == bytes(expect)
    before = bytes(used)
    for slot in (0, -1, 2 * size + 1, 1 << 40):
        with pytest.raises((ValueError, OverflowError)):
            queue_module._native_push(used, slot, 1, 1, 1)
    for head, length, idx in ((1 << 32, 0, 0), (0, 1 << 32, 0), (0, 0, 1 << 16), (-1, 0, 0)):
        with pytest.raises((ValueError, OverflowError)):
            queue_module._native_push(used, 1, head, length, idx)
    with pytest.raises(BufferError):
        queue_module._native_push(bytes(used), 1, 1, 1, 1)
    assert bytes(used) == before
