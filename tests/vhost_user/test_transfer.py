"""Moving a device's state through the front-end's pipe (:mod:`pyvirtiofsd.vhost_user.transfer`):
the reply comes first and the bytes move on a thread, whatever the pipe's flags; failures are
told, not raised; an abandoned transfer stops and closes its end."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import termios
import threading
import time

import pytest

from pyvirtiofsd.testing.testdevice import UppercaseDevice
from pyvirtiofsd.vhost_user import transfer as transfer_module
from pyvirtiofsd.vhost_user.messages import DEVICE_STATE_LOAD, DEVICE_STATE_SAVE
from pyvirtiofsd.vhost_user.transfer import StateTransfer, TransferError

BIG = bytes(range(256)) * 4096  # 1 MiB: far more than a pipe holds


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("nonblocking", [False, True])
def test_save_writes_everything_after_the_start(nonblocking: bool) -> None:
    device = UppercaseDevice(migratable=True)
    device.state = BIG
    r, w = os.pipe2(os.O_NONBLOCK if nonblocking else 0)
    transfer = StateTransfer(device, DEVICE_STATE_SAVE, w)
    # The front-end reads only now (after the reply): the thread has been waiting for it.
    os.set_blocking(r, True)
    assert read_all(r) == BIG
    os.close(r)
    assert transfer.result() is None
    assert transfer.size == len(BIG)
    assert_closed(w)


@pytest.mark.parametrize("nonblocking", [False, True])
def test_load_reads_to_the_end_then_loads(nonblocking: bool) -> None:
    device = UppercaseDevice(migratable=True)
    r, w = os.pipe2(os.O_NONBLOCK if nonblocking else 0)
    transfer = StateTransfer(device, DEVICE_STATE_LOAD, r)
    writer = threading.Thread(target=lambda: (os.write(w, BIG[:1000]), os.close(w)))
    os.set_blocking(w, True)
    writer.start()
    writer.join(20)
    assert transfer.result() is None
    assert device.state == BIG[:1000]
    assert_closed(r)


def test_a_load_the_device_refuses_is_a_failure_with_its_reason() -> None:
    device = UppercaseDevice(migratable=True)
    r, w = os.pipe()
    transfer = StateTransfer(device, DEVICE_STATE_LOAD, r)
    os.write(w, b"!bad state")
    os.close(w)
    assert transfer.result() == "state refused: it starts with '!'"
    assert device.state == b""


def test_a_device_that_cannot_save_is_a_failure() -> None:
    r, w = os.pipe()
    transfer = StateTransfer(UppercaseDevice(), DEVICE_STATE_SAVE, w)
    assert transfer.result() == "this device is not migratable"
    assert read_all(r) == b""  # the pipe is closed: the front-end reads EOF
    os.close(r)


def test_a_front_end_that_goes_away_is_a_failure() -> None:
    device = UppercaseDevice(migratable=True)
    device.state = BIG
    r, w = os.pipe()
    transfer = StateTransfer(device, DEVICE_STATE_SAVE, w)
    os.close(r)
    error = transfer.result()
    assert error is not None and "Broken pipe" in error


def test_cancel_stops_a_transfer_nobody_reads() -> None:
    device = UppercaseDevice(migratable=True)
    device.state = BIG
    r, w = os.pipe()
    transfer = StateTransfer(device, DEVICE_STATE_SAVE, w)
    transfer.cancel()
    assert transfer.done()
    assert transfer.result() == "abandoned by the front-end"
    assert_closed(w)
    os.close(r)


def test_a_socket_will_do_and_a_file_will_not(tmp_path: object) -> None:
    a, b = socket.socketpair()
    device = UppercaseDevice(migratable=True)
    device.state = b"over a socket"
    transfer = StateTransfer(device, DEVICE_STATE_SAVE, os.dup(b.fileno()))
    b.close()
    assert read_all(a.fileno()) == b"over a socket"
    a.close()
    assert transfer.result() is None
    fd = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(TransferError, match="neither a pipe nor a socket"):
        StateTransfer(device, DEVICE_STATE_LOAD, fd)
    assert_closed(fd)
    r, w = os.pipe()
    with pytest.raises(TransferError, match="direction 7"):
        StateTransfer(device, 7, r)
    assert_closed(r)
    os.close(w)


def test_a_load_larger_than_any_state_stops_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """The front-end's bytes are not trusted: past MAX_STATE the load stops reading, fails,
    and hands the device nothing; the writer finds its pipe closed."""
    monkeypatch.setattr(transfer_module, "MAX_STATE", 100_000)
    device = UppercaseDevice(migratable=True)
    r, w = os.pipe()
    transfer = StateTransfer(device, DEVICE_STATE_LOAD, r)
    sent = 0
    with pytest.raises(BrokenPipeError):
        while sent < 10 * len(BIG):  # a guard: the pipe closes long before
            sent += os.write(w, BIG)
    os.close(w)
    assert transfer.result() == "more than 100000 bytes of state"
    assert device.state == b"" and sent < 10 * len(BIG)
    assert_closed(r)


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_cancel_reaches_a_save_whose_reader_stopped_with_the_pipe_full(kind: str) -> None:
    """The front-end's end is blocking (its flags are not ours to change) and its reader has
    stopped: once the pipe is full the transfer must still be waiting where a cancel reaches
    it, not inside a write that can't end."""
    device = UppercaseDevice(migratable=True)
    device.state = BIG
    if kind == "pipe":
        r, w = os.pipe()
    else:
        a, b = socket.socketpair()
        r, w = a.detach(), b.detach()
    transfer = StateTransfer(device, DEVICE_STATE_SAVE, w)
    # Take a little, so that the transfer has written and is writing again, then nothing.
    first = os.read(r, 1000)
    assert first == BIG[:1000]
    while True:
        queued = array.array("i", [0])
        fcntl.ioctl(r, termios.FIONREAD, queued)
        if kind == "socket" or queued[0] >= 60000:
            break
        time.sleep(0.01)
    if kind == "socket":
        time.sleep(0.2)  # (a socket's buffer has no fixed size to wait for)
    cancelled = threading.Thread(target=transfer.cancel, daemon=True)
    cancelled.start()
    cancelled.join(20)
    assert not cancelled.is_alive(), "the cancel did not reach the transfer"
    assert transfer.result() == "abandoned by the front-end"
    assert_closed(w)
    os.close(r)
