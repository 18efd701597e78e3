"""The virtio-fs device: the FUSE server behind virtqueues, served over vhost-user.

Queue 0 is the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT); queues 1..N carry
requests, each with its own worker, so several are served at once. A stream of FORGETs is
served in batches (:meth:`VirtioFsDevice.kick_batch`): a guest removing a tree would otherwise
wake the high-priority worker, and have it take the GIL from the request worker, once a file.
Every queue hands its descriptor chains straight to :meth:`Server.handle`: the request is read
from, and the reply written to, guest memory in place. The device makes its FUSE server and
gives it, once, what it offers: the DAX window and a way to answer a request later (the chain
is the request's token, and :func:`~pyvirtiofsd.virtio.device.later` keeps it in flight).

Live migration: the device is migratable when its file system is and it has no DAX window (the
window's mappings live in the VMM's memory and no front-end carries them over). Its state is
the FUSE session the server negotiated (so the guest goes on without a new INIT) and the file
system's, in one versioned envelope.

With ``keep_listening`` the transport serves one front-end after another on the same socket
(a VMM that reconnects after each guest reboot, as cloud-hypervisor does), each from a clean
slate: the vhost-user side drops everything of the front-end that left (its dirty log and any
state transfer included), and the device reset ends the FUSE session (the file system forgets
every inode and handle, the DAX window its mappings, and the next driver must start with INIT).
Without it, the daemon exits when its one front-end leaves, as virtiofsd does.

Rules: everything this transport is told is in :class:`VhostUserConfig` (frozen; filled from
the command line by field name). The listening socket is not the transport's:
:meth:`VhostUserConfig.listen` makes the :class:`~..vhost_user.connection.Listener` for its
caller, who makes it once (before any sandbox: the path may lie outside it) and closes it
once; :class:`VhostUserTransport` only accepts on it. :meth:`VhostUserTransport.stop` is safe
in a signal handler.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pyvirtiofsd.fuse.filesystem import Filesystem
from pyvirtiofsd.fuse.server import Server, ServerConfig, TransportCaps
from pyvirtiofsd.fuse.state import StateReader, StateWriter
from pyvirtiofsd.transport.dax import MAP_ALIGNMENT, MAX_REGIONS, WINDOW_GRANULE, DaxWindow
from pyvirtiofsd.vhost_user.connection import Listener
from pyvirtiofsd.vhost_user.runner import VhostUserServer
from pyvirtiofsd.virtio.device import VIRTIO_ID_FS, RequestHandler, SharedMemoryMapper, later

__all__ = [
    "MAX_QUEUE_SIZE",
    "MIN_OFFERED_REQUEST_QUEUES",
    "TAG_SIZE",
    "VhostUserConfig",
    "VhostUserTransport",
    "VirtioFsDevice",
]

log = logging.getLogger(__name__)

TAG_SIZE = 36
#: Largest ring the device accepts unless told otherwise: the most virtio allows, which is
#: virtiofsd's fixed figure (the front-end picks the actual size, up to this).
MAX_QUEUE_SIZE = 32768
#: Queues offered beyond what --num-request-queues asks, so that a front-end configured with
#: a few more request queues than the daemon still starts.
MIN_OFFERED_REQUEST_QUEUES = 8
#: While FORGETs keep coming, how many a guest may queue on the high-priority queue before it
#: kicks, and how long (seconds) one may wait to be served (VirtioDevice.kick_batch).
HIPRIO_KICK_BATCH = (16, 0.005)


@dataclass(frozen=True)
class VhostUserConfig:
    """Where and how the virtio-fs device is served over vhost-user."""

    #: The socket to create and listen on, or ``fd``: one already listening (libvirt's).
    socket_path: str | None = None
    fd: int | None = None
    #: Group owning the socket we create (mode 0660 then).
    socket_group: str | None = None
    #: The virtio-fs tag in the config space (None: no config space; the VMM has the tag).
    tag: str | None = None
    num_request_queues: int = 1
    #: The largest ring a front-end may set up (SET_VRING_NUM); a power of two.
    queue_size: int = MAX_QUEUE_SIZE
    #: Threads serving each queue's requests (0: on the queue's own thread).
    thread_pool_size: int = 0
    #: Size of the DAX window (shared memory region 0); 0: none.
    dax_window: int = 0
    #: Serve the next front-end on the same socket when one leaves, rather than exit.
    keep_listening: bool = False

    def listen(self) -> Listener:
        """The listening socket: ours at ``socket_path``, or the inherited ``fd``."""
        if self.fd is not None:
            return Listener.inherit(self.fd)
        if self.socket_path is None:
            raise ValueError("a vhost-user transport needs a socket path or an fd")
        return Listener.bind(self.socket_path, self.socket_group)


class VirtioFsDevice:
    """virtio-fs (device id 26) for :class:`~pyvirtiofsd.vhost_user.runner.VhostUserServer`."""

    device_id = VIRTIO_ID_FS
    features = 0

    def __init__(
        self,
        fs: Filesystem,
        server_config: ServerConfig | None = None,
        *,
        tag: str | None = None,
        num_request_queues: int = 1,
        dax_window: int = 0,
        max_queue_size: int = MAX_QUEUE_SIZE,
    ) -> None:
        if tag is not None and not 0 < len(tag.encode()) <= TAG_SIZE:
            raise ValueError(f"a tag is 1 to {TAG_SIZE} bytes")
        self.tag = tag
        self.num_request_queues = num_request_queues
        self.num_queues = 1 + max(num_request_queues, MIN_OFFERED_REQUEST_QUEUES)
        self.max_queue_size = max_queue_size
        self.window = DaxWindow(dax_window) if dax_window else None
        self.channel: SharedMemoryMapper | None = None
        # What this device offers the FUSE server: the DAX window, and requests answered
        # later through their chain (the token the handlers pass is the chain itself).
        caps = TransportCaps(
            dax_window=self.window,
            map_alignment=MAP_ALIGNMENT if self.window is not None else None,
            later=later,
        )
        self.server = Server(fs, server_config, caps)
        #: Why the device can't be migrated (None: it can).
        self.migration_blocker: str | None = None
        if not fs.migratable:
            self.migration_blocker = f"{type(fs).__name__} cannot save its state"
        elif self.window is not None:
            self.migration_blocker = "a DAX window is not carried over"
        self.migratable = self.migration_blocker is None

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
        # The server's own method: nothing of this (uncompiled) module runs per request.
        return self.server.handle_carried

    def fault(
        self,
        queue_index: int,
        readable: Sequence[memoryview | bytes],
        writable: Sequence[memoryview],
    ) -> int:
        """A request with buffers outside guest RAM as we see it (a guest buffer inside a
        DAX window, whose guest-physical address we are never told): EFAULT."""
        return self.server.fail(readable, writable, errno.EFAULT)

    def interrupt_waits(self, queue_index: int) -> None:
        """The queue stops: end the waits of requests answered later (they answer EINTR)."""
        self.server.interrupt_waiting()

    def kick_batch(self, queue_index: int) -> tuple[int, float]:
        """The high-priority queue carries FORGETs, which nobody waits for: a guest removing a
        tree sends one per file, and a kick each would wake its worker for each."""
        return HIPRIO_KICK_BATCH if queue_index == 0 else (1, 0.0)

    def set_backend_channel(self, channel: SharedMemoryMapper | None) -> None:
        self.channel = channel
        if self.window is not None:
            self.window.mapper = channel

    def save_state(self) -> bytes:
        """The FUSE session and the file system's state (the rings are stopped)."""
        if self.migration_blocker is not None:
            raise ValueError(f"no live migration: {self.migration_blocker}")
        body = StateWriter().bytes(self.server.save_state()).bytes(self.server.fs.save_state())
        return StateWriter().section(b"virtio-fs", 1, body).getvalue()

    def load_state(self, data: bytes) -> None:
        """Go on with the source's FUSE session: the server's, then the file system's."""
        if self.migration_blocker is not None:
            raise ValueError(f"no live migration: {self.migration_blocker}")
        reader = StateReader(data, "virtio-fs state")
        _, body = reader.section(b"virtio-fs", (1,))
        reader.end()
        session, fs_state = body.bytes(), body.bytes()
        body.end()
        self.server.load_state(session)
        if not self.server.initialized:
            return  # nothing mounted on the source
        try:
            self.server.fs.load_state(fs_state)
        except BaseException:
            self.server.reset()
            raise

    def reset(self) -> None:
        """The driver reset the device (guest reboot, driver unload), or its front-end left
        and another may come: a new FUSE session will start with INIT, knowing none of the old
        inodes or handles, and the front-end has dropped every DAX mapping."""
        self.server.reset()
        if self.window is not None:
            self.window.reset()


