"""The /dev/fuse transport as the daemon runs it: ``serve()`` mounts, serves and unmounts, and
``stop()`` ends it whenever it comes, even before the mount is made."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from pyvirtiofsd.transport.fusedev import MIN_WORKERS, FuseMount, FuseMountConfig
from tests.conftest import can_mount_fuse, is_mounted
from tests.memfs import MemFs


@pytest.fixture
def mountable() -> None:
    reason = can_mount_fuse()
    if reason:
        pytest.skip(reason)


def test_workers() -> None:
    assert FuseMountConfig("/x").workers == MIN_WORKERS
    assert FuseMountConfig("/x", thread_pool_size=MIN_WORKERS + 3).workers == MIN_WORKERS + 3


def test_serve_says_why_it_cannot_mount(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    mount = FuseMount(MemFs(), FuseMountConfig(str(tmp_path / "file")))
    with caplog.at_level(logging.ERROR):
        assert mount.serve() == 1
    assert f"cannot mount on {tmp_path / 'file'}" in caplog.text


@pytest.mark.usefixtures("mountable")
def test_stop_before_serve(tmp_path: Path) -> None:
    # A signal may come while the mount is being made: serve() still ends, and unmounts.
    mount = FuseMount(MemFs(), FuseMountConfig(str(tmp_path)))
    mount.stop()
    assert mount.serve() == 0
    assert not is_mounted(tmp_path)


@pytest.mark.usefixtures("mountable")
def test_stop_while_serving(tmp_path: Path) -> None:
    mount = FuseMount(MemFs(), FuseMountConfig(str(tmp_path), readonly=True))
    status: list[int] = []
    t = threading.Thread(target=lambda: status.append(mount.serve()), daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(tmp_path):
            assert t.is_alive() and time.monotonic() < deadline, "never mounted"
            time.sleep(0.02)
        assert os.listdir(tmp_path) == []
        with pytest.raises(OSError):
            (tmp_path / "new").write_text("read-only mount")
    finally:
        mount.stop()
        t.join(30)
    assert status == [0]
    assert not is_mounted(tmp_path)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.usefixtures("mountable")
def test_idle_workers_cost_no_buffer_memory(tmp_path: Path) -> None:
    # Each reader has two buffers of max_write plus a page; were they written when made, the
    # mount's readers alone would take 2 x 16 x 1 MiB. Only what requests reach is allocated.
    (tmp_path / "mnt").mkdir()
    fs = MemFs()
    before = _rss_kib()
    with FuseMount(fs, FuseMountConfig(str(tmp_path / "mnt"))) as mount:
        buffers_kib = 2 * mount.threads * mount.bufsize // 1024
        assert buffers_kib >= 2 * MIN_WORKERS * 1024
        deadline = time.monotonic() + 20
        while not is_mounted(tmp_path / "mnt"):
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.02)
        (tmp_path / "mnt" / "f").write_bytes(b"x" * 300_000)
        assert (tmp_path / "mnt" / "f").read_bytes() == b"x" * 300_000
        grown = _rss_kib() - before
    assert grown < buffers_kib // 4, (grown, buffers_kib)
