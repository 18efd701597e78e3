"""The lock the request path takes: :func:`new_mutex`.

Each request takes a few short locks: the used ring's, an inode's pin count, a file handle's
count of users. CPython 3.11's ``threading.Lock`` parses ``acquire()``'s arguments and reads the
monotonic clock for a deadline at every acquisition, a free lock included, which costs more than
the few statements the lock guards. The compiled build adds ``_mutex.c``, a lock that is taken
with one atomic operation when it is free and waited for, with the GIL released, only when
another thread holds it.

Rules: a lock from :func:`new_mutex` is used as ``threading.Lock`` is (``with``, ``acquire`` with
``blocking`` and ``timeout``, ``release``, ``locked``), whichever build made it; it is not
reentrant and any thread may release it. A wait lets the main thread's signal handlers run, as
``threading.Lock``'s does: a holder may be stuck (a close() on a hung mount), and a signal must
still reach the daemon. Code annotates such a lock as :class:`Mutex` (a name apart from FUSE's
POSIX locks). The request path takes and gives back its locks with :func:`acquire` and
:func:`release`, which are ``lock.acquire()`` and ``lock.release()`` as plain functions: a
compiled build calls a method the generic way (looked up by name), a function bound ``Final``
directly. They take the locks :func:`new_mutex` makes (the pure build's are
``threading.Lock``'s own methods, which take nothing else).
"""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final, Protocol, cast

try:
    from pyvirtiofsd._mutex import Mutex as _CMutex
    from pyvirtiofsd._mutex import acquire as _c_acquire
    from pyvirtiofsd._mutex import release as _c_release
except ImportError:  # a pure build: no C at all
    _CMutex = None
    _c_acquire = None
    _c_release = None

__all__ = ["Mutex", "acquire", "new_mutex", "release"]


class Mutex(Protocol):
    """What the project asks of a lock (``threading.Lock`` is one)."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...

    def release(self) -> None: ...

    def locked(self) -> bool: ...

    def __enter__(self) -> bool: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


#: A new, free lock: the C one in the compiled build, ``threading.Lock`` otherwise.
new_mutex: Final[Callable[[], Mutex]] = _CMutex if _CMutex is not None else threading.Lock
#: ``acquire(lock)``: ``lock.acquire()``, waiting as long as it takes (True).
acquire: Final = cast(
    "Callable[[Mutex], bool]", _c_acquire if _c_acquire is not None else _thread.LockType.acquire
)
#: ``release(lock)``: ``lock.release()``.
release: Final = cast(
    "Callable[[Mutex], None]", _c_release if _c_release is not None else _thread.LockType.release
)
