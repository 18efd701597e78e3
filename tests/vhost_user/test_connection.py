"""The socket edge: the listening socket's one owner, :class:`Listener` (made at a path or
inherited, one front-end accepted, the socket file removed by :meth:`Listener.close` only, and
only ours), and the back-end's receive loop over a socket pair, with a recording handler in place
of the state machine (messages in order with their fds, replies out, the ways the loop ends)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.vhost_user.connection import Connection, Listener
from pyvirtiofsd.vhost_user.messages import (
    HEADER,
    MAX_PAYLOAD,
    FrontendReq,
    Message,
    encode_message,
    encode_reply,
    encode_u64,
)
from pyvirtiofsd.vhost_user.wire import deadline_after, recv_message, send_with_fds


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def test_bind_listens_until_one_front_end_came(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    with Listener.bind(str(path)) as listener:
        assert path.is_socket()
        assert listener.where == str(path)
        client = _connect(path)
        conn = listener.accept()
        try:
            assert conn.getblocking()
            client.sendall(b"x")
            assert conn.recv(1) == b"x"
            # One device, one front-end: a second one is refused, not left in the backlog.
            with pytest.raises(ConnectionRefusedError):
                _connect(path)
            assert path.is_socket(), "accepting removed the socket file"
        finally:
            conn.close()
            client.close()
    assert not path.exists()


def test_bind_replaces_a_stale_socket_but_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with Listener.bind(str(path)):
        _connect(path).close()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError):
        Listener.bind(str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"


def test_bind_with_a_group(tmp_path: Path) -> None:
    import grp

    group = grp.getgrgid(os.getegid()).gr_name
    path = tmp_path / "vhost.sock"
    with Listener.bind(str(path), group):
        st = path.lstat()
        assert st.st_gid == os.getegid()
        assert stat.S_IMODE(st.st_mode) == 0o660
    with pytest.raises(ValueError, match="no group named"):
        Listener.bind(str(path), "no-such-group-here")
    assert not path.exists(), "a refused listener left its socket behind"


def test_close_removes_the_file_through_its_directory(tmp_path: Path) -> None:
    # The sandbox changes the root after the socket is made; the directory's descriptor still
    # names the same directory, as it does here after a rename.
    (tmp_path / "a").mkdir()
    listener = Listener.bind(str(tmp_path / "a" / "vhost.sock"))
    (tmp_path / "a").rename(tmp_path / "b")
    listener.close()
    assert list((tmp_path / "b").iterdir()) == []
    listener.close()  # idempotent


def test_close_leaves_a_socket_that_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    listener = Listener.bind(str(path))
    path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    try:
        listener.close()
        assert path.is_socket(), "closed a listener and removed another one's socket"
    finally:
        other.close()


def test_shutdown_wakes_a_blocked_accept(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    errors: list[OSError] = []
    with Listener.bind(str(path)) as listener:

        def accept() -> None:
            try:
                listener.accept()
            except OSError as e:
                errors.append(e)

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        # Before or during the accept(): either way it fails rather than wait.
        listener.shutdown()
        t.join(10)
        assert not t.is_alive()
    assert len(errors) == 1


def test_inherit_serves_and_never_unlinks(tmp_path: Path) -> None:
    path = tmp_path / "libvirt.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    fd = sock.detach()
    listener = Listener.inherit(fd)
    assert listener.where == f"fd {fd}"
    client = _connect(path)
    listener.accept().close()
    client.close()
    with pytest.raises(OSError) as info:
        os.fstat(fd)  # closed once the front-end came: no second one
    assert info.value.errno == errno.EBADF
    listener.close()
    assert path.is_socket(), "removed the socket file of an inherited fd"


def test_inherit_refuses_what_is_no_listening_unix_socket(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for fd, message in (
            (a.fileno(), "not listening"),
            (r, "not a socket"),
            (dgram.fileno(), "must be a Unix stream socket"),
        ):
            with pytest.raises(ValueError, match=message):
                Listener.inherit(fd)
            os.fstat(fd)  # still the caller's
    finally:
        for s in (a, b, dgram):
            s.close()
        os.close(r)
        os.close(w)


class Recorder:
    """Keeps (request, payload, fd count); answers GET_QUEUE_NUM with 4."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bytes, int]] = []

    def handle(self, msg: Message) -> bytes | None:
        self.seen.append((msg.request, msg.payload, len(msg.fds)))
        msg.close_fds()
        if msg.request == FrontendReq.GET_QUEUE_NUM:
            return encode_reply(msg.request, encode_u64(4))
        return None


class Running:
    def __init__(self) -> None:
        self.frontend, backend = socket.socketpair()
        self.handler = Recorder()
        self.connection = Connection(backend, self.handler)
        self.thread = threading.Thread(target=self.connection.run, daemon=True)
        self.thread.start()

    def ended(self) -> bool:
        self.thread.join(10)
        return not self.thread.is_alive()

    def close(self) -> None:
        self.connection.shutdown()
        self.thread.join(10)
        self.frontend.close()
        self.connection.sock.close()


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running()
    try:
        yield r
    finally:
        r.close()


def test_messages_in_order_with_their_fds(running: Running) -> None:
    fe = running.frontend
    fds = [os.eventfd(0), os.eventfd(0)]
    try:
        send_with_fds(fe, encode_message(FrontendReq.SET_OWNER))
        send_with_fds(fe, encode_message(FrontendReq.SET_MEM_TABLE, bytes(8)), fds)
        send_with_fds(fe, encode_message(FrontendReq.GET_QUEUE_NUM))
        reply = recv_message(fe, deadline=deadline_after(10))
    finally:
        for fd in fds:
            os.close(fd)
    assert reply is not None and reply.is_reply and reply.payload == encode_u64(4)
    assert running.handler.seen == [
        (FrontendReq.SET_OWNER, b"", 0),
        (FrontendReq.SET_MEM_TABLE, bytes(8), 2),
        (FrontendReq.GET_QUEUE_NUM, b"", 0),
    ]


