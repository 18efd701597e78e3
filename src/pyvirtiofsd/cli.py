"""The ``pyvirtiofsd`` command line: virtiofsd's options, plus our own.

The command line owns no setting; it maps arguments onto the configs of the layers that do:
:class:`~.transport.virtiofs.VhostUserConfig`, :class:`~.transport.fusedev.FuseMountConfig`,
the backends' configs, :class:`~.fuse.server.ServerConfig` and the daemon's
:class:`~.daemon.ProcessConfig`. An option's ``dest`` is the name of the config field it sets,
and each config is filled by field name from the options given (an option that also names a
field elsewhere, like ``--readonly``, sets it there too), so an option is spelled once here and
once in its config, and one not given leaves the config's default. virtiofsd's ``-o`` form sets
the same names.

Parsing is kept apart from running (:mod:`pyvirtiofsd.daemon`) so that every option can be
checked, with a clear message and exit status 2, before anything listens or mounts. Nothing
below this module imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pyvirtiofsd import accel
from pyvirtiofsd.backends.passthrough.config import (
    FileHandles,
    MigrationMode,
    MigrationOnError,
    PassthroughConfig,
    SecurityLabel,
)
from pyvirtiofsd.backends.passthrough.idmap import IdMap, IdMapError, IdRule, parse_rule
from pyvirtiofsd.backends.passthrough.xattrmap import XattrMap, XattrMapError
from pyvirtiofsd.daemon import DaemonConfig, ProcessConfig
from pyvirtiofsd.fuse.policy import CachePolicy
from pyvirtiofsd.fuse.server import ServerConfig
from pyvirtiofsd.transport.fusedev import FuseMountConfig
from pyvirtiofsd.transport.virtiofs import MAX_QUEUE_SIZE, VhostUserConfig
from pyvirtiofsd.userns import IdRange, check_map, parse_range
from pyvirtiofsd.version import __version__

if TYPE_CHECKING:
    from pyvirtiofsd.fuse.filesystem import Filesystem

__all__ = [
    "CACHE_MODES",
    "CAPABILITIES",
    "LOG_LEVELS",
    "OPENDAL_THREADS",
    "SANDBOXES",
    "build_parser",
    "main",
    "parse_args",
]

LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")
CACHE_MODES = ("never", "none", "auto", "always", "metadata")
SANDBOXES = ("namespace", "chroot", "none")
#: What libvirt reads from --print-capabilities. "separate-options" makes libvirt pass
#: --shared-dir/--cache/... rather than -o; "security-label-negotiation-mode" says that
#: --security-label takes never|auto|always; "migrate-precopy" lets it migrate a domain with the
#: share mounted (the daemon logs dirty pages and carries its state over).
CAPABILITIES = {
    "type": "fs",
    "features": ["migrate-precopy", "security-label-negotiation-mode", "separate-options"],
}
#: Request threads of an object-storage daemon when --thread-pool-size does not say: served
#: inline, one slow store call would hold up every request behind it, even those the local
#: cache answers at once.
OPENDAL_THREADS = 8

#: virtiofsd options we accept and ignore, because what they tune does not exist here.
_IGNORED_WITH_VALUE = ("--seccomp", "--modcaps")
_IGNORED_FLAGS = ("--preserve-noatime", "-f")
#: virtiofsd's ``-o`` switches and the option each sets; ``no_`` in front clears it.
_COMPAT_SWITCHES = {
    "xattr": "xattr",
    "posix_acl": "posix_acl",
    "readdirplus": "readdirplus",
    "writeback": "writeback",
    "announce_submounts": "announce_submounts",
    "killpriv_v2": "killpriv_v2",
    "flock": "flock_locks",
    "posix_lock": "posix_locks",
    "security_label": "security_label",
}
#: ``-o`` switches that only turn something on.
_COMPAT_ON = {"allow_direct_io": "allow_direct_io"}
#: ``-o KEY=VALUE`` options: the option each sets, and the values it takes (None: any).
_COMPAT_VALUES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "source": ("shared_dir", None),
    "cache": ("cache", CACHE_MODES),
    "sandbox": ("sandbox", SANDBOXES),
    "loglevel": ("log_level", LOG_LEVELS),
    # As in virtiofsd, the map ends at the next comma: -o splits there first.
    "xattrmap": ("xattrmap", None),
}
_COMPAT_ALIASES = {"log_level": "loglevel"}
_COMPAT_IGNORED = ("modcaps", "timeout")
#: --security-label values that ask for nothing (-o no_security_label gives False).
_NO_LABEL = (None, False, "never")

#: Options whose value the config holds in another type than the command line's text.
_CONVERT: dict[str, Any] = {
    "cache": CachePolicy.parse,
    "inode_file_handles": FileHandles.parse,
    "migration_mode": MigrationMode,
    "migration_on_error": MigrationOnError,
    "uid_map": tuple,
    "gid_map": tuple,
    "translate_uid": tuple,
    "translate_gid": tuple,
    "xattrmap": XattrMap.parse,
    "security_label": SecurityLabel.parse,
}

#: The options of live migration (config fields of the passthrough).
_MIGRATION_OPTIONS = (
    "migration_mode",
    "migration_on_error",
    "migration_verify_handles",
    "migration_confirm_paths",
)

_C = TypeVar("_C")


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
    """The parser. Every option's ``dest`` is the config field it sets; none has a default
    (argparse.SUPPRESS), so the configs' own defaults hold for options not given."""
    p = _Parser(
        prog="pyvirtiofsd",
        description="virtio-fs device back-end (vhost-user) and FUSE server.",
        epilog="Compatible with virtiofsd's options; see the README for the rest.",
        argument_default=argparse.SUPPRESS,
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
    conn.add_argument(
        "--keep-listening",
        action="store_true",
        help="when the front-end disconnects, serve the next one on the same socket (one at a "
        "time, each from a clean FUSE session) instead of exiting; for VMMs that reconnect on "
        "every guest reboot (cloud-hypervisor). virtiofsd has no such option",
    )
    conn.add_argument("--tag", help="virtio-fs tag (config space; 36 bytes at most)")
    conn.add_argument(
        "--mount",
        dest="mountpoint",
        metavar="MOUNTPOINT",
        help="serve on the host through /dev/fuse at MOUNTPOINT instead of vhost-user",
    )
    conn.add_argument(
        "--allow-other",
        action="store_true",
        help="with --mount: let every host user use the mount (allow_other); by default only "
        "the daemon's user may. The kernel checks every caller's permissions either way",
    )
    conn.add_argument(
        "--fuse-io-uring",
        dest="io_uring",
        action="store_true",
        help="with --mount: take requests through io_uring, a queue per CPU (FUSE over "
        "io_uring: Linux 6.14+ with fuse's enable_uring parameter set; /dev/fuse otherwise)",
    )
    conn.add_argument("--num-request-queues", type=int, metavar="N")
    conn.add_argument(
        "--queue-size",
        type=int,
        metavar="N",
        help=f"largest virtqueue a front-end may set up (a power of two; {MAX_QUEUE_SIZE}, "
        "the default, is the most virtio allows). virtiofsd has no such option: its limit is "
        f"fixed at {MAX_QUEUE_SIZE}",
    )

    fs = p.add_argument_group("file system")
    fs.add_argument("--shared-dir", metavar="DIR", help="directory to share")
    fs.add_argument("--cache", choices=CACHE_MODES)
    fs.add_argument(
        "--allow-mmap", action="store_true", help="shared mmap with cache=never/metadata"
    )
    fs.add_argument("--writeback", action="store_true")
    fs.add_argument("--allow-direct-io", action="store_true")
    fs.add_argument("--no-readdirplus", dest="readdirplus", action="store_false")
    fs.add_argument("--xattr", action="store_true")
    fs.add_argument("--posix-acl", action="store_true", help="POSIX ACLs (implies --xattr)")
    fs.add_argument(
        "--xattrmap",
        metavar="RULES",
        help="rename, pass, hide or refuse xattr names between guest and host, with "
        "virtiofsd's rules (e.g. ':map::user.virtiofs.:'; implies --xattr). A map that leaves "
        "some name undecided is refused here (virtiofsd stops serving on it)",
    )
    fs.add_argument(
        "--security-label",
        nargs="?",
        const="always",
        choices=[m.value for m in SecurityLabel],
        metavar="never|auto|always",
        help="label each file the guest makes with the security context it sends "
        "(FUSE_SECURITY_CTX; implies --xattr), under the name the xattr map gives it: "
        "always (the default without a value) fails the guest's mount if its kernel does not "
        "send them, auto takes them when it does",
    )
    fs.add_argument("--readonly", action="store_true")
    fs.add_argument("--announce-submounts", action="store_true")
    fs.add_argument("--no-announce-submounts", dest="announce_submounts", action="store_false")
    fs.add_argument("--killpriv-v2", action="store_true")
    fs.add_argument("--no-killpriv-v2", dest="killpriv_v2", action="store_false")
    fs.add_argument(
        "--inode-file-handles",
        choices=("never", "prefer", "mandatory", "fallback"),
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
    for kind in ("uid", "gid"):
        fs.add_argument(
            f"--translate-{kind}",
            action="append",
            type=_id_rule,
            metavar="TYPE:A:B:COUNT",
            help=f"translate {kind}s between guest and host inside the daemon (repeatable): "
            "map:GUEST:HOST:COUNT (both ways), guest:GUEST:HOST:COUNT, host:HOST:GUEST:COUNT, "
            "squash-guest:GUEST:HOST:COUNT, squash-host:HOST:GUEST:COUNT, "
            "forbid-guest:GUEST:COUNT (EPERM). The last number is a COUNT, not the end of the "
            f"range. Rules may not overlap; unmatched {kind}s stay as they are unless that "
            "would alias a translated one (see the README). Not with --posix-acl",
        )
    fs.add_argument(
        "--fuse-passthrough",
        action="store_true",
        help="with --mount: let the kernel read and write files directly (FUSE_PASSTHROUGH)",
    )

    mig = p.add_argument_group("live migration")
    mig.add_argument(
        "--migration-mode",
        choices=[m.value for m in MigrationMode],
        help="as a migration source, how the destination finds each file the guest holds: by "
        "its path in the share (find-paths, the default; an unlinked open file by file handle) "
        "or by its file handle (file-handles: the same file system must be mounted there)",
    )
    mig.add_argument(
        "--migration-on-error",
        choices=[m.value for m in MigrationOnError],
        help="as a migration destination, what to do when a file the guest holds can't be "
        "found: refuse the migration (abort, the default; the source goes on) or let it go on "
        "with that file failing with EIO in the guest (guest-error)",
    )
    mig.add_argument(
        "--migration-verify-handles",
        action="store_true",
        help="with find-paths: send each file's handle too, and refuse a file the destination "
        "finds by that path whose handle differs (same file system on both sides)",
    )
    mig.add_argument(
        "--migration-confirm-paths",
        action="store_true",
        help="accepted for virtiofsd's sake: paths are always taken while the guest is "
        "stopped, so there is nothing left to confirm",
    )

    dax = p.add_argument_group("DAX window")
    dax.add_argument(
        "--dax-window",
        type=_size,
        metavar="SIZE",
        help="size of the DAX window (a multiple of 2M; 0 = no DAX)",
    )
    dax.add_argument(
        "--dax-file-size",
        type=_size,
        metavar="SIZE",
        help="for dax=inode: files at least this large use DAX",
    )

    obj = p.add_argument_group("object storage (Apache OpenDAL)")
    obj.add_argument(
        "--opendal",
        dest="scheme",
        metavar="SCHEME",
        help="serve an OpenDAL service instead of a directory",
    )
    obj.add_argument(
        "--opendal-opt",
        dest="options",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the OpenDAL service (repeatable)",
    )
    obj.add_argument("--opendal-cache-dir", dest="cache_dir", metavar="DIR")
    obj.add_argument("--opendal-cache-size", dest="cache_size", type=_size, metavar="SIZE")

    run = p.add_argument_group("running")
    run.add_argument("--thread-pool-size", type=_nonneg, metavar="N")
    run.add_argument("--rlimit-nofile", type=_nonneg, metavar="N")
    run.add_argument("--sandbox", choices=SANDBOXES)
    for kind in ("uid", "gid"):
        run.add_argument(
            f"--{kind}-map",
            action="append",
            type=_id_range,
            metavar=":INSIDE:OUTSIDE:COUNT:",
            help=f"run in a user namespace where COUNT {kind}s from INSIDE are the host's from "
            "OUTSIDE (repeatable; needs newuidmap/newgidmap for ranges that are not your own)",
        )
    run.add_argument("--log-level", choices=LOG_LEVELS)
    run.add_argument("--syslog", action="store_true")
    run.add_argument("--print-capabilities", action="store_true")
    run.add_argument(
        "-V", "--version", action="version", version=f"pyvirtiofsd {__version__} ({accel.build()})"
    )
    run.add_argument(
        "-o",
        dest="compat_options",
        action="append",
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
    return p


def _apply_compat(p: argparse.ArgumentParser, given: dict[str, Any], notices: list[str]) -> None:
    """virtiofsd's ``-o`` options, as libvirt still emits them: onto the same names as the
    options of today."""
    for group in given.pop("compat_options", []):
        for item in group.split(","):
            if not item:
                continue
            key, _, value = item.partition("=")
            key = _COMPAT_ALIASES.get(key, key)
            if key in _COMPAT_VALUES:
                dest, choices = _COMPAT_VALUES[key]
                if choices is not None and value not in choices:
                    p.error(f"-o {key}: invalid value {value!r}")
                given[dest] = value
            elif key in _COMPAT_SWITCHES:
                given[_COMPAT_SWITCHES[key]] = True
            elif key.startswith("no_") and key[3:] in _COMPAT_SWITCHES:
                given[_COMPAT_SWITCHES[key[3:]]] = False
            elif key in _COMPAT_ON:
                given[_COMPAT_ON[key]] = True
            elif key in _COMPAT_IGNORED:
                notices.append(f"ignoring option {item}")
            else:
                p.error(f"unknown -o option {key!r}")


def parse_args(argv: Sequence[str] | None = None, *, own_fs: bool = False) -> DaemonConfig | None:
    """The daemon's configuration, or None when the command was fully answered
    (--print-capabilities). ``own_fs``: the caller brings its own file system, so no directory
    or service is named."""
    p = build_parser()
    ns = p.parse_args(argv)
    if getattr(ns, "print_capabilities", False):
        print(json.dumps(CAPABILITIES, indent=2))
        return None
    given: dict[str, Any] = vars(ns)
    notices: list[str] = []
    if given.pop("debug", False):
        given["log_level"] = "debug"
    _apply_compat(p, given, notices)
    if "options" in given:
        given["options"] = _service_options(p, given["options"])
    _validate(p, given, own_fs)
    for name, convert in _CONVERT.items():
        if name in given:
            given[name] = convert(given[name])
    if "scheme" in given and not given.get("thread_pool_size"):
        given["thread_pool_size"] = OPENDAL_THREADS
        notices.append(f"--opendal: serving requests on {OPENDAL_THREADS} threads")
    transport: VhostUserConfig | FuseMountConfig
    if "mountpoint" in given:
        transport = _fill(FuseMountConfig, given)
    else:
        transport = _fill(VhostUserConfig, given)
    return DaemonConfig(
        transport=transport,
        backend=None if own_fs else _backend(given),
        server=_fill(ServerConfig, given),
        process=_fill(ProcessConfig, given, notices=tuple(notices)),
    )


def _fill(cls: type[_C], given: dict[str, Any], **values: Any) -> _C:
    """``cls`` (a config dataclass) with each field an option was given for, by name."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in given.items() if k in names}, **values)


def _backend(given: dict[str, Any]) -> Any:
    if "scheme" in given:
        from pyvirtiofsd.backends.opendal.config import OpendalConfig

        return _fill(OpendalConfig, given)
    return _fill(PassthroughConfig, given)


def _service_options(p: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--opendal-opt wants KEY=VALUE, got {item!r}")
        options[key] = value
    return options


def _validate(p: argparse.ArgumentParser, o: dict[str, Any], own_fs: bool) -> None:
    """Every given value, and how they combine (a value not given is a config's default, which
    is valid)."""
    shared_dir = o.get("shared_dir")
    scheme = o.get("scheme")
    mountpoint = o.get("mountpoint")
    if own_fs:
        if shared_dir is not None or scheme is not None:
            p.error("this program serves its own file system: no --shared-dir or --opendal")
    elif scheme is None:
        if shared_dir is None:
            p.error("--shared-dir (or -o source=DIR, or --opendal) is required")
        if not os.path.isdir(shared_dir):
            p.error(f"shared directory {shared_dir!r} does not exist or is not a directory")
    elif shared_dir is not None:
        p.error("--opendal and --shared-dir exclude each other")
    if scheme is None and any(k in o for k in ("options", "cache_dir", "cache_size")):
        p.error("--opendal-opt, --opendal-cache-dir and --opendal-cache-size need --opendal")
    transports = sum(k in o for k in ("socket_path", "fd", "mountpoint"))
    if transports == 0:
        p.error("one of --socket-path, --fd or --mount is required")
    if transports > 1:
        p.error("--socket-path, --fd and --mount exclude each other")
    if "fd" in o:
        _check_listening_fd(p, o["fd"])
    if o.get("keep_listening"):
        if mountpoint is not None:
            p.error("--keep-listening needs a vhost-user front-end, not --mount")
        if scheme is not None:
            # Its destroy() keeps a session's open files and lookups: the next front-end
            # would not start clean.
            p.error(
                "--keep-listening does not work with --opendal yet (the object-storage "
                "backend keeps a departed guest's open files)"
            )
    if mountpoint is not None and not os.path.isdir(mountpoint):
        p.error(f"mount point {mountpoint!r} is not a directory")
    if o.get("io_uring") and mountpoint is not None and shared_dir is not None:
        inner = os.path.realpath(mountpoint)
        outer = os.path.realpath(shared_dir)
        if os.path.commonpath([inner, outer]) == outer:
            # A queue's thread looking a name up in the share would send a request to its own
            # mount, whose delivery waits for that very thread (/dev/fuse has other readers).
            p.error(
                "--fuse-io-uring: the mount point lies inside the shared directory, where the "
                "daemon's own lookups would wait for themselves; mount it elsewhere"
            )
    tag = o.get("tag")
    if tag is not None and (not tag or len(tag.encode()) > 36):
        p.error("--tag must be 1 to 36 bytes long")
    queues = o.get("num_request_queues")
    if queues is not None and not 1 <= queues <= 64:
        p.error("--num-request-queues must be between 1 and 64")
    size = o.get("queue_size")
    if size is not None and (size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1)):
        p.error(f"--queue-size must be a power of two up to {MAX_QUEUE_SIZE}")
    dax_window = o.get("dax_window") or 0
    if dax_window % (2 << 20):
        p.error("--dax-window must be a multiple of 2M")
    if dax_window and mountpoint is not None:
        p.error("--dax-window needs a virtio-fs front-end, not --mount")
    if dax_window and o.get("readonly"):
        # QEMU (11.1) maps every DAX range shared and writable, whatever the mapping asks, so
        # a window would either let the guest write a read-only share or fail every mapping.
        p.error("--dax-window and --readonly exclude each other: QEMU maps DAX ranges writable")
    if o.get("sandbox") not in (None, "none") and (shared_dir is None or mountpoint is not None):
        p.error("--sandbox confines a --shared-dir served over vhost-user; use --sandbox none")
    uid_map, gid_map = o.get("uid_map"), o.get("gid_map")
    if uid_map or gid_map:
        if not (uid_map and gid_map):
            p.error("--uid-map and --gid-map go together")
        if mountpoint is not None:
            p.error("--uid-map/--gid-map need a vhost-user front-end, not --mount")
        for kind, ranges in (("uid", uid_map), ("gid", gid_map)):
            try:
                check_map(kind, ranges)
            except ValueError as e:
                p.error(str(e))
    migration = [k for k in _MIGRATION_OPTIONS if k in o]
    if migration and (shared_dir is None or mountpoint is not None):
        p.error(
            f"--{migration[0].replace('_', '-')} needs a --shared-dir served over vhost-user "
            "(only a passthrough share migrates)"
        )
    if o.get("migration_verify_handles") and o.get("migration_mode") == "file-handles":
        p.error("--migration-verify-handles goes with --migration-mode find-paths only")
    translate = {kind: o.get(f"translate_{kind}") or [] for kind in ("uid", "gid")}
    if translate["uid"] or translate["gid"]:
        if scheme is not None or own_fs:
            p.error("--translate-uid/--translate-gid translate the ids of a --shared-dir")
        if o.get("posix_acl"):
            p.error(
                "--translate-uid/--translate-gid and --posix-acl exclude each other: "
                "the ids inside ACLs are not translated"
            )
        for kind, rules in translate.items():
            try:
                IdMap(kind, rules)
            except IdMapError as e:
                p.error(str(e))
    if "xattrmap" in o:
        try:
            XattrMap.parse(o["xattrmap"])
        except XattrMapError as e:
            p.error(f"--xattrmap: {e}")
    if scheme is not None and ("xattrmap" in o or o.get("security_label") not in _NO_LABEL):
        p.error("--xattrmap and --security-label serve a --shared-dir, not --opendal")
    if o.get("fuse_passthrough") and mountpoint is None:
        p.error("--fuse-passthrough only works with --mount")
    if o.get("allow_other") and mountpoint is None:
        p.error("--allow-other only works with --mount")
    if o.get("io_uring") and mountpoint is None:
        p.error("--fuse-io-uring only works with --mount")
    group = o.get("socket_group")
    if group is not None:
        import grp

        try:
            grp.getgrnam(group)
        except KeyError:
            p.error(f"--socket-group: no group named {group!r}")
    if scheme is not None and not own_fs:
        # Last, as it may ask the store over the network.
        _check_opendal(p, scheme, o.get("options", {}), o.get("cache_dir"))


def _check_opendal(
    p: argparse.ArgumentParser, scheme: str, options: dict[str, str], cache_dir: str | None
) -> None:
    """The scheme, its options and the store itself, checked before anything listens."""
    if cache_dir is not None:
        d = cache_dir
        if os.path.exists(d) and not os.path.isdir(d):
            p.error(f"--opendal-cache-dir {d!r} is not a directory")
        parent = d if os.path.isdir(d) else os.path.dirname(os.path.abspath(d))
        if not os.access(parent, os.W_OK | os.X_OK):
            p.error(f"--opendal-cache-dir {d!r} is not writable")
    try:
        from pyvirtiofsd.backends.opendal.config import check_service
    except ImportError:
        p.error("--opendal needs the opendal package: pip install 'pyvirtiofsd[opendal]'")
    problem = check_service(scheme, options)
    if problem is not None:
        p.error(f"--opendal {scheme}: {problem}")


def _id_range(text: str) -> IdRange:
    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _id_rule(text: str) -> IdRule:
    try:
        return parse_rule(text)
    except IdMapError as e:
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


def main(argv: Sequence[str] | None = None, *, fs: Filesystem | None = None) -> int:
    """Run the daemon as the command line says; the exit status. With ``fs``, serve that file
    system of the caller's (the command line names no --shared-dir or --opendal then)."""
    config = parse_args(argv, own_fs=fs is not None)
    if config is None:
        return 0
    from pyvirtiofsd import daemon

    if fs is None:
        return daemon.run(config)
    return daemon.serve_filesystem(fs, config)


if __name__ == "__main__":
    sys.exit(main())
