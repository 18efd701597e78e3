"""A device's state over the pipe of SET_DEVICE_STATE_FD (live migration), on a thread.

The front-end hands the back-end one end of a pipe and waits for the reply before it touches
its own end: it reads the saved state to EOF, or writes the state to load and closes. So the
bytes cannot move before the reply (a pipe holds 64 KiB), and the state machine replies at once
and leaves the work to a :class:`StateTransfer`, which runs on its own thread:

* save: ``device.save_state()``, then every byte into the pipe, then close it;
* load: read the pipe to EOF, close it, then ``device.load_state(data)``.

CHECK_DEVICE_STATE then waits for the thread (:meth:`StateTransfer.result`) and answers with its
verdict. Rules:

* The thread is the only one touching the device while it runs. A front-end that sends anything
  else before CHECK_DEVICE_STATE abandons the transfer first (:meth:`StateTransfer.cancel`):
  the I/O stops, and the device call in progress, if any, is waited for.
* The pipe's flags are not ours to change: its end is waited for with poll(), and a blocking
  one is written a little at a time (never more than it takes at once), so that a cancel can
  always reach the thread between writes.
* State larger than :data:`MAX_STATE` is refused (a load reads no further).
* The fd is closed by the thread, whatever happens; whoever started the transfer ends it with
  :meth:`StateTransfer.result` or :meth:`StateTransfer.cancel`.
"""

from __future__ import annotations

import logging
import os
import select
import stat
import threading
import time

from pyvirtiofsd.vhost_user.messages import DEVICE_STATE_LOAD, DEVICE_STATE_SAVE
from pyvirtiofsd.virtio.device import VirtioDevice

__all__ = ["MAX_STATE", "StateTransfer", "TransferError"]

log = logging.getLogger(__name__)

#: The largest state moved either way: far more than a guest holding millions of inodes needs.
#: (A saved state takes about 11 bytes per inode the guest holds: 10,000 inodes, 110 KB.)
MAX_STATE = 256 << 20
_CHUNK = 1 << 20


class TransferError(Exception):
    """Why a state transfer could not start."""


class _Cancelled(Exception):
    pass


class StateTransfer:
    """One transfer in ``direction`` (:data:`~.messages.DEVICE_STATE_SAVE` or ``_LOAD``)
    through ``fd`` (taken over: the transfer closes it), started at once on a thread."""

    def __init__(self, device: VirtioDevice, direction: int, fd: int) -> None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            os.close(fd)
            raise TransferError(f"state fd: {e}") from None
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            os.close(fd)
            raise TransferError("the state fd is neither a pipe nor a socket")
        if direction not in (DEVICE_STATE_SAVE, DEVICE_STATE_LOAD):
            os.close(fd)
            raise TransferError(f"transfer direction {direction}")
        self.device = device
        self.direction = direction
        self.what = "save" if direction == DEVICE_STATE_SAVE else "load"
        self._fd = fd
        self._cancel_r, self._cancel_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._error: str | None = None
        #: Bytes moved, and seconds the device took to save or load (for the log).
        self.size = 0
        self.device_seconds = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"device-state-{self.what}", daemon=True
        )
        self._thread.start()

    # -- control side ----------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop moving bytes and wait for the thread (a device call in progress finishes)."""
        if self._cancel_w >= 0:
            try:
                os.write(self._cancel_w, b"x")
            except OSError:
                pass
        self.result()

    def result(self) -> str | None:
        """Wait for the transfer; None when it succeeded, else what went wrong."""
        self._thread.join()
        # Closed here, once the thread is gone: cancel() may write to it until then.
        for fd in (self._cancel_r, self._cancel_w):
            if fd >= 0:
                os.close(fd)
        self._cancel_r = self._cancel_w = -1
        return self._error

    def done(self) -> bool:
        return not self._thread.is_alive()

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        fd = self._fd
        try:
            if self.direction == DEVICE_STATE_SAVE:
                started = time.monotonic()
                data = self.device.save_state()
                self.device_seconds = time.monotonic() - started
                if len(data) > MAX_STATE:
                    raise ValueError(f"a state of {len(data)} bytes (at most {MAX_STATE})")
                self._write_all(fd, data)
                self.size = len(data)
            else:
                data = self._read_all(fd)
                self.size = len(data)
                os.close(fd)
                fd = -1
                started = time.monotonic()
                self.device.load_state(data)
                self.device_seconds = time.monotonic() - started
            log.info(
                "device state %s: %d bytes, %.1f ms in the device",
                self.what,
                self.size,
                self.device_seconds * 1000,
            )
        except _Cancelled:
            self._error = "abandoned by the front-end"
        except OSError as e:
            self._error = f"{type(e).__name__}: {e}"
        except (ValueError, LookupError) as e:
            self._error = str(e)
        except Exception as e:
            log.exception("device state %s failed", self.what)
            self._error = f"{type(e).__name__}: {e}"
        finally:
            if fd >= 0:
                os.close(fd)

    def _wait(self, fd: int, event: int) -> None:
        poller = select.poll()
        poller.register(fd, event)
        poller.register(self._cancel_r, select.POLLIN)
        for ready, _ in poller.poll():
            if ready == self._cancel_r:
                raise _Cancelled

    def _write_all(self, fd: int, data: bytes) -> None:
        # On a blocking fd a write waits until all of it is taken, and a reader that stopped
        # would hold it for ever, out of a cancel's reach: there, write no more than a pipe or
        # socket that polls writable always takes at once (PIPE_BUF).
        chunk = select.PIPE_BUF if os.get_blocking(fd) else _CHUNK
        view = memoryview(data)
        while view:
            self._wait(fd, select.POLLOUT)
            try:
                n = os.write(fd, view[:chunk])
            except BlockingIOError:
                continue
            view = view[n:]

    def _read_all(self, fd: int) -> bytes:
        chunks = []
        total = 0
        while True:
            self._wait(fd, select.POLLIN)
            try:
                chunk = os.read(fd, _CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > MAX_STATE:
                raise ValueError(f"more than {MAX_STATE} bytes of state")
            chunks.append(chunk)
