"""A real Linux guest under QEMU (TCG) mounts the object-storage backend over virtio-fs and works
on it; an independent client (boto3 for s3, the directory for fs) then checks the store. The
last step fsyncs a file the guest still holds open, and the host SIGKILLs the daemon as soon as
the guest reports that fsync returned: the acknowledged data must be in the store."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opendal")

from pyvirtiofsd.vm import FsDevice, missing_assets, run_guest
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket
from tests.opendal_fixtures import Service, make_service

pytestmark = pytest.mark.vm

ENTRIES = int(os.environ.get("ODAL_GUEST_ENTRIES", "2000"))
FSYNCED = "@@FSYNCED@@"

SCRIPT = r"""
set -eu
__MOUNT__
cd /mnt/o

# --- write, read back, overwrite in the middle, append, truncate -----------------------------
dd if=/dev/urandom of=data.bin bs=65536 count=40 2>/dev/null
echo "WRITTEN $(sha256sum data.bin | cut -d' ' -f1)"
printf 'patched in the middle' | dd of=data.bin bs=1 seek=1000000 conv=notrunc 2>/dev/null
echo "PATCHED $(sha256sum data.bin | cut -d' ' -f1)"
printf 'appended' >> data.bin
echo "APPENDED $(sha256sum data.bin | cut -d' ' -f1)"
echo 3 > /proc/sys/vm/drop_caches
echo "REREAD $(sha256sum data.bin | cut -d' ' -f1)"
echo "SIZE $(stat -c %s data.bin)"
cp data.bin cut.bin
truncate -s 123456 cut.bin
truncate -s 200000 cut.bin
echo "CUT $(sha256sum cut.bin | cut -d' ' -f1)"
__FROM_HOST_SETUP__
echo "FROM_HOST $(cat from-host.txt)"

# --- a directory of __ENTRIES__ entries ---------------------------------------------------------
mkdir many
i=0
while [ $i -lt __ENTRIES__ ]; do
    echo "$i" > many/e$i
    i=$((i + 1))
done
echo 3 > /proc/sys/vm/drop_caches
echo "COUNT $(ls many | wc -l)"
echo "LONG_COUNT $(ls -l many | grep -c '^-')"
echo "LAST $(cat many/e__LAST__)"

# --- rename, unlink, rmdir ---------------------------------------------------------------------
mkdir -p tree/sub
echo one > tree/one
echo two > tree/sub/two
mv tree moved
mv moved/one moved/uno
echo temp > doomed
rm doomed
mkdir empty
rmdir empty
if rmdir moved 2>/dev/null; then echo "RMDIR_NONEMPTY allowed"
else echo "RMDIR_NONEMPTY refused"; fi
echo "LISTING $(ls | tr '\n' ' ')"

