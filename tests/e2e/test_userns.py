"""--uid-map/--gid-map: the daemon runs as root of its own user namespace, and a real guest's
ids become the mapped host ids.

Two daemons serve one guest: one started by root with a 65,536-id range (guest uid N is host
uid 100000+N), one started by an unprivileged user who maps only its own ids (guest root is that
user; every other guest id is refused) and, being root in there, confines itself with the
namespace sandbox as well. The host then checks who owns what the guest made.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

import pyvirtiofsd
from pyvirtiofsd.vm import FsDevice, run_guest
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket
from tests.e2e.conftest import parse_report, require_assets

pytestmark = pytest.mark.vm

BASE = 100_000  # host id of guest id 0 on the root-started daemon
USER = 4321  # the unprivileged user, who has no other ids

SCRIPT = r"""
mkdir -p /mnt/a /mnt/b
mount -t virtiofs ranged /mnt/a
mount -t virtiofs own /mnt/b
as() { /mnt/a/probe as "$@" 2>/dev/null; }

cd /mnt/a
echo "A_OWNERS $(stat -c %u:%g host-500) $(stat -c %u:%g host-root)"
echo made by guest root > by-root
mkdir users && chown 1000:1000 users
as 1000 1000 sh -c 'echo made by 1000 > /mnt/a/users/by-1000'; echo "A_USER $?"
as 1000 1000 sh -c 'echo x > /mnt/a/by-1000-at-top'; echo "A_USER_AT_TOP $?"
touch chowned && chown 7:8 chowned
if echo more >> host-root 2>/dev/null; then echo "A_HOST_ROOT written"
else echo "A_HOST_ROOT refused"; fi
echo "A_READ $(cat host-root)"

cd /mnt/b
echo "B_OWNERS $(stat -c %u:%g mine) $(stat -c %u:%g theirs)"
echo made by guest root > new; echo "B_NEW $?"
if cat theirs >/dev/null 2>&1; then echo "B_THEIRS read"; else echo "B_THEIRS refused"; fi
if chown 1000 new 2>/dev/null; then echo "B_CHOWN done"; else echo "B_CHOWN refused"; fi
mkdir open && chmod 777 open
as 1000 1000 sh -c 'echo x > /mnt/b/open/by-1000'; echo "B_USER $?"
echo "B_LIST $(ls open | wc -l)"
cd /
umount /mnt/a /mnt/b
echo "DONE yes"
"""


def _owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


def _daemon(cmd: list[str], log: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return spawn_child(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, **kwargs)


def _runnable_by_anyone(workdir: Path) -> tuple[str, Path]:
    """An interpreter and a package path an unprivileged user can run: Debian's python3 and a
    copy of the package (it has no dependencies), as the test's own interpreter and checkout
    may sit where that user can't go."""
    system_python = shutil.which("python3", path="/usr/bin")
    if system_python is None:
        pytest.skip("no /usr/bin/python3 for the unprivileged daemon")
    lib = workdir / "lib"
    shutil.copytree(Path(pyvirtiofsd.__file__).parent, lib / "pyvirtiofsd")
    return system_python, lib


def test_guest_ids_map_to_host_ids(workdir: Path, guest_probe: Path) -> None:
    require_assets("sid")
    system_python, lib = _runnable_by_anyone(workdir)

    ranged, own, run = workdir / "ranged", workdir / "own", workdir / "run"
    for d in (ranged, own, run):
        d.mkdir(mode=0o755)
        d.chmod(0o755)  # whatever umask an earlier test left behind
    os.chown(ranged, BASE, BASE)
    (ranged / "host-500").write_text("five hundred\n")
    os.chown(ranged / "host-500", BASE + 500, BASE + 500)
    (ranged / "host-root").write_text("host root\n")  # owned by the host's root: unmapped
    (ranged / "host-root").chmod(0o644)
    shutil.copy(guest_probe, ranged / "probe")
    for d in (own, run):
        os.chown(d, USER, USER)
    (own / "mine").write_text("mine\n")
    os.chown(own / "mine", USER, USER)
    (own / "theirs").write_text("secret\n")
    (own / "theirs").chmod(0o600)

    maps = ["--uid-map", f":0:{BASE}:65536:", "--gid-map", f":0:{BASE}:65536:"]
    ranged_sock, own_sock = str(workdir / "ranged.sock"), str(run / "own.sock")
    ranged_log, own_log = workdir / "ranged.log", workdir / "own.log"
    root_daemon = _daemon(
        [system_python, "-m", "pyvirtiofsd", "--socket-path", ranged_sock,
         "--shared-dir", str(ranged), "--tag", "ranged", *maps],
        ranged_log, env={**os.environ, "PYTHONPATH": str(lib)},
    )  # fmt: skip
    user_daemon = _daemon(
        [system_python, "-m", "pyvirtiofsd", "--socket-path", own_sock,
         "--shared-dir", str(own), "--uid-map", f":0:{USER}:1:", "--gid-map", f":0:{USER}:1:",
         "--sandbox", "namespace"],
        own_log, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(lib)},
        user=USER, group=USER, extra_groups=[], cwd=str(run),
    )  # fmt: skip
    try:
        wait_for_socket(ranged_sock, root_daemon)
        wait_for_socket(own_sock, user_daemon)
        devices = [FsDevice(ranged_sock, "ranged"), FsDevice(own_sock, "own")]
        result = run_guest(SCRIPT, devices, qemu="sid", timeout=300)
        statuses = [root_daemon.wait(60), user_daemon.wait(60)]
    finally:
        kill_child(root_daemon)
        kill_child(user_daemon)
    logs = ranged_log.read_text() + own_log.read_text()
    assert statuses == [0, 0], logs
    assert "Traceback" not in logs, logs
    assert logs.count("running as root of a user namespace") == 2, logs
    assert "sandboxed" in own_log.read_text()
    report = parse_report(result.output)
    assert report.get("DONE") == "yes", result.output

    # The range: guest ids are host ids minus BASE; ids outside it are the overflow id.
    assert report["A_OWNERS"] == "500:500 65534:65534"
    assert _owner(ranged / "by-root") == (BASE, BASE)
    assert report["A_USER"] == "0"
    assert (ranged / "users" / "by-1000").read_text() == "made by 1000\n"
    assert _owner(ranged / "users" / "by-1000") == (BASE + 1000, BASE + 1000)
    assert report["A_USER_AT_TOP"] != "0" and not (ranged / "by-1000-at-top").exists()
    assert _owner(ranged / "chowned") == (BASE + 7, BASE + 8)
    # The host's root is nobody in there: guest root may read its file, not write it.
    assert report["A_HOST_ROOT"] == "refused" and report["A_READ"] == "host root"
    assert (ranged / "host-root").read_text() == "host root\n"

    # Only the user's own ids: guest root is that user, and nothing more.
    assert report["B_OWNERS"] == "0:0 65534:65534"
    assert report["B_NEW"] == "0" and _owner(own / "new") == (USER, USER)
    assert report["B_THEIRS"] == "refused"
    assert report["B_CHOWN"] == "refused" and _owner(own / "new") == (USER, USER)
    assert report["B_USER"] != "0" and report["B_LIST"] == "0"
    assert list((own / "open").iterdir()) == []


