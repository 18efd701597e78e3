"""The file-system interface (:mod:`pyvirtiofsd.fuse.filesystem`): every operation a file system
does not override answers ENOSYS (a few have a documented default instead), and what the server
hands ``readdir`` is a :class:`DirBuffer`, used as the protocol says."""

from __future__ import annotations

import errno
import inspect
import stat
from typing import Any

import pytest

from pyvirtiofsd.fuse.buffers import ReplyWriter, WriteData
from pyvirtiofsd.fuse.filesystem import (
    ROOT,
    Attr,
    ConnectionInfo,
    Context,
    DirBuffer,
    Entry,
    Filesystem,
    Lock,
    Opened,
    SetAttr,
    StatVfs,
    dtype_of_mode,
)
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, direct

#: Operations whose default is not ENOSYS, and why: the connection's hooks have nothing to do,
#: FORGET never fails, releasing what was never opened gives nothing back, an empty file
#: system still has a statfs, and the live-migration hooks are no FUSE operations (a file
#: system that does not implement them is not migratable).
NOT_ENOSYS = {
    "init",
    "destroy",
    "shutdown",
    "save_state",
    "load_state",
    "forget",
    "batch_forget",
    "release",
    "releasedir",
    "statfs",
}


def operations() -> list[str]:
    # Callables of the class itself: in the compiled build its methods are method descriptors,
    # not functions.
    return sorted(
        name for name, value in vars(Filesystem).items() if callable(value) and name[0] != "_"
    )


def _sample(operation: str, parameter: str) -> Any:
    """An argument of the parameter's type: the compiled build checks every argument's."""
    if parameter == "ctx":
        return Context(0, 0, 1)
    if parameter == "changes":
        return SetAttr()
    if parameter == "lock":
        return Lock(0, 0, 0, 0)
    if parameter in ("items", "ranges"):
        return []
    if parameter == "out":
        return ReplyWriter([memoryview(bytearray(64))]) if operation == "read" else None
    if parameter == "data":
        return WriteData([memoryview(b"x")], 1) if operation == "write" else b""
    if parameter in ("name", "new_name", "target", "value"):
        return b"x"
    if parameter in ("datasync", "flock", "flock_release", "flush", "kill_suidgid", "sleep"):
        return False
    return 0


@pytest.mark.parametrize("name", sorted(set(operations()) - NOT_ENOSYS))
def test_every_operation_defaults_to_enosys(name: str) -> None:
    method = getattr(Filesystem(), name)
    args = [_sample(name, p) for p in inspect.signature(method).parameters]
    with pytest.raises(OSError) as e:
        method(*args)
    assert e.value.errno == errno.ENOSYS


def test_the_other_defaults() -> None:
    assert set(operations()) >= NOT_ENOSYS
    fs = Filesystem()
    ctx = Context(0, 0, 1)
    fs.init(ConnectionInfo())
    fs.forget(5, 1)
    fs.release(ctx, 5, 1, 0, 0, False, False)
    fs.releasedir(ctx, 5, 1, 0)
    assert isinstance(fs.statfs(ctx, ROOT), StatVfs)
    fs.destroy()
    fs.shutdown()

    forgotten: list[tuple[int, int]] = []

    class Counting(Filesystem):
        def forget(self, ino: int, nlookup: int) -> None:
            forgotten.append((ino, nlookup))

    Counting().batch_forget([(2, 1), (3, 7)])
    assert forgotten == [(2, 1), (3, 7)]


def test_the_server_answers_enosys_for_a_bare_file_system() -> None:
    c = FuseClient(direct(Server(Filesystem())))
    c.init()
    for call in (lambda: c.lookup(ROOT, b"x"), lambda: c.getattr(ROOT), lambda: c.opendir(ROOT)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOSYS
    assert c.statfs().bsize == 512


class Listing(Filesystem):
    """A root holding ``count`` files; records the DirBuffer each readdir was handed."""

    def __init__(self, count: int) -> None:
        self.names = [f"file{i:03d}".encode() for i in range(count)]
        self.handed: list[Any] = []
        self.refused: list[bytes] = []

    def attr(self, ino: int) -> Attr:
        mode = stat.S_IFDIR | 0o755 if ino == ROOT else stat.S_IFREG | 0o644
        return Attr(ino=ino, mode=mode)

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> tuple[Attr, float]:
        return self.attr(ino), 1.0

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        return Opened(fh=7)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, out: DirBuffer) -> None:
        self.handed.append(out)
        for i in range(offset, len(self.names)):
            name, ino = self.names[i], 100 + i
            dtype = dtype_of_mode(stat.S_IFREG)
            if out.plus:
                if not out.fits(name):
                    self.refused.append(name)
                    return
                added = out.add_plus(Entry(ino, self.attr(ino)), i + 1, dtype, name)
            else:
                added = out.add(ino, i + 1, dtype, name)
            if not added:
                self.refused.append(name)
                return


def test_readdir_is_handed_a_dirbuffer() -> None:
    fs = Listing(3)
    c = FuseClient(direct(Server(fs)))
    c.init()
    fh = c.opendir(ROOT).fh
    c.readdir(ROOT, fh)
    c.readdirplus(ROOT, fh)
    plain, plus = fs.handed
    assert (plain.plus, plus.plus) == (False, True)
    members = [m for m in vars(DirBuffer) if not m.startswith("_")]
    assert sorted(members) == ["add", "add_plus", "fits", "plus"]
    for out in (plain, plus):
        for name in ("add", "add_plus", "fits"):
            want = inspect.signature(getattr(DirBuffer, name))
            got = inspect.signature(getattr(out, name))
            assert list(got.parameters) == list(want.parameters)[1:], name


@pytest.mark.parametrize("plus", [False, True], ids=["readdir", "readdirplus"])
def test_entries_that_do_not_fit_come_in_the_next_readdir(plus: bool) -> None:
    fs = Listing(40)
    c = FuseClient(direct(Server(fs)))
    c.init()
    fh = c.opendir(ROOT).fh
    seen: list[bytes] = []
    offset = 0
    while True:
        if plus:
            batch = [(e.d_off, name) for e, name in c.readdirplus(ROOT, fh, offset, size=1024)]
        else:
            batch = [(off, name) for _, off, _, name in c.readdir(ROOT, fh, offset, size=512)]
        if not batch:
            break
        seen += [name for _, name in batch]
        offset = batch[-1][0]
    assert seen == fs.names  # each once, in order, none lost where a reply was full
    assert fs.refused and set(fs.refused) <= set(fs.names)


def test_a_file_system_is_not_migratable_unless_it_says_so() -> None:
    fs = Filesystem()
    assert fs.migratable is False
    with pytest.raises(NotImplementedError, match="cannot save its state"):
        fs.save_state()
    with pytest.raises(NotImplementedError, match="cannot load"):
        fs.load_state(b"")
