"""FUSE over io_uring for the /dev/fuse mount: a queue per CPU, served on that CPU.

Linux 6.14 and later can pass FUSE requests through io_uring instead of read() and write() on
/dev/fuse, when fuse's ``enable_uring`` parameter is set and the daemon asks at INIT
(FUSE_OVER_IO_URING). The kernel then keeps one queue per possible CPU and puts a request on the
queue of the CPU its caller runs on. Each queue here has a thread of its own, pinned to that CPU
where the daemon may run there, with a ring of its own and a few entries (:func:`entries_for`):
buffers the kernel fills with a request and reads the reply from, named in one uring command
that returns a reply and fetches the next request (COMMIT_AND_FETCH). A caller and the thread
that answers it then share a CPU, and a request costs one system call of the daemon's instead
of two; a caller that waits is not woken across CPUs (see docs/benchmarks.md).

An entry's buffer is one anonymous mapping: the kernel's header (the in or out header at 0, the
opcode's fixed arguments at 128, the entry's commit id and payload size at 256) in its first
page, and the payload (names, data) after it. The server is handed the request as it would read
it from /dev/fuse: the in header and fixed arguments copied together into the same page, with a
payload of up to :data:`_SMALL` bytes copied after them (one buffer: the server decodes it in
one piece), or followed by the payload in place (a WRITE's data is not copied). The reply goes
to the out header's place and the payload, the kernel's layout.

Rules:

* Requests come through /dev/fuse until every queue has registered, and FORGET, INTERRUPT and
  the daemon's notifications always do: the mount's /dev/fuse readers stay.
* A queue's ring is touched by its own thread only. A request answered later (a lock wait) has
  its reply written into its entry by whoever ends the wait, who then hands the entry back to
  the queue's thread (:meth:`_Queue.hand_back`: a list under a lock, and an eventfd the ring
  reads), which returns it to the kernel. The queue registers a new entry for each request
  answered later, so that waits never take the last one: the request that ends them (an
  unlock from a caller on the same CPU) must still find one. Entries are kept for reuse.
* The kernel asks every queue to be there before it sends any request through them, and holds
  requests back until then: :meth:`FuseUring.prepare` makes every ring and buffer before the
  INIT reply offers io_uring, so that once offered nothing is left that can fail but the
  kernel's own registration (which then falls back to /dev/fuse by itself).
* A queue ends when the kernel ends its entries (the connection aborted or unmounted:
  ENOTCONN) or when :meth:`FuseUring.stop` asks; its ring is closed then, which takes back
  whatever the kernel still held of it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.uring import Ring

__all__ = ["ENTRIES", "FuseUring", "entries_for", "possible_cpus"]

log = logging.getLogger(__name__)

#: Entries a mount starts with, over all its queues, and the most and fewest one queue has: a
#: queue serves its requests one at a time, so a few are enough to hand it the next while it
#: serves one (more wait in the kernel), and each can come to hold a payload buffer of
#: max_write (its pages are only allocated once a request reaches them). A request answered
#: later takes another (_Queue.lend).
ENTRIES: Final = 64
_MOST_PER_QUEUE: Final = 16
_FEWEST_PER_QUEUE: Final = 2


def entries_for(cpus: int) -> int:
    """Entries each of ``cpus`` queues starts with: 16 up to 4 CPUs, 2 from 32 on."""
    return max(_FEWEST_PER_QUEUE, min(_MOST_PER_QUEUE, ENTRIES // max(cpus, 1)))

_CMD_REGISTER: Final = 1
_CMD_COMMIT_AND_FETCH: Final = 2
#: sizeof(struct fuse_uring_req_header), and where its parts lie.
_HEADER: Final = 288
_OP_IN: Final = 128
_COMMIT_ID: Final = 264
_PAYLOAD_SZ: Final = 272
#: Where the request is put together for the server, in the header's page.
_SCRATCH: Final = 512
#: Payloads up to this size are copied after the fixed arguments (names, small values).
_SMALL: Final = 1024
_PAGE: Final = 4096
_IN_SIZE: Final = abi.IN_HEADER.size
_OUT_SIZE: Final = abi.OUT_HEADER.size
#: user_data of the eventfd read; an entry's is its index in its queue.
_WAKE: Final = 1 << 32
_PRIVATE: Final = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_OUT: Final = abi.OUT_HEADER.struct
_ENDED: Final = (errno.ENOTCONN, errno.ECANCELED, errno.ENODEV, errno.ECONNABORTED)
#: io_uring_enter errors to enter again after (the kernel short of memory for a moment, or
#: completions to reap first).
_TRANSIENT: Final = (errno.EAGAIN, errno.EBUSY, errno.ENOMEM, errno.EINTR)


try:
    from pyvirtiofsd._uring import finish as _c_finish
    from pyvirtiofsd._uring import stage as _c_stage
except ImportError:  # the pure build
    _c_stage = None
    _c_finish = None
#: The compiled build's two steps around the server (``_uring.c``), as _stage_py and _finish_py
#: do them. Bound Final.
_native_stage: Final = _c_stage
_native_finish: Final = _c_finish


def _stage_py(view: memoryview) -> int:
    """Put the request of an entry's buffer together at _SCRATCH: the in header, the fixed
    arguments and a payload of up to _SMALL bytes. The bytes put there, or -1 when the sizes
    the kernel wrote do not add up."""
    length = _U32.unpack_from(view, 0)[0]
    payload_len = _U32.unpack_from(view, _PAYLOAD_SZ)[0]
    args_len = length - _IN_SIZE - payload_len
    if not 0 <= args_len <= _OP_IN or payload_len > len(view) - _PAGE:
        return -1
    start = _SCRATCH + _IN_SIZE
    view[_SCRATCH:start] = view[:_IN_SIZE]
    view[start : start + args_len] = view[_OP_IN : _OP_IN + args_len]
    staged = _IN_SIZE + args_len
    if payload_len <= _SMALL:
        end = _SCRATCH + staged
        view[end : end + payload_len] = view[_PAGE : _PAGE + payload_len]
        staged += payload_len
    return staged


def _finish_py(view: memoryview, reply: int) -> int:
    """Store a reply's payload size in an entry's buffer (an EIO header first when the reply is
    shorter than a header: the kernel needs its entry back with an answer); the commit id."""
    if reply > len(view) - _PAGE + _OUT_SIZE:
        raise ValueError("finish: a reply longer than the entry's buffers")
    if reply < _OUT_SIZE:
        struct.pack_into("<Ii", view, 0, _OUT_SIZE, -errno.EIO)  # the unique stays
        reply = _OUT_SIZE
    _U32.pack_into(view, _PAYLOAD_SZ, reply - _OUT_SIZE)
    return int(_U64.unpack_from(view, _COMMIT_ID)[0])


def possible_cpus() -> int | None:
    """The kernel's number of CPU ids (``nr_cpu_ids``): the FUSE queues it wants. None if it
    can't be read."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return None
    try:
        last = max(int(part.split("-")[-1]) for part in text.split(","))
    except ValueError:
        return None
    return last + 1


