"""Run a virtio device for one vhost-user front-end: queue workers and the server loop.

:class:`DeviceRunner` implements the :class:`~.session.QueueRunner` interface. Each started
ring gets one worker thread that sleeps in ``poll()`` on the ring's kick eventfd and on its
own wake eventfd, then drains the ring:

* pop a chain; an invalid chain is logged and returned with used length 0; a corrupt ring
  stops the worker (logged, err fd signalled) until the front-end restarts it;
* call the device's handler for the queue with the chain's buffers, either inline on the
  worker (``thread_pool_size=0``, the default, like virtiofsd) or on a shared pool;
* push the used entry and signal the call eventfd when the ring's notification state
  (EVENT_IDX or the NO_INTERRUPT flag) asks for it.

A queue whose device allows it (:meth:`~pyvirtiofsd.virtio.device.VirtioDevice.kick_batch`)
is served in batches while kicks come close together: with EVENT_IDX the worker asks the
driver to kick only once that many chains wait, and wakes by itself when the device's wait
is over, so no chain waits longer; a lone kick, or a wait that ran out, puts it back to a
kick per chain, and an idle worker sleeps without a timeout.

Stopping a ring (GET_VRING_BASE, memory table changes, reset) wakes the worker, waits for it to
end and for every request of that ring still running on the pool, so that when
:meth:`DeviceRunner.stop_queue` returns nothing holds a view into guest memory.

A request can be stuck in the backend for good (a stat on a hung mount inside the share).
That must not keep the daemon from ending, so the wait is bounded once the daemon is stopping
(:meth:`DeviceRunner.limit_waits`: a signal, the front-end gone, the connection ending): after
:data:`STOP_GRACE` the ring is *abandoned*. Its worker and the requests still running are left
behind on daemon threads; if they ever return, their replies are dropped, never pushed to a
ring the front-end has taken back. Their views keep the guest memory they use mapped (an mmap
with exported views is not unmapped), so nothing can fault. Until then (a GET_VRING_BASE while
the connection is up) the wait has no deadline, as the protocol needs, but it notices a
signal or the front-end hanging up.

The kick, call and err fds are the front-end's open file descriptions too: their flags are
never changed (see :mod:`.vring`).

:class:`VhostUserServer` glues the pieces: one :class:`~.connection.Listener` (made and
closed by the caller: the loop never creates or removes a socket), and per front-end one
connection, one :class:`~.session.Session` and one runner; it returns when the front-end
disconnects or when :meth:`VhostUserServer.stop` is called. Asked to keep listening, it serves
one front-end after another on the same listener instead, until stopped; each starts from a
clean slate. Everything the last one set up is gone before the next is accepted: its rings
stopped, their kick, call and err fds closed, guest memory unmapped, the back-end channel
closed (:meth:`~.session.Session.close`), the queue threads ended or, stuck in the backend,
left behind as at exit; and the device reset
(:meth:`~pyvirtiofsd.virtio.device.VirtioDevice.reset`), which drops whatever the device kept
for that driver.
"""

from __future__ import annotations

import logging
import os
import queue as _queue
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from pyvirtiofsd.mutex import acquire, release
from pyvirtiofsd.vhost_user.channel import BackendChannel
from pyvirtiofsd.vhost_user.connection import Connection, Listener
from pyvirtiofsd.vhost_user.session import Session
from pyvirtiofsd.vhost_user.vring import Vring, consume
from pyvirtiofsd.virtio.chain import Chain, InvalidChain
from pyvirtiofsd.virtio.device import Completion, RequestHandler, VirtioDevice
from pyvirtiofsd.virtio.queue import QueueBroken, SplitQueue

__all__ = ["DeviceRunner", "VhostUserServer"]

log = logging.getLogger(__name__)

_POLL_ERR: Final = select.POLLERR | select.POLLHUP | select.POLLNVAL

