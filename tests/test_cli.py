"""The command line, run as a real process (``python -m pyvirtiofsd``): what libvirt and QEMU
read from it, what it refuses, libvirt's way of starting it, and how it stops.

No VM: where a front-end is needed, the project's Python front-end plays it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.testing.frontend import DriverQueue, Frontend, FrontendError, GuestRam
from pyvirtiofsd.testing.fuse_client import FuseClient
from pyvirtiofsd.vhost_user.messages import FrontendReq, ProtocolFeature, VringState

REPO = Path(__file__).resolve().parent.parent
DESCRIPTOR = REPO / "share" / "qemu" / "vhost-user" / "50-pyvirtiofsd.json"
DAEMON = [sys.executable, "-m", "pyvirtiofsd"]
#: Exit status of a daemon that answered a signal must come well before this; it only keeps a
#: broken daemon from hanging the test run.
EXIT_GUARD = 30.0


def run_cli(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DAEMON, *args],
        capture_output=True,
        text=True,
        timeout=60,
        pass_fds=pass_fds,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-cli-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shared(work: Path) -> Path:
    d = work / "share"
    d.mkdir()
    (d / "hello.txt").write_bytes(b"hello, libvirt\n")
    return d


def fuse_over(q: DriverQueue) -> FuseClient:
    return FuseClient(lambda req, size: q.request([req], [size] if size else []))


def wait_exit(proc: subprocess.Popen[bytes], log: Path) -> int:
    try:
        return proc.wait(EXIT_GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"daemon did not exit:\n{log.read_text(errors='replace')}")


def check_clean_log(log: Path) -> str:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text
    return text


def wait_for_path(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + EXIT_GUARD
    while not path.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"daemon never listened on {path}:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)


# -- what libvirt and QEMU read ---------------------------------------------------------------


def capabilities() -> dict[str, object]:
    result = run_cli("--print-capabilities")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    caps = json.loads(result.stdout)
    assert isinstance(caps, dict)
    return caps


def test_print_capabilities() -> None:
    caps = capabilities()
    assert caps["type"] == "fs"
    features = caps["features"]
    assert isinstance(features, list)
    assert all(isinstance(f, str) and f for f in features)
    assert len(set(features)) == len(features)
    # The one feature libvirt acts upon for a daemon it starts with <binary path>.
    assert "separate-options" in features
    # libvirt refuses to migrate a domain with a virtiofs share unless the daemon has it.
    assert "migrate-precopy" in features


def test_print_capabilities_needs_no_other_option(work: Path) -> None:
    # libvirt runs the binary with this option alone, from any directory.
    result = subprocess.run(
        [*DAEMON, "--print-capabilities"],
        capture_output=True,
        text=True,
        cwd=work,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["type"] == "fs"
    assert list(work.iterdir()) == []


def test_vhost_user_descriptor_matches_the_daemon() -> None:
    descriptor = json.loads(DESCRIPTOR.read_text())
    assert set(descriptor) <= {"description", "type", "binary", "features", "tags"}
    assert descriptor["type"] == "fs"
    assert isinstance(descriptor["description"], str) and descriptor["description"]
    assert os.path.isabs(descriptor["binary"])
    assert descriptor["features"] == capabilities()["features"]


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("pyvirtiofsd ")
    helptext = run_cli("--help")
    assert helptext.returncode == 0
    for option in ("--socket-path", "--fd", "--shared-dir", "--cache", "--print-capabilities"):
        assert option in helptext.stdout


# -- refused command lines --------------------------------------------------------------------

LONG_TAG = "t" * 37

# (arguments, what the message says); {sock} and {dir} are filled in. Each case is otherwise
# a command line that would start serving, so the refusal is for the stated reason alone.
INVALID = {
    "missing-shared-dir": (["--socket-path", "{sock}", "--shared-dir", "{dir}/nope"],
                           "does not exist or is not a directory"),
    "shared-dir-is-a-file": (["--socket-path", "{sock}", "--shared-dir", "{dir}/hello.txt"],
                             "does not exist or is not a directory"),
    "o-source-missing": (["--socket-path", "{sock}", "-o", "source={dir}/nope"],
                         "does not exist or is not a directory"),
    "no-shared-dir": (["--socket-path", "{sock}"], "--shared-dir (or -o source=DIR"),
    "bad-cache": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--cache", "sometimes"],
                  "argument --cache: invalid choice: 'sometimes'"),
    "bad-o-cache": (["--socket-path", "{sock}", "-o", "source={dir},cache=sometimes"],
                    "-o cache: invalid value 'sometimes'"),
    "tag-too-long": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--tag", LONG_TAG],
                     "--tag must be 1 to 36 bytes long"),
    "empty-tag": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--tag="],
                  "--tag must be 1 to 36 bytes long"),
    "unknown-o-option": (["--socket-path", "{sock}", "-o", "source={dir},frobnicate"],
                         "unknown -o option 'frobnicate'"),
    "o-xattrmap-bad-type": (["--socket-path", "{sock}", "-o", "source={dir},xattrmap=:x:"],
                            "--xattrmap: rule 1: unknown type 'x'"),
    "xattrmap-bad-scope": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--xattrmap",
                            ":ok:all::: :ok:guest:::"], "rule 2: unknown scope 'guest'"),
    "xattrmap-unclosed": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--xattrmap",
                           ":ok:all:::  /bad/all//"], "rule 2 (at character 13) has no closing"),
    "xattrmap-empty": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--xattrmap",
                        " \n "], "--xattrmap: no rules"),
    "xattrmap-map-not-last": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                               "--xattrmap", ":map::user.virtiofs.: :ok:all:::"],
                              "rule 1: a map rule must be the last rule"),
    # virtiofsd 1.14 starts with these and panics on the first name no rule matches.
    "xattrmap-undecided": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--xattrmap",
                            ":prefix:client:trusted.:user.virtiofs.:"],
                           "no rule decides every guest name (one of scope client or all with "
                           "an empty key, such as ':ok:all:::' or ':bad:all:::' at the end); "
                           "no rule decides every host name"),
    "xattrmap-guest-undecided": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                                  "--xattrmap", "/prefix/all/trusted./u.v./ /ok/server///"],
                                 "does not always decide"),
    "xattrmap-host-undecided": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                                 "--xattrmap", "/prefix/all//user.virtiofs./ /ok/client///"],
                                "undecided: no rule decides every host name (one of scope server"),
    "xattrmap-opendal": (["--socket-path", "{sock}", "--opendal", "memory", "--xattrmap",
                          ":map::user.virtiofs.:"], "--security-label serve a --shared-dir, not"),
    "security-label-opendal": (["--socket-path", "{sock}", "--opendal", "memory",
                                "--security-label=auto"], "serve a --shared-dir, not --opendal"),
    "security-label-mode": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                             "--security-label=sometimes"],
                            "argument --security-label: invalid choice: 'sometimes'"),
    "switch-with-a-value": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                             "--migration-confirm-paths=yes"],
                            "argument --migration-confirm-paths: ignored explicit argument 'yes'"),
    "translate-form": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                        "--translate-uid", "map:1:2"], "expected map:GUEST:HOST:COUNT"),
    "translate-type": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                        "--translate-gid=swap:1:2:3"], "the rule's type must be one of map"),
    "translate-wraps": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                         "--translate-uid", "forbid-guest:6000:4294967295"],
                        "'forbid-guest:6000:4294967295' runs past id 4294967295: the last number "
                        "is a count"),
    "translate-to-no-id": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                            "--translate-uid", "map:0:4294967295:1"], "(uid_t)-1"),
    # virtiofsd's work item 198: the second number read as an end
    "translate-overlap": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                           "--translate-uid=forbid-guest:0:999", "--translate-uid=map:1000:1000:1",
                           "--translate-uid=forbid-guest:1001:1999",
                           "--translate-uid=map:2000:2000:1"],
                          "--translate-uid rules 'forbid-guest:1001:1999' (guest uids 1001-2999) "
                          "and 'map:2000:2000:1' (guest uid 2000) both match guest uid 2000"),
    "translate-shared-ids": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                              "--translate-gid", "map:0:5000:10", "--translate-gid",
                              "host:6000:5:1"],
                             "--translate-gid rules 'map:0:5000:10' and 'host:6000:5:1' both make "
                             "guest gid 5"),
    "translate-posix-acl": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                             "--translate-uid", "map:0:100000:65536", "--posix-acl"],
                            "--posix-acl exclude each other"),
    "translate-o-posix-acl": (["--socket-path", "{sock}", "-o", "source={dir},posix_acl",
                               "--translate-gid", "map:0:100000:65536"],
                              "--posix-acl exclude each other"),
    "translate-opendal": (["--socket-path", "{sock}", "--opendal", "memory",
                           "--translate-uid", "map:0:100000:65536"],
                          "translate the ids of a --shared-dir"),
    "uid-map-form": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--uid-map",
                      "0:1000:1", "--gid-map", ":0:1000:1:"], "expected :inside:outside:count:"),
    "uid-map-count": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--uid-map",
                       ":0:1000:0:", "--gid-map", ":0:1000:1:"], "count must be at least 1"),
    "uid-map-alone": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--uid-map",
                       ":0:1000:1:"], "--uid-map and --gid-map go together"),
    "uid-map-without-root": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--uid-map",
                              ":1:1000:1:", "--gid-map", ":0:1000:1:"], "must map uid 0"),
    "gid-map-overlap": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--uid-map",
                         ":0:1000:1:", "--gid-map", ":0:100000:10:", "--gid-map",
                         ":5:200000:10:"], "--gid-map ranges overlap inside"),
    "uid-map-and-mount": (["--mount", "{dir}", "--shared-dir", "{dir}", "--uid-map",
                           ":0:1000:1:", "--gid-map", ":0:1000:1:"], "not --mount"),
    "keep-listening-and-mount": (["--mount", "{dir}", "--shared-dir", "{dir}",
                                  "--keep-listening"], "--keep-listening needs a vhost-user"),
    "keep-listening-and-opendal": (["--socket-path", "{sock}", "--opendal", "memory",
                                    "--keep-listening"],
                                   "--keep-listening does not work with --opendal"),
    "unknown-option": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--frobnicate"],
                       "unrecognized arguments: --frobnicate"),
    "socket-and-fd": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--fd", "0"],
                      "--socket-path, --fd and --mount exclude each other"),
    "socket-and-mount": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--mount", "{dir}"],
                         "--socket-path, --fd and --mount exclude each other"),
    "no-transport": (["--shared-dir", "{dir}"],
                     "one of --socket-path, --fd or --mount is required"),
    "shared-dir-and-opendal": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                                "--opendal", "memory"], "--opendal and --shared-dir exclude"),
    "passthrough-without-mount": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                                   "--fuse-passthrough"], "--fuse-passthrough only works with"),
    "allow-other-without-mount": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                                   "--allow-other"], "--allow-other only works with --mount"),
    "io-uring-without-mount": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                                "--fuse-io-uring"], "--fuse-io-uring only works with --mount"),
    "io-uring-mount-in-share": (["--shared-dir", "{dir}", "--mount", "{dir}", "--fuse-io-uring"],
                                "the mount point lies inside the shared directory"),
    "zero-queues": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                     "--num-request-queues", "0"], "--num-request-queues must be between"),
    "queue-size": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--queue-size", "1000"],
                   "--queue-size must be a power of two"),
    "dax-window-unaligned": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                              "--dax-window", "3M"], "--dax-window must be a multiple of 2M"),
    "dax-window-readonly": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                             "--dax-window", "64M", "--readonly"],
                            "--dax-window and --readonly exclude each other"),
    "bad-sandbox": (["--socket-path", "{sock}", "--shared-dir", "{dir}", "--sandbox", "jail"],
                    "argument --sandbox: invalid choice"),
    "negative-thread-pool": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                              "--thread-pool-size", "-1"], "must not be negative"),
    "unknown-socket-group": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                              "--socket-group", "no-such-group-here"],
                             "no group named 'no-such-group-here'"),
    "bad-migration-mode": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                            "--migration-mode", "guess"],
                           "argument --migration-mode: invalid choice: 'guess'"),
    "bad-migration-on-error": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                                "--migration-on-error", "ignore"],
                               "argument --migration-on-error: invalid choice: 'ignore'"),
    "verify-handles-with-handles": (["--socket-path", "{sock}", "--shared-dir", "{dir}",
                                     "--migration-mode", "file-handles",
                                     "--migration-verify-handles"],
                                    "--migration-verify-handles goes with --migration-mode "
                                    "find-paths only"),
    "migration-and-opendal": (["--socket-path", "{sock}", "--opendal", "memory",
                               "--migration-on-error", "guest-error"],
                              "--migration-on-error needs a --shared-dir served over vhost-user"),
    "migration-and-mount": (["--mount", "{dir}", "--shared-dir", "{dir}",
                             "--migration-mode", "file-handles"],
                            "--migration-mode needs a --shared-dir served over vhost-user"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_command_lines(case: str, work: Path, shared: Path) -> None:
    template, message = INVALID[case]
    sock = work / "vhost.sock"
    args = [a.format(sock=sock, dir=shared) for a in template]
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert result.stderr.startswith("pyvirtiofsd: ") or "usage:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not sock.exists(), "the socket was created for a refused command line"
    assert sorted(p.name for p in work.iterdir()) == ["share"]


def _non_listening_unix() -> socket.socket:
    a, b = socket.socketpair()
    b.close()
    return a


def _tcp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _udp_unix(work: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(work / "dgram.sock"))
    return s


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("pipe", "--fd {fd}: "),
        ("regular-file", "--fd {fd}: "),
        ("closed", "--fd {fd}: Bad file descriptor"),
        ("connected-unix", "--fd {fd} is not a listening socket"),
        ("tcp-listener", "--fd {fd} is not a Unix stream socket"),
        ("unix-datagram", "--fd {fd} is not a Unix stream socket"),
    ],
)
def test_fd_that_is_no_listening_unix_socket(
    kind: str, message: str, work: Path, shared: Path
) -> None:
    keep: list[object] = []
    if kind == "pipe":
        r, w = os.pipe()
        keep += [r, w]
        fd = r
    elif kind == "regular-file":
        fd = os.open(shared / "hello.txt", os.O_RDONLY)
        keep.append(fd)
    elif kind == "closed":
        fd = 987
    else:
        s = {"connected-unix": _non_listening_unix, "tcp-listener": _tcp_listener}.get(
            kind, lambda: _udp_unix(work)
        )()
        keep.append(s)
        fd = s.fileno()
    try:
        before = sorted(p.name for p in work.iterdir())
        passed = () if kind == "closed" else (fd,)
        result = run_cli(f"--fd={fd}", "-o", f"source={shared}", pass_fds=passed)
    finally:
        for item in keep:
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()  # type: ignore[attr-defined]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message.format(fd=fd) in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in work.iterdir()) == before


# -- libvirt's shape: --fd=N with a socket the caller listens on -------------------------------


def libvirt_daemon(
    work: Path, shared: Path, options: str, *extra: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start the daemon as libvirt 9.0 does: it creates and listens on the socket, passes it
    as an inherited fd, and names the directory with ``-o source=``."""
    path = work / "libvirt-fs.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    log = work / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*DAEMON, f"--fd={fd}", "-o", f"source={shared}{options}", *extra],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    # libvirt keeps no use for its copy once the daemon has it.
    listener.close()
    return proc, path, log


