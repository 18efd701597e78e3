"""The passthrough opens nothing but regular files and directories, and its descriptors live
exactly as long as something uses them.

Raw FUSE requests, as a hostile guest kernel may send them, against special files made on the
host (device nodes with the numbers of /dev/zero or /dev/null, FIFOs, sockets). Whether the
daemon opened a node is asked of the kernel: an inotify watch on the node reports every open
of it (O_PATH ones excepted, which are allowed), and /proc/self/fd shows what stays open.

Races (FORGET against SETLK, RELEASE against READ) are forced into the bad interleaving by
pausing the request at the moment it has its descriptor, through a wrapper around the call that
uses it, while the other request runs; no sleeps.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd.backends.passthrough import FileHandles, PassthroughConfig, PassthroughFs, locks
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import Server, TransportCaps
from pyvirtiofsd.testing.fuse_client import FuseClient, direct

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")

#: Only keeps a broken daemon from hanging the run; nothing is timed.
GUARD = 20.0
OFFSET_MAX = 0x7FFF_FFFF_FFFF_FFFF
_O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY

_libc = ctypes.CDLL(None, use_errno=True)
_IN_OPEN = 0x20
_IN_EVENT = struct.Struct("iIII")


class OpenWatch:
    """The kernel's record of opens of some files (inotify IN_OPEN; O_PATH opens are not
    reported)."""

    def __init__(self, *paths: Path) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.names: dict[int, str] = {}
        for p in paths:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(p), _IN_OPEN)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.names[wd] = p.name

    def opened(self) -> list[str]:
        try:
            raw = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, pos = [], 0
        while pos < len(raw):
            wd, _, _, length = _IN_EVENT.unpack_from(raw, pos)
            out.append(self.names[wd])
            pos += _IN_EVENT.size + length
        return out

    def close(self) -> None:
        os.close(self.fd)


def open_fds(path: Path) -> list[tuple[int, int]]:
    """This process's (fd, flags) on ``path``, O_PATH ones left out."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != str(path):
                continue
            with open(f"/proc/self/fdinfo/{name}") as f:
                flags = int(next(x for x in f if x.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):
            continue
        if not flags & os.O_PATH:
            out.append((int(name), flags))
    return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def errno_of(fn: Callable[..., Any], *args: Any, **kw: Any) -> int:
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    return e.value.errno


def lk(c: FuseClient, op: int, nodeid: int, owner: int, ltype: int) -> bytes:
    """GETLK/SETLK/SETLKW of the whole file for ``owner`` (pid 4242)."""
    return c.call(op, nodeid, abi.LK_IN.pack(0, owner, 0, OFFSET_MAX, ltype, 4242, 0, 0))


def create(c: FuseClient, parent: int, name: bytes, flags: int, mode: int = 0o644) -> Any:
    """CREATE with exactly ``flags`` (FuseClient.create adds O_CREAT, as the kernel does)."""
    payload = abi.CREATE_IN.pack(flags, mode, 0, 0) + name + b"\0"
    raw = c.call(abi.Opcode.CREATE, parent, payload)
    return abi.ENTRY_OUT.unpack(raw), abi.OPEN_OUT.unpack(raw, abi.ENTRY_OUT.size)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """``fn`` running on a thread, and where its value or exception will be."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def guarded(fn: Callable[[], Any], unblock: Callable[[], None]) -> Any:
    """Run ``fn`` on a thread; if it is still blocked after GUARD, ``unblock`` it and fail."""
    t, result = in_thread(fn)
    t.join(GUARD)
    if t.is_alive():
        unblock()
        t.join(GUARD)
        pytest.fail("the request blocked its worker")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "file").write_bytes(b"file contents")
    (d / "dir").mkdir()
    (d / "link").symlink_to("file")
    # A "host disk": a device node a guest must never reach (the numbers of /dev/zero).
    os.mknod(d / "disk", 0o666 | stat.S_IFCHR, os.stat("/dev/zero").st_rdev)
    os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
    os.mkfifo(d / "fifo", 0o666)
    os.mknod(d / "sock", 0o666 | stat.S_IFSOCK)
    return d


SPECIAL = ["disk", "null", "fifo", "sock"]


class Daemon:
    def __init__(self, share: Path, **cfg: Any) -> None:
        self.share = share
        self.fs = PassthroughFs(PassthroughConfig(str(share), **cfg))
        self.server = Server(self.fs)
        self.c = FuseClient(direct(self.server))
        self.c.init()
        self.watch = OpenWatch(*(share / n for n in SPECIAL))

    def ino(self, name: str) -> int:
        return int(self.c.lookup(ROOT, name.encode()).nodeid)

    def close(self) -> None:
        self.watch.close()
        self.fs.shutdown()


@pytest.fixture(params=[FileHandles.NEVER, FileHandles.MANDATORY], ids=["fds", "handles"])
def daemon(share: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """The daemon, keeping an O_PATH fd per inode, or reaching inodes by file handle."""
    try:
        d = Daemon(share, inode_file_handles=request.param)
    except OSError as e:
        pytest.skip(f"no file handles here: {e}")
    yield d
    d.close()


def _unblock_fifo(path: Path) -> Callable[[], None]:
    """Opening the other end lets a blocked open of a FIFO go on."""

    def unblock() -> None:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        threading.Timer(1.0, os.close, (fd,)).start()

    return unblock


# --- finding 1: CREATE over a device node ---------------------------------------------------


@pytest.mark.parametrize("name", ["disk", "null", "sock"])
@pytest.mark.parametrize("access", [os.O_RDWR, os.O_RDONLY, os.O_WRONLY | os.O_TRUNC])
def test_create_over_a_device_node_never_opens_it(daemon: Daemon, name: str, access: int) -> None:
    """The escape: a node with a host disk's numbers, then CREATE (no O_EXCL) on its name."""
    inodes = daemon.fs.inodes.count()
    assert errno_of(create, daemon.c, ROOT, name.encode(), access | os.O_CREAT) == errno.ENXIO
    assert daemon.watch.opened() == []
    assert open_fds(daemon.share / name) == []
    # the failed CREATE left no lookup behind
    assert daemon.fs.inodes.count() == inodes


@pytest.mark.parametrize("access", [os.O_RDONLY, os.O_WRONLY])
def test_create_over_a_fifo_neither_blocks_nor_opens(daemon: Daemon, access: int) -> None:
    fifo = daemon.share / "fifo"
    err = guarded(
        lambda: errno_of(create, daemon.c, ROOT, b"fifo", access | os.O_CREAT),
        _unblock_fifo(fifo),
    )
    assert err == errno.ENXIO
    assert daemon.watch.opened() == []


def test_mknod_then_create_is_refused_at_the_mknod(daemon: Daemon) -> None:
    rdev = os.stat("/dev/zero").st_rdev
    for kind in (stat.S_IFCHR, stat.S_IFBLK):
        assert errno_of(daemon.c.mknod, ROOT, b"mine", kind | 0o666, rdev) == errno.EPERM
        assert not os.path.lexists(daemon.share / "mine")
    # FIFOs and sockets may be made; the daemon never opens them
    daemon.c.mknod(ROOT, b"f2", stat.S_IFIFO | 0o644)
    daemon.c.mknod(ROOT, b"s2", stat.S_IFSOCK | 0o644)
    assert stat.S_ISFIFO(os.lstat(daemon.share / "f2").st_mode)
    # a whiteout (0/0), which overlayfs in the guest makes, is no device anyone can open
    daemon.c.mknod(ROOT, b"wh", stat.S_IFCHR, 0)
    assert os.lstat(daemon.share / "wh").st_rdev == 0


def test_allow_devices_lets_mknod_make_devices_that_are_still_never_opened(share: Path) -> None:
    d = Daemon(share, allow_devices=True)
    try:
        rdev = os.stat("/dev/zero").st_rdev
        d.c.mknod(ROOT, b"mine", stat.S_IFCHR | 0o600, rdev)
        assert os.lstat(share / "mine").st_rdev == rdev
        watch = OpenWatch(share / "mine")
        assert errno_of(create, d.c, ROOT, b"mine", os.O_RDWR | os.O_CREAT) == errno.ENXIO
        assert errno_of(d.c.open, d.ino("mine"), os.O_RDWR) == errno.ENXIO
        assert watch.opened() == []
        watch.close()
    finally:
        d.close()


# --- finding 2: CREATE and O_EXCL -----------------------------------------------------------


def test_create_honours_o_excl_on_a_name_that_appeared_after_the_lookup(daemon: Daemon) -> None:
    assert errno_of(daemon.c.lookup, ROOT, b"late") == errno.ENOENT
    (daemon.share / "late").write_bytes(b"host data")  # the host makes it meanwhile
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    assert errno_of(create, daemon.c, ROOT, b"late", flags) == errno.EEXIST
    assert (daemon.share / "late").read_bytes() == b"host data"


def test_create_without_o_excl_opens_an_existing_file_as_open_would(daemon: Daemon) -> None:
    ino = daemon.ino("file")
    entry, opened = create(daemon.c, ROOT, b"file", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    assert entry.nodeid == ino
    assert (daemon.share / "file").read_bytes() == b""
    daemon.c.write(ino, opened.fh, 0, b"again")
    daemon.c.release(ino, opened.fh)
    assert (daemon.share / "file").read_bytes() == b"again"
    for access in (os.O_RDWR, os.O_RDONLY):
        assert errno_of(create, daemon.c, ROOT, b"dir", access | os.O_CREAT) == errno.EISDIR
    assert errno_of(create, daemon.c, ROOT, b"link", os.O_RDWR | os.O_CREAT) == errno.ELOOP


def test_create_makes_new_files_with_the_callers_ids(daemon: Daemon) -> None:
    daemon.share.chmod(0o777)
    daemon.c.uid, daemon.c.gid = 1234, 5678
    entry, opened = create(daemon.c, ROOT, b"new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    st = os.lstat(daemon.share / "new")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    daemon.c.release(entry.nodeid, opened.fh)


# --- finding 3: locks -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SPECIAL, "link"])
@pytest.mark.parametrize("op", [abi.Opcode.GETLK, abi.Opcode.SETLK, abi.Opcode.SETLKW])
def test_locks_on_special_files_open_nothing(daemon: Daemon, name: str, op: int) -> None:
    ino = daemon.ino(name)
    err = guarded(
        lambda: errno_of(lk, daemon.c, op, ino, 1, fcntl.F_WRLCK),
        _unblock_fifo(daemon.share / "fifo"),
    )
    assert err == errno.ENOLCK
    assert daemon.watch.opened() == []
    assert open_fds(daemon.share / name) == []


def test_readonly_lock_fds_are_read_only(share: Path) -> None:
    d = Daemon(share, readonly=True)
    try:
        ino = d.ino("file")
        lk(d.c, abi.Opcode.SETLK, ino, 1, fcntl.F_RDLCK)
        # POSIX: a write lock needs a file open for writing
        assert errno_of(lk, d.c, abi.Opcode.SETLK, ino, 2, fcntl.F_WRLCK) == errno.EBADF
        fds = open_fds(share / "file")
        assert fds and all(flags & os.O_ACCMODE == os.O_RDONLY for _, flags in fds)
        lk(d.c, abi.Opcode.SETLK, d.ino("dir"), 1, fcntl.F_RDLCK)
    finally:
        d.close()


def test_write_locks_still_work(daemon: Daemon) -> None:
    ino = daemon.ino("file")
    lk(daemon.c, abi.Opcode.SETLK, ino, 1, fcntl.F_WRLCK)
    assert errno_of(lk, daemon.c, abi.Opcode.SETLK, ino, 2, fcntl.F_WRLCK) == errno.EAGAIN
    held = abi.LK_OUT.unpack(lk(daemon.c, abi.Opcode.GETLK, ino, 2, fcntl.F_WRLCK))
    assert (held.type, held.pid) == (fcntl.F_WRLCK, 4242)
    daemon.c.flush(ino, daemon.c.open(ino).fh, lock_owner=1)
    lk(daemon.c, abi.Opcode.SETLK, ino, 2, fcntl.F_WRLCK)


# --- finding 4: SYNCFS ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SPECIAL, "link", "file", "dir"])
def test_syncfs_on_any_inode_opens_no_special_file(daemon: Daemon, name: str) -> None:
    ino = daemon.ino(name)
    guarded(
        lambda: daemon.c.call(abi.Opcode.SYNCFS, ino, abi.SYNCFS_IN.pack(0)),
        _unblock_fifo(daemon.share / "fifo"),
    )
    assert daemon.watch.opened() == []


# --- finding 5: O_TMPFILE through OPEN ------------------------------------------------------


@pytest.mark.parametrize("flags", [os.O_TMPFILE | os.O_RDWR, _O_TMPFILE_BIT | os.O_WRONLY])
def test_open_with_o_tmpfile_is_einval(daemon: Daemon, flags: int) -> None:
    before = fd_count()
    d = daemon.ino("dir")
    assert errno_of(daemon.c.open, d, flags) == errno.EINVAL
    assert errno_of(daemon.c.open, ROOT, flags) == errno.EINVAL
    flags |= os.O_CREAT
    assert errno_of(create, daemon.c, ROOT, b"t", flags) == errno.EINVAL
    assert not os.path.lexists(daemon.share / "t")
    daemon.c.forget(d, 1)
    assert fd_count() == before


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


class Pause:
    """Stops the first call that ``matches`` until :meth:`go`; tells when one is stopped."""

    def __init__(self, matches: Callable[..., bool]) -> None:
        self.matches = matches
        self.reached = threading.Event()
        self.released = threading.Event()
        self.args: tuple[Any, ...] = ()
        self._armed = True
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def paused(*args: Any, **kw: Any) -> Any:
            with self._lock:
                hit = self._armed and self.matches(*args)
                if hit:
                    self._armed = False
            if hit:
                self.args = args
                self.reached.set()
                assert self.released.wait(GUARD), "the test never let the request go on"
            return fn(*args, **kw)

        return paused

    def wait(self) -> None:
        assert self.reached.wait(GUARD), "the request never got to the pause"

    def go(self) -> None:
        self.released.set()


def pause_setlk(monkeypatch: pytest.MonkeyPatch) -> Pause:
    """Stop the next F_OFD_SETLK of the lock code, the fd it got in hand."""
    pause = Pause(lambda fd, cmd, arg=None: cmd == fcntl.F_OFD_SETLK)
    module = type("fcntl", (), {})()
    for name in dir(fcntl):
        setattr(module, name, getattr(fcntl, name))
    module.fcntl = pause.wrap(fcntl.fcntl)  # type: ignore[attr-defined]
    monkeypatch.setattr(locks, "fcntl", module)
    return pause


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


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
    if not _is_open(lock_fd):
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


def test_close_of_an_owner_while_its_setlk_runs_leaves_no_lock_and_no_fd(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUSH (the guest's close()) of a lock owner on one queue while a SETLK of the same owner
    runs on another: the lock file is closed after the SETLK, not under it, and its locks go."""
    c = daemon.c
    ino = daemon.ino("file")
    fh = c.open(ino).fh
    lk(c, abi.Opcode.SETLK, ino, 1, fcntl.F_RDLCK)
    base = fd_count()
    pause = pause_setlk(monkeypatch)
    t, result = in_thread(lambda: lk(c, abi.Opcode.SETLK, ino, 1, fcntl.F_WRLCK))
    pause.wait()
    c.flush(ino, fh, lock_owner=1)
    assert _is_open(pause.args[0])
    pause.go()
    t.join(GUARD)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    assert fd_count() == base - 1  # the owner's lock file, gone with the SETLK
    lk(c, abi.Opcode.SETLK, ino, 2, fcntl.F_WRLCK)  # and no lock of owner 1 is left
    c.release(ino, fh)
    c.forget(ino, 1)


def test_release_while_read_uses_the_fd_never_reads_another_file(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    c = daemon.c
    base = fd_count()
    ino = daemon.ino("file")
    fh = c.open(ino).fh
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the guest's file")
    pause = Pause(lambda out, fd, offset, size: True)
    monkeypatch.setattr(ReplyWriter, "read_from_fd", pause.wrap(ReplyWriter.read_from_fd))
    t, result = in_thread(lambda: c.read(ino, fh, 0, 100))
    pause.wait()
    fd = pause.args[1]
    c.release(ino, fh)  # another queue releases the handle the READ is using
    planted = -1
    if not _is_open(fd):
        planted = os.open(victim, os.O_RDONLY)
        if planted != fd:
            os.dup2(planted, fd)
            os.close(planted)
        planted = fd
    pause.go()
    t.join(GUARD)
    assert not t.is_alive()
    try:
        assert planted < 0, "RELEASE closed the fd a READ was using"
        assert result.get("value") == b"file contents", result
    finally:
        if planted >= 0:
            os.close(planted)
    # the READ, the last user, closed it
    assert open_fds(daemon.share / "file") == []
    assert errno_of(c.read, ino, fh, 0, 100) == errno.EBADF
    c.forget(ino, 1)
    assert fd_count() == base


# --- finding 12: a read-only DAX mapping ----------------------------------------------------


class _RecordingWindow:
    """A DAX window that only notes the access mode of the fds it is given."""

    size = 64 << 20

    def __init__(self) -> None:
        self.modes: list[int] = []

    def setup(
        self, fd: int, foffset: int, moffset: int, length: int, writable: bool, owner: object
    ) -> None:
        self.modes.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)

    def remove(self, ranges: object) -> None:
        pass

    def holds(self, owner: object) -> bool:
        return False

    def resized(self, owner: object, size: int) -> None:
        pass

    def flush(self, owner: object) -> None:
        pass


def test_readonly_share_maps_from_a_read_only_fd(tmp_path: Path) -> None:
    """A read-only share never hands out a writable fd for a mapping. (The daemon refuses
    --readonly with a DAX window, since QEMU maps every range writable; this is the backend's
    own rule for file systems served another way.)"""
    (tmp_path / "f").write_bytes(b"r" * 8192)
    fs = PassthroughFs(PassthroughConfig(str(tmp_path), readonly=True))
    window = _RecordingWindow()
    c = FuseClient(direct(Server(fs, caps=TransportCaps(dax_window=window, map_alignment=12))))
    c.init(abi.InitFlag.MAP_ALIGNMENT)
    try:
        ino = c.lookup(ROOT, b"f").nodeid
        read = abi.SETUPMAPPING_FLAG_READ
        c.setupmapping(ino, abi.INVALID_FH, 0, 8192, read, 0)
        assert window.modes == [os.O_RDONLY]
        write = read | abi.SETUPMAPPING_FLAG_WRITE
        assert errno_of(c.setupmapping, ino, abi.INVALID_FH, 0, 8192, write, 0) == errno.EROFS
    finally:
        fs.shutdown()
