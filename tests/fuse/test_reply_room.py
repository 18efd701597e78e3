"""A request whose reply cannot fit the room the guest gave for it is refused before the file
system runs: EINVAL when the out header fits, no reply at all when it does not, and in both
cases no call into the file system, so no file created, no handle or fd opened, no lookup
reference taken, nothing changed in the share.

The file system is the real passthrough over a scratch directory, wrapped to record the calls
the server makes into it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.server import OPS, Server
from pyvirtiofsd.testing.fuse_client import FuseClient, decode_reply, direct, encode_request
from tests.reply_room import CASES, HEADER, NO_REPLY, Env, host_state

#: Cases whose request, once it has room, visibly changes the share.
CHANGES_SHARE = {
    "setattr",
    "symlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "rename",
    "rename2",
    "link",
    "write",
    "setxattr",
    "removexattr",
    "create",
    "fallocate",
    "copy_file_range",
    "copy_file_range_64",
}
#: Cases whose request, once it has room, opens or closes descriptors in the daemon.
CHANGES_FDS = {
    "lookup",
    "open",
    "release",
    "opendir",
    "releasedir",
    "getlk",
    "setlk",
    "setlkw",
    "create",
    "tmpfile",
}


class Recorder:
    """A file system that notes the name of every method the server calls on it."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return record


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def share(open_tmp: Path) -> Path:
    d = open_tmp / "share"
    d.mkdir()
    return d


@pytest.fixture
def session(share: Path) -> Iterator[tuple[Server, Recorder, Env]]:
    fs = PassthroughFs(PassthroughConfig(shared_dir=str(share), xattr=True))
    recorder = Recorder(fs)
    server = Server(recorder)  # type: ignore[arg-type]
    fuse = FuseClient(direct(server))
    fuse.init()
    try:
        yield server, recorder, Env(share, fuse)
    finally:
        fs.shutdown()


def send(server: Server, opcode: int, nodeid: int, payload: bytes, room: int) -> bytes:
    """One request with ``room`` writable bytes (none at all for 0); what came back."""
    request = encode_request(opcode, nodeid, payload, unique=9000 + room)
    out = bytearray(room)
    n = server.handle([memoryview(request)], [memoryview(out)] if room else [])
    return bytes(out[: max(n, 0)])


def too_small(fixed: int) -> list[int]:
    """Writable room that can't hold a reply with ``fixed`` bytes after the header."""
    rooms = [0, 8, HEADER - 1]
    if fixed:
        rooms += [HEADER, HEADER + fixed // 2, HEADER + fixed - 1]
    return rooms


@pytest.mark.parametrize("name", list(CASES))
def test_no_side_effect_without_room_for_the_reply(
    session: tuple[Server, Recorder, Env], name: str
) -> None:
    server, fs, env = session
    case = CASES[name]
    nodeid, payload = case.build(env)
    fds, state = fd_count(), host_state(env.share)
    fs.calls.clear()
    for room in too_small(case.fixed):
        reply = send(server, case.opcode, nodeid, payload, room)
        if room < HEADER:
            assert reply == b"", room  # not even an error fits
        else:
            assert decode_reply(reply).error == errno.EINVAL, room
        assert fs.calls == [], f"{fs.calls} ran with {room} bytes of room"
        assert fd_count() == fds
        assert host_state(env.share) == state
    # With room for it, the very same request reaches the file system and does its work.
    reply = send(server, case.opcode, nodeid, payload, HEADER + case.fixed)
    decoded = decode_reply(reply)
    assert fs.calls, decoded
    if name in CHANGES_SHARE:
        assert decoded.error == 0, os.strerror(decoded.error)
        assert host_state(env.share) != state
    if name in CHANGES_FDS:
        assert decoded.error == 0, os.strerror(decoded.error)
        assert fd_count() != fds


def test_init_without_room_for_its_reply(share: Path) -> None:
    fs = Recorder(PassthroughFs(PassthroughConfig(shared_dir=str(share))))
    server = Server(fs)  # type: ignore[arg-type]
    payload = abi.INIT_IN.pack(
        abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, 1 << 17, abi.InitFlag.INIT_EXT, 0, (0,) * 11
    )
    try:
        for room in too_small(abi.INIT_OUT.size):
            reply = send(server, abi.Opcode.INIT, 0, payload, room)
            assert reply == b"" if room < HEADER else decode_reply(reply).error == errno.EINVAL
            assert not server.initialized and fs.calls == []
        reply = send(server, abi.Opcode.INIT, 0, payload, HEADER + abi.INIT_OUT.size)
        assert decode_reply(reply).error == 0
        assert server.initialized and fs.calls == ["init"]
    finally:
        fs._fs.shutdown()


def test_every_replying_opcode_is_covered() -> None:
    served = set(OPS)
    covered = {case.opcode for case in CASES.values()} | NO_REPLY | {abi.Opcode.INIT}
    assert served <= covered, sorted(abi.Opcode(op).name for op in served - covered)


def test_forget_needs_no_room(session: tuple[Server, Recorder, Env]) -> None:
    server, fs, env = session
    _, node = env.host_file()
    fs.calls.clear()
    assert send(server, abi.Opcode.FORGET, node, abi.FORGET_IN.pack(1), 0) == b""
    assert fs.calls == ["forget"]


def test_many_creates_with_a_tiny_reply_buffer(session: tuple[Server, Recorder, Env]) -> None:
    # The review's case: 100 CREATEs with 32 bytes of room left 100 files and 200 fds behind.
    server, _, env = session
    fds = fd_count()
    for i in range(100):
        payload = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"c%d\0" % i
        reply = send(server, abi.Opcode.CREATE, abi.ROOT_ID, payload, 32)
        assert decode_reply(reply).error == errno.EINVAL
    assert os.listdir(env.share) == []
    assert fd_count() == fds
