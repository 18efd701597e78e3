"""Run the daemon from its configuration: the process, the file system, the transport.

This is where the layers meet: a backend behind the FUSE server, the server behind a
transport (/dev/fuse or the virtio-fs device over vhost-user). Each layer owns its settings
(:class:`~.transport.virtiofs.VhostUserConfig`, :class:`~.transport.fusedev.FuseMountConfig`,
the backends' configs, :class:`~.fuse.server.ServerConfig`); :class:`DaemonConfig` gathers them
with the process's own (:class:`ProcessConfig`: logging, open-file limit, user namespace,
sandbox). Nothing here reads a command line (:mod:`pyvirtiofsd.cli`, above, makes these
configs) and no config changes once made: the sandbox's new share path is a new config.

The listening socket of a vhost-user transport has one owner, this module: it is made once,
from the transport's config, before the user namespace and the sandbox (its path may lie
outside them), and closed once when serving ends, which removes the socket file. (The exit
deadline closes it too, as nothing else runs after its ``os._exit``.)

A transport is an object with ``serve()``, which returns the exit status, and ``stop()``,
which the signal handler calls.

SIGTERM (SIGINT, SIGHUP) always ends the daemon within seconds, from the moment its socket
listens: the handlers are installed before, and a stop signal that comes before there is a
transport stops the transport as soon as it exists (SIGUSR1, the counters, is harmless as
early). With ``--keep-listening`` a signal is the only end. The transports wait a short
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
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from pyvirtiofsd import accel
from pyvirtiofsd.backends.passthrough.config import PassthroughConfig
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import Filesystem
from pyvirtiofsd.fuse.server import Server, ServerConfig
from pyvirtiofsd.transport.fusedev import FuseMount, FuseMountConfig
from pyvirtiofsd.transport.virtiofs import VhostUserConfig, VhostUserTransport
from pyvirtiofsd.userns import IdRange
from pyvirtiofsd.version import __version__
from pyvirtiofsd.vhost_user.connection import Listener

if TYPE_CHECKING:
    from pyvirtiofsd.backends.opendal.config import OpendalConfig

__all__ = [
    "EXIT_DEADLINE",
    "SHUTDOWN_GRACE",
    "DaemonConfig",
    "ProcessConfig",
    "Transport",
    "build_filesystem",
    "log_counters",
    "raise_fd_limit",
    "run",
    "serve_filesystem",
    "setup_logging",
]

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
    """Set RLIMIT_NOFILE as virtiofsd does: to ``wanted`` when given, soft and hard, lower than
    now too (libvirt's ``<openfiles max='N'/>`` becomes ``--rlimit-nofile=N``); by default to
    min(1M, fs.nr_open) unless it is higher already; 0 leaves it alone. A limit the process may
    not reach falls back to its hard limit (with a warning, when it was given)."""
    if wanted == 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    asked = wanted is not None
    if wanted is None:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                nr_open = int(f.read())
        except OSError:
            nr_open = 1 << 20
        wanted = min(1 << 20, nr_open)
        if soft >= wanted:
            return
        target = (wanted, max(hard, wanted))
    else:
        target = (wanted, wanted)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, target)
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open file limit: %s", e)
        else:
            if asked:  # the default is a wish; a limit given is not
                log.warning(
                    "could not set the open file limit to %d; it is %d", wanted, min(wanted, hard)
                )


#: Seconds the file system's shutdown may take when requests were left running in the backend.
SHUTDOWN_GRACE = 5.0
#: Seconds after a stop signal by which the transport must have ended (it needs about the
#: transports' grace, 2 s, when requests are stuck); past it the daemon exits at once.
EXIT_DEADLINE = 15.0


@dataclass(frozen=True)
class ProcessConfig:
    """What the daemon's process does before serving, and how it logs."""

    log_level: str = "info"
    syslog: bool = False
    #: RLIMIT_NOFILE to set (None: as virtiofsd, min(1M, fs.nr_open); 0: leave it alone).
    rlimit_nofile: int | None = None
    #: How a passthrough share is confined: "namespace", "chroot" or "none".
    sandbox: str = "none"
    #: Run as root of a user namespace with these maps (empty: stay in the host's).
    uid_map: tuple[IdRange, ...] = ()
    gid_map: tuple[IdRange, ...] = ()
    #: Said in the log once it is set up (what the command line ignored or chose for the user).
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class DaemonConfig:
    """Everything one daemon runs with, each part owned by its layer."""

    transport: VhostUserConfig | FuseMountConfig
    #: The storage backend (None: the caller brings its own file system).
    backend: PassthroughConfig | OpendalConfig | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)

    def __post_init__(self) -> None:
        if self.process.sandbox != "none" and not (
            isinstance(self.backend, PassthroughConfig)
            and isinstance(self.transport, VhostUserConfig)
        ):
            raise ValueError("a sandbox confines a passthrough share served over vhost-user")


