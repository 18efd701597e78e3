"""Name locks: what a name holds changes under that name's lock.

A name ("a/b/f", or the directory "a/b/") holds three things here: the object in the store, the
inode bound to the path, and the local copy (blob) bound to the path. Every request that binds
or unbinds any of them, or asks the store about the name in order to decide that, does so while
holding the name's lock: lookups that bind an inode, opens and truncates and DAX mappings that
make a local copy, create, symlink, mknod, mkdir, unlink, rmdir, rename (both names). So two
such requests on one name are one after the other, and what one learnt from the store is still
true when it binds.

Rules:

* The key of a path is the path without its trailing slash: the object "d" and the directory
  "d/" share one lock.
* Holding a name also holds each of its ancestor directories *shared*; the name itself is held
  *exclusive*. A directory rename or rmdir holds the directory exclusive, so it excludes every
  request on a name below it, while requests on different names in one directory run at once.
* A thread takes all the names it needs in one :meth:`NameLocks.hold` call (sorted, so two
  holders never wait for each other in a cycle) and never calls ``hold`` again while holding:
  that is checked.
* Uploads and ranged reads are not done under a name lock (a blob's ``commit_lock`` orders
  uploads against renames and unlinks, which take it under the name lock): a slow upload holds
  up nobody but the renames and unlinks of that file.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_SHARED, _EXCLUSIVE = 0, 1


def key_of(path: str) -> str:
    return path.rstrip("/")


def _ancestors(key: str) -> Iterator[str]:
    cut = key.rfind("/")
    while cut > 0:
        key = key[:cut]
        yield key
        cut = key.rfind("/")


class _State:
    __slots__ = ("readers", "waiting", "writer", "writers_waiting")

    def __init__(self) -> None:
        self.readers = 0
        self.writer = False
        #: Exclusive holders waiting: new shared holders wait behind them (no starvation).
        self.writers_waiting = 0
        #: Every thread waiting for this key, in either mode (for tests and debugging).
        self.waiting = 0

    def idle(self) -> bool:
        return not (self.readers or self.writer or self.writers_waiting or self.waiting)


class NameLocks:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._states: dict[str, _State] = {}
        self._local = threading.local()

    @contextlib.contextmanager
    def hold(self, *paths: str) -> Iterator[None]:
        """Hold ``paths`` exclusive (and their ancestors shared) for the ``with`` block."""
        if getattr(self._local, "holding", False):
            raise RuntimeError("name locks are taken once per request, not nested")
        plan: dict[str, int] = {}
        for path in paths:
            key = key_of(path)
            if not key:
                continue  # the root is never renamed nor removed
            plan[key] = _EXCLUSIVE
            for anc in _ancestors(key):
                plan.setdefault(anc, _SHARED)
        taken: list[tuple[str, int]] = []
        self._local.holding = True
        try:
            for key in sorted(plan):
                self._acquire(key, plan[key])
                taken.append((key, plan[key]))
            yield
        finally:
            for key, mode in reversed(taken):
                self._release(key, mode)
            self._local.holding = False

    def waiting(self, path: str) -> int:
        """How many threads wait for the lock of ``path`` right now."""
        with self._cond:
            st = self._states.get(key_of(path))
            return st.waiting if st is not None else 0

    def _acquire(self, key: str, mode: int) -> None:
        with self._cond:
            st = self._states.get(key)
            if st is None:
                st = self._states[key] = _State()
            if mode == _EXCLUSIVE:
                if st.readers or st.writer:
                    st.writers_waiting += 1
                    st.waiting += 1
                    while st.readers or st.writer:
                        self._cond.wait()
                    st.writers_waiting -= 1
                    st.waiting -= 1
                st.writer = True
            else:
                if st.writer or st.writers_waiting:
                    st.waiting += 1
                    while st.writer or st.writers_waiting:
                        self._cond.wait()
                    st.waiting -= 1
                st.readers += 1

    def _release(self, key: str, mode: int) -> None:
        with self._cond:
            st = self._states[key]
            if mode == _EXCLUSIVE:
                st.writer = False
            else:
                st.readers -= 1
            if st.idle():
                del self._states[key]
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._states)


__all__ = ["NameLocks", "key_of"]
