"""The passthrough's locks (:mod:`pyvirtiofsd.backends.passthrough.locks`) through raw FUSE
requests: GETLK/SETLK/SETLKW on a special file open nothing (ENOLCK), lock files of a read-only
share are read-only, write locks conflict between owners as on the host, and the close of an
owner while its SETLK runs leaves neither a lock nor a descriptor.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from tests.backends.passthrough.conftest import (
    GUARD,
    SPECIAL,
    Daemon,
    errno_of,
    fd_count,
    guarded,
    in_thread,
    is_open,
    lk,
    open_fds,
    pause_setlk,
    unblock_fifo,
)

# --- finding 3: locks -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SPECIAL, "link"])
@pytest.mark.parametrize("op", [abi.Opcode.GETLK, abi.Opcode.SETLK, abi.Opcode.SETLKW])
def test_locks_on_special_files_open_nothing(daemon: Daemon, name: str, op: int) -> None:
    ino = daemon.ino(name)
    err = guarded(
        lambda: errno_of(lk, daemon.c, op, ino, 1, fcntl.F_WRLCK),
        unblock_fifo(daemon.share / "fifo"),
    )
    assert err == errno.ENOLCK
    assert daemon.watch.opened() == []
    assert open_fds(daemon.share / name) == []


def test_readonly_lock_fds_are_read_only(share: Path) -> None:
    d = Daemon(share, readonly=True)
    try:
        ino = d.ino("file")
        lk(d.c, abi.Opcode.SETLK, ino, 1, fcntl.F_RDLCK)
        # POSIX: a write lock needs a file open for writing
        assert errno_of(lk, d.c, abi.Opcode.SETLK, ino, 2, fcntl.F_WRLCK) == errno.EBADF
        fds = open_fds(share / "file")
        assert fds and all(flags & os.O_ACCMODE == os.O_RDONLY for _, flags in fds)
        lk(d.c, abi.Opcode.SETLK, d.ino("dir"), 1, fcntl.F_RDLCK)
    finally:
        d.close()


def test_write_locks_still_work(daemon: Daemon) -> None:
    ino = daemon.ino("file")
    lk(daemon.c, abi.Opcode.SETLK, ino, 1, fcntl.F_WRLCK)
    assert errno_of(lk, daemon.c, abi.Opcode.SETLK, ino, 2, fcntl.F_WRLCK) == errno.EAGAIN
    held = abi.LK_OUT.unpack(lk(daemon.c, abi.Opcode.GETLK, ino, 2, fcntl.F_WRLCK))
    assert (held.type, held.pid) == (fcntl.F_WRLCK, 4242)
    daemon.c.flush(ino, daemon.c.open(ino).fh, lock_owner=1)
    lk(daemon.c, abi.Opcode.SETLK, ino, 2, fcntl.F_WRLCK)


def test_close_of_an_owner_while_its_setlk_runs_leaves_no_lock_and_no_fd(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUSH (the guest's close()) of a lock owner on one queue while a SETLK of the same owner
    runs on another: the lock file is closed after the SETLK, not under it, and its locks go."""
    c = daemon.c
    ino = daemon.ino("file")
    fh = c.open(ino).fh
    lk(c, abi.Opcode.SETLK, ino, 1, fcntl.F_RDLCK)
    base = fd_count()
    pause = pause_setlk(monkeypatch)
    t, result = in_thread(lambda: lk(c, abi.Opcode.SETLK, ino, 1, fcntl.F_WRLCK))
    pause.wait()
    c.flush(ino, fh, lock_owner=1)
    assert is_open(pause.args[0])
    pause.go()
    t.join(GUARD)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    assert fd_count() == base - 1  # the owner's lock file, gone with the SETLK
    lk(c, abi.Opcode.SETLK, ino, 2, fcntl.F_WRLCK)  # and no lock of owner 1 is left
    c.release(ino, fh)
    c.forget(ino, 1)
