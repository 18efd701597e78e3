"""A trivial virtio device for testing transports without FUSE.

Every queue upper-cases what the driver sends: the readable buffers, concatenated, are
copied into the writable buffers with ASCII letters upper-cased, as far as they fit. A
request whose first readable byte is ``!`` gets no reply (used length 0), standing in for
FUSE FORGET. Nothing here allocates per byte beyond ``bytes.upper``.

Made ``migratable``, its state is the bytes in :attr:`UppercaseDevice.state`, saved and loaded
as they are; a load of state starting with ``!`` fails, standing in for a destination that
can't take the state over.

``python -m pyvirtiofsd.testing.testdevice SOCKET`` serves it over vhost-user to one
front-end (QEMU, or :mod:`pyvirtiofsd.testing.frontend`), for benchmarks and front-end
experiments without FUSE.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from pyvirtiofsd.vhost_user.connection import Listener
from pyvirtiofsd.vhost_user.runner import VhostUserServer
from pyvirtiofsd.virtio.chain import Chain
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
        migratable: bool = False,
        kick_batch: tuple[int, float] = (1, 0.0),
    ) -> None:
        self.device_id = device_id
        #: What kick_batch() says for every queue.
        self.batch = kick_batch
        self.migratable = migratable
        #: What save_state gives and load_state takes.
        self.state = b""
        self.saves = 0
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

        def handle(chain: Chain) -> int:
            readable, writable = chain.readable, chain.writable
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

    def fault(
        self,
        queue_index: int,
        readable: Sequence[memoryview | bytes],
        writable: Sequence[memoryview],
    ) -> int:
        return 0

    def interrupt_waits(self, queue_index: int) -> None:
        pass

    def kick_batch(self, queue_index: int) -> tuple[int, float]:
        return self.batch

    def save_state(self) -> bytes:
        if not self.migratable:
            raise ValueError("this device is not migratable")
        self.saves += 1
        return self.state

    def load_state(self, data: bytes) -> None:
        if not self.migratable:
            raise ValueError("this device is not migratable")
        if data[:1] == b"!":
            raise ValueError("state refused: it starts with '!'")
        self.state = bytes(data)


def _main(argv: list[str] | None = None) -> int:
    """Serve the test device: ``python -m pyvirtiofsd.testing.testdevice SOCKET``.

    Prints the per-queue request counts and the process's CPU time when the front-end leaves.
    """
    import argparse
    import resource

    p = argparse.ArgumentParser(prog="python -m pyvirtiofsd.testing.testdevice")
    p.add_argument("socket_path")
    p.add_argument("--queues", type=int, default=2, help="queues, hiprio included")
    p.add_argument("--thread-pool-size", type=int, default=0)
    p.add_argument("--tag", help="expose a virtio-fs config space with this tag")
    p.add_argument("--dax-window", type=int, default=0, help="shared memory region 0 size")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(threadName)s %(message)s")
    config = b""
    if args.tag:
        config = args.tag.encode()[:36].ljust(36, b"\0") + (args.queues - 1).to_bytes(4, "little")
    device = UppercaseDevice(
        num_queues=args.queues,
        config=config,
        shmem_sizes=[args.dax_window] if args.dax_window else [],
    )
    with Listener.bind(args.socket_path) as listener:
        served = VhostUserServer(device, listener, thread_pool_size=args.thread_pool_size).run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"served {served} cpu {usage.ru_utime + usage.ru_stime:.3f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
