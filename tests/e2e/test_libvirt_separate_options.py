"""The command line libvirt >= 10 gives a daemon that advertises ``separate-options``, with a
real guest on the share.

libvirt 10 and later (``src/qemu/qemu_virtiofs.c``) create the vhost-user socket, listen on it
and start the daemon with it as descriptor N, with options of today's form rather than ``-o``:

    DAEMON --fd=N --shared-dir DIR [--cache never|always] [--sandbox MODE] [--xattr]
           [--thread-pool-size=N] [--rlimit-nofile=N] [--uid-map=:IN:OUT:N:]... [--gid-map=...]

This machine's libvirt is 9.0, which always uses the ``-o`` form (``test_libvirt.py`` runs that
one through libvirt itself), so the test plays libvirt here: it listens on the socket, starts
the daemon with exactly that command line, every option given, and boots a guest (QEMU 11.1,
a Debian userland for its python3) that mounts the share and uses it. It checks what each
option is for: the guest's root is host uid 100000 (``--uid-map``), a change the host makes is
seen by the guest at once (``--cache never``), user xattrs pass (``--xattr``), the open-file
limit is the one asked for, and the daemon sees the share in a private root, not at its host
path (``--sandbox namespace``). The daemon exits with status 0 when the guest is gone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirtiofsd.vm import FsDevice, run_guest
from pyvirtiofsd.vm.guest import kill_child, spawn_child
from tests.e2e.conftest import parse_report, require_assets

pytestmark = pytest.mark.vm

BASE = 100_000  # the host id of guest id 0
COUNT = 65_536
OPEN_FILES = 4096
POOL = 2
TAG = "libvirt10"
# The guest asks for the host-side change with this line, followed by padding: the harness
# hands output on only once the next 128 characters have arrived.
HOST_CHANGE = "@@HOST_CHANGE@@"

SCRIPT = rf"""
set -eu
__MOUNT__
cd /mnt/s
echo "READ $(cat from-host.txt)"
echo "HOST_OWNER $(stat -c %u:%g from-host.txt)"
echo "written by the guest" > from-guest.txt
mkdir guest-dir && echo nested > guest-dir/file && chown 1000:1000 guest-dir/file
python3 - <<'EOF'
import os
os.setxattr("from-guest.txt", "user.libvirt", b"yes")
print("XATTR", os.getxattr("from-guest.txt", "user.libvirt").decode())
print("HOST_XATTR", os.getxattr("from-host.txt", "user.origin").decode())
EOF
echo "LIVE_BEFORE $(cat live.txt)"
echo "{HOST_CHANGE}"
printf '%200s\n' ''
i=0
while [ ! -e go ]; do
    i=$((i + 1)); [ $i -lt 600 ] || exit 3
    sleep 0.1