class Transport(Protocol):
    """What the daemon runs: a FUSE server behind a transport (/dev/fuse or vhost-user)."""

    #: The FUSE server the transport made for the file system.
    server: Server

    def serve(self) -> int:
        """Serve until the end; the exit status."""
        ...

    def stop(self) -> None:
        """Make :meth:`serve` return soon; safe in a signal handler."""
        ...

    @property
    def abandoned(self) -> int:
        """Once :meth:`serve` has returned: what it left behind still running in the backend
        (workers or rings; none when all ended)."""
        ...


def build_filesystem(config: PassthroughConfig | OpendalConfig) -> Filesystem:
    if isinstance(config, PassthroughConfig):
        from pyvirtiofsd.backends.passthrough import PassthroughFs

        return PassthroughFs(config)
    from pyvirtiofsd.backends.opendal import OpendalFs

    return OpendalFs(config)


def log_counters(server: Server) -> None:
    """Requests served per opcode: sent to the log on SIGUSR1 and at exit."""
    counts = {
        abi.Opcode(op).name: n
        for op, n in enumerate(server.counts)
        if n and op in abi.Opcode._value2member_map_
    }
    log.info("requests served: %s", " ".join(f"{k}={v}" for k, v in sorted(counts.items())))


def run(config: DaemonConfig) -> int:
    """Run the daemon on the storage backend ``config`` names; the exit status."""
    return _run(config, None)


def serve_filesystem(fs: Filesystem, config: DaemonConfig) -> int:
    """Serve a file system of your own (``config.backend`` is None then); the exit status.
    :func:`pyvirtiofsd.serve_filesystem` does the same from a command line."""
    return _run(config, fs)


def _run(config: DaemonConfig, fs: Filesystem | None) -> int:
    process = config.process
    setup_logging(process.log_level, process.syslog)
    log.info("pyvirtiofsd %s (%s)", __version__, accel.build())
    for notice in process.notices:
        log.info("%s", notice)
    raise_fd_limit(process.rlimit_nofile)
    # Before anything exists that a signal's default action would leave behind (the socket
    # file): from here on a stop signal is remembered until there is a transport to stop.
    signals = _Signals()
    signals.install()
    listener = None
    if isinstance(config.transport, VhostUserConfig):
        try:
            listener = config.transport.listen()
        except (OSError, ValueError) as e:
            if config.transport.fd is None:
                log.error("cannot listen on %s: %s", config.transport.socket_path, e)
            else:
                log.error("cannot listen: %s", e)
            return 1
    signals.listener = listener
    try:
        if signals.signalled:
            return 0
        return _prepare_and_serve(config, fs, listener, signals)
    finally:
        signals.ended.set()
        if listener is not None:
            listener.close()