class _Entry:
    """One request's buffers, registered with the kernel once and reused."""

    __slots__ = (
        "_c", "_iov", "index", "iov_addr", "map", "payload", "queue", "view", "words",
        "writable", "writable_len",
    )  # fmt: skip

    def __init__(self, queue: _Queue, index: int, payload_size: int) -> None:
        self.queue = queue
        self.index = index
        self.map = mmap.mmap(-1, _PAGE + payload_size, flags=_PRIVATE)
        self.view = memoryview(self.map)
        self.payload = self.view[_PAGE:]
        #: The header page as 32-bit words: the request's length is the first.
        self.words = self.view[:_PAGE].cast("I")
        self.writable = [self.view[:_OUT_SIZE], self.payload]
        self.writable_len = _OUT_SIZE + payload_size
        self._c = ctypes.c_char.from_buffer(self.map)
        addr = ctypes.addressof(self._c)
        self._iov = (ctypes.c_uint64 * 4)(addr, _HEADER, addr + _PAGE, payload_size)
        self.iov_addr = ctypes.addressof(self._iov)


class _Later:
    """A request of an entry answered later: its reply goes into the entry's own buffers."""

    __slots__ = ("_done", "_entry", "writable")

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry
        self.writable = entry.writable
        self._done = False

    def complete(self, length: int) -> None:
        # Once: a second answer would reach the entry after the kernel gave it another request.
        with self._entry.queue._lock:
            if self._done:
                log.error("FUSE over io_uring: a request answered later was answered twice")
                return
            self._done = True
        self._entry.queue.hand_back(self._entry, length)