done
echo "LIVE_AFTER $(cat live.txt)"
echo "LISTING $(ls | tr '\n' ' ')"
cd /
umount /mnt/s
echo "DONE yes"
"""


class HostChange:
    """Rewrites ``live.txt`` in place when the guest asks, then drops ``go``."""

    def __init__(self, share: Path) -> None:
        self.share = share
        self.seen = ""
        self.done = False

    def __call__(self, text: str) -> None:
        self.seen += text
        if self.done or HOST_CHANGE not in self.seen:
            return
        self.done = True
        # The same inode, longer: a guest that cached the file would show the old bytes.
        with (self.share / "live.txt").open("r+b") as f:
            f.write(b"changed by the host meanwhile")
        go = self.share / "go"
        go.touch()
        os.chown(go, BASE, BASE)


def libvirt10_argv(fd: int, share: Path) -> list[str]:
    """What libvirt >= 10 passes, option by option, in its order."""
    return [
        f"--fd={fd}",
        "--shared-dir", str(share),
        "--cache", "never",
        "--sandbox", "namespace",
        "--xattr",
        f"--thread-pool-size={POOL}",
        f"--rlimit-nofile={OPEN_FILES}",
        f"--uid-map=:0:{BASE}:{COUNT}:",
        f"--gid-map=:0:{BASE}:{COUNT}:",
    ]  # fmt: skip


def open_file_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit")


def test_libvirt10_command_line_serves_a_guest(workdir: Path) -> None:
    require_assets("sid", rootfs="sid")
    share = workdir / "share"
    share.mkdir()
    share.chmod(0o755)
    os.chown(share, BASE, BASE)
    (share / "from-host.txt").write_text("hello from the host\n")
    os.setxattr(share / "from-host.txt", "user.origin", b"host")
    os.chown(share / "from-host.txt", BASE + 5, BASE + 5)
    (share / "live.txt").write_text("old contents\n")
    os.chown(share / "live.txt", BASE, BASE)

    # As libvirt: it makes the socket, listens, and hands the daemon the descriptor.
    path = workdir / "libvirt10-fs.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    argv = libvirt10_argv(fd, share)
    log = workdir / "daemon.log"
    with log.open("wb") as out:
        proc = spawn_child(
            [sys.executable, "-m", "pyvirtiofsd", *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(fd,),
        )  # fmt: skip
    listener.close()  # the daemon has its copy
    try:
        _run(proc, log, share, path)
    finally:
        kill_child(proc, grace=5.0)


def _run(proc: subprocess.Popen[bytes], log: Path, share: Path, path: Path) -> None:
    def text() -> str:
        return log.read_text(errors="replace")

    # The daemon listens once it is set up: namespace, sandbox, limit in place.
    deadline = time.monotonic() + 30
    while "waiting for a vhost-user front-end" not in text():
        assert proc.poll() is None, f"the daemon exited:\n{text()}"
        assert time.monotonic() < deadline, f"the daemon did not start:\n{text()}"
        time.sleep(0.05)
    pid = proc.pid
    assert open_file_limit(pid) == OPEN_FILES
    assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", str(BASE), str(COUNT)]
    assert Path(f"/proc/{pid}/gid_map").read_text().split() == ["0", str(BASE), str(COUNT)]
    # The sandbox: the share is /share of a private root, where its host path is not.
    root = Path(f"/proc/{pid}/root")
    assert sorted(os.listdir(root / "share")) == sorted(os.listdir(share))
    assert not (root / share.relative_to("/")).exists()

    device = FsDevice(str(path), TAG)
    host_change = HostChange(share)
    result = run_guest(
        SCRIPT.replace("__MOUNT__", device.mount_command("/mnt/s")),
        [device],
        rootfs="sid",
        timeout=300,
        on_output=host_change,
    )
    rc = proc.wait(60)
    daemon_log = text()
    assert result.status == 0, result.output + result.kernel_log[-3000:] + daemon_log[-3000:]
    report = parse_report(result.output)
    assert report.get("DONE") == "yes", result.output
    assert rc == 0, daemon_log[-4000:]
    assert "Traceback" not in daemon_log, daemon_log[-6000:]
    assert " WARNING " not in daemon_log and " ERROR " not in daemon_log, daemon_log[-4000:]

    # --uid-map/--gid-map: guest ids are host ids from BASE, both ways.
    assert report["HOST_OWNER"] == "5:5"
    assert (share / "from-guest.txt").read_text() == "written by the guest\n"
    st = (share / "from-guest.txt").stat()
    assert (st.st_uid, st.st_gid) == (BASE, BASE)
    st = (share / "guest-dir" / "file").stat()
    assert (st.st_uid, st.st_gid) == (BASE + 1000, BASE + 1000)
    # --xattr: user xattrs both ways.
    assert report["XATTR"] == "yes" and report["HOST_XATTR"] == "host"
    assert os.getxattr(share / "from-guest.txt", "user.libvirt") == b"yes"
    # --cache never: the host's change, seen at once.
    assert host_change.done
    assert report["LIVE_BEFORE"] == "old contents"
    assert report["LIVE_AFTER"] == "changed by the host meanwhile"
    assert report["READ"] == "hello from the host"
    assert report["LISTING"].split() == sorted(os.listdir(share))
    # An inherited socket is libvirt's: the daemon leaves its file alone.
    assert path.is_socket()
