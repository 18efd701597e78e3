"""Run the daemon from parsed options: build the file system, serve it, exit cleanly.

This is where the layers meet: a backend behind the FUSE server, the server behind a
transport (/dev/fuse or the virtio-fs device over vhost-user).

SIGTERM (SIGINT, SIGHUP) always ends the daemon within seconds. The transports wait a short
grace for requests still running, then leave behind those stuck in the backend (a stat on a
hung mount never returns): their threads are daemon threads. The file system's shutdown then
runs without a limit, unless requests were left behind (it gets :data:`SHUTDOWN_GRACE`, as
what they hold may be what it waits for). Should the transport itself not end within
:data:`EXIT_DEADLINE` of the signal, which no known path does, the daemon removes its socket
and exits at once, with status 1.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from .cli import Options
from .fuse import abi
from .fuse.filesystem import Filesystem
from .fuse.server import Server

if TYPE_CHECKING:
    from .transport.virtiofs import Listener
    from .userns import IdRange

log = logging.getLogger("pyvirtiofsd")

_LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
    "off": logging.CRITICAL + 10,
}


def setup_logging(level: str, use_syslog: bool) -> None:
    handler: logging.Handler
    if use_syslog:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("pyvirtiofsd[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])


def raise_fd_limit(wanted: int | None) -> None:
    """Raise RLIMIT_NOFILE as virtiofsd does: to min(1M, fs.nr_open) unless told otherwise."""
    if wanted == 0:
        return
    if wanted is None:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                nr_open = int(f.read())
        except OSError:
            nr_open = 1 << 20
        wanted = min(1 << 20, nr_open)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open file limit: %s", e)


#: Request threads of an object-storage daemon when --thread-pool-size does not say.
OPENDAL_THREADS = 8
#: Seconds the file system's shutdown may take when requests were left running in the backend.
SHUTDOWN_GRACE = 5.0
#: Seconds after a stop signal by which the transport must have ended (it needs about the
#: transports' grace, 2 s, when requests are stuck); past it the daemon exits at once.
EXIT_DEADLINE = 15.0
#: Seconds a /dev/fuse mount waits for its workers once unmounted, before leaving behind those
#: stuck in the backend.
FUSEDEV_GRACE = 2.0


def build_filesystem(opts: Options) -> Filesystem:
    if opts.opendal is not None:
        from .backends.opendal import OpendalConfig, OpendalFs

        if opts.thread_pool_size == 0:
            # Served inline, one slow store call would hold up every request behind it, even
            # those the local cache answers at once.
            opts.thread_pool_size = OPENDAL_THREADS
            log.info("--opendal: serving requests on %d threads", OPENDAL_THREADS)

        return OpendalFs(
            OpendalConfig(
                scheme=opts.opendal,
                options=opts.opendal_opts,
                cache=opts.cache,
                cache_dir=opts.opendal_cache_dir,
                cache_size=opts.opendal_cache_size,
                readonly=opts.readonly,
                readdirplus=opts.readdirplus,
                writeback=opts.writeback,
            )
        )
    from .backends.passthrough import PassthroughConfig, PassthroughFs

    assert opts.shared_dir is not None
    return PassthroughFs(
        PassthroughConfig(
            shared_dir=opts.shared_dir,
            cache=opts.cache,
            writeback=opts.writeback,
            readonly=opts.readonly,
            xattr=opts.xattr,
            posix_acl=opts.posix_acl,
            readdirplus=opts.readdirplus,
            announce_submounts=opts.announce_submounts,
            killpriv_v2=opts.killpriv_v2,
            allow_direct_io=opts.allow_direct_io,
            allow_mmap=opts.allow_mmap,
            inode_file_handles=opts.inode_file_handles,
            fuse_passthrough=opts.fuse_passthrough,
            dax_file_size=opts.dax_file_size,
            allow_devices=opts.allow_devices,
        )
    )


def log_counters(server: Server) -> None:
    """Requests served per opcode: sent to the log on SIGUSR1 and at exit."""
    counts = {
        abi.Opcode(op).name: n
        for op, n in enumerate(server.counts)
        if n and op in abi.Opcode._value2member_map_
    }
    log.info("requests served: %s", " ".join(f"{k}={v}" for k, v in sorted(counts.items())))


def run(opts: Options) -> int:
    setup_logging(opts.log_level, opts.syslog)
    for item in opts.ignored:
        log.info("ignoring option %s", item)
    raise_fd_limit(opts.rlimit_nofile)
    listener = None
    if opts.socket_path is not None:
        from .transport.virtiofs import Listener

        try:
            listener = Listener(opts.socket_path, opts.socket_group)
        except OSError as e:
            log.error("cannot listen on %s: %s", opts.socket_path, e)
            return 1
    if opts.uid_map:
        from . import userns

        try:
            userns.enter(opts.uid_map, opts.gid_map)
        except OSError as e:
            log.error("cannot enter a user namespace with these id maps: %s", e)
            if listener is not None:
                listener.remove()
            return 1
        log.info("running as root of a user namespace (uid map %s)", _show(opts.uid_map))
    if opts.sandbox != "none":
        assert opts.shared_dir is not None
        from . import sandbox

        try:
            opts.shared_dir = sandbox.enter(opts.shared_dir)
        except OSError as e:
            log.error("cannot set up the %s sandbox: %s", opts.sandbox, e)
            if listener is not None:
                listener.remove()
            return 1
        log.info("sandboxed: the share is %s of a private root", opts.shared_dir)
    try:
        fs = build_filesystem(opts)
    except OSError as e:
        log.error("cannot serve %s: %s", opts.shared_dir or opts.opendal, e)
        if listener is not None:
            listener.remove()
        return 1
    return serve(fs, opts, listener)


def _show(ranges: list[IdRange]) -> str:
    return " ".join(f":{r.inside}:{r.outside}:{r.count}:" for r in ranges)


def serve(fs: Filesystem, opts: Options, listener: Listener | None = None) -> int:
    """Serve ``fs`` as the options say (/dev/fuse or vhost-user) until the end; the exit
    status."""
    disabled = 0
    if not opts.posix_locks:
        disabled |= abi.InitFlag.POSIX_LOCKS
    if not opts.flock_locks:
        disabled |= abi.InitFlag.FLOCK_LOCKS
    server = Server(fs, disabled_flags=disabled)
    stop = threading.Event()
    stoppers: list[Callable[[], None]] = []
    transport_ended = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        first = not stop.is_set()
        stop.set()
        for fn in stoppers:
            fn()
        if first:
            threading.Thread(
                target=_exit_deadline,
                args=(transport_ended, listener),
                name="exit-deadline",
                daemon=True,
            ).start()

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        log_counters(server)

    # Requests allocate many small, short-lived, acyclic objects; the cyclic collector's
    # default of a pass every 700 allocations costs several microseconds per request.
    # Startup objects never die: take them out of its sight altogether.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    try:
        if opts.mount is not None:
            return _run_fusedev(opts, server, stop, stoppers)
        from .transport.virtiofs import run_vhost_user

        return run_vhost_user(opts, server, stop, stoppers, listener)
    finally:
        transport_ended.set()
        log_counters(server)
        shutdown = getattr(fs, "shutdown", None)
        if shutdown is not None:
            stuck = server.in_flight()
            if stuck:
                log.error(
                    "%d request(s) still running in the backend; shutting the file system "
                    "down without them",
                    stuck,
                )
                _run_for(shutdown, SHUTDOWN_GRACE)
            else:
                shutdown()


def _run_for(fn: Callable[[], object], seconds: float) -> None:
    """Run ``fn`` on a daemon thread for up to ``seconds``, and go on without it after that."""
    thread = threading.Thread(target=fn, name="shutdown", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        log.error("the file system did not shut down in %g seconds; exiting without it", seconds)


def _exit_deadline(ended: threading.Event, listener: Listener | None) -> None:
    """After a stop signal: exit at once if the transport has not ended by the deadline."""
    if ended.wait(EXIT_DEADLINE):
        return
    log.error("not stopped %g seconds after the signal; exiting now", EXIT_DEADLINE)
    if listener is not None:
        listener.remove()
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    os._exit(1)


def serve_filesystem(fs: Filesystem, argv: list[str] | None = None) -> int:
    """Serve a file system of your own with the daemon's command line (``--mount DIR``, or
    ``--socket-path PATH`` for a VM, and the rest); returns the exit status."""
    from .cli import parse_args

    opts = parse_args(argv, own_fs=True)
    if opts is None:
        return 0
    setup_logging(opts.log_level, opts.syslog)
    return serve(fs, opts)


def _run_fusedev(
    opts: Options, server: Server, stop: threading.Event, stoppers: list[Callable[[], None]]
) -> int:
    from .transport.fusedev import FuseMount

    assert opts.mount is not None
    mount = FuseMount(
        server,
        opts.mount,
        threads=max(opts.thread_pool_size, 4),
        readonly=opts.readonly,
    )
    try:
        mount.start()
    except OSError as e:
        log.error("cannot mount on %s: %s", opts.mount, e)
        return 1
    stoppers.append(mount.stop)
    # Wake up now and then so that signals are handled promptly; a signal that came while
    # mounting found no stopper yet, hence the check of the flag.
    while not mount.wait(0.5):
        if stop.is_set():
            break
    # Workers stuck in the backend never see the unmount: they get a moment only.
    mount.close(FUSEDEV_GRACE)
    log.info("unmounted %s", opts.mount)
    return 0
