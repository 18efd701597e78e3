"""The passthrough against the host itself, step by step and under races.

1. A hypothesis state machine sends random sequences of FUSE requests to an in-process
   ``Server(PassthroughFs(...))`` and does the same operations directly on a scratch
   directory with os calls; every reply must match (errno, data, attributes, listings), and
   after every step the two trees must be the same. Where the contract decides what the host
   would do differently (OPEN or CREATE of a FIFO, socket or device: ENXIO, never opened),
   the scratch side follows the contract.
2. A concurrent phase: several threads race FORGET, LOOKUP, OPEN, RELEASE, READ, WRITE,
   FLUSH, SETLK, GETLK and flock on a few shared nodeids and handles, in-process from several
   threads and through the real daemon over several request queues. Any errno a hostile but
   well-formed guest can cause (EBADF for a handle or inode already gone, EAGAIN for a lock
   held) is fine; EIO (an unexpected exception) is not. Each file holds its own letter and
   is written through its handles with its own capital, so a READ or WRITE that reached
   another file (an fd closed under a running request and its number reused) shows.

After each run the guest releases every handle and forgets every lookup, and the descriptors
that refer to the share must be exactly those from before the run (the contract has no
time-delayed graveyard of fds), and no lock may be left on any file. Nothing asserts on
timings: the threads start together at a barrier and run a fixed number of requests.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import stat
import struct
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from pyvirtiofsd import linux
from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import direct
from tests.attack.tools import (
    ROOT,
    AttackDaemon,
    Guest,
    Hang,
    Reply,
    dirent_names,
    entry_of,
    errname,
    open_fds,
    open_of,
    start_daemon,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs as root")

RUNS: Counter[str] = Counter()


class DirectGuest(Guest):
    """A :class:`Guest` whose requests go straight to an in-process server."""

    def __init__(self, server: Server) -> None:
        self._transact = direct(server)
        super().__init__(None)  # type: ignore[arg-type]

    def call(
        self, opcode: int, nodeid: int, payload: bytes = b"", reply_size: int = 4096, **kw: Any
    ) -> Reply:
        from pyvirtiofsd.testing.fuse_client import encode_request

        unique = self._next()
        raw = self._transact(encode_request(opcode, nodeid, payload, unique, **kw), reply_size + 16)
        return self._decode(raw)

    def send(self, opcode: int, nodeid: int, payload: bytes = b"") -> None:
        from pyvirtiofsd.testing.fuse_client import encode_request

        self._transact(encode_request(opcode, nodeid, payload, self._next()), 0)


def share_fds(pid: int | None, share: Path) -> list[str]:
    """What the process's descriptors inside ``share`` refer to, sorted."""
    fds = open_fds(pid if pid is not None else os.getpid())
    return sorted(f"{fd.target} ({fd.flags:#o})" for fd in fds.values() if str(share) in fd.target)


def held_locks(share: Path) -> list[str]:
    """Files in ``share`` on which some open file description holds a lock."""
    held = []
    for dirpath, _, filenames in os.walk(share):
        for n in filenames:
            p = Path(dirpath, n)
            if not stat.S_ISREG(os.lstat(p).st_mode):
                continue
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
            try:
                probe = struct.pack("=hh4xqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
                ltype = struct.unpack("=hh4xqqi4x", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0]
                if ltype != fcntl.F_UNLCK:
                    held.append(str(p))
                if fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) is None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                held.append(f"{p} (flock)")
            finally:
                os.close(fd)
    return held


# -- 1. the state machine ---------------------------------------------------------------------

PATHS = ["a", "b", "d", "d/a", "d/b"]
SPECIAL = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)


def _err(fn: Callable[[], Any]) -> tuple[int, Any]:
    try:
        return 0, fn()
    except OSError as e:
        return e.errno or -1, None


