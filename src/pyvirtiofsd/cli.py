"""The ``pyvirtiofsd`` command line: virtiofsd's options, plus our own.

Parsing is kept apart from running (:mod:`pyvirtiofsd.daemon`) so that every option can be
checked, with a clear message and exit status 2, before anything listens or mounts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import __version__
from .backends.passthrough import CachePolicy, FileHandles
from .userns import IdRange, check_map, parse_range

LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")
#: What libvirt reads from --print-capabilities. "separate-options" makes libvirt pass
#: --shared-dir/--cache/... rather than -o. Migration is not offered: we have no device state.
CAPABILITIES = {"type": "fs", "features": ["separate-options"]}

#: virtiofsd options we accept and ignore, because what they tune does not exist here.
_IGNORED_WITH_VALUE = ("--seccomp", "--modcaps")
_IGNORED_FLAGS = ("--preserve-noatime", "-f")
#: virtiofsd options we refuse rather than silently run without.
_UNSUPPORTED = (
    "--xattrmap",
    "--security-label",
    "--translate-uid",
    "--translate-gid",
    "--migration-mode",
    "--migration-on-error",
    "--migration-verify-handles",
    "--migration-confirm-paths",
)


@dataclass
class Options:
    shared_dir: str | None = None
    socket_path: str | None = None
    fd: int | None = None
    socket_group: str | None = None
    tag: str | None = None
    cache: CachePolicy = CachePolicy.AUTO
    allow_mmap: bool = False
    writeback: bool = False
    allow_direct_io: bool = False
    readdirplus: bool = True
    thread_pool_size: int = 0
    rlimit_nofile: int | None = None
    xattr: bool = False
    posix_acl: bool = False
    readonly: bool = False
    announce_submounts: bool = True
    killpriv_v2: bool = False
    #: Serve POSIX record locks and flock() in the daemon (else the guest locks locally).
    posix_locks: bool = True
    flock_locks: bool = True
    inode_file_handles: FileHandles = FileHandles.NEVER
    sandbox: str = "none"
    #: Run as root of a user namespace with these maps (empty: stay in the host's).
    uid_map: list[IdRange] = field(default_factory=list)
    gid_map: list[IdRange] = field(default_factory=list)
    log_level: str = "info"
    syslog: bool = False
    # Beyond virtiofsd:
    mount: str | None = None
    fuse_passthrough: bool = False
    allow_devices: bool = False
    num_request_queues: int = 1
    queue_size: int = 1024
    dax_window: int = 0
    dax_file_size: int | None = None
    opendal: str | None = None
    opendal_opts: dict[str, str] = field(default_factory=dict)
    opendal_cache_dir: str | None = None
    opendal_cache_size: int | None = None
    ignored: list[str] = field(default_factory=list)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\nTry '{self.prog} --help'.\n")


def _size(text: str) -> int:
    """A byte count with an optional K/M/G/T suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = 1
    if t and t[-1] in units:
        scale = units[t[-1]]
        t = t[:-1]
    try:
        value = int(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative size: {text!r}")
    return value


def _nonneg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pyvirtiofsd",
        description="virtio-fs device back-end (vhost-user) and FUSE server.",
        epilog="Compatible with virtiofsd's options; see the README for the rest.",
    )
    conn = p.add_argument_group("connection")
    conn.add_argument(
        "--socket-path", metavar="PATH", help="vhost-user socket to create and listen on"
    )
    conn.add_argument("--socket", dest="socket_path", metavar="PATH", help=argparse.SUPPRESS)
    conn.add_argument(
        "--fd", type=_nonneg, metavar="FD", help="an already listening socket (libvirt)"
    )
    conn.add_argument("--socket-group", metavar="GROUP", help="group owning the socket")
    conn.add_argument("--tag", help="virtio-fs tag (config space; 36 bytes at most)")
    conn.add_argument(
        "--mount",
        metavar="MOUNTPOINT",
        help="serve on the host through /dev/fuse at MOUNTPOINT instead of vhost-user",
    )
    conn.add_argument("--num-request-queues", type=int, default=1, metavar="N")
    conn.add_argument("--queue-size", type=int, default=1024, metavar="N", help=argparse.SUPPRESS)

    fs = p.add_argument_group("file system")
    fs.add_argument("--shared-dir", metavar="DIR", help="directory to share")
    fs.add_argument(
        "--cache", choices=("never", "none", "auto", "always", "metadata"), default="auto"
    )
    fs.add_argument(
        "--allow-mmap", action="store_true", help="shared mmap with cache=never/metadata"
    )
    fs.add_argument("--writeback", action="store_true")
    fs.add_argument("--allow-direct-io", action="store_true")
    fs.add_argument("--no-readdirplus", action="store_true")
    fs.add_argument("--xattr", action="store_true")
    fs.add_argument("--posix-acl", action="store_true", help="POSIX ACLs (implies --xattr)")
    fs.add_argument("--readonly", action="store_true")
    fs.add_argument("--announce-submounts", action="store_true", default=True)
    fs.add_argument("--no-announce-submounts", dest="announce_submounts", action="store_false")
    fs.add_argument("--killpriv-v2", action="store_true")
    fs.add_argument("--no-killpriv-v2", dest="killpriv_v2", action="store_false")
    fs.add_argument(
        "--inode-file-handles",
        choices=("never", "prefer", "mandatory", "fallback"),
        default="never",
        help="reference inodes by file handle instead of one open fd each",
    )
    fs.add_argument(
        "--allow-devices",
        action="store_true",
        help="let the guest make character and block device nodes (MKNOD; EPERM otherwise). "
        "virtiofsd has no such switch, and makes them: but a device node the daemon makes as "
        "root in the share is a host device that any host user who can reach the share could "
        "open, so here it takes asking",
    )
    fs.add_argument(
        "--fuse-passthrough",
        action="store_true",
        help="with --mount: let the kernel read and write files directly (FUSE_PASSTHROUGH)",
    )

    dax = p.add_argument_group("DAX window")
    dax.add_argument(
        "--dax-window",
        type=_size,
        default=0,
        metavar="SIZE",
        help="size of the DAX window (a multiple of 2M; 0 = no DAX)",
    )
    dax.add_argument(
        "--dax-file-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="for dax=inode: files at least this large use DAX",
    )

    obj = p.add_argument_group("object storage (Apache OpenDAL)")
    obj.add_argument(
        "--opendal", metavar="SCHEME", help="serve an OpenDAL service instead of a directory"
    )
    obj.add_argument(
        "--opendal-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the OpenDAL service (repeatable)",
    )
    obj.add_argument("--opendal-cache-dir", metavar="DIR")
    obj.add_argument("--opendal-cache-size", type=_size, metavar="SIZE")

    run = p.add_argument_group("running")
    run.add_argument("--thread-pool-size", type=_nonneg, default=0, metavar="N")
    run.add_argument("--rlimit-nofile", type=_nonneg, metavar="N")
    run.add_argument("--sandbox", choices=("namespace", "chroot", "none"), default="none")
    for kind in ("uid", "gid"):
        run.add_argument(
            f"--{kind}-map",
            action="append",
            default=[],
            type=_id_range,
            metavar=":INSIDE:OUTSIDE:COUNT:",
            help=f"run in a user namespace where COUNT {kind}s from INSIDE are the host's from "
            "OUTSIDE (repeatable; needs newuidmap/newgidmap for ranges that are not your own)",
        )
    run.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    run.add_argument("--syslog", action="store_true")
    run.add_argument("--print-capabilities", action="store_true")
    run.add_argument("-V", "--version", action="version", version=f"pyvirtiofsd {__version__}")
    run.add_argument(
        "-o",
        dest="compat_options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="virtiofsd's deprecated comma-separated options (source=DIR,cache=...,xattr,...)",
    )
    run.add_argument("-d", dest="debug", action="store_true", help=argparse.SUPPRESS)
    for opt in _IGNORED_WITH_VALUE:
        run.add_argument(
            opt, dest="ignored_" + opt.strip("-").replace("-", "_"), help=argparse.SUPPRESS
        )
    for opt in _IGNORED_FLAGS:
        run.add_argument(
            opt,
            action="store_true",
            dest="ignored_" + opt.strip("-").replace("-", "_"),
            help=argparse.SUPPRESS,
        )
    for opt in _UNSUPPORTED:
        run.add_argument(
            opt,
            dest="unsupported_" + opt.strip("-").replace("-", "_"),
            nargs="?",
            const="",
            action="append",
            help=argparse.SUPPRESS,
        )
    return p


