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
from pyvirtiofsd.testing.frontend import DriverQueue, Frontend, GuestRam
from pyvirtiofsd.testing.fuse_client import FuseClient
from pyvirtiofsd.transport.virtiofs import MAX_QUEUE_SIZE, VhostUserConfig, VhostUserTransport
from pyvirtiofsd.vhost_user.messages import FrontendReq, VringState
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