SUBORDINATE_SCRIPT = r"""
mkdir -p /mnt/s && mount -t virtiofs sub /mnt/s
cd /mnt/s
echo "S_OWNERS $(stat -c %u:%g top)"
echo made by guest root > by-root
mkdir open && chmod 777 open
/mnt/s/probe as 1000 1000 sh -c 'echo made by 1000 > /mnt/s/open/by-1000'; echo "S_USER $?"
chown 5:6 by-root; echo "S_CHOWN $?"
cd / && umount /mnt/s
echo "DONE yes"
"""


def test_unprivileged_user_maps_subordinate_ids(workdir: Path, guest_probe: Path) -> None:
    """The rootless form virtiofsd documents: your own id as root, and the range /etc/subuid
    gives you for everyone else, set through newuidmap/newgidmap (.ci/setup makes the user)."""
    require_assets("sid")
    try:
        user = pwd.getpwnam("pyvirtiofsd-test")
    except KeyError:
        pytest.skip("no user pyvirtiofsd-test with subordinate ids (see .ci/setup)")
    if shutil.which("newuidmap") is None:
        pytest.skip("newuidmap is not installed (package uidmap)")
    sub = _subordinate("/etc/subuid", user.pw_name), _subordinate("/etc/subgid", user.pw_name)
    system_python, lib = _runnable_by_anyone(workdir)
    share, run = workdir / "sub", workdir / "run"
    for d in (share, run):
        d.mkdir()
        d.chmod(0o755)
        os.chown(d, user.pw_uid, user.pw_gid)
    (share / "top").write_text("")
    os.chown(share / "top", user.pw_uid, user.pw_gid)
    shutil.copy(guest_probe, share / "probe")
    sock, log = str(run / "sub.sock"), workdir / "sub.log"
    uid, gid = user.pw_uid, user.pw_gid
    daemon = _daemon(
        [system_python, "-m", "pyvirtiofsd", "--socket-path", sock, "--shared-dir", str(share),
         f"--uid-map=:0:{uid}:1:", f"--uid-map=:1:{sub[0]}:65535:",
         f"--gid-map=:0:{gid}:1:", f"--gid-map=:1:{sub[1]}:65535:"],
        log, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(lib)},
        user=uid, group=gid, extra_groups=[], cwd=str(run),
    )  # fmt: skip
    try:
        wait_for_socket(sock, daemon)
        result = run_guest(SUBORDINATE_SCRIPT, [FsDevice(sock, "sub")], qemu="sid", timeout=300)
        status = daemon.wait(60)
    finally:
        kill_child(daemon)
    text = log.read_text()
    assert status == 0 and "Traceback" not in text, text
    report = parse_report(result.output)
    assert report.get("DONE") == "yes", result.output
    assert report["S_OWNERS"] == "0:0"
    assert report["S_USER"] == "0" and report["S_CHOWN"] == "0"
    # guest id N (N >= 1) is the N-th subordinate id, counting from 1
    assert _owner(share / "open" / "by-1000") == (sub[0] + 999, sub[1] + 999)
    assert _owner(share / "by-root") == (sub[0] + 4, sub[1] + 5)


def _subordinate(path: str, name: str) -> int:
    """The first id of ``name``'s range in /etc/subuid or /etc/subgid."""
    with open(path) as f:
        for line in f:
            fields = line.strip().split(":")
            if fields[0] == name and int(fields[2]) >= 65535:
                return int(fields[1])
    pytest.skip(f"{name} has no range of 65535 ids in {path}")