def _apply_compat(p: argparse.ArgumentParser, ns: argparse.Namespace, opts: Options) -> None:
    """virtiofsd's ``-o`` options, as libvirt still emits them."""
    for group in ns.compat_options:
        for item in group.split(","):
            if not item:
                continue
            key, _, value = item.partition("=")
            if key == "source":
                opts.shared_dir = value
            elif key == "cache":
                try:
                    opts.cache = CachePolicy.parse(value)
                except ValueError:
                    p.error(f"-o cache: invalid value {value!r}")
            elif key in ("xattr", "no_xattr"):
                opts.xattr = key == "xattr"
            elif key in ("posix_acl", "no_posix_acl"):
                opts.posix_acl = key == "posix_acl"
            elif key in ("readdirplus", "no_readdirplus"):
                opts.readdirplus = key == "readdirplus"
            elif key in ("writeback", "no_writeback"):
                opts.writeback = key == "writeback"
            elif key == "allow_direct_io":
                opts.allow_direct_io = True
            elif key in ("announce_submounts", "no_announce_submounts"):
                opts.announce_submounts = key == "announce_submounts"
            elif key in ("killpriv_v2", "no_killpriv_v2"):
                opts.killpriv_v2 = key == "killpriv_v2"
            elif key == "sandbox":
                if value not in ("namespace", "chroot", "none"):
                    p.error(f"-o sandbox: invalid value {value!r}")
                opts.sandbox = value
            elif key in ("loglevel", "log_level"):
                if value not in LOG_LEVELS:
                    p.error(f"-o loglevel: invalid value {value!r}")
                opts.log_level = value
            elif key in ("flock", "no_flock"):
                opts.flock_locks = key == "flock"
            elif key in ("posix_lock", "no_posix_lock"):
                opts.posix_locks = key == "posix_lock"
            elif key in ("modcaps", "timeout"):
                opts.ignored.append(item)
            elif key in ("xattrmap", "security_label"):
                p.error(f"-o {key} is not supported")
            else:
                p.error(f"unknown -o option {key!r}")


