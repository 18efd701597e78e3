"""Guest-side behaviour only a virtio-fs mount shows: submounts announced to the guest, and
locks that wait (a blocking flock answered later, without holding up the request queue)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtiofsd.vm import FsDevice, missing_assets, run_guest
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket

pytestmark = pytest.mark.vm

SCRIPT = """
mkdir -p /mnt && mount -t virtiofs share /mnt
cat /mnt/sub/inside
echo "DEVS $(stat -c %d /mnt) $(stat -c %d /mnt/sub/inside)"
for kind in flock posix; do
    /mnt/probe lock $kind wait /mnt/lockfile 3 | sed "s/^/holder $kind: /" &
    sleep 1
    /mnt/probe lock $kind try /mnt/lockfile 0 | sed "s/^/try $kind: /"
    t0=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    /mnt/probe lock $kind wait /mnt/lockfile 0 | sed "s/^/waiter $kind: /"
    echo "waited $kind $(( ($(cut -d' ' -f1 /proc/uptime | tr -d .) - t0) * 10 ))"
    wait
done
"""


def test_submounts_and_waiting_locks(tmp_path: Path, guest_probe: Path) -> None:
    missing = missing_assets(qemu="sid")
    if missing:
        pytest.skip("; ".join(missing))
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(share / "sub")], check=True)
    try:
        (share / "sub" / "inside").write_text("on a tmpfs inside the share\n")
        (share / "lockfile").write_text("")
        shutil.copy(guest_probe, share / "probe")
        sock = str(tmp_path / "fs.sock")
        log = tmp_path / "daemon.log"
        with open(log, "wb") as f:
            proc = spawn_child(
                [sys.executable, "-m", "pyvirtiofsd", "--socket-path", sock,
                 "--shared-dir", str(share)],
                stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_for_socket(sock, proc)
            result = run_guest(SCRIPT, [FsDevice(sock, "share")], qemu="sid", timeout=300)
        finally:
            kill_child(proc, grace=10)
    finally:
        subprocess.run(["umount", "-l", str(share / "sub")], check=False)
    out = result.output.splitlines()
    devs = next(line for line in out if line.startswith("DEVS")).split()
    assert devs[1] != devs[2], "the tmpfs inside the share is a submount in the guest"
    assert "on a tmpfs inside the share" in out
    for kind in ("flock", "posix"):
        assert f"try {kind}: refused" in out
        assert f"holder {kind}: unlocked" in out and f"waiter {kind}: locked" in out
        # The waiter got the lock only once the holder let it go: the holder keeps it 3 s
        # from a second before the waiter starts. (Timed, not by the order of the lines: the
        # two go to the console through two processes, in either order.)
        waited = int(next(line for line in out if line.startswith(f"waited {kind}")).split()[2])
        assert waited >= 1000, f"the {kind} waiter waited {waited} ms"
    assert "Traceback" not in log.read_text()
