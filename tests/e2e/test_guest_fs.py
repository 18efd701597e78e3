"""A real Linux guest under QEMU 7.2 (bookworm) and 11.1 (sid) uses shares served by the daemon.

One guest per QEMU version, with two virtio-fs devices, each served by its own
``python -m pyvirtiofsd`` process:

* ``share`` (default options): listing, create, write, read, rename, delete, chmod, symlink,
  hard link; bytes written on one side are identical on the other; a 256 MiB file copied in
  the guest hashes the same on the host; a tar of a few thousand files extracts and
  ``find | wc -l`` agrees with the host;
* ``live``, with ``--cache never``: the host changes files while the guest waits, and the
  guest sees the change at once. Beside QEMU 7.2 this daemon is started the way bookworm's
  libvirt 9.0 starts it (``--fd=N -o source=DIR,cache=none,xattr,flock,posix_lock``, on a
  socket the test listens on), beside 11.1 with ``--socket-path ... --cache never``.

The guest prints ``KEY value`` lines; the host checks them, and the files themselves, with
Python. Both daemons must exit with status 0, with no traceback, when the guest powers off.
"""

from __future__ import annotations

import filecmp
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from pyvirtiofsd.vm import FsDevice, run_guest
from tests.e2e.conftest import (
    DaemonFactory,
    parse_report,
    require_assets,
    sha256_file,
    write_random,
)

pytestmark = pytest.mark.vm

MiB = 1 << 20
BIG_SIZE = 256 * MiB
TREE_DIRS = 40
TREE_FILES_PER_DIR = 75
TREE_SYMLINKS = 25
LIVE_OLD = b"old contents\n"
LIVE_NEW = b"new contents, longer than the old ones\n"
# The guest asks for the host-side change with this line. The harness hands script output on
# only once the next 128 characters have arrived (a marker could be split), so the guest
# follows it with a line of padding.
HOST_CHANGE = "@@HOST_CHANGE@@"

SCRIPT = r"""
set -eu
__MOUNT_SHARE__
__MOUNT_LIVE__
cd /mnt/s

# --- cache=none: the host changes files while the guest waits -------------------------------
echo "LIVE_BEFORE $(cat /mnt/live/watched)"
echo "LIVE_LISTING_BEFORE $(ls -1A /mnt/live | tr '\n' ' ')"
echo "__HOST_CHANGE__"
printf '%200s\n' ''
i=0
while [ ! -e /mnt/live/go ]; do
    i=$((i + 1)); [ $i -lt 1200 ] || { echo "the host never changed the files"; exit 3; }
    sleep 0.1
done
# No sleep, no cache drop: with cache=none the next reads must already see the change.
echo "LIVE_AFTER $(cat /mnt/live/watched)"
echo "LIVE_SIZE $(stat -c %s /mnt/live/watched)"
echo "LIVE_MODE $(stat -c %a /mnt/live/watched)"
echo "LIVE_NEW $(cat /mnt/live/new-on-host)"
echo "LIVE_LISTING_AFTER $(ls -1A /mnt/live | tr '\n' ' ')"

# --- host to guest, guest to host ------------------------------------------------------------
echo "LISTING $(ls -1A listing | tr '\n' ' ')"
echo "FROM_HOST $(sha256sum from-host.bin | cut -d' ' -f1)"
echo "FROM_HOST_SIZE $(stat -c %s from-host.bin)"
dd if=/dev/urandom of=from-guest.bin bs=65536 count=20 2>/dev/null
head -c 12345 /dev/urandom >> from-guest.bin
printf 'patched in the middle' | dd of=from-guest.bin bs=1 seek=70000 conv=notrunc 2>/dev/null
echo "FROM_GUEST $(sha256sum from-guest.bin | cut -d' ' -f1)"

# --- POSIX operations ------------------------------------------------------------------------
mkdir ops ops/sub
echo 'hello world' > ops/created
echo "READ_BACK $(cat ops/created)"
mv ops/created ops/sub/renamed
chmod 0640 ops/sub/renamed
ln -s sub/renamed ops/symlink
ln ops/sub/renamed ops/hardlink
echo "READLINK $(readlink ops/symlink)"
echo "VIA_SYMLINK $(cat ops/symlink)"
echo "NLINK $(stat -c %h ops/sub/renamed)"
[ "$(stat -c %i ops/hardlink)" = "$(stat -c %i ops/sub/renamed)" ] && echo "SAME_INODE yes"
echo "MODE $(stat -c %a ops/sub/renamed)"
echo one > ops/r1
echo two > ops/r2
mv ops/r1 ops/r2
echo "RENAMED_OVER $(cat ops/r2)"
touch ops/doomed
rm ops/doomed
mkdir ops/doomed-dir
rmdir ops/doomed-dir
rm /mnt/s/to-delete
truncate -s 100000 ops/truncated
echo "TRUNCATED $(stat -c %s ops/truncated)"
echo "OPS_LISTING $(ls -1A ops | tr '\n' ' ')"

# --- 256 MiB copied in the guest, read back from the daemon rather than the page cache -------
cp big.bin big.copy
sync
echo 3 > /proc/sys/vm/drop_caches
echo "BIG_COPY $(sha256sum big.copy | cut -d' ' -f1)"

# --- a tar of a few thousand files -----------------------------------------------------------
mkdir extracted
tar -xf tree.tar -C extracted
echo "FIND_COUNT $(find extracted | wc -l)"
echo "DONE yes"
"""


