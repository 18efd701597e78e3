"""Serve a FUSE server on the host through /dev/fuse: mount, worker threads, unmount.

The mount is made with mount(2) directly, so libfuse is not needed (root only). Each worker
thread reads one request at a time into its own buffer and writes the reply from its own buffer;
the kernel hands each request to the thread that has waited longest. A mount keeps many
readers waiting (:data:`MIN_WORKERS`): the one woken has then slept long enough that the
scheduler may run it on the CPU its caller is about to leave, rather than wake an idle CPU for
it, which is what a request costs most where waking a CPU is dear (a virtual machine's vCPU).
Idle readers cost a stack and their buffers' untouched pages: the buffers are anonymous
mappings, so only the pages a request reaches are ever allocated.

Rules: everything the mount is told is in :class:`FuseMountConfig` (frozen; filled from the
command line by field name). :meth:`FuseMount.serve` runs the whole life (mount, serve,
unmount) and returns the exit status; :meth:`FuseMount.stop` takes no lock that could be held
by the thread it interrupts, so a signal handler may call it.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any, Final

from pyvirtiofsd import linux
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import Filesystem
from pyvirtiofsd.fuse.server import Server, ServerConfig, TransportCaps
from pyvirtiofsd.transport.fuse_uring import FuseUring, possible_cpus

__all__ = [
    "MIN_WORKERS",
    "UNMOUNT_GRACE",
    "FuseMount",
    "FuseMountConfig",
]

log = logging.getLogger(__name__)

#: Errors of write() on /dev/fuse that only mean the request is no longer wanted.
_STALE_REPLY: Final = (errno.ENOENT, errno.EINTR)
#: Worker threads a mount has at least: a request waiting in the backend must not hold up the
#: others, the kernel sends several at once, and a serial caller is answered sooner with many
#: readers waiting (see above, and docs/benchmarks.md for what 4, 8 and 16 gave).
MIN_WORKERS: Final = 16
#: Seconds :meth:`FuseMount.serve` waits for its workers once unmounted, before leaving behind
#: those stuck in the backend.
UNMOUNT_GRACE: Final = 2.0
#: How often (seconds) :meth:`FuseMount.serve` looks whether it was asked to stop.
_STOP_POLL: Final = 0.5
#: Bound Final: a compiled build would look them up among the os module's attributes each time.
_readv: Final = os.readv
_write: Final = os.write

try:
    from pyvirtiofsd.transport._fusedev import receive as _c_receive
    from pyvirtiofsd.transport._fusedev import send as _c_send
except ImportError:  # the pure build
    _c_receive = None
    _c_send = None
#: The compiled build's read of a request and write of a reply (``_fusedev.c``): one system
#: call each, without os.readv's iovec list or the slice os.write needs. Bound Final.
_native_receive: Final = _c_receive
_native_send: Final = _c_send
_ENODEV: Final = errno.ENODEV
_PRIVATE: Final = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
#: Errors of read() on /dev/fuse to read again after.
_READ_AGAIN: Final = (errno.EINTR, errno.EAGAIN, errno.ENOENT)


@dataclass(frozen=True)
class FuseMountConfig:
    """Where and how the FUSE server is mounted on the host."""

    mountpoint: str
    #: Worker threads beyond :data:`MIN_WORKERS` (the mount has ``max(this, MIN_WORKERS)``).
    thread_pool_size: int = 0
    #: Mount read-only (MS_RDONLY), on top of whatever the file system refuses itself.
    readonly: bool = False
    #: Let every user of the host use the mount (``allow_other``). Without it, as libfuse mounts
    #: by default, only processes of the daemon's own user may.
    allow_other: bool = False
    #: Ask the kernel for FUSE over io_uring (:mod:`.fuse_uring`); where it does not offer it
    #: (fuse's ``enable_uring`` parameter off, a kernel before 6.14), /dev/fuse serves alone.
    io_uring: bool = False
    fsname: str = "pyvirtiofsd"
    subtype: str = "pyvirtiofsd"

    @property
    def workers(self) -> int:
        return max(self.thread_pool_size, MIN_WORKERS)


def _mount_device(mountpoint: str) -> int | None:
    """The device number of the newest mount on ``mountpoint`` (without stat(), which would
    wait for our own not yet running workers)."""
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == mountpoint:
                major, minor = fields[2].split(":")
                dev = os.makedev(int(major), int(minor))
    return dev


class FuseMount:
    """A /dev/fuse mount of ``server`` as ``config`` says.

    :meth:`serve` is the whole life of the mount, for the daemon. Piecewise: :meth:`start`
    mounts and starts the workers; :meth:`wait` returns once the file system is unmounted (by
    :meth:`stop`, by ``umount``, or by the kernel aborting the connection); :meth:`close`
    unmounts and lets the workers go.
    """

    def __init__(
        self, fs: Filesystem, config: FuseMountConfig, server_config: ServerConfig | None = None
    ) -> None:
        self.config = config
        caps = TransportCaps(
            backing_open=self.backing_open,
            backing_close=self.backing_close,
            later=self._later,
            io_uring=config.io_uring,
        )
        #: The FUSE server behind the mount.
        self.server = server = Server(fs, server_config, caps)
        self.mountpoint = os.path.abspath(config.mountpoint)
        self.threads = config.workers
        self.fsname = config.fsname
        self.subtype = config.subtype
        self.readonly = config.readonly
        self.fd = -1
        self._workers: list[threading.Thread] = []
        #: Workers :meth:`close` left behind, stuck in the backend.
        self.abandoned = 0
        self._mounted = False
        self._stop_asked = False
        self._conn_dev: int | None = None
        self._lock = threading.Lock()
        self.bufsize = server.max_write + abi.PAGE_SIZE
        #: The io_uring queues, made at start() and started once INIT agrees on them.
        self.uring: FuseUring | None = None
        #: Set when the mount ended because it could not go on serving (serve() returns 1).
        self.failed = False
        #: Whether the reply to INIT has yet to be looked at for io_uring (see _worker).
        self._uring_pending = False
        self._uring_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        st = os.stat(self.mountpoint)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(
                errno.ENOTDIR, "mount point is not a directory", self.mountpoint
            )
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        if self.config.io_uring:
            try:
                self._prepare_uring()
            except OSError:
                os.close(self.fd)
                self.fd = -1
                raise
        # default_permissions always: the server checks no permissions itself (it acts with the
        # daemon's full rights), so the kernel must check every caller's, the daemon's own user
        # included: a root process without capabilities, or with another fsuid, gets no more
        # through the mount than it would in the share.
        options = (
            f"fd={self.fd},rootmode={stat.S_IFDIR:o},user_id={os.getuid()},"
            f"group_id={os.getgid()},default_permissions"
        )
        if self.config.allow_other:
            options += ",allow_other"
        flags = linux.MS_NOSUID | linux.MS_NODEV | (linux.MS_RDONLY if self.readonly else 0)
        try:
            linux.mount(self.fsname, self.mountpoint, f"fuse.{self.subtype}", flags, options)
        except OSError:
            if self.uring is not None:
                self.uring.discard()  # its rings, never started
                self.uring = None
            os.close(self.fd)
            self.fd = -1
            raise
        self._mounted = True
        self._conn_dev = _mount_device(self.mountpoint)
        for i in range(self.threads):
            t = threading.Thread(target=self._worker, name=f"fuse-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        log.info("mounted on %s with %d worker threads", self.mountpoint, self.threads)

    def _prepare_uring(self) -> None:
        # Everything that can fail is made before INIT offers io_uring: once offered, the
        # kernel holds every request back until each of its queues is there.
        cpus = possible_cpus()
        if cpus is None:
            raise OSError(errno.ENOENT, "FUSE over io_uring: the number of CPUs is unknown")
        self.uring = FuseUring(
            self.server, self.fd, self.server.max_write, cpus, on_failure=self._uring_failed
        )
        self._uring_pending = True

    def _uring_failed(self) -> None:
        # A queue that can't serve leaves its CPU's callers waiting for good: the mount ends
        # (and serve() says it failed) rather than hang them.
        self.failed = True
        self.stop()

    def _init_answered(self) -> None:
        """INIT is answered (the first request of the connection): start the io_uring queues if
        it agreed on them, else drop them."""
        with self._uring_lock:
            if not self._uring_pending:
                return
            self._uring_pending = False
        uring = self.uring
        if uring is None:
            return
        if not self.server.flags & abi.InitFlag.OVER_IO_URING:
            log.info(
                "the kernel does not offer FUSE over io_uring (fuse's enable_uring parameter, "
                "Linux 6.14+): requests go through /dev/fuse"
            )
            uring.discard()
            self.uring = None
            return
        # Said first: the kernel sends nothing more until every queue has registered, so the
        # line is there by the time anything the mount does has been answered.
        log.info("FUSE over io_uring: %d queue(s), one per CPU", len(uring.queues))
        self._workers.extend(uring.start())

    def serve(self) -> int:
        """Mount, serve until unmounted or :meth:`stop`, unmount; the exit status."""
        try:
            self.start()
        except OSError as e:
            log.error("cannot mount on %s: %s", self.config.mountpoint, e)
            return 1
        # Wake up now and then so that a stop is seen promptly; one asked for while mounting
        # found nothing to unmount yet, hence the flag.
        while not self.wait(_STOP_POLL):
            if self._stop_asked:
                break
        # Workers stuck in the backend never see the unmount: they get a moment only.
        self.close(UNMOUNT_GRACE)
        log.info("unmounted %s", self.config.mountpoint)
        return 1 if self.failed else 0

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the workers to end; True once they all have."""
        for t in self._workers:
            t.join(timeout)
        return not any(t.is_alive() for t in self._workers)

    def stop(self) -> None:
        """Unmount (lazily if busy); the workers then see the connection end. Safe in a signal
        handler: it never waits for a lock (whoever holds it is unmounting already)."""
        self._stop_asked = True
        if not self._lock.acquire(blocking=False):
            return
        try:
            if not self._mounted:
                return
            self._mounted = False
        finally:
            self._lock.release()
        try:
            linux.umount2(self.mountpoint, 0)
        except OSError as e:
            if e.errno == errno.EBUSY:
                linux.umount2(self.mountpoint, linux.MNT_DETACH)
                self._abort()
            elif e.errno not in (errno.EINVAL, errno.ENOENT):
                raise

    def _abort(self) -> None:
        # A lazy unmount leaves the connection alive while files are open: abort it through
        # the fusectl file system, when mounted, so that the workers return.
        if self._conn_dev is None:
            return
        conns = "/sys/fs/fuse/connections"
        path = f"{conns}/{os.minor(self._conn_dev)}/abort"
        try:
            if not os.path.exists(path):
                linux.mount("fusectl", conns, "fusectl", 0, "")
            with open(path, "w") as f:
                f.write("1")
        except OSError as e:
            log.debug("aborting the FUSE connection: %s", e)

    def close(self, grace: float = 5.0) -> None:
        """Unmount and wait up to ``grace`` seconds for the workers. Workers still running
        then are stuck in the backend: they are left behind (daemon threads), and so is the
        device fd, which they would otherwise write their replies to once reused."""
        self.stop()
        self.server.interrupt_waiting()  # lock waits end with EINTR; nobody is left to tell
        uring = self.uring
        if uring is not None:
            uring.stop()  # the unmount ended its queues; this ends any that did not see it
        if not self.wait(grace):
            self.abandoned = sum(t.is_alive() for t in self._workers)
            log.error(
                "%d worker(s) still running in the backend; leaving them behind", self.abandoned
            )
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FuseMount:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- FUSE_PASSTHROUGH ------------------------------------------------------------------

    def backing_open(self, fd: int) -> int:
        buf = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        return linux.ioctl_buffer(self.fd, abi.DEV_IOC_BACKING_OPEN, buf)

    def backing_close(self, backing_id: int) -> None:
        linux.ioctl_int(self.fd, abi.DEV_IOC_BACKING_CLOSE, backing_id)

    # --- serving ---------------------------------------------------------------------------

    def _worker(self) -> None:
        fd = self.fd
        # Anonymous mappings, not bytearrays: a bytearray's pages are all written (zeroed) when
        # it is made, a mapping's only when a request reaches them. Private ones: mmap's default
        # (shared) would make them shared memory, handed on to any child process.
        inbuf = mmap.mmap(-1, self.bufsize, flags=_PRIVATE)
        outbuf = mmap.mmap(-1, self.bufsize, flags=_PRIVATE)
        inview = memoryview(inbuf)
        outview = memoryview(outbuf)
        server = self.server
        # Made once: the server keeps neither list past handle() (a reply answered later
        # has a buffer of its own), and it is told their sizes rather than left to sum them.
        # The request is the first n bytes of the whole buffer: no view is cut for each.
        inbufs = [inbuf]
        inviews = [inview]
        outviews = [outview]
        outlen = self.bufsize
        # Typed: the C read's count would otherwise stay a Python object for each use below.
        n: int
        while True:
            try:
                if _native_receive is not None:
                    n = _native_receive(fd, inbuf)
                else:
                    n = _readv(fd, inbufs)
            except OSError as e:
                if e.errno == _ENODEV:
                    break
                if e.errno in _READ_AGAIN:
                    continue
                log.error("reading /dev/fuse: %s", e)
                break
            if n == 0:
                break
            # None: the reply comes later, from its own buffer (_later); this one is free.
            reply = server.handle(inviews, outviews, None, n, outlen)
            if not reply:
                continue
            if _native_send is None:
                self._send(outview[:reply])
            else:
                try:
                    _native_send(fd, outbuf, reply)
                except OSError as e:
                    _send_failed(e)
            if self._uring_pending:
                self._init_answered()
        log.debug("worker %s ends", threading.current_thread().name)

    def _send(self, reply: Any) -> None:
        try:
            _write(self.fd, reply)
        except OSError as e:
            _send_failed(e)

    def _later(self, token: object) -> Any:
        # A reply written to /dev/fuse names its request by unique: it needs no more than a
        # buffer of its own, since the worker's goes on to the next request. One that came
        # through io_uring (its token is its entry) is answered in its entry.
        if token is not None and self.uring is not None:
            return self.uring.later(token)
        return _Later(self)


def _send_failed(e: OSError) -> None:
    if e.errno not in _STALE_REPLY and e.errno != _ENODEV:
        log.warning("writing a reply to /dev/fuse: %s", e)


class _Later:
    """A request answered later: a reply buffer of its own, written to /dev/fuse whole."""

    __slots__ = ("_buf", "_mount", "writable")

    #: Replies answered later are lock replies: a header and nothing more (room to spare).
    SIZE: Final = 256

    def __init__(self, mount: FuseMount) -> None:
        self._mount = mount
        self._buf = bytearray(self.SIZE)
        self.writable = [memoryview(self._buf)]

    def complete(self, length: int) -> None:
        self._mount._send(self.writable[0][:length])