#: Once the daemon is stopping, how long (seconds) stopping the rings waits in all for
#: requests still running in the backend before leaving them behind.
STOP_GRACE: Final = 2.0
#: A ring stop that has waited this long (seconds) for a request says so in the log.
STUCK_NOTICE: Final = 5.0
#: How often (seconds) a ring stop without a deadline looks whether it got one, or whether
#: the front-end hung up.
_WAIT_SLICE: Final = 0.25
#: The least a ring stop waits (seconds) once past the limit: enough for an idle worker to
#: wake up and end.
_LAST_CHANCE: Final = 0.5


class _Pool:
    """A fixed set of threads taking ``(function, argument)`` items from one queue.

    Leaner than ``concurrent.futures.ThreadPoolExecutor``: no Future per item and one C
    queue operation per hand-over, which matters at a few microseconds per request.
    """

    def __init__(self, size: int) -> None:
        self._items: _queue.SimpleQueue[tuple[Callable[[Chain], None], Chain] | None] = (
            _queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._run, name=f"vq-pool-{i}", daemon=True)
            for i in range(size)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[Chain], None], chain: Chain) -> None:
        self._items.put((fn, chain))

    def _run(self) -> None:
        get = self._items.get
        while (item := get()) is not None:
            fn, chain = item
            del item
            try:
                fn(chain)
            except Exception:
                # A lost pool thread would shrink the pool for good; keep serving.
                log.exception("pool thread: unexpected failure")
            del chain

    def shutdown(self, deadline: float | None = None) -> None:
        """End the threads; those still in a request at ``deadline`` (monotonic) are left
        behind (their rings were abandoned)."""
        for _ in self._threads:
            self._items.put(None)
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


class _Later:
    """A chain its handler answers later (a :class:`~pyvirtiofsd.virtio.device.Completion`)."""

    __slots__ = ("_chain", "_done", "_worker")

    def __init__(self, worker: _QueueWorker, chain: Chain) -> None:
        self._worker = worker
        self._chain = chain
        self._done = False

    @property
    def writable(self) -> Sequence[memoryview]:
        return self._chain.writable

    def complete(self, used: int) -> None:
        if self._done:
            raise RuntimeError("a chain answered twice")
        self._done = True
        self._chain.owner = None
        self._worker._completed_later(self._chain, used)