def make_tree_tar(path: Path) -> int:
    """A tar of TREE_DIRS directories of small files plus some symlinks; its entry count."""
    entries = 0
    with tarfile.open(path, "w") as tar:

        def add(name: str, kind: bytes, data: bytes = b"", target: str = "") -> None:
            nonlocal entries
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            info.mtime = 1_700_000_000
            info.linkname = target
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
            entries += 1

        add("tree", tarfile.DIRTYPE)
        for d in range(TREE_DIRS):
            add(f"tree/d{d:02}", tarfile.DIRTYPE)
            for f in range(TREE_FILES_PER_DIR):
                add(f"tree/d{d:02}/f{f:03}", tarfile.REGTYPE, f"{d}/{f}\n".encode() * (f + 1))
        for s in range(TREE_SYMLINKS):
            add(f"tree/link{s:02}", tarfile.SYMTYPE, target=f"d{s:02}/f000")
    return entries


def count_tree(root: Path) -> int:
    """What ``find root | wc -l`` prints: root itself and everything below it."""
    count = 1
    for _dirpath, dirnames, filenames in os.walk(root):
        count += len(dirnames) + len(filenames)
    return count


def same_trees(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(same_trees(a / d, b / d) for d in cmp.common_dirs)


class HostChange:
    """Changes the ``live`` share's files when the guest asks (it waits for ``go``)."""

    def __init__(self, live: Path) -> None:
        self.live = live
        self.seen = ""
        self.done = False

    def __call__(self, text: str) -> None:
        if self.done:
            return
        self.seen += text
        if HOST_CHANGE not in self.seen:
            return
        self.done = True
        # Same inode rewritten in place: only a guest that does not cache would notice.
        with (self.live / "watched").open("r+b") as f:
            f.write(LIVE_NEW)
        (self.live / "watched").chmod(0o600)
        (self.live / "new-on-host").write_bytes(b"made by the host\n")
        (self.live / "gone-on-host").unlink()
        (self.live / "go").touch()


@pytest.mark.parametrize("qemu", ["bookworm", "sid"])
def test_guest_uses_the_share(qemu: str, workdir: Path, start_daemon: DaemonFactory) -> None:
    require_assets(qemu)
    share = workdir / "share"
    live = workdir / "live"
    staging = workdir / "staging"
    for d in (share, live, staging, share / "listing"):
        d.mkdir()
    for name in ("alpha", "beta", "gamma.txt", ".hidden"):
        (share / "listing" / name).write_text(name)
    (share / "listing" / "subdir").mkdir()
    write_random(share / "from-host.bin", 3 * MiB + 4321, seed=1)
    write_random(share / "big.bin", BIG_SIZE, seed=2)
    (share / "to-delete").write_text("the guest removes this")
    tar_entries = make_tree_tar(share / "tree.tar")
    with tarfile.open(share / "tree.tar") as tar:
        tar.extractall(staging, filter="tar")
    (live / "watched").write_bytes(LIVE_OLD)
    (live / "gone-on-host").write_text("deleted by the host while the guest runs")

    share_daemon = start_daemon(share)
    if qemu == "bookworm":
        live_daemon = start_daemon(
            live, "-o", "cache=none,xattr,flock,posix_lock", inherit_socket=True
        )
    else:
        live_daemon = start_daemon(live, "--cache", "never")
    devices = [FsDevice(share_daemon.socket, "share"), FsDevice(live_daemon.socket, "live")]
    script = (
        SCRIPT.replace("__MOUNT_SHARE__", devices[0].mount_command("/mnt/s"))
        .replace("__MOUNT_LIVE__", devices[1].mount_command("/mnt/live"))
        .replace("__HOST_CHANGE__", HOST_CHANGE)
    )
    host_change = HostChange(live)
    result = run_guest(script, devices, qemu=qemu, timeout=600, on_output=host_change)
    share_daemon.finish()
    live_daemon.finish()
    assert result.status == 0, result.output + result.kernel_log[-3000:]
    report = parse_report(result.output)
    assert report.get("DONE") == "yes", result.output

    # cache=none: the guest saw every host change without waiting.
    assert host_change.done
    assert report["LIVE_BEFORE"] == LIVE_OLD.decode().strip()
    assert report["LIVE_LISTING_BEFORE"].split() == ["gone-on-host", "watched"]
    assert report["LIVE_AFTER"] == LIVE_NEW.decode().strip()
    assert int(report["LIVE_SIZE"]) == len(LIVE_NEW)
    assert report["LIVE_MODE"] == "600"
    assert report["LIVE_NEW"] == "made by the host"
    assert report["LIVE_LISTING_AFTER"].split() == ["go", "new-on-host", "watched"]

    # Host to guest and back, byte for byte.
    assert report["LISTING"].split() == sorted(os.listdir(share / "listing"))
    assert report["FROM_HOST"] == sha256_file(share / "from-host.bin")
    assert int(report["FROM_HOST_SIZE"]) == 3 * MiB + 4321
    from_guest = share / "from-guest.bin"
    assert from_guest.stat().st_size == 20 * 65536 + 12345
    assert report["FROM_GUEST"] == sha256_file(from_guest)
    assert from_guest.read_bytes()[70000:70021] == b"patched in the middle"

    # The POSIX operations, as the host sees them.
    ops = share / "ops"
    renamed = ops / "sub" / "renamed"
    assert report["READ_BACK"] == "hello world"
    assert renamed.read_bytes() == b"hello world\n"
    assert not (ops / "created").exists()
    assert stat.S_IMODE(renamed.stat().st_mode) == 0o640 and report["MODE"] == "640"
    assert os.readlink(ops / "symlink") == "sub/renamed" == report["READLINK"]
    assert report["VIA_SYMLINK"] == "hello world"
    hard = (ops / "hardlink").stat()
    assert hard.st_ino == renamed.stat().st_ino and hard.st_nlink == 2
    assert report["NLINK"] == "2" and report["SAME_INODE"] == "yes"
    assert (ops / "r2").read_bytes() == b"one\n" and report["RENAMED_OVER"] == "one"
    assert not (ops / "r1").exists()
    assert not (ops / "doomed").exists() and not (ops / "doomed-dir").exists()
    assert not (share / "to-delete").exists()
    assert (ops / "truncated").stat().st_size == 100000 == int(report["TRUNCATED"])
    assert report["OPS_LISTING"].split() == sorted(os.listdir(ops))

    # The 256 MiB copy.
    big = sha256_file(share / "big.bin")
    assert sha256_file(share / "big.copy") == big
    assert report["BIG_COPY"] == big

    # The tar: as many entries in the guest as on the host, and the same files.
    extracted = share / "extracted"
    assert int(report["FIND_COUNT"]) == count_tree(extracted) == tar_entries + 1
    assert count_tree(extracted) == count_tree(staging)
    assert same_trees(extracted / "tree", staging / "tree")
