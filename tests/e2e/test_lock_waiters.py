"""Blocking lock requests that have to wait do so in one bounded pool per connection.

The real daemon, driven by the Python front-end: a lock is held, then more SETLKW requests
than the pool has places ask for it. Those beyond the bound get ENOLCK at once, the daemon's
thread count stays bounded, and the waiting ones all get their locks once the holder lets go.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import MAX_LOCK_WAITERS
from pyvirtiofsd.testing.fuse_client import decode_reply, encode_request
from tests.e2e.frontend_daemon import finish, start

HOLDER = 1
EXTRA = 16


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_lock_waits_beyond_the_bound_get_enolck(tmp_path: Path) -> None:
    s = start(tmp_path)
    try:
        (s.src / "locked").write_bytes(b"x" * 100)
        node = s.lookup("locked")
        fh = s.fuse.open(node, os.O_RDWR).fh
        q = s.frontend.queues[1]

        def lk(opcode: int, owner: int, ltype: int, unique: int) -> bytes:
            payload = abi.LK_IN.pack(fh, owner, 0, 99, ltype, owner, 0, 0)
            return encode_request(opcode, node, payload, unique)

        reply = q.request([lk(abi.Opcode.SETLK, HOLDER, fcntl.F_WRLCK, 1)], [64], timeout=20)
        assert decode_reply(reply).error == 0
        baseline = threads_of(s.proc.pid)

        # Each waiter is a lock owner of its own asking for a shared lock: all of them can have
        # it at once when the holder's exclusive lock goes.
        heads = []
        for i in range(MAX_LOCK_WAITERS + EXTRA):
            request = lk(abi.Opcode.SETLKW, 100 + i, fcntl.F_RDLCK, 1000 + i)
            heads.append(q.submit([request], [64]))
        q.kick()
        # The requests are served in order: the first MAX_LOCK_WAITERS wait, the rest are
        # refused without waiting.
        for i, head in enumerate(heads[MAX_LOCK_WAITERS:]):
            q.wait(head, timeout=30)
            error, unique, _ = decode_reply(q.result(head)[1])
            assert (error, unique) == (errno.ENOLCK, 1000 + MAX_LOCK_WAITERS + i)
        assert threads_of(s.proc.pid) <= baseline + MAX_LOCK_WAITERS
        assert not any(head in q.completed for head in heads[:MAX_LOCK_WAITERS])

        reply = q.request([lk(abi.Opcode.SETLK, HOLDER, fcntl.F_UNLCK, 2)], [64], timeout=20)
        assert decode_reply(reply).error == 0
        for i, head in enumerate(heads[:MAX_LOCK_WAITERS]):
            q.wait(head, timeout=60)
            assert decode_reply(q.result(head)[1]) == (0, 1000 + i, b"")
        assert threads_of(s.proc.pid) <= baseline + MAX_LOCK_WAITERS

        # The places are free again: one more wait is accepted, and ends when the lock frees.
        reply = q.request([lk(abi.Opcode.SETLK, HOLDER, fcntl.F_RDLCK, 3)], [64], timeout=20)
        assert decode_reply(reply).error == 0
        head = q.submit([lk(abi.Opcode.SETLKW, 99, fcntl.F_WRLCK, 4)], [64])
        q.kick()
        reply = q.request([lk(abi.Opcode.SETLK, HOLDER, fcntl.F_UNLCK, 5)], [64], timeout=20)
        assert decode_reply(reply).error == 0
        for i in range(MAX_LOCK_WAITERS):  # the shared locks of the first round go with them
            unlock = lk(abi.Opcode.SETLK, 100 + i, fcntl.F_UNLCK, 2000 + i)
            assert decode_reply(q.request([unlock], [64], timeout=20)).error == 0
        q.wait(head, timeout=60)
        assert decode_reply(q.result(head)[1]) == (0, 4, b"")
        s.fuse.release(node, fh)
        s.fuse.forget(node, 1)
        s.fuse.getattr(ROOT)
    finally:
        log = finish(s)
    assert "lock waits already; ENOLCK" in log
