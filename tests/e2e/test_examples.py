"""The example file system in examples/ runs, mounted through /dev/fuse."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import can_mount_fuse, is_mounted

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_hellofs(tmp_path: Path) -> None:
    reason = can_mount_fuse()
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "hellofs.py"), "--mount", str(mnt)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.05)
        assert sorted(os.listdir(mnt)) == ["hello", "time"]
        assert (mnt / "hello").read_text() == "Hello from a Python file system!\n"
        assert (mnt / "time").read_text().count(":") == 2
        with pytest.raises(OSError):
            (mnt / "hello").write_text("no")
        with pytest.raises(FileNotFoundError):
            (mnt / "nope").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert not is_mounted(mnt)


@pytest.mark.vm
def test_hellofs_in_a_guest(tmp_path: Path) -> None:
    from pyvirtiofsd.vm import FsDevice, missing_assets, run_guest
    from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket

    missing = missing_assets(qemu="sid")
    if missing:
        pytest.skip("; ".join(missing))
    sock = str(tmp_path / "hello.sock")
    proc = spawn_child(
        [sys.executable, str(EXAMPLES / "hellofs.py"), "--socket-path", sock],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock, proc)
        dev = FsDevice(sock, "hello")
        result = run_guest(
            f"{dev.mount_command('/mnt')}\nls -1 /mnt\ncat /mnt/hello\n",
            [dev],
            qemu="sid",
            timeout=120,
        )
        assert proc.wait(30) == 0
    finally:
        kill_child(proc)
    assert result.status == 0, result.output
    assert result.output.split("\n")[:3] == ["hello", "time", "Hello from a Python file system!"]
