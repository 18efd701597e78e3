"""FUSE over io_uring as the /dev/fuse mount runs it, through the real kernel: requests reach the
per-CPU queues, payloads of every size around the copy limit cross intact, a lock wait answered
later returns its entry (also when interrupted, or still waiting at unmount), and a kernel that
does not offer io_uring leaves /dev/fuse to serve alone."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.backends.passthrough.config import PassthroughConfig
from pyvirtiofsd.backends.passthrough.fs import PassthroughFs
from pyvirtiofsd.transport import fuse_uring
from pyvirtiofsd.transport.fusedev import FuseMount, FuseMountConfig
from tests.conftest import fuse_uring_enabled, is_mounted


@contextlib.contextmanager
def mount(tmp_path: Path, uring: bool = True) -> Iterator[tuple[FuseMount, Path, Path]]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    fs = PassthroughFs(PassthroughConfig(shared_dir=str(src), xattr=True))
    with fuse_uring_enabled(uring):
        m = FuseMount(fs, FuseMountConfig(str(mnt), io_uring=True))
        m.start()
        try:
            os.stat(mnt)  # INIT answered, queues registered
            yield m, src, mnt
        finally:
            m.close(5.0)
    assert not is_mounted(mnt)


def served(m: FuseMount) -> int:
    assert m.uring is not None
    return sum(q.served for q in m.uring.queues)


def test_entries_per_queue_shrink_as_cpus_grow() -> None:
    assert [fuse_uring.entries_for(n) for n in (1, 2, 4, 8, 16, 32, 64, 4096)] == [
        16, 16, 16, 8, 4, 2, 2, 2,
    ]  # fmt: skip


def test_requests_go_through_a_queue_per_cpu(tmp_path: Path) -> None:
    with mount(tmp_path) as (m, src, mnt):
        assert m.uring is not None
        assert len(m.uring.queues) == fuse_uring.possible_cpus()
        before = served(m)
        for i in range(50):
            p = mnt / f"f{i}"
            p.write_bytes(bytes([i]) * (i * 997))
            assert p.read_bytes() == bytes([i]) * (i * 997)
            p.unlink()
        # A create, a write, an open, a read, a release and an unlink each at least.
        assert served(m) - before >= 50 * 5
        assert os.listdir(src) == []


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 4096, 65536, 1 << 20])
def test_payloads_around_the_copy_limit_cross_intact(tmp_path: Path, size: int) -> None:
    # Up to _SMALL bytes the payload is copied after the arguments, past it handed on in
    # place: data, xattr values and names either way.
    data = os.urandom(size)
    with mount(tmp_path) as (_, src, mnt):
        (mnt / "f").write_bytes(data)
        assert (src / "f").read_bytes() == data
        assert (mnt / "f").read_bytes() == data
        value = data[: min(size, 3000)] or b"v"  # ext4 keeps values to a block
        os.setxattr(mnt / "f", "user.big", value)
        assert os.getxattr(mnt / "f", "user.big") == value
        assert os.getxattr(src / "f", "user.big") == value
        name = "n" * 255
        target = "t" * min(max(size, 1), 4095)
        os.symlink(target, mnt / name)
        assert os.readlink(mnt / name) == target
        os.rename(mnt / name, mnt / ("m" * 255))
        assert os.readlink(src / ("m" * 255)) == target


LOCKER = textwrap.dedent(
    """
    import fcntl, os, sys
    path, hold, cpu = sys.argv[1:]
    if cpu:
        os.sched_setaffinity(0, {int(cpu)})
    f = open(path, "r+")
    fcntl.lockf(f, fcntl.LOCK_EX)
    print("locked", flush=True)
    if hold:
        sys.stdin.readline()
    """
)


def _locker(path: Path, cpu: int | None = None, hold: bool = True) -> subprocess.Popen[str]:
    """A process that takes a POSIX lock on ``path``, waiting for it; a holder keeps it until
    told (a line on its stdin), a waiter drops it at once (the order waiters get it in is the
    kernel's)."""
    args = [str(path), "1" if hold else "", "" if cpu is None else str(cpu)]
    p = subprocess.Popen(
        [sys.executable, "-c", LOCKER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return p


def _holder(path: Path, cpu: int | None = None) -> subprocess.Popen[str]:
    """A process holding a POSIX lock on ``path`` (it has said so) until told."""
    holder = _locker(path, cpu)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_a_lock_wait_answered_later_returns_its_entry(tmp_path: Path) -> None:
    with mount(tmp_path) as (_, _, mnt):
        f = mnt / "lock"
        f.write_text("x")
        holder = _holder(f)
        waiters = [_locker(f, hold=False) for _ in range(3)]
        time.sleep(0.5)
        # The waits hold entries; the queues go on serving.
        for i in range(20):
            (mnt / f"g{i}").write_text("y")
            assert os.stat(mnt / f"g{i}").st_size == 1
        assert all(w.poll() is None for w in waiters)
        # One waiter is killed while it waits: its INTERRUPT comes through /dev/fuse, and the
        # wait ends with EINTR, answered in the entry.
        waiters[0].kill()
        waiters[0].wait(10)
        holder.communicate("\n", timeout=10)
        for w in waiters[1:]:
            assert w.communicate(timeout=20)[0] == "locked\n"
        assert (mnt / "lock").read_text() == "x"


def test_more_lock_waits_than_entries_on_one_cpu_leave_room_for_the_unlock(
    tmp_path: Path,
) -> None:
    # Every caller on one CPU, so one queue: the waits take more entries than it started with,
    # and the holder's unlock, from the same CPU, still needs one.
    cpu = min(os.sched_getaffinity(0))
    with mount(tmp_path) as (m, _, mnt):
        f = mnt / "lock"
        f.write_text("x")
        holder = _holder(f, cpu)
        assert m.uring is not None
        queue = m.uring.queues[cpu]
        start = len(queue.entries)
        waiters = [_locker(f, cpu, hold=False) for _ in range(start + 4)]
        deadline = time.monotonic() + 20
        # Each wait holds an entry of the queue: at least as many as it started with.
        while len(m.server._waiting) < start:
            assert time.monotonic() < deadline, f"{len(m.server._waiting)} waits"
            time.sleep(0.05)
        time.sleep(0.5)
        # The holder's unlock (at its close) goes to the same queue.
        holder.communicate("\n", timeout=20)
        for w in waiters:
            assert w.communicate(timeout=30)[0] == "locked\n"
        assert len(queue.entries) >= 2 * start + 4


def test_unmount_with_a_lock_wait_pending(tmp_path: Path) -> None:
    with mount(tmp_path) as (m, _, mnt):
        f = mnt / "lock"
        f.write_text("x")
        holder = _holder(f)
        waiter = _locker(f)
        time.sleep(0.5)
        try:
            started = time.monotonic()
            m.close(5.0)
            assert time.monotonic() - started < 10
            assert m.abandoned == 0
        finally:
            for p in (holder, waiter):
                p.kill()
                p.wait(10)


def test_without_enable_uring_dev_fuse_serves_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), mount(tmp_path, uring=False) as (m, src, mnt):
        (mnt / "f").write_text("through /dev/fuse")
        assert (src / "f").read_text() == "through /dev/fuse"
        assert m.uring is None
    assert "does not offer FUSE over io_uring" in caplog.text


def test_entries_stay_bounded_over_many_waits(tmp_path: Path) -> None:
    # One wait at a time, many times over, from one CPU: the entry a wait held comes back
    # when it ends, so the queue adds none once it has its start plus the one lent.
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        with mount(tmp_path) as (m, _, mnt):
            assert m.uring is not None
            queue = m.uring.queues[cpu]
            start = len(queue.entries)
            (mnt / "f").write_text("x")
            holder = os.open(mnt / "f", os.O_RDONLY)
            for _ in range(3 * start):
                fcntl.flock(holder, fcntl.LOCK_EX)
                got = threading.Event()

                def wait(got: threading.Event) -> None:
                    fd = os.open(mnt / "f", os.O_RDONLY)
                    fcntl.flock(fd, fcntl.LOCK_EX)  # waits, in the daemon, for the holder
                    got.set()
                    os.close(fd)

                t = threading.Thread(target=wait, args=(got,))
                t.start()
                deadline = time.monotonic() + 10
                while not m.server._waiting:
                    assert time.monotonic() < deadline, "the wait never reached the daemon"
                    time.sleep(0.005)
                fcntl.flock(holder, fcntl.LOCK_UN)
                assert got.wait(10)
                t.join(10)
            os.close(holder)
            assert len(queue.entries) <= start + 1
    finally:
        os.sched_setaffinity(0, before)


def test_an_aborted_connection_ends_the_mount_with_a_wait_pending(tmp_path: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "lock").write_text("x")
    fs = PassthroughFs(PassthroughConfig(shared_dir=str(src)))
    with fuse_uring_enabled():
        m = FuseMount(fs, FuseMountConfig(str(mnt), io_uring=True))
        status: list[int] = []
        serving = threading.Thread(target=lambda: status.append(m.serve()), daemon=True)
        serving.start()
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.02)
        holder = _holder(mnt / "lock")
        waiter = _locker(mnt / "lock")
        while not m.server._waiting:
            assert time.monotonic() < deadline, "the wait never reached the daemon"
            time.sleep(0.02)
        try:
            m._abort()  # /sys/fs/fuse/connections/N/abort, as an administrator would
            serving.join(15)
            assert not serving.is_alive(), "the mount did not end"
            assert status == [0]
        finally:
            for p in (holder, waiter):
                p.kill()
                p.wait(10)
            if is_mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.pure_python
def test_a_queue_that_cannot_serve_ends_the_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The kernel holds every request back until each queue registered, and never moves one to
    # another queue: a queue that fails must end the mount, not leave its callers waiting.
    arm = fuse_uring._Queue._arm_wake

    def broken(self: fuse_uring._Queue) -> None:
        if self.qid == len(self.uring.queues) - 1:
            raise OSError(9, "injected")
        arm(self)

    monkeypatch.setattr(fuse_uring._Queue, "_arm_wake", broken)
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    fs = PassthroughFs(PassthroughConfig(shared_dir=str(src)))
    with fuse_uring_enabled(), caplog.at_level(logging.ERROR):
        m = FuseMount(fs, FuseMountConfig(str(mnt), io_uring=True))
        status: list[int] = []
        serving = threading.Thread(target=lambda: status.append(m.serve()), daemon=True)
        serving.start()
        deadline = time.monotonic() + 20
        while not is_mounted(mnt) and serving.is_alive():
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.02)
        with contextlib.suppress(OSError):
            os.stat(mnt)  # INIT, then the queues; the broken one ends the mount
        serving.join(15)
        assert not serving.is_alive(), "the mount did not end"
    assert status == [1]
    assert not is_mounted(mnt)
    assert "cannot serve: ending the mount" in caplog.text