def parse_args(argv: Sequence[str] | None = None, *, own_fs: bool = False) -> Options | None:
    """The options, or None when the command was fully answered (--print-capabilities).
    ``own_fs``: the caller brings its own file system, so no directory or service is named."""
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return None
    for opt in _UNSUPPORTED:
        if getattr(ns, "unsupported_" + opt.strip("-").replace("-", "_")):
            p.error(f"{opt} is not supported by pyvirtiofsd")
    opts = Options(
        shared_dir=ns.shared_dir,
        socket_path=ns.socket_path,
        fd=ns.fd,
        socket_group=ns.socket_group,
        tag=ns.tag,
        cache=CachePolicy.parse(ns.cache),
        allow_mmap=ns.allow_mmap,
        writeback=ns.writeback,
        allow_direct_io=ns.allow_direct_io,
        readdirplus=not ns.no_readdirplus,
        thread_pool_size=ns.thread_pool_size,
        rlimit_nofile=ns.rlimit_nofile,
        xattr=ns.xattr or ns.posix_acl,
        posix_acl=ns.posix_acl,
        readonly=ns.readonly,
        announce_submounts=ns.announce_submounts,
        killpriv_v2=ns.killpriv_v2,
        inode_file_handles=FileHandles(
            "prefer" if ns.inode_file_handles == "fallback" else ns.inode_file_handles
        ),
        sandbox=ns.sandbox,
        uid_map=ns.uid_map,
        gid_map=ns.gid_map,
        log_level="debug" if ns.debug else ns.log_level,
        syslog=ns.syslog,
        mount=ns.mount,
        fuse_passthrough=ns.fuse_passthrough,
        allow_devices=ns.allow_devices,
        num_request_queues=ns.num_request_queues,
        queue_size=ns.queue_size,
        dax_window=ns.dax_window,
        dax_file_size=ns.dax_file_size,
        opendal=ns.opendal,
        opendal_cache_dir=ns.opendal_cache_dir,
        opendal_cache_size=ns.opendal_cache_size,
    )
    _apply_compat(p, ns, opts)
    if opts.posix_acl:
        opts.xattr = True
    for item in ns.opendal_opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--opendal-opt wants KEY=VALUE, got {item!r}")
        opts.opendal_opts[key] = value
    _validate(p, opts, own_fs)
    return opts