def _prepare_and_serve(
    config: DaemonConfig, fs: Filesystem | None, listener: Listener | None, signals: _Signals
) -> int:
    process = config.process
    if process.uid_map:
        from pyvirtiofsd import userns

        try:
            userns.enter(list(process.uid_map), list(process.gid_map))
        except OSError as e:
            log.error("cannot enter a user namespace with these id maps: %s", e)
            return 1
        log.info("running as root of a user namespace (uid map %s)", _show(process.uid_map))
    backend = config.backend
    if process.sandbox != "none":
        assert isinstance(backend, PassthroughConfig)  # DaemonConfig makes sure
        from pyvirtiofsd import sandbox

        try:
            backend = replace(backend, shared_dir=sandbox.enter(backend.shared_dir))
        except OSError as e:
            log.error("cannot set up the %s sandbox: %s", process.sandbox, e)
            return 1
        log.info("sandboxed: the share is %s of a private root", backend.shared_dir)
    if fs is None:
        assert backend is not None
        try:
            fs = build_filesystem(backend)
        except OSError as e:
            what = backend.shared_dir if isinstance(backend, PassthroughConfig) else backend.scheme
            log.error("cannot serve %s: %s", what, e)
            return 1
    return _serve(fs, config, listener, signals)


def _show(ranges: tuple[IdRange, ...]) -> str:
    return " ".join(f":{r.inside}:{r.outside}:{r.count}:" for r in ranges)


def _transport(fs: Filesystem, config: DaemonConfig, listener: Listener | None) -> Transport:
    """The transport ``config`` names, with the FUSE server for ``fs`` behind it."""
    if isinstance(config.transport, FuseMountConfig):
        return FuseMount(fs, config.transport, config.server)
    assert listener is not None
    return VhostUserTransport(fs, config.transport, listener, config.server)


class _Signals:
    """The daemon's signal handlers, installed before it listens: SIGTERM, SIGINT and SIGHUP
    stop it, SIGUSR1 logs the counters. A stop signal that comes before there is a transport
    is remembered, and stops the transport as soon as there is one (its default action would
    end the process with the socket file left behind). The exit deadline starts with the first
    stop signal once a transport serves: before, the process may still need to be the one
    thread it is (to enter a user namespace or the sandbox)."""

    def __init__(self) -> None:
        self.signalled: list[int] = []
        self.listener: Listener | None = None
        self.transport: Transport | None = None
        #: Set once the transport has ended.
        self.ended = threading.Event()
        self._deadline = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_usr1)

    def attach(self, transport: Transport) -> None:
        """``transport`` serves from now on: stop it if a signal asked already."""
        self.transport = transport
        if self.signalled:
            transport.stop()
            self._start_deadline()

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        self.signalled.append(signum)
        transport = self.transport
        if transport is not None:
            transport.stop()
            self._start_deadline()

    def _on_usr1(self, signum: int, frame: FrameType | None) -> None:
        transport = self.transport
        if transport is not None:
            log_counters(transport.server)

    def _start_deadline(self) -> None:
        if self._deadline:
            return
        self._deadline = True
        try:
            threading.Thread(
                target=_exit_deadline,
                args=(self.ended, self.listener),
                name="exit-deadline",
                daemon=True,
            ).start()
        except RuntimeError as e:
            # Out of threads: raised here, in the signal handler, it would end serve() before
            # it closes the transport. The stop goes on without the backstop.
            log.warning("no thread for the exit deadline: %s", e)


def _serve(
    fs: Filesystem, config: DaemonConfig, listener: Listener | None, signals: _Signals
) -> int:
    """Serve ``fs`` on the configured transport until the end; the exit status."""
    transport = _transport(fs, config, listener)
    server = transport.server
    # Requests allocate many small, short-lived, acyclic objects; the cyclic collector's
    # default of a pass every 700 allocations costs several microseconds per request.
    # Startup objects never die: take them out of its sight altogether.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    signals.attach(transport)
    try:
        if signals.signalled:
            return 0  # stopped before there was anything to serve
        return transport.serve()
    finally:
        signals.ended.set()
        log_counters(server)
        abandoned, waits = transport.abandoned, server.in_flight()
        if abandoned or waits:
            log.error(
                "requests still running in the backend (%d worker(s) or ring(s) left behind, "
                "%d lock wait(s)); shutting the file system down without them",
                abandoned,
                waits,
            )
            _run_for(fs.shutdown, SHUTDOWN_GRACE)
        else:
            fs.shutdown()


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
        listener.close()  # no finally runs after os._exit
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    os._exit(1)