def test_libvirt_command_line_serves(work: Path, shared: Path) -> None:
    proc, path, log = libvirt_daemon(work, shared, ",cache=none,xattr,flock,posix_lock")
    try:
        with Frontend.connect(str(path)) as fe:
            q = fe.setup(queues=(0, 1), queue_size=64)[1]
            fuse = fuse_over(q)
            # As the kernel does; FuseClient.setxattr sends the extended fuse_setxattr_in.
            fuse.init(abi.InitFlag.SETXATTR_EXT)
            entry = fuse.lookup(abi.ROOT_ID, b"hello.txt")
            opened = fuse.open(entry.nodeid)
            # cache=none is virtiofsd's old name for "never": no page cache in the guest.
            assert opened.open_flags & abi.FOPEN_DIRECT_IO
            assert fuse.read(entry.nodeid, opened.fh, 0, 100) == b"hello, libvirt\n"
            fuse.release(entry.nodeid, opened.fh)
            # xattr was asked for, so user xattrs reach the host file.
            fuse.setxattr(entry.nodeid, b"user.libvirt", b"yes")
            assert fuse.getxattr(entry.nodeid, b"user.libvirt") == b"yes"
        rc = wait_exit(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = check_clean_log(log)
    assert rc == 0, text
    assert os.getxattr(shared / "hello.txt", "user.libvirt") == b"yes"


def test_libvirt_command_line_without_xattr_refuses_xattrs(work: Path, shared: Path) -> None:
    # The same shape with libvirt's other knobs; no "xattr", so xattrs stay off.
    proc, path, log = libvirt_daemon(
        work, shared, ",cache=auto,sandbox=chroot,posix_lock,flock", "--thread-pool-size=4"
    )
    try:
        with Frontend.connect(str(path)) as fe:
            fuse = fuse_over(fe.setup(queues=(0, 1), queue_size=64)[1])
            fuse.init(abi.InitFlag.SETXATTR_EXT)
            entry = fuse.lookup(abi.ROOT_ID, b"hello.txt")
            assert not fuse.open(entry.nodeid).open_flags & abi.FOPEN_DIRECT_IO
            with pytest.raises(OSError) as info:
                fuse.setxattr(entry.nodeid, b"user.libvirt", b"no")
            assert info.value.errno in (errno.ENOSYS, errno.EOPNOTSUPP)
        rc = wait_exit(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, check_clean_log(log)
    check_clean_log(log)


# -- Incus's shape: --translate-uid/--translate-gid around its idmap -----------------------------


def incus_translation(kind: str, entries: list[tuple[int, int, int]]) -> list[str]:
    """The arguments Incus (internal/server/device/device_utils_disk.go) passes for a VM's
    sorted idmap entries (nsid, hostid, range), spelled as it spells them."""
    args, last = [], 0
    for nsid, hostid, count in entries:
        args.append(f"--translate-{kind}=map:{nsid}:{hostid}:{count}")
        args.append(f"--translate-{kind}=forbid-guest:{last}:{nsid - last}")
        last = nsid + count
    if last < 4294967295:
        args.append(f"--translate-{kind}=forbid-guest:{last}:{4294967295 - last}")
    return args


def test_incus_command_line_serves_translated_ids(work: Path, shared: Path) -> None:
    """Incus's argv unchanged (a count-0 forbid-guest included): guest ids are the map's host
    ids, the host's own ids show as no one, ids past the map are EPERM."""
    if os.geteuid() != 0:
        pytest.skip("acting as the caller needs root")
    shared.chmod(0o777)
    os.chown(shared / "hello.txt", 1001000, 1001000)
    (shared / "hosts").write_text("host root's")
    entries = [(0, 1000000, 1000000000)]
    path = work / "incus.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    args = [f"--fd={fd}", "--cache=never", f"--shared-dir={shared}",
            *incus_translation("uid", entries), *incus_translation("gid", entries)]  # fmt: skip
    assert "--translate-uid=forbid-guest:0:0" in args
    log = work / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*DAEMON, *args], pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    listener.close()
    try:
        with Frontend.connect(str(path)) as fe:
            fuse = fuse_over(fe.setup(queues=(0, 1), queue_size=64)[1])
            fuse.init()
            hello = fuse.lookup(abi.ROOT_ID, b"hello.txt")
            hosts = fuse.lookup(abi.ROOT_ID, b"hosts")
            made = fuse.create(abi.ROOT_ID, b"by-1000", uid=1000, gid=1000)[0]
            with pytest.raises(PermissionError):
                fuse.create(abi.ROOT_ID, b"by-2000000000", uid=2000000000, gid=1000)
        rc = wait_exit(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = check_clean_log(log)
    assert rc == 0, text
    assert (hello.uid, hello.gid) == (1000, 1000)
    assert (hosts.uid, hosts.gid) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert (made.uid, made.gid) == (1000, 1000)
    st = os.stat(shared / "by-1000")
    assert (st.st_uid, st.st_gid) == (1001000, 1001000)
    assert not (shared / "by-2000000000").exists()


# -- stopping ---------------------------------------------------------------------------------


def socket_daemon(
    work: Path, shared: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    path = work / "vhost.sock"
    log = work / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*DAEMON, "--socket-path", str(path), "--shared-dir", str(shared), *extra],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    wait_for_path(path, proc, log)
    return proc, path, log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops_a_waiting_daemon(signum: int, work: Path, shared: Path) -> None:
    proc, path, log = socket_daemon(work, shared)
    proc.send_signal(signum)
    rc = wait_exit(proc, log)
    text = check_clean_log(log)
    assert rc == 0, text
    assert not path.exists(), "the socket outlived the daemon"
    assert f"signal {signum}" in text


def test_sigterm_stops_a_serving_daemon(work: Path, shared: Path) -> None:
    proc, path, log = socket_daemon(work, shared)
    with Frontend.connect(str(path)) as fe:
        fuse = fuse_over(fe.setup(queues=(0, 1), queue_size=64)[1])
        fuse.init()
        fuse.getattr(abi.ROOT_ID)
        proc.send_signal(signal.SIGTERM)
        rc = wait_exit(proc, log)
        with pytest.raises(FrontendError):
            fe.get_queue_num()  # the daemon hung up
    text = check_clean_log(log)
    assert rc == 0, text
    assert not path.exists()


def test_sigusr1_logs_counters_and_keeps_serving(work: Path, shared: Path) -> None:
    proc, path, log = socket_daemon(work, shared)
    with Frontend.connect(str(path)) as fe:
        fuse = fuse_over(fe.setup(queues=(0, 1), queue_size=64)[1])
        fuse.init()
        for _ in range(3):
            fuse.getattr(abi.ROOT_ID)
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + EXIT_GUARD
        while "GETATTR=3" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "requests served: GETATTR=3 INIT=1" in log.read_text()
        fuse.getattr(abi.ROOT_ID)
    rc = wait_exit(proc, log)
    text = check_clean_log(log)
    assert rc == 0, text
    assert "requests served: GETATTR=4 INIT=1" in text


def test_lock_options_of_the_old_form(shared: Path, work: Path) -> None:
    from pyvirtiofsd.cli import parse_args

    sock = str(work / "s.sock")
    config = parse_args(["--socket-path", sock, "-o", f"source={shared},no_posix_lock,no_flock"])
    assert config is not None
    assert not config.server.posix_locks and not config.server.flock_locks
    config = parse_args(["--socket-path", sock, "-o", f"source={shared},posix_lock,flock"])
    assert config is not None and config.server.posix_locks and config.server.flock_locks
    assert not (work / "s.sock").exists()


def test_xattrmap_and_security_label_forms(shared: Path, work: Path) -> None:
    """virtiofsd's spellings: --security-label alone is "always", -o security_label and
    no_security_label are switches, -o xattrmap= is the map; each implies --xattr."""
    from pyvirtiofsd.backends.passthrough import PassthroughConfig, SecurityLabel, XattrMap
    from pyvirtiofsd.cli import parse_args

    sock = str(work / "s.sock")

    def backend(*args: str) -> PassthroughConfig:
        config = parse_args(["--socket-path", sock, *args])
        assert config is not None and isinstance(config.backend, PassthroughConfig)
        return config.backend

    d = f"--shared-dir={shared}"
    assert backend(d).security_label is SecurityLabel.NEVER
    assert not backend(d).xattr
    for args, mode in [
        ((d, "--security-label"), SecurityLabel.ALWAYS),
        ((d, "--security-label", "--readonly"), SecurityLabel.ALWAYS),
        ((d, "--security-label=auto"), SecurityLabel.AUTO),
        ((d, "--security-label=always"), SecurityLabel.ALWAYS),
        (("-o", f"source={shared},security_label"), SecurityLabel.ALWAYS),
        (("-o", f"source={shared},security_label,no_security_label"), SecurityLabel.NEVER),
    ]:
        config = backend(*args)
        assert config.security_label is mode, args
        assert config.xattr is (mode is not SecurityLabel.NEVER), args
    assert backend(d, "--security-label=never").security_label is SecurityLabel.NEVER
    rules = "/prefix/all/trusted./user.virtiofs./ /ok/all///"
    for args in [(d, "--xattrmap", rules), ("-o", f"source={shared},xattrmap={rules}")]:
        config = backend(*args)
        assert config.xattrmap == XattrMap.parse(rules)
        assert config.xattr
    assert not (work / "s.sock").exists()


def test_capabilities_offer_the_security_label_modes() -> None:
    # libvirt and others read this before passing --security-label=auto|always|never.
    assert "security-label-negotiation-mode" in capabilities()["features"]


# -- options and the configs they set -----------------------------------------------------------


def _config_classes() -> list[type]:
    pytest.importorskip("opendal")
    from pyvirtiofsd.backends.opendal import OpendalConfig
    from pyvirtiofsd.backends.passthrough import PassthroughConfig
    from pyvirtiofsd.daemon import DaemonConfig, ProcessConfig
    from pyvirtiofsd.fuse.server import ServerConfig
    from pyvirtiofsd.transport.fusedev import FuseMountConfig
    from pyvirtiofsd.transport.virtiofs import VhostUserConfig

    return [
        VhostUserConfig,
        FuseMountConfig,
        PassthroughConfig,
        OpendalConfig,
        ServerConfig,
        ProcessConfig,
        DaemonConfig,
    ]


def test_every_option_names_a_config_field() -> None:
    """The command line owns no setting: each option (and each ``-o`` form) sets the field of
    its name in a layer's config, so that no option is copied field by field."""
    from pyvirtiofsd import cli

    fields = {f.name for cls in _config_classes() for f in dataclasses.fields(cls)}
    own = {"help", "version", "print_capabilities", "compat_options", "debug"}
    dests = {
        a.dest
        for a in cli.build_parser()._actions
        if a.dest not in own and not a.dest.startswith("ignored_")
    }
    assert dests - fields == set()
    compat = {
        *cli._COMPAT_SWITCHES.values(),
        *cli._COMPAT_ON.values(),
        *(dest for dest, _ in cli._COMPAT_VALUES.values()),
    }
    assert compat - fields == set()


def test_configs_are_frozen() -> None:
    for cls in _config_classes():
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]