def _validate(p: argparse.ArgumentParser, o: Options, own_fs: bool) -> None:
    if own_fs:
        if o.shared_dir is not None or o.opendal is not None:
            p.error("this program serves its own file system: no --shared-dir or --opendal")
    elif o.opendal is None:
        if o.shared_dir is None:
            p.error("--shared-dir (or -o source=DIR, or --opendal) is required")
        if not os.path.isdir(o.shared_dir):
            p.error(f"shared directory {o.shared_dir!r} does not exist or is not a directory")
    elif o.shared_dir is not None:
        p.error("--opendal and --shared-dir exclude each other")
    if o.opendal is None and (
        o.opendal_opts or o.opendal_cache_dir is not None or o.opendal_cache_size is not None
    ):
        p.error("--opendal-opt, --opendal-cache-dir and --opendal-cache-size need --opendal")
    transports = sum(x is not None for x in (o.socket_path, o.fd, o.mount))
    if transports == 0:
        p.error("one of --socket-path, --fd or --mount is required")
    if transports > 1:
        p.error("--socket-path, --fd and --mount exclude each other")
    if o.fd is not None:
        _check_listening_fd(p, o.fd)
    if o.mount is not None and not os.path.isdir(o.mount):
        p.error(f"mount point {o.mount!r} is not a directory")
    if o.tag is not None and (not o.tag or len(o.tag.encode()) > 36):
        p.error("--tag must be 1 to 36 bytes long")
    if not 1 <= o.num_request_queues <= 64:
        p.error("--num-request-queues must be between 1 and 64")
    if o.queue_size < 1 or o.queue_size > 32768 or o.queue_size & (o.queue_size - 1):
        p.error("--queue-size must be a power of two up to 32768")
    if o.dax_window % (2 << 20):
        p.error("--dax-window must be a multiple of 2M")
    if o.dax_window and o.mount is not None:
        p.error("--dax-window needs a virtio-fs front-end, not --mount")
    if o.dax_window and o.readonly:
        # QEMU (11.1) maps every DAX range shared and writable, whatever the mapping asks, so
        # a window would either let the guest write a read-only share or fail every mapping.
        p.error("--dax-window and --readonly exclude each other: QEMU maps DAX ranges writable")
    if o.sandbox != "none" and (o.shared_dir is None or o.mount is not None):
        p.error("--sandbox confines a --shared-dir served over vhost-user; use --sandbox none")
    if o.uid_map or o.gid_map:
        if not (o.uid_map and o.gid_map):
            p.error("--uid-map and --gid-map go together")
        if o.mount is not None:
            p.error("--uid-map/--gid-map need a vhost-user front-end, not --mount")
        for kind, ranges in (("uid", o.uid_map), ("gid", o.gid_map)):
            try:
                check_map(kind, ranges)
            except ValueError as e:
                p.error(str(e))
    if o.fuse_passthrough and o.mount is None:
        p.error("--fuse-passthrough only works with --mount")
    if o.socket_group is not None:
        import grp

        try:
            grp.getgrnam(o.socket_group)
        except KeyError:
            p.error(f"--socket-group: no group named {o.socket_group!r}")
    if o.opendal is not None and not own_fs:
        # Last, as it may ask the store over the network.
        _check_opendal(p, o)


def _check_opendal(p: argparse.ArgumentParser, o: Options) -> None:
    """The scheme, its options and the store itself, checked before anything listens."""
    if o.opendal_cache_dir is not None:
        d = o.opendal_cache_dir
        if os.path.exists(d) and not os.path.isdir(d):
            p.error(f"--opendal-cache-dir {d!r} is not a directory")
        parent = d if os.path.isdir(d) else os.path.dirname(os.path.abspath(d))
        if not os.access(parent, os.W_OK | os.X_OK):
            p.error(f"--opendal-cache-dir {d!r} is not writable")
    try:
        from .backends.opendal.config import check_service
    except ImportError:
        p.error("--opendal needs the opendal package: pip install 'pyvirtiofsd[opendal]'")
    problem = check_service(o.opendal or "", o.opendal_opts)
    if problem is not None:
        p.error(f"--opendal {o.opendal}: {problem}")


def _id_range(text: str) -> IdRange:
    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_listening_fd(p: argparse.ArgumentParser, fd: int) -> None:
    import socket

    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        p.error(f"--fd {fd}: {e.strerror}")
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            p.error(f"--fd {fd} is not a Unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            p.error(f"--fd {fd} is not a listening socket")
    finally:
        os.close(sock.detach())


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts is None:
        return 0
    from .daemon import run

    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