class _Queue:
    """The ring, entries and thread of the queue of one CPU."""

    def __init__(
        self, uring: FuseUring, qid: int, payload_size: int, entries: int, most: int
    ) -> None:
        self.uring = uring
        self.qid = qid
        # Room for a completion of every entry it may come to have (``most``) and the wake.
        self.ring = Ring(entries + 1, 2 * (most + 1))
        self.entries: list[_Entry] = []
        self.wake_fd = -1
        self._wake_buf = (ctypes.c_uint64 * 1)()
        self._lock = threading.Lock()
        self._back: list[tuple[_Entry, int]] = []
        self.thread: threading.Thread | None = None
        #: Requests this queue has taken from the kernel.
        self.served = 0
        self.payload_size = payload_size
        #: Entries the kernel holds or this queue serves (not ended).
        self._live = 0
        #: Entries it started with, and those held by requests answered later.
        self.start_entries = entries
        self.lent = 0
        try:
            self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC)
            for i in range(entries):
                self.entries.append(_Entry(self, i, payload_size))
        except BaseException:
            self.close()
            raise

    def hand_back(self, entry: _Entry, length: int) -> None:
        """From any thread: ``entry``'s reply (``length`` bytes) is written; return it."""
        with self._lock:
            if self.wake_fd < 0:
                return  # the queue has ended, and the kernel has taken the entry back
            self._back.append((entry, length))
            os.eventfd_write(self.wake_fd, 1)

    def run(self) -> None:
        cpu = self.qid
        if cpu in self.uring.allowed_cpus:
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError as e:  # the CPU went away, or our set changed: serve from anywhere
                log.warning("FUSE over io_uring, queue %d: not pinned to its CPU: %s", cpu, e)
        ring = self.ring
        failed = True
        try:
            self._arm_wake()
            for entry in self.entries:
                self._register(entry)
            while self._live and not self.uring.stopping:
                try:
                    ring.submit_and_wait(1)
                except OSError as err:
                    if err.errno not in _TRANSIENT:
                        raise
                    time.sleep(0.001)  # reaped below; then entered again
                for user_data, res in ring.completions():
                    if user_data == _WAKE:
                        self._returned()
                        self._arm_wake()
                    elif res < 0:
                        if -res in _ENDED:
                            failed = False
                            return  # the connection is gone, and every entry with it
                        self._ended(user_data, res)
                    else:
                        self._serve_guarded(self.entries[user_data])
            # Every entry refused before any request: the kernel went back to /dev/fuse. Lost
            # after serving, to errors: this CPU's callers would wait for good.
            failed = bool(self.served) and not self._live and not self.uring.stopping
        except Exception:
            log.exception("FUSE over io_uring, queue %d: worker died", self.qid)
        finally:
            self.close()
            log.debug(
                "FUSE over io_uring, queue %d ends after %d requests", self.qid, self.served
            )
            if failed and not self.uring.stopping:
                # Its CPU's callers would wait for it for good (the kernel never moves a
                # request to another queue): end the mount instead, loudly.
                self.uring.failed(self.qid)

    def _arm_wake(self) -> None:
        self.ring.prepare_read(self.wake_fd, ctypes.addressof(self._wake_buf), 8, _WAKE)

    def _register(self, entry: _Entry) -> None:
        self._live += 1
        self.ring.prepare_cmd(
            self.uring.fd, _CMD_REGISTER, entry.index, entry.iov_addr, 2, 0, self.qid
        )

    def _ended(self, index: int, res: int) -> None:
        self._live -= 1
        if not self.served:
            log.error(
                "FUSE over io_uring, queue %d: the kernel refused entry %d (%s); requests then "
                "go through /dev/fuse",
                self.qid,
                index,
                os.strerror(-res),
            )
        else:
            log.error(
                "FUSE over io_uring, queue %d: entry %d ended: %s",
                self.qid,
                index,
                os.strerror(-res),
            )

    def lend(self) -> None:
        """On the queue's thread, while one of its requests is being served: that request will
        be answered later (a lock wait), keeping its entry until then. While fewer entries than
        the queue started with are left for other requests, a new one is added, so that waits
        never leave the queue without one for the request that would end them (an unlock from
        a caller on this CPU); the entries then number at most those it started with and the
        server's limit of waits."""
        self.lent += 1
        if len(self.entries) - self.lent >= self.start_entries:
            return
        try:
            entry = _Entry(self, len(self.entries), self.payload_size)
        except OSError as e:
            log.warning("FUSE over io_uring, queue %d: no entry added for a wait: %s", self.qid, e)
            return
        self.entries.append(entry)
        self._register(entry)

    def _serve_guarded(self, entry: _Entry) -> None:
        try:
            self._serve(entry)
        except Exception:
            # The entry must go back to the kernel whatever happened, or this CPU's callers
            # would wait for it for good.
            log.exception("FUSE over io_uring, queue %d: request failed", self.qid)
            self._fail(entry, errno.EIO)

    def _fail(self, entry: _Entry, err: int) -> None:
        view = entry.view
        _OUT.pack_into(view, 0, _OUT_SIZE, -err, _U64.unpack_from(view, 8)[0])
        self._commit(entry, _OUT_SIZE)

    def _serve(self, entry: _Entry) -> None:
        self.served += 1
        view = entry.view
        if _native_stage is not None:
            staged: int = _native_stage(view)
        else:
            staged = _stage_py(view)
        if staged < 0:
            # Not what the kernel sends: answered EIO rather than read past what it filled.
            log.warning("FUSE over io_uring: a request whose sizes do not add up")
            self._fail(entry, errno.EIO)
            return
        length = entry.words[0]
        if staged == length:
            readable = [view[_SCRATCH : _SCRATCH + staged]]
        else:
            # Cut to the request: the server takes a request's last buffer as all of its data.
            readable = [view[_SCRATCH : _SCRATCH + staged], entry.payload[: length - staged]]
        server = self.uring.server
        reply = server.handle(readable, entry.writable, entry, length, entry.writable_len)
        if reply is None:
            return  # answered later (_Later), through hand_back
        self._commit(entry, reply)

    def _commit(self, entry: _Entry, reply: int) -> None:
        if _native_finish is not None:
            commit_id: int = _native_finish(entry.view, reply)
        else:
            commit_id = _finish_py(entry.view, reply)
        self.ring.prepare_cmd(
            self.uring.fd, _CMD_COMMIT_AND_FETCH, entry.index, 0, 0, commit_id, self.qid
        )

    def _returned(self) -> None:
        with self._lock:
            back, self._back = self._back, []
        for entry, length in back:
            self.lent -= 1
            self._commit(entry, length)

    def wake(self) -> None:
        # Never waits: a signal handler may call it while its own thread holds the lock, and
        # whoever holds it is handing an entry back (which wakes the queue too) or closing it.
        if not self._lock.acquire(False):
            return
        try:
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)
        finally:
            self._lock.release()

    def close(self) -> None:
        # The ring first: closing it takes back whatever the kernel held of the entries. The
        # entries' memory stays mapped (FuseUring keeps them) until the mount object goes:
        # io_uring ends a ring's commands after close() returns, and the kernel must never
        # find a request's buffer unmapped, or mapped to something else.
        self.ring.close()
        with self._lock:
            fd, self.wake_fd = self.wake_fd, -1
            self._back = []
        if fd >= 0:
            os.close(fd)


