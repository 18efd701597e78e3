"""The device/transport interface (:mod:`pyvirtiofsd.virtio.device`): :func:`later` hands a chain
to whoever serves it and refuses a chain no transport serves; the completion writes into the
chain's own buffers and returns it once, from any thread; and the project's devices implement
:class:`VirtioDevice` as declared. (The vhost-user runner's side of ``later()`` is tested in
tests/vhost_user/test_runner.py.)"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence

import pytest

from pyvirtiofsd.testing.testdevice import UppercaseDevice
from pyvirtiofsd.transport.virtiofs import VirtioFsDevice
from pyvirtiofsd.virtio.chain import Chain
from pyvirtiofsd.virtio.device import (
    VIRTIO_ID_FS,
    Completion,
    SharedMemoryMapper,
    VirtioDevice,
    later,
)
from tests.memfs import MemFs


class Owner:
    """A queue worker's side of ``later()``: chains in flight, each returned once with its
    used length."""

    def __init__(self) -> None:
        self.in_flight: set[int] = set()
        self.returned: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def later(self, chain: Chain) -> Completion:
        with self.lock:
            self.in_flight.add(chain.head)
        return _Completion(self, chain)


class _Completion:
    def __init__(self, owner: Owner, chain: Chain) -> None:
        self._owner = owner
        self._chain = chain

    @property
    def writable(self) -> Sequence[memoryview]:
        return self._chain.writable

    def complete(self, used: int) -> None:
        with self._owner.lock:
            self._owner.in_flight.remove(self._chain.head)  # returned once only
            self._owner.returned.append((self._chain.head, used))


def chain(head: int, request: bytes, room: int) -> Chain:
    return Chain(head, [memoryview(request)], [memoryview(bytearray(room))])


def test_later_refuses_a_chain_no_transport_serves() -> None:
    with pytest.raises(RuntimeError, match="no transport is serving"):
        later(chain(0, b"req", 8))


def test_later_is_answered_through_the_completion_from_another_thread() -> None:
    owner = Owner()
    c = chain(5, b"ping", 8)
    c.owner = owner
    threads: list[threading.Thread] = []

    def handler(ch: Chain) -> int | None:
        done = later(ch)
        reply = bytes(ch.readable[0]).upper()

        def answer() -> None:
            done.writable[0][: len(reply)] = reply
            done.complete(len(reply))

        threads.append(threading.Thread(target=answer))
        threads[-1].start()
        return None  # answered later

    assert handler(c) is None
    threads[0].join(30)
    assert owner.returned == [(5, 4)]
    assert owner.in_flight == set()
    assert bytes(c.writable[0][:4]) == b"PING"


def test_the_projects_devices_implement_the_interface() -> None:
    devices = [UppercaseDevice(), VirtioFsDevice(MemFs())]
    methods = [
        name
        for name, member in vars(VirtioDevice).items()
        if not name.startswith("_") and callable(member)
    ]
    assert sorted(methods) == [
        "config",
        "fault",
        "handler",
        "interrupt_waits",
        "kick_batch",
        "load_state",
        "reset",
        "save_state",
        "set_backend_channel",
        "shmem_sizes",
    ]
    for device in devices:
        for name in ("device_id", "num_queues", "max_queue_size", "features"):
            assert isinstance(getattr(device, name), int), (device, name)
        assert isinstance(device.migratable, bool), device
        for name in methods:
            want = list(inspect.signature(getattr(VirtioDevice, name)).parameters)[1:]
            got = list(inspect.signature(getattr(device, name)).parameters)
            assert got == want, (type(device).__name__, name)
    assert devices[1].device_id == VIRTIO_ID_FS == 26


def test_shared_memory_mapper_is_checked_at_runtime() -> None:
    class Mapper:
        def shmem_map(
            self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int, w: bool
        ) -> int:
            return 0

        def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> int:
            return 0

    assert isinstance(Mapper(), SharedMemoryMapper)
    assert not isinstance(object(), SharedMemoryMapper)
