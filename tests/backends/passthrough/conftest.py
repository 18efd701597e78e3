"""Fixtures and helpers of the passthrough's module tests: the file system served in-process
and driven with raw FUSE requests (``FuseClient(direct(Server(fs)))``), which can say things a
kernel never would, and the host's view of what it did.

Whether the file system opened a node is asked of the kernel: an inotify watch on the node
reports every open of it (O_PATH ones excepted, which are allowed), and /proc/self/fd shows what
stays open. Races are forced into the bad interleaving by pausing a request at the moment it has
its descriptor (:class:`Pause`, around the call that uses it) while the other request runs; no
sleeps.
"""

from __future__ import annotations

import ctypes
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
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, direct

#: Only keeps a broken daemon from hanging the run; nothing is timed.
GUARD = 20.0
OFFSET_MAX = 0x7FFF_FFFF_FFFF_FFFF

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
    if os.geteuid() != 0:
        pytest.skip("making device nodes needs root")
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


def unblock_fifo(path: Path) -> Callable[[], None]:
    """Opening the other end lets a blocked open of a FIFO go on."""

    def unblock() -> None:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        threading.Timer(1.0, os.close, (fd,)).start()

    return unblock


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


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    share = tmp_path / "share"
    outside = tmp_path / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (share / "file").write_text("inside")
    (share / "dir").mkdir()
    (share / "etc").symlink_to("/etc")
    (share / "up").symlink_to("../outside")
    return share, outside


@pytest.fixture
def client(tree: tuple[Path, Path]) -> FuseClient:
    fs = PassthroughFs(PassthroughConfig(str(tree[0]), xattr=True))
    c = FuseClient(direct(Server(fs)))
    c.init()
    yield c
    fs.shutdown()
