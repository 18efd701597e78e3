"""A trivial virtio device for testing transports without FUSE.

Every queue upper-cases what the driver sends: the readable buffers, concatenated, are
copied into the writable buffers with ASCII letters upper-cased, as far as they fit. A
request whose first readable byte is ``!`` gets no reply (used length 0), standing in for
FUSE FORGET. Nothing here allocates per byte beyond ``bytes.upper``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from pyvirtiofsd.virtio.device import RequestHandler, SharedMemoryMapper

__all__ = ["UppercaseDevice"]

log = logging.getLogger(__name__)


class UppercaseDevice:
    """The test device; ``device_id`` defaults to virtio-fs so QEMU accepts it as one."""

    def __init__(
        self,
        *,
        num_queues: int = 2,
        max_queue_size: int = 1024,
        device_id: int = 26,
        config: bytes = b"",
        shmem_sizes: Sequence[int] = (),
        delay: float = 0.0,
        barrier: threading.Barrier | None = None,
    ) -> None:
        self.device_id = device_id
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.features = 0
        self._config = bytes(config)
        self._shmem_sizes = list(shmem_sizes)
        self._delay = delay
        # Requests meet here: they get past it only if enough of them run at the same time.
        self.barrier = barrier
        self.channel: SharedMemoryMapper | None = None
        self.resets = 0
        self.threads_seen: set[str] = set()
        self._lock = threading.Lock()

    def config(self) -> bytes:
        return self._config

    def shmem_sizes(self) -> list[int]:
        return list(self._shmem_sizes)

    def handler(self, queue_index: int) -> RequestHandler:
        delay = self._delay

        def handle(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
            if delay:
                threading.Event().wait(delay)
            barrier = self.barrier
            if barrier is not None:
                barrier.wait(timeout=30)
            if delay or barrier is not None:
                with self._lock:
                    self.threads_seen.add(threading.current_thread().name)
            data = b"".join(readable).upper()
            if data[:1] == b"!":
                return 0
            written = 0
            for buf in writable:
                n = min(len(buf), len(data) - written)
                if n <= 0:
                    break
                buf[:n] = data[written : written + n]
                written += n
            return written

        return handle

    def set_backend_channel(self, channel: SharedMemoryMapper | None) -> None:
        self.channel = channel

    def reset(self) -> None:
        self.resets += 1
