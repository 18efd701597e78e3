"""The passthrough's inodes (:mod:`pyvirtiofsd.backends.passthrough.inodes`) through raw FUSE
requests: FORGET ends an inode (never the root's), its descriptors go with its last user and not
before (a lock file being opened, or used, while the guest forgets the inode), the descriptor
count returns to its baseline once everything is forgotten, and inodes reached by file handle
keep no descriptor open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import stat
import struct
from pathlib import Path

import pytest

from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs, inodes
from pyvirtiofsd.backends.passthrough.config import FileHandles
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ROOT, Attr
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, direct
from tests.backends.passthrough.conftest import (
    GUARD,
    OFFSET_MAX,
    Daemon,
    Pause,
    errno_of,
    fd_count,
    in_thread,
    is_open,
    lk,
    open_fds,
    pause_setlk,
)


def test_forgotten_inode_is_gone(client: FuseClient) -> None:
    f = client.lookup(ROOT, b"file")
    client.lookup(ROOT, b"file")
    client.forget(f.nodeid, 1)
    assert client.getattr(f.nodeid).size == 6
    client.forget(f.nodeid, 1)
    assert errno_of(client.getattr, f.nodeid) == errno.EBADF
    assert client.lookup(ROOT, b"file").nodeid != f.nodeid


def test_root_is_never_forgotten(client: FuseClient) -> None:
    client.forget(ROOT, 1 << 40)
    assert client.getattr(ROOT).mode


def test_file_handles_mode(tree: tuple[Path, Path]) -> None:
    from pyvirtiofsd.backends.passthrough import FileHandles

    fs = PassthroughFs(PassthroughConfig(str(tree[0]), inode_file_handles=FileHandles.MANDATORY))
    c = FuseClient(direct(Server(fs)))
    c.init()
    f = c.lookup(ROOT, b"file")
    opened = c.open(f.nodeid)
    assert c.read(f.nodeid, opened.fh, 0, 100) == b"inside"
    d = c.lookup(ROOT, b"dir")
    e = c.mkdir(d.nodeid, b"sub")
    assert c.lookup(d.nodeid, b"sub").nodeid == e.nodeid
    link = c.lookup(ROOT, b"etc")
    assert errno_of(c.lookup, link.nodeid, b"passwd") == errno.ENOTDIR
    assert fs.inodes.root.fd >= 0
    assert all(i.fd < 0 for i in list(fs.inodes._by_id.values()) if i is not fs.inodes.root)
    fs.shutdown()


# --- finding 12: descriptors live as long as their users ------------------------------------


def test_fds_return_to_the_baseline_once_everything_is_forgotten(daemon: Daemon) -> None:
    c = daemon.c
    base = fd_count()
    for round_ in range(3):
        name = f"f{round_}".encode()
        entry, opened = c.create(ROOT, name, 0o644, os.O_RDWR)
        c.write(entry.nodeid, opened.fh, 0, b"x" * 100)
        lk(c, abi.Opcode.SETLK, entry.nodeid, 7, fcntl.F_WRLCK)
        lk(c, abi.Opcode.GETLK, entry.nodeid, 8, fcntl.F_WRLCK)
        d = c.lookup(ROOT, b"dir")
        lk(c, abi.Opcode.SETLK, d.nodeid, 7, fcntl.F_RDLCK)
        dh = c.opendir(d.nodeid).fh
        c.readdirplus(d.nodeid, dh)
        c.releasedir(d.nodeid, dh)
        c.release(entry.nodeid, opened.fh)
        c.forget(entry.nodeid, 1)
        c.forget(d.nodeid, 1)
    assert daemon.fs.inodes.count() == 1
    assert fd_count() == base


@pytest.mark.pure_python
def test_forget_while_setlk_opens_its_lock_fd_leaks_nothing(daemon: Daemon) -> None:
    c = daemon.c
    base = fd_count()
    ino = daemon.ino("file")
    pause = Pause(lambda inode, flags: not flags & os.O_PATH)
    daemon.fs.inodes.open = pause.wrap(daemon.fs.inodes.open)  # type: ignore[method-assign]
    t, result = in_thread(lambda: lk(c, abi.Opcode.SETLK, ino, 1, fcntl.F_WRLCK))
    pause.wait()
    c.forget(ino, 1)  # the guest forgets the inode while its lock file is being opened
    pause.go()
    t.join(GUARD)
    assert not t.is_alive()
    # Either answer is fine; what is not: a lock fd left open on an inode nobody knows.
    assert "error" not in result or result["error"].errno == errno.EBADF
    assert daemon.fs.inodes.count() == 1
    assert open_fds(daemon.share / "file") == []
    assert fd_count() == base


def test_forget_while_setlk_uses_its_lock_fd_never_reaches_another_file(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    c = daemon.c
    base = fd_count()
    ino = daemon.ino("file")
    lk(c, abi.Opcode.SETLK, ino, 1, fcntl.F_RDLCK)  # the owner's lock file now exists
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    pause = pause_setlk(monkeypatch)
    t, result = in_thread(lambda: lk(c, abi.Opcode.SETLK, ino, 1, fcntl.F_WRLCK))
    pause.wait()
    lock_fd = pause.args[0]
    c.forget(ino, 1)
    planted = -1
    if not is_open(lock_fd):
        # The fd was closed under the request: another file takes its number, as any open
        # on another thread might.
        planted = os.open(victim, os.O_RDWR)
        if planted != lock_fd:
            os.dup2(planted, lock_fd)
            os.close(planted)
        planted = lock_fd
    pause.go()
    t.join(GUARD)
    assert not t.is_alive()
    try:
        probe = os.open(victim, os.O_RDWR)
        whole = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
        held = fcntl.fcntl(probe, fcntl.F_OFD_GETLK, whole)
        os.close(probe)
        assert struct.unpack("hhqqi4x", held)[0] == fcntl.F_UNLCK, "the victim got locked"
        assert planted < 0, "the lock fd was closed while SETLK was using it"
        assert "error" not in result, result.get("error")
    finally:
        if planted >= 0:
            os.close(planted)
    assert daemon.fs.inodes.count() == 1
    assert fd_count() == base


# --- live migration ---------------------------------------------------------------------------


def test_restored_and_lost_inodes(tmp_path: Path) -> None:
    from pyvirtiofsd.backends.passthrough.config import FileHandles
    from pyvirtiofsd.backends.passthrough.inodes import InodeStore

    (tmp_path / "a").write_bytes(b"")
    store = InodeStore(str(tmp_path), FileHandles.NEVER)
    try:
        fd = os.open(tmp_path / "a", os.O_PATH)
        inode = store.restore(40, fd, inodes.ident_of(os.fstat(fd)), 3)
        assert store.get(40) is inode and inode.refcount == 3
        again = os.open(tmp_path / "a", os.O_PATH)
        with pytest.raises(ValueError, match="inode 41 is the same file here as inode 40"):
            store.restore(41, again, inodes.ident_of(os.fstat(again)), 1)
        store.mark_lost(50, 2)
        with pytest.raises(OSError) as e:
            store.get(50)
        assert e.value.errno == errno.EIO
        store.forget(50, 1)
        assert errno_of(store.get, 50) == errno.EIO
        store.forget(50, 1)
        assert errno_of(store.get, 50) == errno.EBADF
        # New numbers come after every number the guest holds.
        os.mkdir(tmp_path / "b")
        b = store.add(os.open(tmp_path / "b", os.O_PATH), inodes.ident_of(os.stat(tmp_path / "b")))
        assert b.nodeid == 51
    finally:
        store.close_all()


def test_granted_locks_are_recorded_until_their_owner_goes(daemon: Daemon) -> None:
    ino = daemon.ino("file")
    lk(daemon.c, abi.Opcode.SETLK, ino, 5, fcntl.F_WRLCK)
    store = daemon.fs.inodes
    inode = store.get(ino)
    assert store.held_locks(inode) == [(5, 4242, [(0, OFFSET_MAX, fcntl.F_WRLCK)])]
    fh = daemon.c.open(ino, os.O_RDWR).fh
    daemon.c.flush(ino, fh, lock_owner=5)  # the owner closes its file: its locks go
    assert store.held_locks(inode) == []


def _every_kind(root: Path) -> list[Path]:
    """One file of each type, with times, sizes and link counts that differ."""
    (root / "reg").write_bytes(b"x" * 5000)
    os.link(root / "reg", root / "reg2")
    (root / "dir").mkdir()
    os.symlink("reg", root / "link")
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
    os.utime(root / "reg", ns=(-5_500_000_000, 2**40 * 1_000_000_000 + 7))
    os.utime(root / "dir", ns=(0, 999_999_999))
    return [root / n for n in ("reg", "dir", "link", "fifo", "sock")] + [Path("/dev/null")]


@pytest.mark.parametrize("flags", [0, abi.ATTR_SUBMOUNT, 0xFFFF_FFFF])
def test_attrs_of_an_fd_are_what_the_stat_result_gives(tmp_path: Path, flags: int) -> None:
    """The compiled build makes attributes (and a lookup's identity) from fstat() in C,
    without an os.stat_result: the same as the Python path for every file type (a device's
    64-bit number, times before 1970 and far ahead, hard links), on the build under test."""
    for path in _every_kind(tmp_path):
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            assert inodes.attr_of_fd(fd, flags) == Attr.from_stat(st, None, flags), path
            attr, ident = inodes.entry_of_fd(fd)
            assert attr.with_flags(flags) == Attr.from_stat(st, None, flags), path
            assert ident == (st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)), path
        finally:
            os.close(fd)
    if inodes._native_fstat_attr is None or inodes._native_fstat_entry is None:
        assert os.environ.get("PYVIRTIOFSD_TEST_BUILD") != "mypyc", "C module missing"


def test_attr_of_fd_fails_as_fstat_does() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    for fd in (r, -1):
        with pytest.raises(OSError) as got:
            inodes.attr_of_fd(fd)
        assert got.value.errno == errno.EBADF
    native = inodes._native_fstat_attr
    if native is not None:
        for bad in ((2**40, 0), (0, 2**32), (0, -1)):
            with pytest.raises(OverflowError):
                native(*bad)
        with pytest.raises(TypeError):
            native(0)
        entry = inodes._native_fstat_entry
        with pytest.raises(OverflowError):
            entry(2**40)
        with pytest.raises(TypeError):
            entry()
    with pytest.raises(OSError) as got:
        inodes.entry_of_fd(r)
    assert got.value.errno == errno.EBADF


def _open_or_errno(dir_fd: int, name: bytes, flags: int) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        return -e.errno


@pytest.mark.parametrize(
    "flags",
    [
        os.O_PATH | os.O_NOFOLLOW,
        # O_NONBLOCK: a FIFO's open would wait for its other end.
        os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
        os.O_RDONLY | os.O_NONBLOCK,
        os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK,
        os.O_WRONLY | os.O_NONBLOCK,
    ],
)
def test_open_at_answers_as_os_open_with_the_errno_for_an_exception(
    tmp_path: Path, flags: int
) -> None:
    """A lookup's open answers a failure with minus its errno, in C on the compiled build:
    for every kind of file, a missing name, "." and "..", the same fd kind or errno as
    os.open, close-on-exec as os.open makes its fds."""
    root = tmp_path / "root"
    root.mkdir()
    names = [p.name.encode() for p in _every_kind(root)[:-1]] + [b"missing", b".", b".."]
    dir_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for name in [*names, b"reg/below"]:
            want = _open_or_errno(dir_fd, name, flags)
            got = inodes.open_at(dir_fd, name, flags)
            try:
                assert (got >= 0) == (want >= 0), name
                if got < 0:
                    assert got == want, (name, os.strerror(-got))
                else:
                    assert os.fstat(got).st_ino == os.fstat(want).st_ino, name
                    assert fcntl.fcntl(got, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, name
            finally:
                for fd in (got, want):
                    if fd >= 0:
                        os.close(fd)
        assert inodes.open_at(-1, b"reg", flags) == -errno.EBADF
    finally:
        os.close(dir_fd)


def test_open_at_never_makes_a_file_and_refuses_what_os_open_refuses(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        for flags in (os.O_CREAT | os.O_WRONLY, os.O_TMPFILE | os.O_RDWR):
            with pytest.raises(ValueError):
                inodes.open_at(dir_fd, b"new", flags)
        assert not (tmp_path / "new").exists()
        with pytest.raises(ValueError):
            inodes.open_at(dir_fd, b"a\0b", os.O_PATH)
        native = inodes._native_open_at
        if native is None:
            assert os.environ.get("PYVIRTIOFSD_TEST_BUILD") != "mypyc", "C module missing"
            return
        for bad in ((2**40, b"x", 0), (dir_fd, b"x", 2**40)):
            with pytest.raises(OverflowError):
                native(*bad)
        with pytest.raises(TypeError):
            native(dir_fd, "x", 0)
        with pytest.raises(TypeError):
            native(dir_fd, b"x")
    finally:
        os.close(dir_fd)


def test_reopen_goes_through_the_fd_link_and_fails_with_the_errno(tmp_path: Path) -> None:
    """An inode is opened anew through its /proc/self/fd link, by one name in an fd of that
    directory (in C on the compiled build): a new open file of the same inode, close-on-exec,
    even for an O_PATH fd of a symlink's target; the errno of a failure as OSError; never a
    file made."""
    (tmp_path / "f").write_bytes(b"data")
    proc_fds = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    path_fd = os.open(tmp_path / "f", os.O_PATH)
    try:
        for flags in (os.O_RDONLY, os.O_RDWR | os.O_NOFOLLOW, os.O_PATH):
            new = inodes._reopen(proc_fds, path_fd, stat.S_IFREG, flags)
            try:
                assert new != path_fd
                assert os.fstat(new).st_ino == os.fstat(path_fd).st_ino
                assert fcntl.fcntl(new, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
                if flags != os.O_PATH:
                    assert os.pread(new, 4, 0) == b"data"
            finally:
                os.close(new)
        with pytest.raises(OSError) as e:
            inodes._reopen(proc_fds, path_fd, stat.S_IFREG, os.O_RDONLY | os.O_DIRECTORY)
        assert e.value.errno == errno.ENOTDIR
        with pytest.raises(OSError) as e:
            inodes._reopen(proc_fds, 999_999, stat.S_IFREG, os.O_RDONLY)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(OSError) as e:
            inodes._reopen(proc_fds, path_fd, stat.S_IFLNK, os.O_RDONLY)
        assert e.value.errno == errno.ELOOP
        for making in (os.O_CREAT | os.O_WRONLY, os.O_TMPFILE | os.O_RDWR):
            with pytest.raises(ValueError):
                inodes._reopen(proc_fds, path_fd, stat.S_IFREG, making)
    finally:
        os.close(path_fd)
        os.close(proc_fds)


def _fds() -> set[str]:
    found = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{n}"))
        except FileNotFoundError:
            pass  # listdir's own
    return found


def test_stores_share_one_proc_fd_dir_given_back_by_the_last(tmp_path: Path) -> None:
    before = _fds()
    a = inodes.InodeStore(str(tmp_path), FileHandles.NEVER)
    b = inodes.InodeStore(str(tmp_path), FileHandles.NEVER)
    assert a._proc_fds == b._proc_fds >= 0
    a.close_all()
    fd = b.open(b.root, os.O_RDONLY | os.O_DIRECTORY)
    assert os.fstat(fd).st_ino == os.stat(tmp_path).st_ino
    os.close(fd)
    b.close_all()
    assert _fds() == before


def test_a_forked_child_reopens_through_its_own_descriptors(tmp_path: Path) -> None:
    """/proc/self is resolved when the store opens it: after fork() the child replaces it, or
    its reopens would go through the parent's descriptors, whatever the parent keeps under
    the inode's number by then. The child's is close-on-exec, as the parent's."""
    share = tmp_path / "share"
    share.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    store = inodes.InodeStore(str(share), FileHandles.NEVER)
    go_r, go_w = os.pipe()
    ino_r, ino_w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.read(go_r, 1)  # the parent has put another directory under the number
                fd = store.open(store.root, os.O_RDONLY | os.O_DIRECTORY)
                inheritable = os.get_inheritable(store._proc_fds)
                os.write(ino_w, struct.pack("=Q?", os.fstat(fd).st_ino, inheritable))
                code = 0
            finally:
                os._exit(code)
        saved = os.dup(store.root.fd)
        other = os.open(outside, os.O_PATH | os.O_DIRECTORY)
        os.dup2(other, store.root.fd)
        os.close(other)
        try:
            os.write(go_w, b"x")
            got, inheritable = struct.unpack("=Q?", os.read(ino_r, 9))
            assert os.waitpid(pid, 0)[1] == 0
        finally:
            os.dup2(saved, store.root.fd)
            os.close(saved)
        assert got == os.stat(share).st_ino != os.stat(outside).st_ino
        assert not inheritable  # the child's own is close-on-exec too
    finally:
        for fd in (go_r, go_w, ino_r, ino_w):
            os.close(fd)
        store.close_all()


def test_a_child_forked_while_the_shared_fd_is_locked_still_gives_it_back(
    tmp_path: Path,
) -> None:
    store = inodes.InodeStore(str(tmp_path), FileHandles.NEVER)
    with inodes._PROC_FDS.lock:  # as another thread in take() or give() would hold it
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                signal.alarm(10)  # a lock the child inherited held would wait for ever
                store.close_all()
                code = 0
            finally:
                os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    store.close_all()


def test_dir_entries_are_what_getdents_gives_and_resume_at_their_offsets(tmp_path: Path) -> None:
    """One getdents64 taken apart (in C on the compiled build): every name, with its inode
    number and type as lstat and scandir give them, whatever its bytes and length; a small
    read size splits the directory over several calls, and seeking to an entry's offset goes
    on after it."""
    root = tmp_path / "d"
    root.mkdir()
    names = {b"x" * 255, b"\xff\xfe name", b"a", b"with\nnewline"}
    names |= {f"f{i:04d}".encode() for i in range(300)}
    for name in names:
        (root / os.fsdecode(name)).write_bytes(b"")
    os.symlink("a", root / "link")
    (root / "sub").mkdir()
    names |= {b"link", b"sub"}
    kinds = {e.name.encode("utf-8", "surrogateescape"): e for e in os.scandir(root)}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen: list[inodes.DirEntry] = []
        while batch := inodes.dir_entries(fd, 4096):
            assert len(batch) < len(names)  # 4 KiB holds far fewer than all of them
            seen += batch
        assert inodes.dir_entries(fd) == []
        assert sorted(e[3] for e in seen) == sorted([*names, b".", b".."])
        for d_ino, _, dtype, name in seen:
            st = os.lstat(root / os.fsdecode(name))
            assert d_ino == st.st_ino, name
            if name in kinds:
                want = 10 if kinds[name].is_symlink() else 4 if kinds[name].is_dir() else 8
                assert dtype == want, name
        # The offset an entry carries is where the one after it starts.
        for i in (0, 1, 150, len(seen) - 2):
            os.lseek(fd, seen[i][1], os.SEEK_SET)
            assert inodes.dir_entries(fd)[0] == seen[i + 1]
        with pytest.raises(OSError) as got:
            inodes.dir_entries(-1)
        assert got.value.errno == errno.EBADF
        native = inodes._native_dir_entries
        if native is None:
            assert os.environ.get("PYVIRTIOFSD_TEST_BUILD") != "mypyc", "C module missing"
            return
        for size in (0, 1023, 1 << 25):
            with pytest.raises(ValueError):
                native(fd, size)
        with pytest.raises(TypeError):
            native(fd)
    finally:
        os.close(fd)
    reg = os.open(root / "a", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as got:
            inodes.dir_entries(reg)
        assert got.value.errno == errno.ENOTDIR
    finally:
        os.close(reg)


def test_a_file_from_before_1970_is_looked_up_and_its_reference_kept(tmp_path: Path) -> None:
    """Its times once made the reply fail to pack after the lookup had taken its reference:
    EINVAL, and a reference the kernel would never forget."""
    old = tmp_path / "old"
    old.touch()
    os.utime(old, ns=(-5_500_000_000, -1))
    fs = PassthroughFs(PassthroughConfig(shared_dir=str(tmp_path)))
    client = FuseClient(direct(Server(fs)))
    client.init()
    entry = client.lookup(ROOT, b"old")
    assert (entry.atime, entry.atimensec) == (2**64 - 6, 500_000_000)
    attr = client.getattr(entry.nodeid)
    assert (attr.mtime, attr.mtimensec) == (2**64 - 1, 999_999_999)
    client.forget(entry.nodeid, 1)  # the one reference the lookup took, and no other
    assert errno_of(client.getattr, entry.nodeid) == errno.EBADF
    assert stat.S_ISDIR(client.getattr(ROOT).mode)
    fs.shutdown()


def test_a_pin_or_unpin_that_fails_leaves_the_store_lock_free(tmp_path: Path) -> None:
    """The inode store takes its lock with acquire() and release() on the request path; an
    error between the two still releases it (a later FORGET would wait for ever)."""
    fs = PassthroughFs(PassthroughConfig(str(tmp_path)))
    store = fs.inodes
    for call in (store.pin, store.unpin):
        with pytest.raises((AttributeError, TypeError)):
            call(object())  # type: ignore[arg-type]
        assert store._lock.acquire(timeout=5)
        store._lock.release()
    fs.shutdown()
