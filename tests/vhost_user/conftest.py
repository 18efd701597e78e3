"""A daemon serving the test device on a real Unix socket, in a thread of the test."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from pyvirtiofsd.testing.frontend import Frontend
from pyvirtiofsd.testing.testdevice import UppercaseDevice
from pyvirtiofsd.vhost_user.connection import Listener
from pyvirtiofsd.vhost_user.runner import VhostUserServer


class Daemon:
    def __init__(self, path: Path, device: UppercaseDevice, thread_pool_size: int) -> None:
        self.path = str(path)
        self.device = device
        self.served: Sequence[int] | None = None
        self.error: BaseException | None = None
        # The socket listens once the listener is made: a front-end can connect right away.
        self.listener = Listener.bind(self.path)
        self.server = VhostUserServer(device, self.listener, thread_pool_size=thread_pool_size)
        self.thread = threading.Thread(target=self._run, name="daemon", daemon=True)
        self.thread.start()
        self.frontends: list[Frontend] = []

    def _run(self) -> None:
        try:
            self.served = self.server.run()
        except BaseException as e:  # surfaced by the fixture
            self.error = e

    def connect(self) -> Frontend:
        fe = Frontend.connect(self.path, timeout=10)
        self.frontends.append(fe)
        return fe

    def wait_exit(self, timeout: float = 10) -> Sequence[int]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the daemon did not exit after the disconnect"
        if self.error is not None:
            raise self.error
        assert self.served is not None
        return self.served


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected Unix socket pair (front-end end, back-end end), closed after the test."""
    frontend, backend = socket.socketpair()
    try:
        yield frontend, backend
    finally:
        frontend.close()
        backend.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    started: list[Daemon] = []

    def start(device: UppercaseDevice | None = None, *, thread_pool_size: int = 0) -> Daemon:
        d = Daemon(
            tmp_path / f"vhost-{len(started)}.sock",
            device or UppercaseDevice(num_queues=4),
            thread_pool_size,
        )
        started.append(d)
        return d

    yield start
    for d in started:
        for fe in d.frontends:
            fe.close()
        d.thread.join(10)
        assert not d.thread.is_alive(), "a daemon thread outlived its front-end"
        d.listener.close()