class FuseUring:
    """The queues of one mount's /dev/fuse connection (``fd``), one per possible CPU."""

    def __init__(
        self,
        server: Server,
        fd: int,
        payload_size: int,
        cpus: int,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.server = server
        self.fd = fd
        self.stopping = False
        #: Called when a queue can no longer serve (the mount then ends).
        self.on_failure = on_failure
        self.allowed_cpus = os.sched_getaffinity(0)
        self.queues: list[_Queue] = []
        try:
            entries = entries_for(cpus)
            most = entries + server.lock_waiters.size
            for qid in range(cpus):
                self.queues.append(_Queue(self, qid, payload_size, entries, most))
        except BaseException:
            for q in self.queues:
                q.close()
            raise

    def start(self) -> list[threading.Thread]:
        """Start every queue's thread (once INIT agreed on io_uring); the threads. A thread
        that can't be started ends the mount (:meth:`failed`): the kernel would hold every
        request back until its queue registered."""
        threads = []
        for q in self.queues:
            t = threading.Thread(target=q.run, name=f"fuse-uring-{q.qid}", daemon=True)
            q.thread = t
            try:
                t.start()
            except RuntimeError as e:
                log.error("FUSE over io_uring, queue %d: no thread: %s", q.qid, e)
                for unstarted in self.queues[q.qid :]:
                    unstarted.close()
                self.failed(q.qid)
                break
            threads.append(t)
        return threads

    def failed(self, qid: int) -> None:
        log.error(
            "FUSE over io_uring, queue %d cannot serve: ending the mount, whose callers on its "
            "CPU would otherwise wait for good",
            qid,
        )
        if self.on_failure is not None:
            self.on_failure()

    def later(self, entry: Any) -> _Later:
        """The request of ``entry`` (its token) is answered later: see :meth:`_Queue.lend`."""
        entry.queue.lend()
        return _Later(entry)

    def stop(self) -> None:
        """Ask every queue to end (safe in a signal handler)."""
        self.stopping = True
        for q in self.queues:
            q.wake()

    def discard(self) -> None:
        """Drop the queues of a connection that did not agree on io_uring (never started)."""
        for q in self.queues:
            q.close()
        self.queues = []
