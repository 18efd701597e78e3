"""The virtio-fs device: the FUSE server behind virtqueues, served over vhost-user.

Queue 0 is the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT); queues 1..N carry
requests, each with its own worker, so several are served at once. Every queue hands its
descriptor chains straight to :meth:`Server.handle`: the request is read from, and the reply
written to, guest memory in place.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..fuse.server import Server
from ..vhost_user.connection import listen_unix
from ..vhost_user.runner import VhostUserServer
from ..virtio.device import VIRTIO_ID_FS, RequestHandler, SharedMemoryMapper, defer
from .dax import MAP_ALIGNMENT, MAX_REGIONS, WINDOW_GRANULE, DaxWindow

if TYPE_CHECKING:
    from ..cli import Options

log = logging.getLogger(__name__)

TAG_SIZE = 36
#: Largest ring the device accepts (virtiofsd's figure; the guest picks the actual size).
MAX_QUEUE_SIZE = 32768
#: Queues offered beyond what --num-request-queues asks, so that a front-end configured with
#: a few more request queues than the daemon still starts.
MIN_OFFERED_REQUEST_QUEUES = 8


class VirtioFsDevice:
    """virtio-fs (device id 26) for :class:`~pyvirtiofsd.vhost_user.runner.VhostUserServer`."""

    device_id = VIRTIO_ID_FS
    features = 0

    def __init__(
        self,
        server: Server,
        *,
        tag: str | None = None,
        num_request_queues: int = 1,
        dax_window: int = 0,
    ) -> None:
        if tag is not None and not 0 < len(tag.encode()) <= TAG_SIZE:
            raise ValueError(f"a tag is 1 to {TAG_SIZE} bytes")
        self.server = server
        self.tag = tag
        self.num_request_queues = num_request_queues
        self.num_queues = 1 + max(num_request_queues, MIN_OFFERED_REQUEST_QUEUES)
        self.max_queue_size = MAX_QUEUE_SIZE
        self.window = DaxWindow(dax_window) if dax_window else None
        self.channel: SharedMemoryMapper | None = None
        server.deferred_reply = self._deferred_reply
        if self.window is not None:
            server.dax_window = self.window
            server.map_alignment = MAP_ALIGNMENT

    def config(self) -> bytes:
        """virtio_fs_config; offered only with a tag (QEMU 7.1 to 8.0 crash on CONFIG, and
        vhost-user-fs-pci has its own tag)."""
        if self.tag is None:
            return b""
        tag = self.tag.encode().ljust(TAG_SIZE, b"\0")
        return tag + self.num_request_queues.to_bytes(4, "little")

    def shmem_sizes(self) -> list[int]:
        return [self.window.size] if self.window is not None else []

    def handler(self, queue_index: int) -> RequestHandler:
        handle = self.server.handle

        def serve(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
            # The writable views are the token a deferred reply is written into.
            return handle(readable, writable, writable)

        return serve

    def _deferred_reply(self, writable: Sequence[memoryview]) -> Callable[[bytes], None]:
        """Keep the request's chain for a reply that comes later (from the server's lock-wait
        pool): the chain is returned once the reply is in its writable buffers."""
        complete = defer()

        def deliver(reply: bytes) -> None:
            done = 0
            for view in writable:
                n = min(len(view), len(reply) - done)
                if n <= 0:
                    break
                view[:n] = reply[done : done + n]
                done += n
            complete(done)

        return deliver

    def fault(
        self, queue_index: int, readable: Sequence[memoryview], writable: Sequence[memoryview]
    ) -> int:
        """A request with buffers outside guest RAM as we see it (a guest buffer inside a
        DAX window, whose guest-physical address we are never told): EFAULT."""
        return self.server.fail(readable, writable, errno.EFAULT)

    def cancel_deferred(self, queue_index: int) -> None:
        """The queue stops: end the waits of deferred requests (they answer EINTR)."""
        self.server.interrupt_waiting()

    def set_backend_channel(self, channel: SharedMemoryMapper | None) -> None:
        self.channel = channel
        if self.window is not None:
            self.window.mapper = channel

    def reset(self) -> None:
        """The driver reset the device (guest reboot, driver unload): a new FUSE session will
        start with INIT, knowing none of the old inodes or handles, and the front-end has
        dropped every DAX mapping."""
        self.server.reset()
        if self.window is not None:
            self.window.reset()


class Listener:
    """The vhost-user socket we create for ``--socket-path``: made before the sandbox (the
    path may be outside it), and removed at the end through a descriptor of its directory,
    which stays valid inside the sandbox too."""

    def __init__(self, path: str, group: str | None) -> None:
        self.sock = listen_unix(path)
        self.path = path
        self._lock = threading.Lock()  # remove() may race the exit deadline's
        self._dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_PATH | os.O_CLOEXEC)
        self._name = os.path.basename(path)
        if group is not None:
            gid = grp.getgrnam(group).gr_gid
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)

    def remove(self) -> None:
        with self._lock:
            if self._dir_fd < 0:
                return
            try:
                os.unlink(self._name, dir_fd=self._dir_fd)
            except OSError:
                pass
            os.close(self._dir_fd)
            self._dir_fd = -1


def run_vhost_user(
    opts: Options,
    server: Server,
    stop: threading.Event,
    stoppers: list[Callable[[], None]],
    listener: Listener | None = None,
) -> int:
    """Serve one front-end over vhost-user until it disconnects or a signal stops us."""
    device = VirtioFsDevice(
        server,
        tag=opts.tag,
        num_request_queues=opts.num_request_queues,
        dax_window=opts.dax_window,
    )
    try:
        if listener is None and opts.socket_path is not None:
            listener = Listener(opts.socket_path, opts.socket_group)
        daemon = VhostUserServer(
            device,
            listener=listener.sock if listener is not None else None,
            listen_fd=opts.fd if listener is None else None,
            thread_pool_size=opts.thread_pool_size,
        )
    except (OSError, ValueError) as e:
        log.error("cannot listen: %s", e)
        return 1
    try:
        stoppers.append(daemon.stop)
        if stop.is_set():
            return 0
        if device.window is not None and device.window.size > MAX_REGIONS * WINDOW_GRANULE:
            log.warning(
                "a DAX window of %d MiB has more 2 MiB ranges than the %d memory regions QEMU "
                "lets a vhost-user device map; mappings past that are refused (ENOSPC)",
                device.window.size >> 20,
                MAX_REGIONS,
            )
        where = opts.socket_path or f"fd {opts.fd}"
        log.info(
            "waiting for a vhost-user front-end on %s (%d request queue(s))",
            where,
            opts.num_request_queues,
        )
        served = daemon.run()
    finally:
        if listener is not None:
            listener.remove()
    log.info("front-end gone; requests per queue: %s", served)
    if device.window is not None:
        log.info(
            "DAX window: %s",
            " ".join(f"{k}={v}" for k, v in device.window.stats.items()),
        )
    return 0
