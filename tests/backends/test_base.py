"""The shared backend base: the handle table's rules (numbers, counts, who closes, who waits),
the errno helper, and the DAX helpers against a window that records what it is asked."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable

import pytest

from pyvirtiofsd.backends.base import (
    Backend,
    Handle,
    HandleTable,
    dax_flush,
    dax_map,
    dax_resized,
    dax_unmap,
    oserror,
)
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ConnectionInfo, Context


class H(Handle):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Other(Handle):
    __slots__ = ()


def table() -> tuple[HandleTable[Handle], list[Handle]]:
    closed: list[Handle] = []
    return HandleTable(closed.append), closed


def test_oserror() -> None:
    e = oserror(errno.EBADF)
    assert isinstance(e, OSError) and e.errno == errno.EBADF
    assert e.strerror == os.strerror(errno.EBADF)
    assert oserror(errno.EINVAL, "invalid name").strerror == "invalid name"


def test_numbers_count_up_and_unknown_ones_are_ebadf() -> None:
    t, closed = table()
    a, b = H("a"), H("b")
    assert (t.add(a), t.add(b)) == (1, 2)
    assert 1 in t and 2 in t and 0 not in t and len(t) == 2
    for fh in (0, 3, -1, 1 << 64):
        with pytest.raises(OSError) as e:
            t.use(fh)
        assert e.value.errno == errno.EBADF
        assert t.use_if(fh) is None
    assert t.use_if(None) is None
    # A released number is never given again, nor found.
    h = t.remove(1)
    assert h is a
    t.done(a)
    assert closed == [a]
    assert t.add(H("c")) == 3
    assert t.use_if(1) is None
    assert t.remove(1) is None


def test_a_migrated_table_keeps_the_guests_numbers() -> None:
    t, closed = table()
    a, b = H("a"), H("b")
    t.insert(5, a)
    t.insert(2, b)
    t.mark_lost(3)
    t.reserve(9)
    items, lost, next_fh = t.items()
    assert items == [(2, b), (5, a)] and lost == [3] and next_fh == 9
    assert t.use(5) is a
    t.done(a)
    with pytest.raises(ValueError, match="taken"):
        t.insert(5, H("again"))
    with pytest.raises(ValueError, match="taken"):
        t.insert(3, H("lost one"))
    # A lost number answers EIO until released; then it is unknown (EBADF).
    with pytest.raises(OSError) as e:
        t.use(3)
    assert e.value.errno == errno.EIO
    assert t.lost(3) and t.remove(3) is None and not t.lost(3)
    with pytest.raises(OSError) as e:
        t.use(3)
    assert e.value.errno == errno.EBADF
    assert t.add(H("new")) == 9
    for h in t.remove_all():
        t.done(h)
    assert sorted(h.name for h in closed) == ["a", "b", "new"]  # type: ignore[attr-defined]


def test_uses_are_counted() -> None:
    t, closed = table()
    h = H("a")
    fh = t.add(h)
    assert h.users == 1
    assert t.use(fh) is h and t.use_if(fh) is h
    assert h.users == 3
    t.done(h)
    t.done(h)
    assert h.users == 1 and not closed


def test_remove_closes_at_once_when_nobody_uses_it() -> None:
    t, closed = table()
    h = H("a")
    fh = t.add(h)
    assert t.remove(fh) is h
    assert fh not in t and not closed
    t.done(h)
    assert closed == [h]


def test_the_last_user_closes_a_removed_handle() -> None:
    """RELEASE never closes what a concurrent request uses: the request that is last closes."""
    t, closed = table()
    h = H("a")
    fh = t.add(h)
    first, second = t.use(fh), t.use(fh)
    t.done(t.remove(fh))  # type: ignore[arg-type]
    assert not closed
    t.done(first)
    assert not closed
    t.done(second)
    assert closed == [h]


def test_close_runs_outside_the_lock_and_once() -> None:
    seen: list[object] = []

    def close(h: Handle) -> None:
        # Would deadlock if the table still held its lock.
        seen.append(t.use_if(1))
        t.add(H("during close"))

    t: HandleTable[Handle] = HandleTable(close)
    h = H("a")
    t.add(h)
    t.done(t.remove(1))  # type: ignore[arg-type]
    assert seen == [None]
    assert t.remove(1) is None


def test_remove_by_kind() -> None:
    t, _ = table()
    fh = t.add(H("a"))
    assert t.remove(fh, Other) is None
    assert t.remove_idle(fh, Other) is None
    assert fh in t
    assert t.remove(fh, H) is not None


def test_remove_all_hands_over_every_count() -> None:
    t, closed = table()
    hs = [H(str(i)) for i in range(3)]
    for h in hs:
        t.add(h)
    busy = t.use(2)
    out = t.remove_all()
    assert out == hs and len(t) == 0
    for h in out:
        t.done(h)
    assert closed == [hs[0], hs[2]]
    t.done(busy)
    assert closed == [hs[0], hs[2], hs[1]]


def test_remove_idle_returns_at_once_without_users() -> None:
    t, closed = table()
    h = H("a")
    fh = t.add(h)
    assert t.remove_idle(fh) is h
    assert h.users == 0 and fh not in t and not closed


def test_remove_idle_waits_for_the_users_and_closes_nothing() -> None:
    t, closed = table()
    h = H("a")
    fh = t.add(h)
    users = [t.use(fh), t.use(fh)]
    got: list[Handle | None] = []
    remover = threading.Thread(target=lambda: got.append(t.remove_idle(fh)))
    remover.start()
    # Out of the table at once (no new user can come), but the remover waits for these two.
    for _ in range(1000):
        if fh not in t:
            break
        threading.Event().wait(0.01)
    assert fh not in t
    with pytest.raises(OSError):
        t.use(fh)
    t.done(users.pop())
    remover.join(0.05)
    assert remover.is_alive() and not got
    t.done(users.pop())
    remover.join(60)
    assert got == [h] and not closed and h.users == 0


class Window:
    """A DAX window that records what it is asked, with mappings of ``mapped`` inodes."""

    size = 1 << 21

    def __init__(self, mapped: Iterable[int] = ()) -> None:
        self.mapped = set(mapped)
        self.calls: list[tuple[object, ...]] = []

    def setup(
        self, fd: int, foffset: int, moffset: int, length: int, writable: bool, owner: object
    ) -> None:
        os.fstat(fd)  # open while the window copies it
        self.calls.append(("setup", foffset, moffset, length, writable, owner))

    def remove(self, ranges: Iterable[tuple[int, int]]) -> None:
        self.calls.append(("remove", list(ranges)))

    def holds(self, owner: object) -> bool:
        return owner in self.mapped

    def resized(self, owner: object, size: int) -> None:
        self.calls.append(("resized", owner, size))

    def flush(self, owner: object) -> None:
        self.calls.append(("flush", owner))


def test_dax_without_a_window() -> None:
    opened: list[bool] = []
    with pytest.raises(OSError) as e:
        dax_map(None, 5, 0, 4096, 0, 0, lambda w: opened.append(w) or 0)
    assert e.value.errno == errno.ENOSYS and not opened
    with pytest.raises(OSError) as e:
        dax_unmap(None, [(0, 4096)])
    assert e.value.errno == errno.ENOSYS
    dax_flush(None, 5)
    dax_resized(None, 5, 10)


def test_dax_map_opens_for_the_mapping_and_closes() -> None:
    w = Window()
    fds: list[int] = []

    def open_fd(writable: bool) -> int:
        fds.append(os.open("/dev/null", os.O_RDWR if writable else os.O_RDONLY))
        return fds[-1]

    dax_map(w, 5, 4096, 8192, abi.SETUPMAPPING_FLAG_WRITE, 1 << 20, open_fd)
    dax_map(w, 6, 0, 4096, 0, 0, open_fd)
    assert w.calls == [("setup", 4096, 1 << 20, 8192, True, 5), ("setup", 0, 0, 4096, False, 6)]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)

    class Refused(Window):
        def setup(self, *args: object) -> None:
            raise OSError(errno.EINVAL, "refused")

    with pytest.raises(OSError):
        dax_map(Refused(), 5, 0, 4096, 0, 0, open_fd)
    with pytest.raises(OSError):
        os.fstat(fds[-1])
    dax_unmap(w, [(0, 4096)])
    assert w.calls[-1] == ("remove", [(0, 4096)])


def test_dax_flush_and_resized_only_for_mapped_files() -> None:
    w = Window(mapped=[5])
    dax_flush(w, 6)
    dax_resized(w, 6, 10)
    dax_resized(w, 6, fd=-1)  # never stat'ed: 6 has no mappings
    assert w.calls == []
    dax_flush(w, 5)
    dax_resized(w, 5, 10)
    r, wfd = os.pipe()
    try:
        dax_resized(w, 5, fd=r)
    finally:
        os.close(r)
        os.close(wfd)
    assert w.calls == [("flush", 5), ("resized", 5, 10), ("resized", 5, 0)]


class NullBackend(Backend):
    """Maps /dev/null for every inode, and remembers what it was asked to open."""

    def __init__(self, window: Window | None) -> None:
        self._conn = ConnectionInfo(dax_window=window)
        self.asked: list[tuple[int, int | None, int, int, bool]] = []

    def dax_fd(self, ino: int, fh: int | None, offset: int, length: int, writable: bool) -> int:
        self.asked.append((ino, fh, offset, length, writable))
        return os.open("/dev/null", os.O_RDWR)


def test_backend_maps_through_dax_fd() -> None:
    ctx = Context(0, 0, 1)
    w = Window()
    fs = NullBackend(w)
    fs.setupmapping(ctx, 7, 3, 4096, 8192, abi.SETUPMAPPING_FLAG_WRITE, 1 << 21)
    fs.setupmapping(ctx, 7, 3, 0, 4096, 0, 0)
    assert fs.asked == [(7, 3, 4096, 8192, True), (7, 3, 0, 4096, False)]
    assert w.calls == [("setup", 4096, 1 << 21, 8192, True, 7), ("setup", 0, 0, 4096, False, 7)]
    fs.removemapping(ctx, [(0, 4096)])
    assert w.calls[-1] == ("remove", [(0, 4096)])
    # No window: ENOSYS before anything is opened.
    fs = NullBackend(None)
    for call in (
        lambda: fs.setupmapping(ctx, 7, 3, 0, 4096, 0, 0),
        lambda: fs.removemapping(ctx, [(0, 4096)]),
    ):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOSYS
    assert fs.asked == []
    # A backend that says nothing of mapping maps nothing.
    with pytest.raises(OSError) as e:
        Backend.dax_fd(fs, 7, None, 0, 4096, False)
    assert e.value.errno == errno.ENOSYS
