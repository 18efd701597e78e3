"""DAX with a real guest: QEMU 11.1's generic vhost-user device gets its window from us, and the
guest kernel mounts with -o dax=always / dax=inode. Reads, shared-mapping writes, a window
smaller than the file (the guest reclaims), per-inode DAX."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.vm import FsDevice, run_guest
from pyvirtiofsd.vm.assets import missing_assets
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def probe(guest_probe: Path) -> Path:
    missing = missing_assets(qemu="sid")
    if missing:
        pytest.skip("; ".join(missing))
    return guest_probe


def host_sum(probe: Path, path: Path) -> str:
    return subprocess.run(
        [str(probe), "sum", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        seed = os.urandom(1 << 20)
        for i in range(size >> 20):
            f.write(hashlib.sha256(seed + i.to_bytes(4, "little")).digest() * 32768)


class Daemon:
    def __init__(self, work: Path, share: Path, *args: str) -> None:
        self.socket = str(work / "fs.sock")
        self.log = work / "daemon.log"
        with open(self.log, "wb") as f:
            self.proc = spawn_child(
                [
                    sys.executable,
                    "-m",
                    "pyvirtiofsd",
                    "--socket-path",
                    self.socket,
                    "--shared-dir",
                    str(share),
                    "--tag",
                    "share",
                    "--log-level",
                    "debug",
                    *args,
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        wait_for_socket(self.socket, self.proc)

    def finish(self) -> dict[str, int]:
        """Wait for the exit the front-end's departure causes; the request counters."""
        try:
            assert self.proc.wait(30) == 0
        finally:
            kill_child(self.proc)
        text = self.log.read_text()
        assert "Traceback" not in text, text[-4000:]
        counts = re.findall(r"requests served: (.*)", text)[-1]
        stats = re.findall(r"DAX window: (.*)", text)[-1]
        pairs = [kv.split("=") for kv in (counts + " " + stats).split()]
        return {k: int(v) for k, v in pairs}


@pytest.fixture
def share(tmp_path: Path, probe: Path) -> Iterator[Path]:
    share = tmp_path / "share"
    share.mkdir()
    shutil.copy(probe, share / "probe")
    yield share


def boot(share: Path, work: Path, script: str, *daemon_args: str, mount: str) -> tuple[str, dict]:
    daemon = Daemon(work, share, *daemon_args)
    dev = FsDevice(socket=daemon.socket, tag="share", generic=True)
    try:
        result = run_guest(
            f"{dev.mount_command('/mnt', mount)}\n{script}", [dev], qemu="sid", timeout=600
        )
    finally:
        if daemon.proc.poll() is None and not os.path.exists(daemon.socket):
            pass
    assert result.status == 0, result.output + result.kernel_log[-3000:]
    assert "Cache len" in result.kernel_log  # the guest found the window
    return result.output, daemon.finish()


def test_read_and_write_through_the_window(share: Path, tmp_path: Path, probe: Path) -> None:
    make_file(share / "big", 256 << 20)
    expected_sha = sha256(share / "big")
    expected_sum = host_sum(probe, share / "big")
    out, counts = boot(
        share,
        tmp_path,
        "sha256sum /mnt/big\n"
        "/mnt/probe sum /mnt/big\n"
        "/mnt/probe write /mnt/big 1234567 written-through-the-dax-window\n"
        "/mnt/probe attr /mnt/big\n",
        "--dax-window",
        "512M",
        mount="dax=always",
    )
    lines = out.split()
    assert lines[0] == expected_sha
    assert lines[2] == expected_sum
    assert lines[3] == "dax"
    with open(share / "big", "rb") as f:
        f.seek(1234567)
        assert f.read(30) == b"written-through-the-dax-window"
    assert counts["SETUPMAPPING"] >= 128  # 256 MiB in 2 MiB ranges
    assert counts.get("READ", 0) == 0  # every byte came through the window
    assert counts["failed"] == 0


def test_window_smaller_than_the_file(share: Path, tmp_path: Path, probe: Path) -> None:
    make_file(share / "big", 256 << 20)
    expected_sha = sha256(share / "big")
    out, counts = boot(
        share,
        tmp_path,
        "sha256sum /mnt/big\nsha256sum /mnt/big\n",
        "--dax-window",
        "64M",
        mount="dax=always",
    )
    assert out.split()[0] == expected_sha and out.split()[2] == expected_sha
    # the guest had to take ranges back to read it all
    assert counts["REMOVEMAPPING"] > 0 and counts["shmem_unmap"] > 0
    assert counts["SETUPMAPPING"] > 32
    assert counts["failed"] == 0


def test_dax_per_inode(share: Path, tmp_path: Path) -> None:
    (share / "small").write_bytes(b"s" * 4096)
    make_file(share / "large", 4 << 20)
    expected = sha256(share / "large")
    out, counts = boot(
        share,
        tmp_path,
        "/mnt/probe attr /mnt/small\n/mnt/probe attr /mnt/large\n"
        "cat /mnt/small | wc -c\nsha256sum /mnt/large\n",
        "--dax-window",
        "256M",
        "--dax-file-size",
        "1M",
        mount="dax=inode",
    )
    lines = out.split()
    assert lines[:3] == ["nodax", "dax", "4096"]
    assert lines[3] == expected
    assert counts["READ"] >= 1  # the small file went through FUSE READ
    assert counts["SETUPMAPPING"] >= 2  # the large one (and the probe) through the window