def test_options_not_given_leave_the_configs_defaults(shared: Path, work: Path) -> None:
    from pyvirtiofsd.backends.passthrough import PassthroughConfig
    from pyvirtiofsd.cli import parse_args
    from pyvirtiofsd.daemon import ProcessConfig
    from pyvirtiofsd.fuse.server import ServerConfig
    from pyvirtiofsd.transport.virtiofs import VhostUserConfig

    sock = str(work / "s.sock")
    config = parse_args(["--socket-path", sock, "--shared-dir", str(shared)])
    assert config is not None
    assert config.transport == VhostUserConfig(socket_path=sock)
    assert config.backend == PassthroughConfig(str(shared))
    assert config.server == ServerConfig()
    assert config.process == ProcessConfig()


def test_migration_options_fill_the_passthrough_config(shared: Path, work: Path) -> None:
    from pyvirtiofsd.backends.passthrough import PassthroughConfig
    from pyvirtiofsd.backends.passthrough.config import MigrationMode, MigrationOnError
    from pyvirtiofsd.cli import parse_args

    sock = str(work / "s.sock")
    base = ["--socket-path", sock, "--shared-dir", str(shared)]
    config = parse_args(base)
    assert config is not None and isinstance(config.backend, PassthroughConfig)
    assert config.backend.migration_mode is MigrationMode.FIND_PATHS
    assert config.backend.migration_on_error is MigrationOnError.ABORT
    config = parse_args(
        [
            *base,
            "--migration-mode",
            "file-handles",
            "--migration-on-error",
            "guest-error",
            "--migration-confirm-paths",
        ]
    )
    assert config is not None and isinstance(config.backend, PassthroughConfig)
    assert config.backend.migration_mode is MigrationMode.FILE_HANDLES
    assert config.backend.migration_on_error is MigrationOnError.GUEST_ERROR
    assert config.backend.migration_confirm_paths
    config = parse_args([*base, "--migration-verify-handles"])
    assert config is not None and isinstance(config.backend, PassthroughConfig)
    assert config.backend.migration_verify_handles


