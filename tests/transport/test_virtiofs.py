"""The virtio-fs transport: its config makes the listener, the transport serves one front-end
on it as configured (or, kept listening, one after another, each on a new FUSE session), and
stops whenever asked, without ever removing the socket itself."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.state import StateError
from pyvirtiofsd.testing.frontend import DriverQueue, Frontend, GuestRam
from pyvirtiofsd.testing.fuse_client import FuseClient, direct
from pyvirtiofsd.transport.virtiofs import (
    MAX_QUEUE_SIZE,
    VhostUserConfig,
    VhostUserTransport,
    VirtioFsDevice,
)
from pyvirtiofsd.vhost_user.messages import (
    DEVICE_STATE_LOAD,
    DEVICE_STATE_NO_FD,
    DEVICE_STATE_SAVE,
    VHOST_F_LOG_ALL,
    FrontendReq,
    VringState,
)
from tests.memfs import MemFs


def test_config_makes_the_listener(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    with VhostUserConfig(socket_path=str(path)).listen() as listener:
        assert listener.where == str(path) and path.is_socket()
    assert not path.exists()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "inherited.sock"))
    sock.listen(1)
    try:
        # An fd wins over a path, as libvirt gives only the fd.
        listener = VhostUserConfig(fd=sock.fileno()).listen()
        assert listener.where == f"fd {sock.fileno()}"
        listener.sock.detach()  # type: ignore[union-attr]  # the test's socket to close
    finally:
        sock.close()
    with pytest.raises(ValueError):
        VhostUserConfig().listen()


def test_stop_before_serve(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    with VhostUserConfig(socket_path=str(path)).listen() as listener:
        transport = VhostUserTransport(MemFs(), VhostUserConfig(), listener)
        transport.stop()
        assert transport.serve() == 0
        assert path.is_socket(), "the transport removed a socket it does not own"


def test_serves_as_configured(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    config = VhostUserConfig(socket_path=str(path), tag="cfg", num_request_queues=2, queue_size=16)
    with config.listen() as listener:
        transport = VhostUserTransport(MemFs(), config, listener)
        assert transport.device.max_queue_size == 16
        status: list[int] = []
        t = threading.Thread(target=lambda: status.append(transport.serve()), daemon=True)
        t.start()
        with Frontend.connect(str(path)) as fe:
            fe.negotiate()
            assert fe.get_queue_num() > config.num_request_queues
            assert fe.get_config(0, 40) == b"cfg".ljust(36, b"\0") + (2).to_bytes(4, "little")
            assert fe.status_of(FrontendReq.SET_VRING_NUM, VringState(1, 32).encode()) != 0
            fe.ram = GuestRam(16 << 20)
            fe.share_ram(fe.ram)
            q = fe.start_queue(1, 16)
            fuse = FuseClient(lambda req, size: q.request([req], [size] if size else []))
            fuse.init()
            assert fuse.getattr(abi.ROOT_ID)
            transport.stop()
            t.join(10)
        assert status == [0]
    assert MAX_QUEUE_SIZE == VhostUserConfig().queue_size == 32768


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _client(q: DriverQueue) -> FuseClient:
    return FuseClient(lambda req, size: q.request([req], [size] if size else []))


def test_keep_listening_starts_each_front_end_on_a_new_fuse_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next front-end finds no trace of the last one's FUSE session: nothing is served
    before its INIT, the old nodeids and file handles are unknown, and every fd the last one
    caused the file system to open is closed."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "file").write_bytes(b"contents")
    (share / "dir").mkdir()
    path = tmp_path / "vhost.sock"
    config = VhostUserConfig(socket_path=str(path), keep_listening=True)
    fs = PassthroughFs(PassthroughConfig(str(share)))
    with config.listen() as listener:
        transport = VhostUserTransport(fs, config, listener)
        device = transport.device
        resets: list[int] = []
        reset = device.reset

        def counted_reset() -> None:
            reset()
            resets.append(fs.inodes.count())

        monkeypatch.setattr(device, "reset", counted_reset)
        baseline = _fds()
        status: list[int] = []
        t = threading.Thread(target=lambda: status.append(transport.serve()), daemon=True)
        t.start()
        stale: tuple[int, int, int] | None = None
        for i in range(3):
            with Frontend.connect(str(path)) as fe:
                fuse = _client(fe.setup(queues=(0, 1), queue_size=16, ram_size=16 << 20)[1])
                if stale is not None:
                    nodeid, fh, dir_fh = stale
                    with pytest.raises(OSError) as before_init:
                        fuse.getattr(nodeid)
                    assert before_init.value.errno == errno.EIO  # INIT first
                fuse.init()
                if stale is not None:
                    for call, *args in (
                        (fuse.getattr, nodeid),
                        (fuse.read, nodeid, fh, 0, 8),
                        (fuse.readdir, abi.ROOT_ID, dir_fh),
                    ):
                        with pytest.raises(OSError) as gone:
                            call(*args)
                        assert gone.value.errno == errno.EBADF
                entry = fuse.lookup(abi.ROOT_ID, b"file")
                assert stale is None or entry.nodeid != stale[0]
                opened = fuse.open(entry.nodeid)
                assert fuse.read(entry.nodeid, opened.fh, 0, 8) == b"contents"
                fuse.lookup(abi.ROOT_ID, b"dir")
                dir_fh = fuse.opendir(abi.ROOT_ID).fh
                stale = (entry.nodeid, opened.fh, dir_fh)
                assert _fds() > baseline
                # Gone without RELEASE or FORGET, as a VMM that quits.
            deadline = time.monotonic() + 10
            while len(resets) != i + 1:
                assert time.monotonic() < deadline, "no reset after the front-end left"
                time.sleep(0.01)
            assert not device.server.initialized
            assert resets[-1] == 1  # the root alone
            assert _fds() == baseline, "the last front-end's fds are still open"
        transport.stop()
        t.join(10)
        assert status == [0]
        assert path.is_socket()
    fs.shutdown()


# --- live migration ------------------------------------------------------------------------------


def _passthrough(path: Path, **cfg: object) -> PassthroughFs:
    return PassthroughFs(PassthroughConfig(str(path), **cfg))  # type: ignore[arg-type]


def test_only_a_migratable_file_system_without_a_window_migrates(tmp_path: Path) -> None:
    device = VirtioFsDevice(MemFs())
    assert not device.migratable and device.migration_blocker == "MemFs cannot save its state"
    with pytest.raises(ValueError, match="no live migration: MemFs"):
        device.save_state()
    fs = _passthrough(tmp_path)
    try:
        assert VirtioFsDevice(fs).migratable
        windowed = VirtioFsDevice(fs, dax_window=2 << 20)
        assert not windowed.migratable
        assert windowed.migration_blocker == "a DAX window is not carried over"
    finally:
        fs.shutdown()


def test_the_session_and_the_files_move_to_another_device(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"contents")
    source_fs = _passthrough(tmp_path)
    source = VirtioFsDevice(source_fs)
    c = FuseClient(direct(source.server))
    c.init(flags=abi.InitFlag.INIT_EXT | abi.InitFlag.ASYNC_READ)
    f = c.lookup(abi.ROOT_ID, b"f")
    fh = c.open(f.nodeid).fh
    saved = source.save_state()
    dest_fs = _passthrough(tmp_path)
    try:
        destination = VirtioFsDevice(dest_fs)
        destination.load_state(saved)
        c2 = FuseClient(direct(destination.server))
        assert c2.read(f.nodeid, fh, 0, 100) == b"contents"
        assert c.read(f.nodeid, fh, 0, 100) == b"contents"  # the source still serves it
    finally:
        source_fs.shutdown()
        dest_fs.shutdown()


def test_a_failed_load_leaves_no_session(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    (tmp_path / "dst").mkdir()
    source_fs = _passthrough(tmp_path / "src")
    source = VirtioFsDevice(source_fs)
    c = FuseClient(direct(source.server))
    c.init()
    c.lookup(abi.ROOT_ID, b"f")
    dest_fs = _passthrough(tmp_path / "dst")
    try:
        destination = VirtioFsDevice(dest_fs)
        with pytest.raises(StateError, match="can't be found"):
            destination.load_state(source.save_state())
        assert not destination.server.initialized
        with pytest.raises(StateError, match="virtio-fs state: truncated"):
            destination.load_state(source.save_state()[:-3])
    finally:
        source_fs.shutdown()
        dest_fs.shutdown()


def _held_session(share: Path) -> tuple[PassthroughFs, bytes, dict[str, int]]:
    """A source whose guest holds a file open with a lock on it (the source keeps holding the
    lock: a destination on this host takes it again only once the source lets go): its file
    system and its saved device state."""
    fs = _passthrough(share)
    device = VirtioFsDevice(fs)
    c = FuseClient(direct(device.server))
    c.init()
    nodeid = c.lookup(abi.ROOT_ID, b"file").nodeid
    fh = c.open(nodeid, os.O_RDWR).fh
    c.call(abi.Opcode.SETLK, nodeid, abi.LK_IN.pack(fh, 7, 0, 99, 1, 4242, 0, 0))  # F_WRLCK
    return fs, device.save_state(), {"nodeid": nodeid, "fh": fh}


def _transfer(fe: Frontend, direction: int, data: bytes = b"") -> int | None:
    """SET_DEVICE_STATE_FD through a pipe; for a load, the bytes written and CHECK's answer."""
    r, w = os.pipe2(os.O_CLOEXEC)
    mine, theirs = (w, r) if direction == DEVICE_STATE_LOAD else (r, w)
    try:
        assert fe.set_device_state_fd(direction, theirs) == DEVICE_STATE_NO_FD
    finally:
        os.close(theirs)
    if direction != DEVICE_STATE_LOAD:
        os.close(mine)  # nobody reads: the save is left hanging
        return None
    with os.fdopen(mine, "wb") as f:
        f.write(data)
    return fe.check_device_state()


