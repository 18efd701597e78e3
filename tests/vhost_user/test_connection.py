"""The listening socket's one owner, :class:`Listener`: made at a path or inherited, one
front-end accepted, and the socket file removed by :meth:`Listener.close` only, and only ours."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from pyvirtiofsd.vhost_user.connection import Listener


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
