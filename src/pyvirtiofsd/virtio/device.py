"""The interface between a virtio device model and the transport that serves it.

A device (virtio-fs, or the test device in :mod:`pyvirtiofsd.testing.testdevice`) says how
many queues it has, which feature bits and config space it exposes, and gives one
:data:`RequestHandler` per queue. The transport (the vhost-user runner in
:mod:`pyvirtiofsd.vhost_user.runner`) pops chains, calls the handler with the chain's
buffers and returns the chain with the length the handler reports.

Handlers run on the queue's worker thread, or on a pool thread when a pool is configured,
so a handler for a queue may run concurrently with itself. The memoryviews it receives
point into guest memory: it must not keep them (or slices of them) after it returns,
because the memory can be unmapped once the request is complete.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "DEFERRED",
    "VIRTIO_ID_FS",
    "RequestHandler",
    "SharedMemoryMapper",
    "VirtioDevice",
    "defer",
]

VIRTIO_ID_FS = 26

#: A handler's return value meaning "this chain is answered later": the handler called
#: :func:`defer` and will call the function it got with the used length.
DEFERRED = -2

#: The transport's hook for :func:`defer`, set per thread around each handler call.
current = threading.local()


def defer() -> Callable[[int], None]:
    """From inside a handler: keep this chain in flight after the handler returns.

    Returns ``complete(used_len)``, which any thread may call once the reply is in the
    chain's writable buffers (the buffers stay valid until then); the handler then returns
    :data:`DEFERRED`. Used for requests that wait (a blocking lock) without holding up the
    queue. A transport stopping the queue first calls the device's ``cancel_deferred``, if it
    has one, so that such waits end.
    """
    hook = getattr(current, "defer", None)
    if hook is None:
        raise RuntimeError("defer() called outside a request handler")
    return hook()


RequestHandler = Callable[[Sequence[memoryview], Sequence[memoryview]], int]
"""``handler(readable, writable) -> used_len``.

``readable`` are the device-readable buffers of one chain in order, ``writable`` the
device-writable ones. The return value is the number of bytes written into ``writable``
(the used length; 0 means no reply, e.g. FUSE FORGET). Values outside
``0..sum(len(writable))`` are clamped and logged by the runner.
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
    """

    device_id: int
    num_queues: int
    max_queue_size: int
    features: int

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