_PAYLOAD = 8192


def _entry_buffer(length: int, payload_len: int) -> bytearray:
    buf = bytearray(os.urandom(4096 + _PAYLOAD))
    buf[0:4] = length.to_bytes(4, "little")
    buf[272:276] = payload_len.to_bytes(4, "little")
    return buf


@pytest.mark.parametrize(
    ("length", "payload_len"),
    [
        (40, 0), (80, 0), (168, 0), (46, 6), (120, 80), (104 + 1024, 1024),
        (104 + 1025, 1025), (40 + _PAYLOAD, _PAYLOAD),  # whole requests
        (169, 0), (39, 0), (40, 1), (0xFFFFFFFF, 0), (40 + _PAYLOAD + 1, _PAYLOAD + 1),
        (30, 0xFFFFFFF0),  # sizes that do not add up
    ],
)  # fmt: skip
def test_the_c_stage_puts_together_what_the_python_does(length: int, payload_len: int) -> None:
    native = pytest.importorskip("pyvirtiofsd._uring")
    a = _entry_buffer(length, payload_len)
    b = bytearray(a)
    expected = fuse_uring._stage_py(memoryview(a))
    assert native.stage(memoryview(b)) == expected
    assert a == b
    if expected >= 0:
        assert a[512 : 512 + 40] == a[:40]


@pytest.mark.parametrize("reply", [0, 15, 16, 24, 16 + _PAYLOAD])
def test_the_c_finish_stores_what_the_python_does(reply: int) -> None:
    native = pytest.importorskip("pyvirtiofsd._uring")
    a = _entry_buffer(100, 0)
    b = bytearray(a)
    commit_id = int.from_bytes(a[264:272], "little")
    assert fuse_uring._finish_py(memoryview(a), reply) == commit_id
    assert native.finish(memoryview(b), reply) == commit_id
    assert a == b
    assert int.from_bytes(a[272:276], "little") == max(reply, 16) - 16


def test_the_c_steps_refuse_what_does_not_fit() -> None:
    native = pytest.importorskip("pyvirtiofsd._uring")
    with pytest.raises(ValueError):
        fuse_uring._finish_py(memoryview(_entry_buffer(100, 0)), 17 + _PAYLOAD)
    with pytest.raises(ValueError):
        native.finish(memoryview(_entry_buffer(100, 0)), 17 + _PAYLOAD)
    with pytest.raises(ValueError):
        native.stage(bytearray(100))
    with pytest.raises(BufferError):
        native.stage(b"read-only" * 1000)