def test_keep_listening_is_the_transports(shared: Path, work: Path) -> None:
    from pyvirtiofsd.cli import parse_args
    from pyvirtiofsd.transport.virtiofs import VhostUserConfig

    sock = str(work / "s.sock")
    config = parse_args(["--socket-path", sock, "--shared-dir", str(shared), "--keep-listening"])
    assert config is not None
    assert config.transport == VhostUserConfig(socket_path=sock, keep_listening=True)
    assert "--keep-listening" in run_cli("--help").stdout


def test_allow_other_is_the_mounts(shared: Path, work: Path) -> None:
    from pyvirtiofsd.cli import parse_args
    from pyvirtiofsd.transport.fusedev import FuseMountConfig

    base = ["--shared-dir", str(shared), "--mount", str(work)]
    config = parse_args(base)
    assert config is not None and config.transport == FuseMountConfig(str(work))
    config = parse_args([*base, "--allow-other"])
    assert config is not None
    assert config.transport == FuseMountConfig(str(work), allow_other=True)


# -- --queue-size ------------------------------------------------------------------------------


@pytest.mark.parametrize("largest", [None, 64], ids=["default", "64"])
def test_queue_size_is_the_largest_ring_a_front_end_may_set_up(
    largest: int | None, work: Path, shared: Path
) -> None:
    extra = [] if largest is None else ["--queue-size", str(largest)]
    proc, path, log = socket_daemon(work, shared, *extra)
    largest = largest or 32768  # the most virtio allows, as virtiofsd accepts
    try:
        with Frontend.connect(str(path)) as fe:
            fe.negotiate()
            assert fe.has_protocol(ProtocolFeature.REPLY_ACK)
            too_big = VringState(1, largest * 2).encode()
            assert fe.status_of(FrontendReq.SET_VRING_NUM, too_big) != 0
            fe.ram = GuestRam(64 << 20)
            fe.share_ram(fe.ram)
            fuse = fuse_over(fe.start_queue(1, largest))
            fuse.init()
            assert fuse.lookup(abi.ROOT_ID, b"hello.txt").nodeid
        rc = wait_exit(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = check_clean_log(log)
    assert rc == 0, text
    assert f"ring size {largest * 2} is not a power of two up to {largest}" in text


# -- --allow-devices ---------------------------------------------------------------------------


@pytest.mark.parametrize("allow", [False, True])
def test_allow_devices_decides_whether_mknod_makes_devices(
    allow: bool, work: Path, shared: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("making device nodes needs root")
    path = work / "vhost.sock"
    log = work / "daemon.log"
    args = ["--socket-path", str(path), "--shared-dir", str(shared)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*DAEMON, *args, *(["--allow-devices"] if allow else [])],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        wait_for_path(path, proc, log)
        with Frontend.connect(str(path)) as fe:
            fuse = fuse_over(fe.setup(queues=(0, 1), queue_size=64)[1])
            fuse.init()
            rdev = os.stat("/dev/null").st_rdev
            if allow:
                fuse.mknod(abi.ROOT_ID, b"null", 0o020600, rdev)
                assert os.lstat(shared / "null").st_rdev == rdev
            else:
                with pytest.raises(OSError) as info:
                    fuse.mknod(abi.ROOT_ID, b"null", 0o020600, rdev)
                assert info.value.errno == errno.EPERM
                assert not os.path.lexists(shared / "null")
            # FIFOs are no devices: made either way
            fuse.mknod(abi.ROOT_ID, b"fifo", 0o010600)
        rc = wait_exit(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, check_clean_log(log)
    assert "--allow-devices" in run_cli("--help").stdout