def test_front_end_leaving_ends_the_loop(running: Running) -> None:
    running.frontend.shutdown(socket.SHUT_WR)
    assert running.ended()


def test_leaving_mid_message_is_logged(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        send_with_fds(running.frontend, encode_message(FrontendReq.SET_STATUS, bytes(8))[:15])
        running.frontend.shutdown(socket.SHUT_WR)
        assert running.ended()
    assert "front-end closed mid-message" in caplog.text
    assert running.handler.seen == []


def test_oversized_message_ends_the_loop(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        send_with_fds(running.frontend, HEADER.pack(FrontendReq.SET_CONFIG, 1, MAX_PAYLOAD + 1))
        assert running.ended()
    assert "closing the connection" in caplog.text
    assert running.handler.seen == []


def test_shutdown_ends_the_loop(running: Running) -> None:
    running.connection.shutdown()
    assert running.ended()


# -- keeping the socket listening (--keep-listening) -----------------------------------------


def test_accept_can_keep_listening(tmp_path: Path) -> None:
    path = tmp_path / "vhost.sock"
    with Listener.bind(str(path)) as listener:
        ident = path.stat().st_ino
        for _ in range(3):
            client = _connect(path)
            conn = listener.accept(keep_listening=True)
            client.sendall(b"x")
            assert conn.recv(1) == b"x"
            conn.close()
            client.close()
            # The same socket file, still bound and listening: never unlinked or rebound.
            assert path.stat().st_ino == ident
    assert not path.exists()


def test_an_inherited_socket_kept_listening_stays_open(tmp_path: Path) -> None:
    path = tmp_path / "libvirt.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    fd = sock.detach()
    listener = Listener.inherit(fd)
    for _ in range(2):
        client = _connect(path)
        listener.accept(keep_listening=True).close()
        client.close()
        os.fstat(fd)  # still open, for the next front-end
    listener.close()
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    assert path.is_socket(), "removed the socket file of an inherited fd"


class Served:
    """A front-end served by a Connection that watches its listener for others."""

    def __init__(self, path: Path) -> None:
        self.listener = Listener.bind(str(path))
        self.client = _connect(path)
        self.conn = self.listener.accept(keep_listening=True)
        self.handler = Recorder()
        self.connection = Connection(self.conn, self.handler, refuse=self.listener)
        self.thread = threading.Thread(target=self.connection.run, daemon=True)

    def ask(self) -> bytes:
        send_with_fds(self.client, encode_message(FrontendReq.GET_QUEUE_NUM))
        reply = recv_message(self.client, deadline=deadline_after(10))
        assert reply is not None
        return reply.payload

    def close(self) -> None:
        self.connection.shutdown()
        self.thread.join(10)
        self.client.close()
        self.conn.close()
        self.listener.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "vhost.sock")
    try:
        yield s
    finally:
        s.close()


def test_a_second_front_end_is_refused_while_one_is_served(
    served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served.thread.start()
    assert served.ask() == encode_u64(4)
    with caplog.at_level(logging.WARNING):
        other = _connect(tmp_path / "vhost.sock")
        other.settimeout(10)
        try:
            # Closed at once, rather than left waiting in the backlog for a reply.
            assert other.recv(1) == b""
        finally:
            other.close()
        assert served.ask() == encode_u64(4)  # the first is still served
    assert "another front-end connected" in caplog.text
    served.client.shutdown(socket.SHUT_WR)
    served.thread.join(10)
    assert not served.thread.is_alive()


def test_a_front_end_that_hung_up_and_came_back_is_not_refused(
    served: Served, tmp_path: Path
) -> None:
    # The VMM closes its connection and connects again (a guest reboot) before the loop looks:
    # both sockets are readable at once, and the hang-up is seen first.
    served.client.close()
    again = _connect(tmp_path / "vhost.sock")
    try:
        served.thread.start()
        served.thread.join(10)
        assert not served.thread.is_alive(), "the hang-up did not end the loop"
        assert served.handler.seen == []
        conn = served.listener.accept(keep_listening=True)  # the new one waited in the backlog
        try:
            again.sendall(b"x")
            assert conn.recv(1) == b"x"
        finally:
            conn.close()
    finally:
        again.close()


def test_a_shut_down_listener_is_no_longer_watched(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks: list[bool] = []
    refuse_waiting = served.listener.refuse_waiting

    def counted() -> bool:
        looks.append(refuse_waiting())
        return looks[-1]

    monkeypatch.setattr(served.listener, "refuse_waiting", counted)
    served.listener.shutdown()  # a stop signal: the listener reads as ready from now on
    served.thread.start()
    # Nothing sent yet: the loop finds only the listener ready, once.
    deadline = time.monotonic() + 10
    while not looks:
        assert time.monotonic() < deadline, "the loop never looked at the listener"
        time.sleep(0.01)
    assert served.ask() == encode_u64(4)
    assert served.ask() == encode_u64(4)
    assert looks == [False], "the loop kept looking at a listener that can accept nothing"
    served.client.shutdown(socket.SHUT_WR)
    served.thread.join(10)
    assert not served.thread.is_alive()