def test_keep_listening_drops_a_migration_between_front_ends(tmp_path: Path) -> None:
    """A front-end that migrated a guest in (state loaded, a lock still to take again from the
    source), logged dirty pages and left mid-way through a save: the next one finds none of it,
    and every fd of it is closed."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "file").write_bytes(b"contents")
    source_fs, saved, held = _held_session(share)
    path = tmp_path / "vhost.sock"
    config = VhostUserConfig(socket_path=str(path), keep_listening=True)
    fs = _passthrough(share)
    try:
        with config.listen() as listener:
            transport = VhostUserTransport(fs, config, listener)
            baseline = _fds()
            t = threading.Thread(target=transport.serve, daemon=True)
            t.start()
            with Frontend.connect(str(path)) as fe:
                fe.setup(queues=(0, 1), queue_size=16, ram_size=16 << 20)
                log_fd = os.memfd_create("test-dirty-log", os.MFD_CLOEXEC)
                os.ftruncate(log_fd, 4096)
                fe.set_log_base(log_fd, 4096)
                os.close(log_fd)
                fe.set_features(fe.features | 1 << VHOST_F_LOG_ALL)
                fe.stop_queue(0)
                fe.stop_queue(1)
                assert _transfer(fe, DEVICE_STATE_LOAD, saved) == 0
                assert fs.inodes.count() == 2 and fs.inodes.pending_locks
                retaker = fs.retaker
                assert retaker is not None and retaker.is_alive()
                _transfer(fe, DEVICE_STATE_SAVE)
            deadline = time.monotonic() + 10
            while transport.device.server.initialized or fs.inodes.count() != 1:
                assert time.monotonic() < deadline, "no reset after the front-end left"
                time.sleep(0.01)
            assert not retaker.is_alive() and not fs.inodes.pending_locks
            with open("/proc/self/maps") as maps:
                assert "test-dirty-log" not in maps.read()
            assert _fds() == baseline, "the migrated guest's fds are still open"
            with Frontend.connect(str(path)) as fe:
                fuse = _client(fe.setup(queues=(0, 1), queue_size=16, ram_size=16 << 20)[1])
                fuse.init()
                with pytest.raises(OSError) as gone:
                    fuse.getattr(held["nodeid"])
                assert gone.value.errno == errno.EBADF
            transport.stop()
            t.join(10)
    finally:
        fs.shutdown()
        source_fs.shutdown()


@pytest.mark.parametrize(
    ("mangle", "logged"),
    [
        (lambda b: b[:-5], "truncated"),
        (lambda b: b + b"\0", "bytes past the end"),
        (lambda b: b.replace(b"virtio-fs", b"virtio-xx"), "section b'virtio-xx'"),
        (lambda b: b"\xff" * 64, "virtio-fs state"),
    ],
)
def test_a_malformed_state_fails_the_check_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mangle: object, logged: str
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "file").write_bytes(b"contents")
    source_fs, saved, _ = _held_session(share)
    path = tmp_path / "vhost.sock"
    config = VhostUserConfig(socket_path=str(path))
    fs = _passthrough(share)
    try:
        with config.listen() as listener:
            transport = VhostUserTransport(fs, config, listener)
            t = threading.Thread(target=transport.serve, daemon=True)
            t.start()
            with Frontend.connect(str(path)) as fe:
                fe.setup(queues=(0, 1), queue_size=16, ram_size=16 << 20)
                fe.stop_queue(0)
                fe.stop_queue(1)
                assert _transfer(fe, DEVICE_STATE_LOAD, mangle(saved)) == 1  # type: ignore[operator]
                assert not transport.device.server.initialized and fs.inodes.count() == 1
                # The daemon goes on: a good state loads after a bad one.
                assert _transfer(fe, DEVICE_STATE_LOAD, saved) == 0
            t.join(10)
            assert not t.is_alive()
    finally:
        fs.shutdown()
        source_fs.shutdown()
    failures = [r for r in caplog.records if "device state load failed" in r.getMessage()]
    assert len(failures) == 1 and logged in failures[0].getMessage()
    assert failures[0].exc_info is None
    assert not any(r.exc_info for r in caplog.records)
