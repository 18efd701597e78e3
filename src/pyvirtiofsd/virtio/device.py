"""The interface between a virtio device model and the transport that serves it.

A device (virtio-fs, or the test device in :mod:`pyvirtiofsd.testing.testdevice`) says how
many queues it has, which feature bits and config space it exposes, and gives one
:data:`RequestHandler` per queue. The transport (the vhost-user runner in
:mod:`pyvirtiofsd.vhost_user.runner`) pops chains, calls the handler with each chain and
returns the chain with the length the handler reports.

Rules:

* Handlers run on the queue's worker thread, or on a pool thread when a pool is configured,
  so a handler for a queue may run concurrently with itself.
* The memoryviews of a chain point into guest memory: a handler must not keep them (or
  slices of them) after the chain is returned, because the memory can be unmapped then.
* A handler that cannot answer at once (a request that waits) calls :func:`later` with the
  chain, returns None, and answers through the :class:`Completion` it got, from any thread;
  the chain's buffers stay valid until then. A transport stopping the queue first calls the
  device's :meth:`VirtioDevice.interrupt_waits`, so that such waits end.
* Live migration: a device that can be migrated (``migratable``) gives its state as bytes
  (:meth:`VirtioDevice.save_state`) and takes it back on another instance
  (:meth:`VirtioDevice.load_state`), both only while every queue is stopped. Saving leaves the
  device as it was (the front-end may resume it). A device that is not migratable makes the
  transport offer the front-end no migration at all. The transport logs the pages the device
  writes through its chains; the device does nothing for that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from pyvirtiofsd.virtio.chain import Chain

__all__ = [
    "VIRTIO_ID_FS",
    "ChainOwner",
    "Completion",
    "RequestHandler",
    "SharedMemoryMapper",
    "VirtioDevice",
    "later",
]

VIRTIO_ID_FS = 26


class Completion(Protocol):
    """A chain answered later: the buffers the reply goes into, and how to return it."""

    @property
    def writable(self) -> Sequence[memoryview]: ...

    def complete(self, used: int) -> None:
        """Return the chain with ``used`` bytes written (once, from any thread)."""
        ...


class ChainOwner(Protocol):
    """Whoever serves a chain (the transport's queue worker), as :attr:`Chain.owner`."""

    def later(self, chain: Chain) -> Completion: ...


def later(chain: Chain) -> Completion:
    """From a handler: keep ``chain`` in flight after the handler returns (it then returns
    None), and get the :class:`Completion` that answers it."""
    owner = chain.owner
    if owner is None:
        raise RuntimeError("later() for a chain that no transport is serving")
    return owner.later(chain)  # type: ignore[attr-defined, no-any-return]


RequestHandler = Callable[[Chain], int | None]
"""``handler(chain) -> used_len | None``.

``chain.readable`` are the device-readable buffers of one chain in order, ``chain.writable``
the device-writable ones. The return value is the number of bytes written into the writable
buffers (the used length; 0 means no reply, e.g. FUSE FORGET), or None when the chain is
answered later (:func:`later`). Values outside ``0..chain.writable_len`` are clamped and
logged by the runner.
"""


@runtime_checkable
class SharedMemoryMapper(Protocol):
    """What a device can ask of the transport for its shared memory regions (DAX)."""

    def shmem_map(
        self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool
    ) -> int: ...

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> int: ...


class VirtioDevice(Protocol):
    """A virtio device model served by a transport.

    Attributes:
        device_id: the virtio device id (26 for virtio-fs).
        num_queues: queues the device uses; for virtio-fs, 1 hiprio + N request queues.
        max_queue_size: the largest queue size the device accepts.
        features: device-specific virtio feature bits (none for virtio-fs); the transport
            adds the ring and version bits itself.
        migratable: whether :meth:`save_state` and :meth:`load_state` work.
    """

    device_id: int
    num_queues: int
    max_queue_size: int
    features: int
    migratable: bool

    def config(self) -> bytes:
        """The device config space; empty if the device has none to expose."""
        ...

    def shmem_sizes(self) -> list[int]:
        """Sizes of the device's shared memory regions, indexed by shmid; [] for none."""
        ...

    def handler(self, queue_index: int) -> RequestHandler:
        """The request handler for one queue (called when the queue starts)."""
        ...

    def set_backend_channel(self, channel: SharedMemoryMapper | None) -> None:
        """Give the device the transport's channel for shared memory mapping (or None)."""
        ...

    def reset(self) -> None:
        """Forget per-driver state: the driver reset the device or went away."""
        ...

    def fault(
        self,
        queue_index: int,
        readable: Sequence[memoryview | bytes],
        writable: Sequence[memoryview],
    ) -> int:
        """A chain with buffers outside guest memory as the device sees it: the buffers that
        could be reached (each list cut at its first unreachable buffer). Returns the used
        length of an error reply written there, or 0 to return the chain unused."""
        ...

    def interrupt_waits(self, queue_index: int) -> None:
        """The queue stops: end the waits of chains answered later (:func:`later`)."""
        ...

    def kick_batch(self, queue_index: int) -> tuple[int, float]:
        """``(count, wait)``: while chains keep coming on the queue, the driver may make up to
        ``count`` available before it kicks, and a chain may wait up to ``wait`` seconds to be
        served. ``(1, 0.0)``: every chain is served at once, as usual; more suits a queue whose
        requests nobody waits for (virtio-fs's FORGETs)."""
        ...

    def save_state(self) -> bytes:
        """The device's state, for a copy of it elsewhere to go on from (every queue is
        stopped; the device keeps its state). Raises with a message saying why it can't."""
        ...

    def load_state(self, data: bytes) -> None:
        """Take over the state :meth:`save_state` gave on the source (every queue is stopped,
        no memory table may exist yet). Raises with a message saying what could not be
        restored."""
        ...