echo "ENTRIES_NOW $(ls many | wc -l)"
echo "MOVED $(cat moved/uno moved/sub/two | tr '\n' ' ')"
__DURABILITY__
echo "DONE yes"
"""


# The store can only be checked from outside on services another client can reach; on
# memory the guest's own report stands, and there is no store to survive a SIGKILL.
DURABILITY = r"""
# --- fsync, then the daemon dies ----------------------------------------------------------------
# A background process holds the file open for good: closing it would send a FLUSH, which
# uploads too, and would wait forever once the daemon is gone.
(
    exec 3>durable.txt
    printf 'acknowledged by fsync' >&3
    sync durable.txt
    echo "__FSYNCED__"
    printf '%200s\n' ''
    touch /tmp/fsynced
    exec sleep 100000
) &
cd /
while [ ! -e /tmp/fsynced ]; do sleep 0.1; done
sleep 2
"""


def require_vm() -> None:
    reasons = missing_assets(qemu="sid")
    if reasons:
        pytest.skip("; ".join(reasons))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("scheme", ["s3", "fs", "memory"])
def test_guest_on_object_storage(scheme: str, request: pytest.FixtureRequest, work: Path) -> None:
    require_vm()
    outside = scheme != "memory"  # another client can reach the store
    service: Service = (
        request.getfixturevalue(f"{scheme}_service")
        if outside
        else make_service("memory", work, lambda: request.getfixturevalue("moto_server"))
    )
    if outside:
        service.view.put("from-host.txt", b"written by another client\n")
    sock = str(work / "vfs.sock")
    log = work / "daemon.log"
    with open(log, "wb") as f:
        proc = spawn_child(
            [
                sys.executable,
                "-m",
                "pyvirtiofsd",
                "--socket-path",
                sock,
                *service.args(),
                "--opendal-cache-dir",
                str(work / "cache"),
                "--thread-pool-size",
                "8",
            ],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=f,
        )
    killed: list[bool] = []
    tail = [""]

    def on_output(text: str) -> None:
        # SIGKILL the moment the guest reports that fsync returned: no flush, no release, no
        # clean exit can add anything to the store after that.
        # Look before trimming: one chunk may carry the marker and plenty after it. Keep just
        # enough of the past to find a marker that arrives split across two chunks.
        window = tail[0] + text
        tail[0] = window[-len(FSYNCED) :]
        if os.environ.get("ODAL_GUEST_ECHO"):
            sys.stderr.write(text)
        if not killed and FSYNCED in window:
            proc.send_signal(signal.SIGKILL)
            killed.append(True)

    try:
        wait_for_socket(sock, proc)
        dev = FsDevice(sock, "objects")
        script = (
            SCRIPT.replace("__MOUNT__", dev.mount_command("/mnt/o"))
            .replace("__ENTRIES__", str(ENTRIES))
            .replace("__LAST__", str(ENTRIES - 1))
            .replace("__DURABILITY__", DURABILITY if outside else "")
            .replace("__FSYNCED__", FSYNCED)
            .replace(
                "__FROM_HOST_SETUP__",
                "" if outside else "echo 'written by another client' > from-host.txt",
            )
        )
        result = run_guest(script, [dev], qemu="sid", timeout=1200, on_output=on_output)
    finally:
        kill_child(proc)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-5000:]
    assert killed or not outside, result.output
    report = {}
    for line in result.output.splitlines():
        key, _, value = line.partition(" ")
        if key.isupper():
            report[key] = value.strip()

    assert report["COUNT"] == report["LONG_COUNT"] == report["ENTRIES_NOW"] == str(ENTRIES)
    assert report["MOVED"] == "one two"
    assert report["RMDIR_NONEMPTY"] == "refused"
    assert report["SIZE"] == str(40 * 65536 + len("appended"))
    assert report["APPENDED"] == report["REREAD"]
    assert report["DONE"] == "yes"
    if not outside:
        assert report["LISTING"].split() == sorted(
            ["cut.bin", "data.bin", "from-host.txt", "many", "moved"]
        )
        return
    view = service.view
    data = view.get("data.bin")
    assert len(data) == 40 * 65536 + len("appended") == int(report["SIZE"])
    assert data[1_000_000:1_000_021] == b"patched in the middle"
    assert data.endswith(b"appended")
    assert sha(data) == report["APPENDED"] == report["REREAD"]
    cut = view.get("cut.bin")
    assert cut == data[:123456] + b"\0" * (200000 - 123456)
    assert sha(cut) == report["CUT"]
    assert report["FROM_HOST"] == "written by another client"
    assert report["COUNT"] == report["LONG_COUNT"] == str(ENTRIES)
    assert report["LAST"] == str(ENTRIES - 1)
    assert report["DONE"] == "yes"
    keys = view.files()
    assert {k for k in keys if k.startswith("many/")} == {f"many/e{i}" for i in range(ENTRIES)}
    assert view.get("many/e77") == b"77\n"
    assert view.get("moved/uno") == b"one\n" and view.get("moved/sub/two") == b"two\n"
    assert not any(k.startswith("tree/") for k in keys)
    assert "doomed" not in keys and "empty/" not in view.names()
    assert report["RMDIR_NONEMPTY"] == "refused"
    # fsync returned, the daemon was killed at once: the store has the data.
    assert view.get("durable.txt") == b"acknowledged by fsync"


@pytest.fixture
def fs_service(work: Path) -> Service:
    from tests.opendal_fixtures import DirView

    root = work / "fsroot"
    root.mkdir()
    return Service("fs", {"root": str(root)}, DirView(root))