class _QueueWorker:
    """The thread serving one started ring."""

    def __init__(
        self,
        runner: DeviceRunner,
        vring: Vring,
        queue: SplitQueue,
        handler: RequestHandler,
        pool: _Pool | None,
    ) -> None:
        self.runner = runner
        self.vring = vring
        self.queue = queue
        self.handler = handler
        self.pool = pool
        self.served = runner.served
        self.stopping = False
        self._stop_started = 0.0
        #: Left behind by stop(): whatever it still does is never pushed to the ring.
        self.abandoned = False
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kick_fd = vring.kick_fd
        self._scratch = bytearray(8)
        # Set when the kernel can't read the kick fd without blocking (RWF_NOWAIT): the worker
        # then reads it plainly, and stop() kicks it to make sure it is not waiting there.
        self._plain_kick_reads = False
        self._inflight = 0
        #: Chains the driver may make available before it kicks and how long (ms) one may wait
        #: (kick_batch), and how many the next re-arm asks for: 1 but while kicks come close
        #: together.
        count, wait = runner.device.kick_batch(vring.index)
        # Only EVENT_IDX lets a device ask for fewer kicks.
        self.batch = max(1, min(count, queue.size // 2)) if wait > 0 and queue.event_idx else 1
        self.batch_wait_ms = wait * 1000
        self._ahead = 1
        self._exited = False
        self._idle = threading.Condition(threading.Lock())
        self.thread = threading.Thread(target=self._run, name=f"vq{vring.index}", daemon=True)

    # -- control side ----------------------------------------------------------------------

    def wake(self) -> None:
        os.eventfd_write(self.wake_fd, 1)

    def begin_stop(self) -> None:
        """Tell the worker to end (it does once its current request is done)."""
        if self.stopping:
            return
        self._stop_started = time.monotonic()
        self.stopping = True
        self.wake()
        if self._plain_kick_reads and self.kick_fd is not None:
            try:
                os.eventfd_write(self.kick_fd, 1)  # a spurious kick, which drivers allow
            except OSError:
                pass

    def stop(self) -> bool:
        """Stop the worker and wait for the ring's requests, within the runner's limit
        (:meth:`DeviceRunner.limit_waits`). True once all are done; False if some are still
        running in the backend: the ring is then abandoned."""
        self.begin_stop()
        done = self._wait_for(lambda: self._exited)
        device, index = self.runner.device, self.vring.index
        device.interrupt_waits(index)

        def drained() -> bool:
            # A request the pool serves after the line above may begin a wait now: it is
            # ended at the next look, not waited for.
            device.interrupt_waits(index)
            return not self._inflight

        if done:
            done = self._wait_for(drained)
        with self.vring.lock, self._idle:
            done = self._exited and not self._inflight
            self.abandoned = not done
            exited = self._exited
            running = self._inflight + (not exited)
        if exited:
            os.close(self.wake_fd)
        # else the worker closes it when (if ever) it ends: it may still poll it.
        if not done:
            log.error(
                "vring %d: %d request(s) still running in the backend; leaving them behind",
                self.vring.index,
                running,
            )
        return done

    def _wait_for(self, condition: Callable[[], bool]) -> bool:
        """Wait until ``condition`` (checked under ``_idle``) holds; False if the runner's
        limit passed first."""
        runner = self.runner
        started = self._stop_started
        noticed = False
        with self._idle:
            while not condition():
                now = time.monotonic()
                limit = runner.wait_limit
                if limit is None and runner.peer_gone():
                    runner.limit_waits()
                    limit = runner.wait_limit
                if limit is not None:
                    # A ring stopped after the limit passed still gets a moment to end.
                    limit = max(limit, started + _LAST_CHANCE)
                    if now >= limit:
                        return False
                if not noticed and now - started >= STUCK_NOTICE:
                    noticed = True
                    log.warning(
                        "vring %d: stopping it waits for a request still running in the backend",
                        self.vring.index,
                    )
                self._idle.wait(_WAIT_SLICE if limit is None else min(_WAIT_SLICE, limit - now))
        return True

    # -- worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.wake_fd, select.POLLIN)
        kick_fd = self.kick_fd
        if kick_fd is not None:
            poller.register(kick_fd, select.POLLIN)
        wake_fd = self.wake_fd
        try:
            # A front-end may have queued requests before the ring started and need not
            # kick again, so look once before sleeping.
            self._drain()
            # Bound once: a compiled build looks a method up by name at each call.
            poll = poller.poll
            batch, wait_ms = self.batch, self.batch_wait_ms
            last_wake = -1e18  # no kick yet: the first is a lone one
            while True:
                ready = poll() if self._ahead == 1 else poll(wait_ms)
                if batch > 1:
                    # Kicks close together (a stream of FORGETs): ask for one per batch from
                    # now on, and look by ourselves once the wait is over. A look that found
                    # the wait over, or a kick long after the last, goes back to a kick per
                    # chain, so an idle queue sleeps without a timeout. Only kicks count:
                    # chains spaced just over the wait then kick once each, not twice.
                    if ready:
                        now = time.monotonic()
                        self._ahead = batch if (now - last_wake) * 1000 < wait_ms else 1
                        last_wake = now
                    else:
                        self._ahead = 1
                for fd, events in ready:
                    if events & _POLL_ERR:
                        log.error(
                            "vring %d: kick fd %d failed (poll events %#x)",
                            self.vring.index,
                            fd,
                            events,
                        )
                        poller.unregister(fd)
                        continue
                    if fd == wake_fd:
                        try:
                            os.read(fd, 8)  # our own eventfd, non-blocking
                        except BlockingIOError:
                            pass
                        if self.stopping:
                            return
                    elif self._plain_kick_reads or not consume(fd, self._scratch):
                        self._plain_kick_reads = True
                        if not self.stopping:
                            os.readv(fd, [self._scratch])
                if self.stopping:
                    return
                self._drain()
        except Exception:
            if not self.abandoned:
                log.exception("vring %d: worker died", self.vring.index)
                self.vring.broken = True
                self.vring.signal_err()
        finally:
            if self._ahead != 1:
                self._kick_per_chain()
            with self._idle:
                self._exited = True
                close_wake_fd = self.abandoned
                self._idle.notify_all()
            if close_wake_fd:
                os.close(wake_fd)

    def _kick_per_chain(self) -> None:
        """Leave the ring asking for a kick at its next chain, as whoever serves it next (a
        restarted worker, another back-end after a migration) may expect; not once the ring
        was abandoned, broken or unmapped."""
        lock = self.vring.lock
        acquire(lock)
        try:
            if not self.abandoned and not self.vring.broken:
                self.queue.enable_notification()
        except Exception:
            log.exception("vring %d: re-arming notifications on the way out", self.vring.index)
        finally:
            release(lock)

    def _drain(self) -> None:
        """Serve everything available, then re-arm notifications."""
        vring = self.vring
        queue = self.queue
        while vring.enabled and not vring.broken and not self.stopping:
            queue.disable_notification()
            while True:
                try:
                    chain = queue.pop()
                except InvalidChain as e:
                    self._invalid(e)
                    continue
                except QueueBroken as broken:
                    log.error("vring %d: ring is corrupt, stopping it: %s", vring.index, broken)
                    vring.broken = True
                    vring.signal_err()
                    return
                if chain is None:
                    break
                # A lone request is served inline: handing it to a pool thread costs
                # more than it saves. Requests that arrive together go to the pool.
                if self.pool is None or (not self._inflight and not queue.available()):
                    self._serve(chain)
                else:
                    with self._idle:
                        self._inflight += 1
                    self.pool.submit(self._serve_pooled, chain)
                if self.stopping or not vring.enabled:
                    return
            if not queue.enable_notification(self._ahead):
                return

    def _serve(self, chain: Chain) -> None:
        # Typed as any owner, not as this worker: the handler may hand the chain on (later()),
        # and a compiled build would otherwise check the owner read below against this class.
        me: object = self
        chain.owner = me
        try:
            used = self.handler(chain)
        except Exception:
            log.exception("vring %d: handler failed on chain %d", self.vring.index, chain.head)
            used = 0
        if used is None:
            if chain.owner is not me:
                return  # answered later, through the Completion the handler took
            log.error("vring %d: handler kept a chain without later()", self.vring.index)
            used = 0
        chain.owner = None
        self._finish(chain, used)

    def later(self, chain: Chain) -> Completion:
        """Keep ``chain`` in flight after its handler returns (see
        :func:`pyvirtiofsd.virtio.device.later`)."""
        if chain.owner is not self:
            raise RuntimeError("later() twice, or for a chain this worker is not serving")
        completion = _Later(self, chain)
        chain.owner = completion
        with self._idle:
            self._inflight += 1
        return completion

    def _completed_later(self, chain: Chain, used: int) -> None:
        try:
            self._finish(chain, used)
        finally:
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def _finish(self, chain: Chain, used: int) -> None:
        if used and not 0 < used <= chain.writable_len:
            log.error(
                "vring %d: handler returned used length %r for %d writable bytes",
                self.vring.index,
                used,
                chain.writable_len,
            )
            used = 0
        written = _written(self.queue, chain, used) if used and self.queue.logging else None
        # Drop the views now, not when the chain object happens to be collected: once
        # the entry is used the driver may reuse the buffers and the memory may go away.
        chain.release()
        self._complete(chain.head, used, written)

    def _invalid(self, e: InvalidChain) -> None:
        """Return an unservable chain; when parts of it were reachable the device may
        still answer through them (``device.fault``), e.g. with an error reply."""
        used = 0
        partial = e.partial
        if partial is not None:
            try:
                fault = self.runner.device.fault
                used = fault(self.vring.index, partial.readable, partial.writable)
            except Exception:
                log.exception("vring %d: fault handler failed", self.vring.index)
            if not 0 <= used <= partial.writable_len:
                used = 0
        written = None
        if partial is not None:
            if used and self.queue.logging:
                written = _written(self.queue, partial, used)
            partial.release()
        log.warning(
            "vring %d: %s; %s",
            self.vring.index,
            e,
            f"answered with a {used}-byte reply" if used else "returned unused",
        )
        self._complete(e.head, used, written)

    def _serve_pooled(self, chain: Chain) -> None:
        try:
            self._serve(chain)
        finally:
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def _complete(self, head: int, used: int, written: list[tuple[int, int]] | None = None) -> None:
        vring = self.vring
        queue = self.queue
        # The lock's methods as functions (see pyvirtiofsd.mutex) rather than ``with``: a
        # compiled build calls a ``with``'s methods, and any method of the lock, the generic
        # way, once per request here.
        lock = vring.lock
        acquire(lock)
        try:
            if self.abandoned:
                return  # the front-end has the ring back (or is gone): not ours to touch
            queue.push_used(head, used, written)
            # Added and stored apart: a compiled build adds "+=" on a list item the generic way.
            served = self.served
            index = vring.index
            served[index] = served[index] + 1
            if queue.needs_notification():
                vring.signal_call_locked()
        finally:
            release(lock)


class DeviceRunner:
    """Runs the queues of one device: a worker per started ring, an optional pool.

    ``served[i]`` counts the chains returned on queue ``i`` (invalid ones included).
    """

    def __init__(self, device: VirtioDevice, *, thread_pool_size: int = 0) -> None:
        if thread_pool_size < 0:
            raise ValueError("thread_pool_size must be >= 0")
        self.device = device
        self.thread_pool_size = thread_pool_size
        self.served = [0] * device.num_queues
        self._pool: _Pool | None = None
        self._workers: dict[int, _QueueWorker] = {}
        #: Monotonic time past which stopping a ring stops waiting for its requests (None:
        #: no limit). Set by :meth:`limit_waits`.
        self.wait_limit: float | None = None
        #: Whether the front-end has hung up; asked while a ring stop waits without a limit.
        self.peer_gone: Callable[[], bool] = lambda: False
        #: Rings abandoned with requests still running in the backend.
        self.abandoned = 0

    def _get_pool(self) -> _Pool | None:
        if self.thread_pool_size and self._pool is None:
            self._pool = _Pool(self.thread_pool_size)
        return self._pool

    def start_queue(self, vring: Vring) -> None:
        if vring.index in self._workers:
            raise RuntimeError(f"ring {vring.index} already has a worker")
        assert vring.queue is not None
        worker = _QueueWorker(
            self, vring, vring.queue, self.device.handler(vring.index), self._get_pool()
        )
        self._workers[vring.index] = worker
        worker.thread.start()

    def limit_waits(self, grace: float = STOP_GRACE) -> None:
        """The daemon is stopping: from now on, stopping the rings waits at most ``grace``
        seconds more for requests still running. No lock: safe in a signal handler."""
        limit = time.monotonic() + grace
        current = self.wait_limit
        if current is None or limit < current:
            self.wait_limit = limit

    def stop_queue(self, vring: Vring) -> None:
        worker = self._workers.pop(vring.index, None)
        if worker is not None and not worker.stop():
            self.abandoned += 1

    def wake_queue(self, vring: Vring) -> None:
        worker = self._workers.get(vring.index)
        if worker is not None:
            worker.wake()

    def close(self) -> None:
        """Stop every ring and the pool, leaving behind what is stuck past the grace."""
        self.limit_waits()
        workers = list(self._workers.values())
        self._workers.clear()
        for worker in workers:  # all at once: only the stuck ones take the grace
            worker.begin_stop()
        for worker in workers:
            if not worker.stop():
                self.abandoned += 1
        if self._pool is not None:
            self._pool.shutdown(self.wait_limit if self.abandoned else None)
            self._pool = None


class VhostUserServer:
    """One device served to one front-end: accept, run until the front-end leaves.

    ``listener`` is where the front-end connects; it belongs to the caller, who closes it
    (which removes its socket file). With ``keep_listening`` the next front-end is served on the
    same listener once one leaves (one at a time; one that connects meanwhile is refused), and
    only :meth:`stop` ends :meth:`run`. :meth:`run` blocks; :meth:`stop` makes it return and may
    be called from another thread or a signal handler.
    """

    def __init__(
        self,
        device: VirtioDevice,
        listener: Listener,
        *,
        thread_pool_size: int = 0,
        keep_listening: bool = False,
    ) -> None:
        self.device = device
        self.listener = listener
        self.thread_pool_size = thread_pool_size
        self.keep_listening = keep_listening
        #: The runner of the current (or last) front-end's queues.
        self.runner = DeviceRunner(device, thread_pool_size=thread_pool_size)
        self.connection: Connection | None = None
        #: Front-ends served so far (the current one included).
        self.front_ends = 0
        # Counts of the runners of front-ends gone, for the totals.
        self._served_before = [0] * device.num_queues
        self._abandoned_before = 0
        self._stopped = False
        self._ran = False

    @property
    def served(self) -> list[int]:
        """Chains returned so far, per queue, over every front-end."""
        return [a + b for a, b in zip(self._served_before, self.runner.served, strict=True)]

    def run(self) -> list[int]:
        """Serve one front-end (with ``keep_listening``: one after another, until
        :meth:`stop`); return the per-queue request counts when done."""
        if self._ran:
            raise RuntimeError("run() can only be called once")
        self._ran = True
        while not self._stopped:
            try:
                sock = self.listener.accept(keep_listening=self.keep_listening)
            except OSError:
                if self._stopped:  # stop() shut the listener down
                    break
                raise
            if self.front_ends:
                self._fresh_runner()
            self.front_ends += 1
            self._serve(sock)
            if not self.keep_listening or self._stopped:
                break
            # The driver went with its front-end: whatever the device kept for it goes too.
            try:
                self.device.reset()
            except Exception:
                log.exception(
                    "vhost-user: resetting the device after front-end %d failed", self.front_ends
                )
            log.info(
                "vhost-user: front-end %d gone (%d requests); waiting for the next on %s",
                self.front_ends,
                sum(self.runner.served),
                self.listener.where,
            )
        return self.served

    def _fresh_runner(self) -> None:
        """Count the last front-end's runner in the totals, and make the next one's."""
        old = self.runner
        self._served_before = [a + b for a, b in zip(self._served_before, old.served, strict=True)]
        self._abandoned_before += old.abandoned
        self.runner = DeviceRunner(self.device, thread_pool_size=self.thread_pool_size)

    def _serve(self, sock: socket.socket) -> None:
        """Serve the front-end on ``sock`` until it leaves (or :meth:`stop`); then nothing it
        set up is left but what is stuck in the backend."""
        runner = self.runner
        session = Session(self.device, runner, channel_factory=BackendChannel.from_fd)
        refuse = self.listener if self.keep_listening else None
        self.connection = Connection(sock, session, refuse=refuse)
        runner.peer_gone = lambda: _hung_up(sock)
        try:
            if not self._stopped:
                self.connection.run()
        finally:
            # The front-end is gone (or we are stopping): requests stuck in the backend get
            # a few seconds, then are left behind.
            runner.limit_waits()
            runner.close()
            session.close()  # the rings are stopped already; it unmaps and closes the rest
            runner.peer_gone = lambda: True
            sock.close()

    @property
    def abandoned(self) -> int:
        """Rings left behind with requests still running in the backend."""
        return self._abandoned_before + self.runner.abandoned

    def stop(self) -> None:
        """Make :meth:`run` return: stop accepting, or end the connection (requests stuck in
        the backend are waited for :data:`STOP_GRACE`, then left behind)."""
        self._stopped = True
        self.runner.limit_waits()
        self.listener.shutdown()
        connection = self.connection
        if connection is not None:
            connection.shutdown()


def _written(queue: SplitQueue, chain: Chain, used: int) -> list[tuple[int, int]] | None:
    """The guest-physical ranges of a reply of ``used`` bytes, while the queue logs its data:
    from the walk, or for a chain popped before logging began, from its views."""
    if queue.data_log is None:
        return None
    if chain.gpas is not None:
        return chain.written(used)
    return queue.memory.guest_ranges(chain.writable, used)


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer of ``sock`` has closed the connection (without reading from it)."""
    poller = select.poll()
    try:
        poller.register(sock, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | _POLL_ERR) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return True
