"""The /dev/fuse transport as the daemon runs it: ``serve()`` mounts, serves and unmounts, and
``stop()`` ends it whenever it comes, even before the mount is made."""

from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from pyvirtiofsd.transport import fusedev as fusedev_module
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.usefixtures("mountable")
def test_idle_workers_cost_no_buffer_memory(tmp_path: Path) -> None:
    # Each reader has two buffers of max_write plus a page; were they written when made, the
    # mount's readers alone would take 2 x 16 x 1 MiB. Only what requests reach is allocated,
    # and as the process's own memory, not as shared memory a child would share.
    (tmp_path / "mnt").mkdir()
    fs = MemFs()
    before, shared_before = _status_kib("VmRSS"), _status_kib("RssShmem")
    with FuseMount(fs, FuseMountConfig(str(tmp_path / "mnt"))) as mount:
        buffers_kib = 2 * mount.threads * mount.bufsize // 1024
        assert buffers_kib >= 2 * MIN_WORKERS * 1024
        deadline = time.monotonic() + 20
        while not is_mounted(tmp_path / "mnt"):
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.02)
        (tmp_path / "mnt" / "f").write_bytes(b"x" * 300_000)
        assert (tmp_path / "mnt" / "f").read_bytes() == b"x" * 300_000
        grown = _status_kib("VmRSS") - before
        shared = _status_kib("RssShmem") - shared_before
    assert grown < buffers_kib // 4, (grown, buffers_kib)
    assert shared < 256, shared  # the 300 kB the requests reached are not shared memory


native_io = pytest.mark.skipif(
    fusedev_module._native_receive is None,
    reason="pure build: no C read and write (they come with mypyc's)",
)


@native_io
def test_the_c_read_and_write_move_what_os_read_and_write_move() -> None:
    receive, send = fusedev_module._native_receive, fusedev_module._native_send
    r, w = os.pipe()
    try:
        out = mmap.mmap(-1, 1 << 20)
        out[:11] = b"hello world"
        assert send(w, out, 5) == 5
        assert send(w, memoryview(out), 0) == 0
        room = bytearray(64)
        assert receive(r, room) == 5
        assert room[:5] == b"hello"
        # A reply longer than the pipe holds: written with the GIL released, read meanwhile.
        out[: 1 << 20] = os.urandom(1 << 20)
        got = bytearray()

        def drain() -> None:
            while len(got) < 1 << 20:
                got.extend(os.read(r, 1 << 16))

        t = threading.Thread(target=drain)
        t.start()
        assert send(w, out, 1 << 20) == 1 << 20
        t.join(30)
        assert bytes(got) == out[: 1 << 20]
        os.close(w)
        w = -1
        assert receive(r, room) == 0  # end of file
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@native_io
def test_the_c_read_and_write_refuse_what_they_cannot_do() -> None:
    receive, send = fusedev_module._native_receive, fusedev_module._native_send
    r, w = os.pipe()
    try:
        buf = bytearray(8)
        for length in (-1, 9):
            with pytest.raises(ValueError):
                send(w, buf, length)
        with pytest.raises(ValueError):
            send(w, array.array("I", [1, 2]), 4)  # not single bytes
        with pytest.raises((TypeError, BufferError)):
            receive(r, b"read-only")
        with pytest.raises(ValueError):
            receive(-1, buf)
        with pytest.raises(TypeError):
            send(w, buf)  # type: ignore[call-arg]
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            receive(r, buf)
        closed = os.dup(r)
        os.close(closed)
        with pytest.raises(OSError) as e:
            receive(closed, buf)
        assert e.value.errno == errno.EBADF
        with pytest.raises(OSError) as e:
            send(r, buf, 1)  # the pipe's read end
        assert e.value.errno == errno.EBADF
        with pytest.raises(BlockingIOError):  # nothing was written by the refusals
            os.read(r, 16)
    finally:
        os.close(r)
        os.close(w)
