"""The real daemon, driven by the Python front-end, refuses every request whose reply can't fit
the writable buffers of its chain before running it: nothing changes in the share, and the
daemon's descriptor count (inodes, handles, lock files) stays where it was."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.testing.fuse_client import decode_reply, encode_request
from tests.e2e.frontend_daemon import Setup, finish, start
from tests.reply_room import CASES, HEADER, Env, host_state


def fd_count(s: Setup) -> int:
    return len(os.listdir(f"/proc/{s.proc.pid}/fd"))


def send(s: Setup, opcode: int, nodeid: int, payload: bytes, room: int, unique: int) -> bytes:
    q = s.frontend.queues[1]
    request = encode_request(opcode, nodeid, payload, unique)
    return q.request([request], [room] if room else [], timeout=20)


def test_no_side_effect_without_room_for_the_reply(tmp_path: Path) -> None:
    s = start(tmp_path, "--xattr")
    try:
        env = Env(s.src, s.fuse)
        unique = 10_000
        for name, case in CASES.items():
            nodeid, payload = case.build(env)
            fds, state = fd_count(s), host_state(s.src)
            rooms = [0, 8, HEADER - 1] + ([HEADER + case.fixed - 1] if case.fixed else [])
            for room in rooms:
                unique += 1
                reply = send(s, case.opcode, nodeid, payload, room, unique)
                if room < HEADER:
                    assert reply == b"", (name, room)
                else:
                    assert decode_reply(reply) == (errno.EINVAL, unique, b""), (name, room)
                assert fd_count(s) == fds, (name, room)
                assert host_state(s.src) == state, (name, room)
            unique += 1
            reply = send(s, case.opcode, nodeid, payload, HEADER + case.fixed, unique)
            assert decode_reply(reply).unique == unique, name
    finally:
        log = finish(s)
    assert "has no room for a reply" in log


def test_many_creates_with_a_tiny_reply_buffer(tmp_path: Path) -> None:
    # The review's case: 100 CREATEs with 32 bytes of room left 100 files, 100 handles and 200
    # fds in the daemon.
    s = start(tmp_path)
    try:
        fds = fd_count(s)
        for i in range(100):
            payload = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"c%d\0" % i
            reply = send(s, abi.Opcode.CREATE, abi.ROOT_ID, payload, 32, 500 + i)
            assert decode_reply(reply) == (errno.EINVAL, 500 + i, b"")
        assert os.listdir(s.src) == []
        assert fd_count(s) == fds
    finally:
        finish(s)
