"""The request path's lock: the C one of the compiled build behaves as ``threading.Lock``."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable

import pytest

from pyvirtiofsd import mutex
from pyvirtiofsd.mutex import Mutex, new_mutex

#: Every lock maker a build has: threading's, and the C one where it was built.
MAKERS: dict[str, Callable[[], Mutex]] = {"threading": threading.Lock}
if mutex._CMutex is not None:
    MAKERS["C"] = mutex._CMutex


@pytest.fixture(params=sorted(MAKERS))
def make(request: pytest.FixtureRequest) -> Callable[[], Mutex]:
    return MAKERS[request.param]


def test_the_build_makes_its_own() -> None:
    assert new_mutex is (mutex._CMutex or threading.Lock)


def test_with_acquire_release_and_locked(make: Callable[[], Mutex]) -> None:
    lock = make()
    assert not lock.locked()
    with lock as got:
        assert got is True and lock.locked()
        assert lock.acquire(False) is False  # not reentrant
        assert lock.acquire(timeout=0.01) is False
    assert not lock.locked()
    assert lock.acquire() is True and lock.locked()
    lock.release()
    assert lock.acquire(blocking=True, timeout=1) is True
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()
    with pytest.raises(ValueError):
        lock.acquire(False, 1)
    with pytest.raises(ValueError):
        lock.acquire(timeout=-2)
    with pytest.raises(TypeError):
        lock.acquire(1, 2, 3)  # type: ignore[call-arg]
    for refused, error in [
        (math.nan, ValueError),
        (math.inf, OverflowError),
        (1e19, OverflowError),
    ]:
        with pytest.raises(error):
            lock.acquire(timeout=refused)


def test_an_exception_in_the_block_releases_it(make: Callable[[], Mutex]) -> None:
    lock = make()
    with pytest.raises(KeyError), lock:
        raise KeyError("x")
    assert not lock.locked()


def test_another_thread_may_release_it(make: Callable[[], Mutex]) -> None:
    lock = make()
    lock.acquire()
    t = threading.Thread(target=lock.release)
    t.start()
    t.join()
    assert not lock.locked()


def test_a_waiter_lets_python_run_and_gets_the_lock_once_it_is_free(
    make: Callable[[], Mutex],
) -> None:
    """A thread waiting for a held lock releases the GIL (the holder, in Python, goes on and
    frees it); a timed wait ends when its time is up."""
    lock = make()
    lock.acquire()
    got: list[float] = []

    def wait() -> None:
        with lock:
            got.append(time.monotonic())

    t = threading.Thread(target=wait)
    t.start()
    spun = 0
    until = time.monotonic() + 0.2
    while time.monotonic() < until:
        spun += 1  # Python runs here while the other thread waits
    assert not got and spun > 1000
    released = time.monotonic()
    lock.release()
    t.join(10)
    assert got and got[0] >= released
    lock.acquire()
    start = time.monotonic()
    assert lock.acquire(timeout=0.1) is False
    assert time.monotonic() - start >= 0.09
    lock.release()


class _Alarm(Exception):
    pass


@pytest.mark.parametrize("how", ["with", "acquire", "timed acquire"])
def test_the_main_thread_runs_its_signal_handlers_while_it_waits(
    make: Callable[[], Mutex], how: str
) -> None:
    """A lock may be held across a close() stuck on a hung mount: a signal (SIGTERM) must still
    reach the main thread waiting for it, and the exception its handler raises ends the wait
    without the lock."""
    lock = make()
    held = threading.Event()
    free = threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            free.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)

    def alarm(signum: int, frame: object) -> None:
        raise _Alarm

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    start = time.monotonic()
    try:
        with pytest.raises(_Alarm):
            if how == "with":
                with lock:
                    pass
            elif how == "acquire":
                lock.acquire()
            else:
                lock.acquire(timeout=30)
        assert time.monotonic() - start < 5
        assert lock.locked()  # still the other thread's
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        free.set()
        t.join(10)
    assert not lock.locked()


def test_it_keeps_threads_apart(make: Callable[[], Mutex]) -> None:
    lock = make()
    box = {"n": 0}

    def add() -> None:
        for _ in range(20000):
            with lock:
                n = box["n"]
                time.sleep(0) if n % 5000 == 0 else None
                box["n"] = n + 1

    threads = [threading.Thread(target=add) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert box["n"] == 6 * 20000 and not lock.locked()


def test_no_arguments_make_it() -> None:
    if mutex._CMutex is None:
        pytest.skip("pure build: no C lock")
    with pytest.raises(TypeError):
        mutex._CMutex(1)  # type: ignore[call-arg]


def test_the_functions_take_and_give_back_any_lock(make: Callable[[], Mutex]) -> None:
    """``acquire(lock)`` and ``release(lock)`` are the lock's methods as functions, for the
    build's own lock and for threading's alike."""
    for lock in (make(), threading.Lock()):
        assert mutex.acquire(lock) is True and lock.locked()
        assert lock.acquire(False) is False
        mutex.release(lock)
        assert not lock.locked()
        with pytest.raises(RuntimeError):
            mutex.release(lock)
