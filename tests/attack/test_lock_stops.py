"""Lock waits a ring stop must still end, sent by hand to a real daemon.

A stop of a ring (GET_VRING_BASE: QEMU's stop, reset or migration) ends every lock wait with
EINTR and waits for the ring's requests; while the front-end stays connected it waits without a
limit, so a wait the stop can't reach would block the front-end for good. Two ways a guest could
make one: a second SETLKW under the unique of one that waits (the server tracks waits by
unique), and a SETLKW that begins to wait after the stop ended the waits (a pool thread serves it
late, behind other requests).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from tests.attack.tools import ROOT, AttackDaemon, Guest, entry_of, open_of, start_daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")


def _locked_file(d: AttackDaemon) -> tuple[int, int]:
    """A file whose write lock owner 1 holds: (nodeid, fh)."""
    r = d.guest.create(ROOT, b"f", os.O_RDWR)
    node, fh = entry_of(r).nodeid, open_of(r, abi.ENTRY_OUT.size).fh
    assert d.guest.lock(abi.Opcode.SETLK, node, fh, 1, fcntl.F_WRLCK, False).ok
    return node, fh


def _wants(g: Guest, fh: int, owner: int) -> bytes:
    """SETLKW's arguments: ``owner`` wants the whole file's write lock."""
    return g.lk_payload(fh, owner, fcntl.F_WRLCK, False)


def test_a_second_wait_under_one_unique_is_refused(tmp_path: Path) -> None:
    share, outside = tmp_path / "share", tmp_path / "outside"
    share.mkdir()
    outside.mkdir()
    d = start_daemon(tmp_path, share, outside)
    g = d.guest
    node, fh = _locked_file(d)
    first, _ = g.submit(abi.Opcode.SETLKW, node, _wants(g, fh, 2), 64, unique=777)
    time.sleep(0.3)
    second, _ = g.submit(abi.Opcode.SETLKW, node, _wants(g, fh, 3), 64, unique=777)
    assert g.collect(second, abi.Opcode.SETLKW).err == errno.EINVAL
    # The stop reaches the first wait, which answers EINTR; the front-end is not kept waiting.
    d.frontend.get_vring_base(1)
    assert g.collect(first, abi.Opcode.SETLKW).err == errno.EINTR
    d.close()


@pytest.mark.parametrize("queued", [20, 55])
def test_a_wait_that_begins_during_a_ring_stop_ends(tmp_path: Path, queued: int) -> None:
    share, outside = tmp_path / "share", tmp_path / "outside"
    share.mkdir()
    outside.mkdir()
    for i in range(300):
        (share / f"x{i}").write_bytes(b"")
    d = start_daemon(tmp_path, share, outside, "--thread-pool-size=1")
    g = d.guest
    node, fh = _locked_file(d)
    dh = open_of(g.opendir(ROOT)).fh
    listing = abi.READ_IN.pack(dh, 0, 16384, 0, 0, 0, 0)
    for _ in range(queued):
        g.submit(abi.Opcode.READDIRPLUS, ROOT, listing, 16384)
    wait, _ = g.submit(abi.Opcode.SETLKW, node, _wants(g, fh, 2), 64)
    # The SETLKW must be taken off the ring before the stop: one still on it is not the
    # daemon's to answer until the ring starts again.
    g.q.wait_taken()
    d.frontend.get_vring_base(1)  # raises if the front-end gets no answer
    assert g.collect(wait, abi.Opcode.SETLKW).err == errno.EINTR
    d.close()
