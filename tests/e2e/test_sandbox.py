"""--sandbox: the daemon serves from a private root that holds the share and little else."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.frontend_daemon import finish, start


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_sandboxed_daemon_sees_only_the_share(tmp_path: Path, mode: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root")
    s = start(tmp_path, "--sandbox", mode)
    try:
        (s.src / "f").write_text("inside")
        ino = s.lookup("f")
        assert s.fuse.read(ino, s.fuse.open(ino).fh, 0, 10) == b"inside"
        root = Path(f"/proc/{s.proc.pid}/root")
        assert os.readlink(f"/proc/{s.proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert sorted(os.listdir(root / "share")) == ["f"]
        assert not (root / "etc/passwd").exists()
        assert not (root / "home").exists()
        assert not (root / "usr/bin").exists()
        assert not (root / str(tmp_path).lstrip("/")).exists()
    finally:
        text = finish(s)
    assert "sandboxed" in text
    assert not (tmp_path / "fs.sock").exists()  # removed on the way out, from inside


def _mount_options(pid: int) -> dict[str, set[str]]:
    """Mount point -> per-mount options, as process ``pid`` sees its mounts."""
    out = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            out[fields[4]] = set(fields[5].split(","))
    return out


def test_the_share_and_its_submounts_are_nodev_and_nosuid(tmp_path: Path) -> None:
    """Device nodes and set-id bits in the share are nothing to the sandboxed daemon, even on a
    mount inside the share that allows them on the host; the guest sees the nodes unchanged."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root")
    share = tmp_path / "share"
    sub = share / "sub"
    sub.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(sub)], check=True)
    log = tmp_path / "daemon.log"
    proc = None
    try:
        os.mknod(sub / "null", 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
        host = _mount_options(os.getpid())[str(sub)]
        assert not host & {"nodev", "nosuid"}
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pyvirtiofsd",
                    "--socket-path",
                    str(tmp_path / "fs.sock"),
                    "--shared-dir",
                    str(share),
                    "--sandbox",
                    "namespace",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while "sandboxed" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        mounts = _mount_options(proc.pid)
        for point in ("/share", "/share/sub"):
            assert {"nodev", "nosuid"} <= mounts[point], (point, mounts[point])
        assert "ro" not in mounts["/share"] and "ro" not in mounts["/share/sub"]
        root = Path(f"/proc/{proc.pid}/root")
        # the node is still there, as it was: only using it through the daemon is stopped
        assert os.lstat(root / "share/sub/null").st_rdev == os.stat("/dev/null").st_rdev
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-l", str(sub)], check=False)
    assert "Traceback" not in log.read_text()