class VhostUserTransport:
    """The FUSE server as a virtio-fs device, served to one front-end over ``listener``."""

    def __init__(
        self,
        fs: Filesystem,
        config: VhostUserConfig,
        listener: Listener,
        server_config: ServerConfig | None = None,
    ) -> None:
        self.config = config
        self.device = VirtioFsDevice(
            fs,
            server_config,
            tag=config.tag,
            num_request_queues=config.num_request_queues,
            dax_window=config.dax_window,
            max_queue_size=config.queue_size,
        )
        self._loop = VhostUserServer(
            self.device,
            listener,
            thread_pool_size=config.thread_pool_size,
            keep_listening=config.keep_listening,
        )
        #: The FUSE server behind the device.
        self.server = self.device.server
        self._stopped = False

    def serve(self) -> int:
        """Serve until the front-end disconnects or :meth:`stop` (with ``keep_listening``, until
        :meth:`stop` only); the exit status."""
        if self._stopped:
            return 0
        window = self.device.window
        if window is not None and window.size > MAX_REGIONS * WINDOW_GRANULE:
            log.warning(
                "a DAX window of %d MiB has more 2 MiB ranges than the %d memory regions QEMU "
                "lets a vhost-user device map; mappings past that are refused (ENOSPC)",
                window.size >> 20,
                MAX_REGIONS,
            )
        log.info(
            "waiting for a vhost-user front-end on %s (%d request queue(s))%s",
            self._loop.listener.where,
            self.config.num_request_queues,
            "; serving one after another" if self.config.keep_listening else "",
        )
        if self.device.migration_blocker is not None:
            log.info("live migration not offered: %s", self.device.migration_blocker)
        served = self._loop.run()
        if self.config.keep_listening:
            log.info("stopped after %d front-end(s)", self._loop.front_ends)
        log.info("front-end gone; requests per queue: %s", served)
        if window is not None:
            log.info("DAX window: %s", " ".join(f"{k}={v}" for k, v in window.stats.items()))
        return 0

    @property
    def abandoned(self) -> int:
        """Rings left behind with requests still running in the backend."""
        return self._loop.abandoned

    def stop(self) -> None:
        """Stop accepting, or end the connection; safe in a signal handler."""
        self._stopped = True
        self._loop.stop()
