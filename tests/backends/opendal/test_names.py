"""Name locks (:mod:`pyvirtiofsd.backends.opendal.names`): a name is held exclusive, its ancestors
shared; an object and the directory of the same name share one lock; names in one directory are
held at once; a directory held exclusive excludes every name below it; holds are not nested, and
two holders of the same names in any order never deadlock.

Waiting is seen through :meth:`NameLocks.waiting` and concurrency through barriers; nothing is
timed (the bounds only keep a broken lock from hanging the run)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from pyvirtiofsd.backends.opendal.names import NameLocks, key_of

GUARD = 30.0


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.001)


class Holder(threading.Thread):
    """Holds ``paths`` until :meth:`let_go`."""

    def __init__(self, locks: NameLocks, *paths: str) -> None:
        super().__init__(daemon=True)
        self.locks = locks
        self.paths = paths
        self.holding = threading.Event()
        self._go = threading.Event()

    def run(self) -> None:
        with self.locks.hold(*self.paths):
            self.holding.set()
            self._go.wait(GUARD)

    def let_go(self) -> None:
        self._go.set()
        self.join(GUARD)
        assert not self.is_alive()


def test_key_of_drops_the_directory_slash() -> None:
    assert key_of("a/b/") == key_of("a/b") == "a/b"
    assert key_of("") == ""


@pytest.mark.parametrize(
    ("held", "wanted", "waits_on"),
    [
        ("d", "d/", "d"),  # the object "d" and the directory "d/" share one lock
        ("dir/", "dir/x", "dir"),  # a directory held exclusive excludes what is below it
        ("dir/x", "dir/", "dir"),  # and waits for what is below it to be let go
        ("a/b/c", "a/b/c", "a/b/c"),
    ],
)
def test_exclusive_names_wait_for_each_other(held: str, wanted: str, waits_on: str) -> None:
    locks = NameLocks()
    first = Holder(locks, held)
    first.start()
    assert first.holding.wait(GUARD)
    second = Holder(locks, wanted)
    second.start()
    wait_until(lambda: locks.waiting(waits_on) == 1, f"{wanted} waits for {held}")
    assert not second.holding.is_set()
    first.let_go()
    assert second.holding.wait(GUARD)
    second.let_go()
    assert len(locks) == 0  # nothing left behind once idle


def test_names_in_one_directory_are_held_at_once() -> None:
    locks = NameLocks()
    together = threading.Barrier(3, timeout=GUARD)

    def hold(name: str) -> None:
        with locks.hold(name):
            together.wait()  # passes only while all three hold their names

    threads = [threading.Thread(target=hold, args=(f"dir/{n}",)) for n in "ab"]
    for t in threads:
        t.start()
    with locks.hold("dir/c"):
        together.wait()
    for t in threads:
        t.join(GUARD)
    assert len(locks) == 0


def test_holds_are_not_nested() -> None:
    locks = NameLocks()
    with locks.hold("a"), pytest.raises(RuntimeError, match="not nested"), locks.hold("b"):
        pass
    with locks.hold("a"):  # the refused attempt left nothing held
        pass
    assert len(locks) == 0


def test_the_root_is_never_locked() -> None:
    """The root is never renamed nor removed: holding it takes nothing, and never waits."""
    locks = NameLocks()
    with locks.hold(""):
        assert len(locks) == 0
        other = Holder(locks, "")
        other.start()
        assert other.holding.wait(GUARD)
        other.let_go()


def test_opposite_orders_never_deadlock() -> None:
    locks = NameLocks()
    start = threading.Barrier(2, timeout=GUARD)

    def rename(a: str, b: str) -> None:
        start.wait()
        for _ in range(300):
            with locks.hold(a, b):
                pass

    threads = [
        threading.Thread(target=rename, args=("x/one", "y/two")),
        threading.Thread(target=rename, args=("y/two", "x/one")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
        assert not t.is_alive(), "the two holders deadlocked"
    assert len(locks) == 0