class PassthroughVsHost(RuleBasedStateMachine):
    """Every FUSE request next to the same operation done by the host on a scratch copy."""

    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        RUNS["state machine runs"] += 1
        self.tmp = Path(tempfile.mkdtemp(prefix="pva-sm-"))
        self.share = self.tmp / "share"
        self.ref = self.tmp / "ref"
        self.share.mkdir()
        self.ref.mkdir()
        self.fs = PassthroughFs(PassthroughConfig(str(self.share), xattr=True))
        self.g = DirectGuest(Server(self.fs))
        self.g.init()
        self.baseline = share_fds(None, self.share)
        self.looked: Counter[int] = Counter()
        self.open_handles: dict[int, tuple[int, int, bool]] = {}  # id -> nodeid, fh, ref fd
        self.next_handle = 0

    # --- both sides ------------------------------------------------------------------------

    def resolve(self, path: str) -> tuple[int, int]:
        """FUSE side: (errno, nodeid) of ``path`` by lookups from the root."""
        nodeid = ROOT
        for part in path.split("/"):
            r = self.g.lookup(nodeid, part.encode())
            if not r.ok:
                return r.err, 0
            nodeid = entry_of(r).nodeid
            self.looked[nodeid] += 1
        return 0, nodeid

    def parent(self, path: str) -> tuple[int, int, bytes]:
        head, _, name = path.rpartition("/")
        if not head:
            return 0, ROOT, name.encode()
        err, nodeid = self.resolve(head)
        return err, nodeid, name.encode()

    def rpath(self, path: str) -> Path:
        return self.ref / path

    def rparent(self, path: str) -> int:
        """Scratch side: the errno of reaching ``path``'s parent without following links."""
        head = path.rpartition("/")[0]
        if not head:
            return 0
        err, st_ = _err(lambda: os.lstat(self.rpath(head)))
        if err:
            return err
        return 0 if stat.S_ISDIR(st_.st_mode) else errno.ENOTDIR

    def rlstat(self, path: str) -> tuple[int, Any]:
        err = self.rparent(path)
        if err:
            return err, None
        return _err(lambda: os.lstat(self.rpath(path)))

    def same(self, what: str, fuse: Any, host: Any) -> None:
        assert fuse == host, f"{what}: passthrough {fuse!r}, host {host!r}"

    # --- rules -----------------------------------------------------------------------------

    @rule(path=st.sampled_from(PATHS))
    def getattr(self, path: str) -> None:
        err, nodeid = self.resolve(path)
        fuse: Any = (errname(err),)
        if not err:
            r = self.g.getattr(nodeid)
            a = abi.ATTR_OUT.unpack(r.payload)
            size = a.size if not stat.S_ISDIR(a.mode) else 0
            fuse = (errname(r.err), a.mode, a.nlink, size, a.uid, a.gid)
        rerr, st_ = self.rlstat(path)
        host: Any = (errname(rerr),)
        if not rerr:
            size = st_.st_size if not stat.S_ISDIR(st_.st_mode) else 0
            host = ("OK", st_.st_mode, st_.st_nlink, size, st_.st_uid, st_.st_gid)
        self.same(f"GETATTR {path}", fuse, host)

    @rule(
        target=handles,
        path=st.sampled_from(PATHS),
        excl=st.booleans(),
        trunc=st.booleans(),
    )
    def create(self, path: str, excl: bool, trunc: bool) -> Any:
        flags = os.O_RDWR | (os.O_EXCL if excl else 0) | (os.O_TRUNC if trunc else 0)
        err, parent, name = self.parent(path)
        nodeid = fh = 0
        if not err:
            r = self.g.create(parent, name, flags, 0o644)
            err = r.err
            if r.ok:
                nodeid = entry_of(r).nodeid
                self.looked[nodeid] += 1
                fh = open_of(r, abi.ENTRY_OUT.size).fh
        rerr, st_ = self.rlstat(path)
        fd = -1
        if rerr not in (0, errno.ENOENT):
            herr = rerr
        elif rerr == 0 and excl:
            herr = errno.EEXIST
        elif rerr == 0 and stat.S_IFMT(st_.st_mode) in SPECIAL:
            herr = errno.ENXIO  # the contract: never opened
        else:
            herr, fd = _err(
                lambda: os.open(self.rpath(path), flags | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            )
        return self._opened(f"CREATE {path} {flags:#o}", err, nodeid, fh, herr, fd)

    def _opened(self, what: str, err: int, nodeid: int, fh: int, herr: int, fd: Any) -> Any:
        if not err and herr:
            self.g.release(nodeid, fh)
        if err == 0 and not herr:
            self.next_handle += 1
            self.open_handles[self.next_handle] = (nodeid, fh, fd)
        elif fd not in (None, -1) and not herr:
            os.close(fd)
        self.same(what, errname(err), errname(herr))
        return self.next_handle if err == 0 else None

    @rule(
        target=handles,
        path=st.sampled_from(PATHS),
        flags=st.sampled_from(
            [
                os.O_RDONLY,
                os.O_WRONLY,
                os.O_RDWR,
                os.O_RDWR | os.O_TRUNC,
                os.O_WRONLY | os.O_APPEND,
            ]
        ),
    )
    def open(self, path: str, flags: int) -> Any:
        err, nodeid = self.resolve(path)
        fh = 0
        if not err:
            r = self.g.open(nodeid, flags)
            err = r.err
            if r.ok:
                fh = open_of(r).fh
        rerr, st_ = self.rlstat(path)
        fd = -1
        if rerr:
            herr = rerr
        elif stat.S_ISLNK(st_.st_mode):
            herr = errno.ELOOP
        elif stat.S_IFMT(st_.st_mode) in SPECIAL:
            herr = errno.ENXIO
        else:
            herr, fd = _err(lambda: os.open(self.rpath(path), flags | os.O_NOFOLLOW))
        return self._opened(f"OPEN {path} {flags:#o}", err, nodeid, fh, herr, fd)

    @rule(h=handles, offset=st.integers(0, 8192), data=st.binary(min_size=1, max_size=300))
    def write(self, h: Any, offset: int, data: bytes) -> None:
        if h not in self.open_handles:
            return
        nodeid, fh, fd = self.open_handles[h]
        r = self.g.write(nodeid, fh, offset, data)
        fuse = (errname(r.err), abi.WRITE_OUT.unpack(r.payload).size if r.ok else 0)
        herr, n = _err(lambda: os.pwrite(fd, data, offset))
        self.same(f"WRITE {len(data)}@{offset}", fuse, (errname(herr), n or 0))

    @rule(h=handles, offset=st.integers(0, 8192), size=st.integers(0, 5000))
    def read(self, h: Any, offset: int, size: int) -> None:
        if h not in self.open_handles:
            return
        nodeid, fh, fd = self.open_handles[h]
        r = self.g.read(nodeid, fh, offset, size)
        herr, data = _err(lambda: os.pread(fd, size, offset))
        self.same(
            f"READ {size}@{offset}", (errname(r.err), r.payload), (errname(herr), data or b"")
        )

    @rule(h=consumes(handles))
    def release(self, h: Any) -> None:
        if h not in self.open_handles:
            return
        nodeid, fh, fd = self.open_handles.pop(h)
        r = self.g.release(nodeid, fh)
        os.close(fd)
        self.same("RELEASE", errname(r.err), "OK")

    @rule(path=st.sampled_from(PATHS), size=st.integers(0, 10000))
    def truncate(self, path: str, size: int) -> None:
        err, nodeid = self.resolve(path)
        if not err:
            err = self.g.setattr(nodeid, valid=abi.FATTR_SIZE, size=size).err
        rerr, st_ = self.rlstat(path)
        if not rerr:
            if stat.S_ISDIR(st_.st_mode):
                rerr = errno.EISDIR
            elif not stat.S_ISREG(st_.st_mode):
                rerr = errno.EINVAL
            else:
                rerr = _err(lambda: os.truncate(self.rpath(path), size))[0]
        self.same(f"SETATTR size {path}", errname(err), errname(rerr))

    @rule(path=st.sampled_from(PATHS), mode=st.sampled_from([0o600, 0o755, 0o4755, 0o000]))
    def chmod(self, path: str, mode: int) -> None:
        err, nodeid = self.resolve(path)
        if not err:
            err = self.g.setattr(nodeid, valid=abi.FATTR_MODE, mode=mode).err
        rerr, st_ = self.rlstat(path)
        if not rerr:
            if stat.S_ISLNK(st_.st_mode):
                rerr = errno.EOPNOTSUPP
            else:
                rerr = _err(lambda: os.chmod(self.rpath(path), mode))[0]
        self.same(f"SETATTR mode {path}", errname(err), errname(rerr))

    def _make(self, what: str, path: str, send: Callable[[int, bytes], Reply], host: Any) -> None:
        err, parent, name = self.parent(path)
        if not err:
            r = send(parent, name)
            err = r.err
            if r.ok:
                self.looked[entry_of(r).nodeid] += 1
        rerr = self.rparent(path) or _err(host)[0]
        self.same(f"{what} {path}", errname(err), errname(rerr))

    @rule(path=st.sampled_from(PATHS))
    def mkdir(self, path: str) -> None:
        self._make(
            "MKDIR",
            path,
            lambda p, n: self.g.mkdir(p, n, 0o755),
            lambda: os.mkdir(self.rpath(path), 0o755),
        )

    @rule(path=st.sampled_from(PATHS))
    def mkfifo(self, path: str) -> None:
        self._make(
            "MKNOD fifo",
            path,
            lambda p, n: self.g.mknod(p, n, stat.S_IFIFO | 0o644),
            lambda: os.mkfifo(self.rpath(path), 0o644),
        )

    @rule(path=st.sampled_from(PATHS), dest=st.sampled_from(["a", "d/b", "/etc/passwd", ".."]))
    def symlink(self, path: str, dest: str) -> None:
        self._make(
            "SYMLINK",
            path,
            lambda p, n: self.g.symlink(p, n, dest.encode()),
            lambda: os.symlink(dest, self.rpath(path)),
        )

    @rule(path=st.sampled_from(PATHS))
    def unlink(self, path: str) -> None:
        err, parent, name = self.parent(path)
        if not err:
            err = self.g.unlink(parent, name).err
        rerr = self.rparent(path) or _err(lambda: os.unlink(self.rpath(path)))[0]
        self.same(f"UNLINK {path}", errname(err), errname(rerr))

    @rule(path=st.sampled_from(PATHS))
    def rmdir(self, path: str) -> None:
        err, parent, name = self.parent(path)
        if not err:
            err = self.g.rmdir(parent, name).err
        rerr = self.rparent(path) or _err(lambda: os.rmdir(self.rpath(path)))[0]
        self.same(f"RMDIR {path}", errname(err), errname(rerr))

    @rule(
        src=st.sampled_from(PATHS),
        dst=st.sampled_from(PATHS),
        flags=st.sampled_from([0, linux.RENAME_NOREPLACE, linux.RENAME_EXCHANGE]),
    )
    def rename(self, src: str, dst: str, flags: int) -> None:
        err, sp, sn = self.parent(src)
        if not err:
            err, dp, dn = self.parent(dst)
            if not err:
                err = self.g.rename(sp, sn, dp, dn, flags).err
        rerr = self.rparent(src) or self.rparent(dst)
        if not rerr:
            rerr = _err(
                lambda: linux.renameat2(
                    -100, os.fsencode(self.rpath(src)), -100, os.fsencode(self.rpath(dst)), flags
                )
            )[0]
        self.same(f"RENAME {src} {dst} {flags}", errname(err), errname(rerr))

    @rule(src=st.sampled_from(PATHS), dst=st.sampled_from(PATHS))
    def link(self, src: str, dst: str) -> None:
        err, nodeid = self.resolve(src)
        if not err:
            err, dp, dn = self.parent(dst)
            if not err:
                r = self.g.link(nodeid, dp, dn)
                err = r.err
                if r.ok:
                    self.looked[entry_of(r).nodeid] += 1
        rerr, _ = self.rlstat(src)
        rerr = rerr or self.rparent(dst)
        if not rerr:
            rerr = _err(lambda: os.link(self.rpath(src), self.rpath(dst), follow_symlinks=False))[0]
        self.same(f"LINK {src} {dst}", errname(err), errname(rerr))

    @rule(path=st.sampled_from(["", "d", "a"]), plus=st.booleans())
    def readdir(self, path: str, plus: bool) -> None:
        err, nodeid = self.resolve(path) if path else (0, ROOT)
        fuse: Any = errname(err)
        if not err:
            r = self.g.opendir(nodeid)
            fuse = errname(r.err)
            if r.ok:
                fh = open_of(r).fh
                listing = self.g.readdir(nodeid, fh, plus=plus, size=65536)
                entries = dirent_names(listing.payload, plus)
                for name, child in entries:
                    if child and name not in (b".", b".."):
                        self.looked[child] += 1
                fuse = sorted(n.decode() for n, _ in entries if n not in (b".", b".."))
                self.g.releasedir(nodeid, fh)
        rerr, st_ = self.rlstat(path) if path else (0, os.lstat(self.ref))
        host: Any = errname(rerr)
        if not rerr:
            if not stat.S_ISDIR(st_.st_mode):
                host = "ENOTDIR"
            else:
                host = sorted(os.listdir(self.rpath(path) if path else self.ref))
        self.same(f"READDIR{'PLUS' if plus else ''} {path!r}", fuse, host)

    @rule(path=st.sampled_from(PATHS), value=st.binary(max_size=20))
    def setxattr(self, path: str, value: bytes) -> None:
        err, nodeid = self.resolve(path)
        if not err:
            err = self.g.setxattr(nodeid, b"user.sm", value).err
        rerr = (
            self.rlstat(path)[0]
            or _err(
                lambda: os.setxattr(self.rpath(path), b"user.sm", value, follow_symlinks=False)
            )[0]
        )
        self.same(f"SETXATTR {path}", errname(err), errname(rerr))

    @rule(path=st.sampled_from(PATHS))
    def getxattr(self, path: str) -> None:
        err, nodeid = self.resolve(path)
        value = b""
        if not err:
            r = self.g.getxattr(nodeid, b"user.sm")
            err, value = r.err, r.payload if r.ok else b""
        rerr, host = self.rlstat(path)[0], None
        if not rerr:
            rerr, host = _err(
                lambda: os.getxattr(self.rpath(path), b"user.sm", follow_symlinks=False)
            )
        self.same(f"GETXATTR {path}", (errname(err), value), (errname(rerr), host or b""))

    @precondition(lambda self: bool(self.looked))
    @rule()
    def forget_all(self) -> None:
        self.g.batch_forget([(n, c) for n, c in self.looked.items() if c])
        self.looked.clear()

    @invariant()
    def same_trees(self) -> None:
        self.same("tree", _tree(self.share), _tree(self.ref))

    def teardown(self) -> None:
        try:
            for nodeid, fh, fd in self.open_handles.values():
                self.g.release(nodeid, fh)
                os.close(fd)
            self.open_handles.clear()
            if self.looked:
                self.g.batch_forget([(n, c) for n, c in self.looked.items() if c])
            self.looked.clear()
            left = share_fds(None, self.share)
            assert left == self.baseline, (
                "descriptors of the share still open after every handle was released and "
                f"every lookup forgotten: {dict(Counter(left) - Counter(self.baseline))}"
            )
        finally:
            self.fs.shutdown()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _tree(top: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st_ = os.lstat(p)
            what: Any = stat.S_IFMT(st_.st_mode)
            if stat.S_ISREG(st_.st_mode):
                what = (what, p.read_bytes(), os.getxattr(p, "user.sm") if _has_x(p) else None)
            elif stat.S_ISLNK(st_.st_mode):
                what = (what, os.readlink(p))
            out[str(p.relative_to(top))] = (what, stat.S_IMODE(st_.st_mode), st_.st_nlink)
    return out


def _has_x(p: Path) -> bool:
    return "user.sm" in os.listxattr(p, follow_symlinks=False)


PassthroughVsHost.TestCase.settings = settings(
    max_examples=int(os.environ.get("ATTACK_EXAMPLES", "60")),
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPassthroughVsHost = PassthroughVsHost.TestCase


# -- 2. races ---------------------------------------------------------------------------------

FILES = [b"f0", b"f1", b"f2"]
#: Every file holds its own letter, and writes through a handle of file i write its capital:
#: a read or write that lands on another file (an fd number closed and reused under a
#: request) shows as a foreign letter.
SIZE = 1000


def letters(i: int) -> bytes:
    return bytes([ord("a") + i, ord("A") + i])


ALLOWED = {0, errno.EBADF, errno.EAGAIN, errno.ENOENT}
THREADS = 4
STEPS = 1000


class Shared:
    """What the racing threads share: nodeids and handles any of them may use."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nodeids: list[int] = []
        self.handles: list[tuple[int, int, int]] = []  # nodeid, fh, file index
        self.all_handles: list[tuple[int, int, int]] = []
        self.file_of: dict[int, int] = {}
        self.errors: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.requests = 0


def racer(g: Guest, me: int, seed: int, shared: Shared, barrier: threading.Barrier) -> Counter[int]:
    """One thread's requests; returns the lookups it still holds."""
    rng = random.Random(seed * 1000 + me)
    mine: Counter[int] = Counter()
    owner = 0x1000 + me

    def note(what: str, r: Reply) -> None:
        with shared.lock:
            shared.requests += 1
            shared.errors[f"{what}:{errname(r.err)}"] += 1
            if r.err not in ALLOWED:
                shared.unexpected.append(f"{what} answered {errname(r.err)}")

    def pick_node() -> int:
        with shared.lock:
            return rng.choice(shared.nodeids) if shared.nodeids else ROOT

    def pick_handle() -> tuple[int, int, int] | None:
        with shared.lock:
            return rng.choice(shared.handles) if shared.handles else None

    barrier.wait()
    for _ in range(STEPS):
        action = rng.randrange(10)
        if action == 0 or not shared.nodeids:
            index = rng.randrange(len(FILES))
            r = g.lookup(ROOT, FILES[index])
            note("LOOKUP", r)
            if r.ok:
                nodeid = entry_of(r).nodeid
                mine[nodeid] += 1
                with shared.lock:
                    shared.nodeids.append(nodeid)
                    shared.file_of[nodeid] = index
        elif action == 1 and mine:
            # FORGET all of one inode's lookups this thread holds: with the others doing
            # the same, inodes die while requests naming them are in flight.
            nodeid = rng.choice(list(mine))
            g.forget(nodeid, mine.pop(nodeid))
        elif action == 2:
            nodeid = pick_node()
            r = g.open(nodeid, os.O_RDWR)
            note("OPEN", r)
            if r.ok:
                fh = open_of(r).fh
                with shared.lock:
                    h = (nodeid, fh, shared.file_of[nodeid])
                    shared.handles.append(h)
                    shared.all_handles.append(h)
        elif action == 3:
            h = pick_handle()
            if h:
                with shared.lock:
                    if h in shared.handles:
                        shared.handles.remove(h)
                note("RELEASE", g.release(h[0], h[1], owner, flush=rng.random() < 0.5))
        elif action == 4:
            h = pick_handle()
            if h:
                r = g.read(pick_node(), h[1], rng.randrange(100), 64)
                note("READ", r)
                foreign = set(r.payload) - set(letters(h[2]))
                if foreign:
                    with shared.lock:
                        shared.unexpected.append(
                            f"READ through a handle of {FILES[h[2]]!r} gave {bytes(foreign)!r}"
                        )
        elif action == 5:
            h = pick_handle()
            if h:
                data = letters(h[2])[1:] * 4
                note("WRITE", g.write(pick_node(), h[1], rng.randrange(SIZE - 4), data))
        elif action in (6, 7):
            nodeid = pick_node()
            h = pick_handle()
            ltype = rng.choice([fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK])
            op = abi.Opcode.GETLK if action == 6 else abi.Opcode.SETLK
            note(op.name, g.lock(op, nodeid, h[1] if h else 0, owner, ltype, False))
        elif action == 8:
            h = pick_handle()
            if h:
                ltype = rng.choice([fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK])
                note("FLOCK", g.lock(abi.Opcode.SETLK, h[0], h[1], owner, ltype, True))
        else:
            h = pick_handle()
            if h:
                note("FLUSH", g.flush(h[0], h[1], owner))
    return mine


def race(guests: list[Guest], seed: int, share: Path) -> Shared:
    """Run the racers, then release every handle and forget every lookup."""
    shared = Shared()
    barrier = threading.Barrier(len(guests))
    held: list[Counter[int]] = [Counter() for _ in guests]
    failures: list[BaseException] = []

    def run(i: int) -> None:
        try:
            held[i] = racer(guests[i], i, seed, shared, barrier)
        except BaseException as e:  # a Hang, or a bug in the test
            failures.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(guests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    g = guests[0]
    for nodeid, fh, _ in shared.all_handles:
        g.release(nodeid, fh)  # EBADF for those released already
    totals: Counter[int] = Counter()
    for c in held:
        totals.update(c)
    if totals:
        g.batch_forget(list(totals.items()))
    # A request on the same queue after the BATCH_FORGET: it has been served when this
    # answers.
    assert g.getattr(ROOT).ok
    RUNS["race runs"] += 1
    RUNS["race requests"] += shared.requests
    return shared


@pytest.fixture
def race_share() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="pva-race-"))
    share = tmp / "share"
    share.mkdir()
    for i, name in enumerate(FILES):
        (share / name.decode()).write_bytes(letters(i)[:1] * SIZE)
    try:
        yield share
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check(shared: Shared, left: list[str], baseline: list[str], share: Path) -> None:
    problems = [f"{n} x {what}" for what, n in Counter(shared.unexpected).most_common(5)]
    if left != baseline:
        problems.append(
            "descriptors of the share still open after every handle was released and every "
            f"lookup forgotten: {dict(Counter(left) - Counter(baseline))}"
        )
    problems += [f"a lock is still held on {p}" for p in held_locks(share)]
    for i, name in enumerate(FILES):
        content = (share / name.decode()).read_bytes()
        foreign = set(content) - set(letters(i))
        if foreign or len(content) != SIZE:
            problems.append(
                f"{name!r} ({len(content)} bytes) got bytes written through another file's "
                f"handle: {bytes(foreign)!r}"
            )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("seed", range(5))
def test_race_in_process(race_share: Path, seed: int) -> None:
    fs = PassthroughFs(PassthroughConfig(str(race_share)))
    server = Server(fs)
    guests: list[Guest] = [DirectGuest(server) for _ in range(THREADS)]
    guests[0].init()
    baseline = share_fds(None, race_share)
    try:
        shared = race(guests, seed, race_share)
        _check(shared, share_fds(None, race_share), baseline, race_share)
    finally:
        fs.shutdown()


@pytest.fixture
def race_daemon(race_share: Path) -> Iterator[AttackDaemon]:
    outside = race_share.parent / "outside"
    outside.mkdir()
    d = start_daemon(
        race_share.parent,
        race_share,
        outside,
        "--num-request-queues",
        str(THREADS),
        queues=THREADS + 1,
    )
    try:
        yield d
    finally:
        if d.alive() and not any(g.broken for g in d.guests.values()):
            d.close()
        else:
            from pyvirtiofsd.vm.guest import kill_child

            kill_child(d.proc)
            d.window.close()


@pytest.mark.parametrize("seed", range(3))
def test_race_daemon(race_daemon: AttackDaemon, seed: int) -> None:
    d = race_daemon
    # Queue 1 is each run's first racer and the one that cleans up; queues 2.. race too.
    guests = [d.guests[i] for i in range(1, THREADS + 1)]
    baseline = share_fds(d.pid, d.share)
    try:
        shared = race(guests, seed, d.share)
    except Hang as e:
        pytest.fail(f"a request hung: {e}", pytrace=False)
    assert "Traceback" not in d.log_text(), d.log_text()[-3000:]
    _check(shared, share_fds(d.pid, d.share), baseline, d.share)


@pytest.fixture(scope="module", autouse=True)
def _count_runs(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    line = "attack races: " + " ".join(f"{k.replace(' ', '_')}={v}" for k, v in RUNS.items())
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        request.config.add_cleanup(lambda: reporter.write_line(line))
    report = os.environ.get("ATTACK_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(line + "\n")
