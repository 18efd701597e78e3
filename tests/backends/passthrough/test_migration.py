"""Live migration of the passthrough (:mod:`pyvirtiofsd.backends.passthrough.migration`), in
process: a source served by raw FUSE requests saves what its guest holds, a destination on the
same directory (or a copy) takes it over, and the guest's numbers go on working there. Files
the destination cannot find fail the load with their names, or are lost (EIO) on request;
nothing outside the share is ever reached; locks are taken again once the source lets go."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.backends.passthrough import migration as mig
from pyvirtiofsd.backends.passthrough.config import FileHandles, MigrationMode, MigrationOnError
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.fuse.state import StateError, StateWriter
from pyvirtiofsd.testing.fuse_client import FuseClient, direct
from tests.backends.passthrough.conftest import GUARD, OFFSET_MAX, OpenWatch, errno_of, fd_count

_FLOCK = struct.Struct("=hh4xqqi4x")


class Side:
    """One daemon's file system and server, and a guest's raw FUSE client of it."""

    def __init__(self, share: Path, **cfg: Any) -> None:
        self.fs = PassthroughFs(PassthroughConfig(str(share), **cfg))
        self.server = Server(self.fs)
        self.c = FuseClient(direct(self.server))

    def save(self) -> tuple[bytes, bytes]:
        return self.server.save_state(), self.fs.save_state()

    def load(self, saved: tuple[bytes, bytes]) -> None:
        self.server.load_state(saved[0])
        self.fs.load_state(saved[1])

    def close(self) -> None:
        self.fs.shutdown()


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    (d / "dir" / "sub").mkdir(parents=True)
    (d / "file").write_bytes(b"file contents")
    (d / "dir" / "sub" / "deep").write_bytes(b"deep contents")
    (d / "link").symlink_to("file")
    (tmp_path / "outside").write_bytes(b"secret")
    return d


@pytest.fixture
def sides() -> Iterator[list[Side]]:
    made: list[Side] = []
    yield made
    for side in made:
        side.close()


def side(sides: list[Side], share: Path, **cfg: Any) -> Side:
    s = Side(share, **cfg)
    sides.append(s)
    return s


def source(sides: list[Side], share: Path, **cfg: Any) -> tuple[Side, dict[str, Any]]:
    """A source whose guest holds a few inodes and open files."""
    src = side(sides, share, **cfg)
    c = src.c
    c.init()
    held: dict[str, Any] = {}
    held["file"] = c.lookup(ROOT, b"file").nodeid
    c.lookup(ROOT, b"file")  # two lookups
    held["dir"] = c.lookup(ROOT, b"dir").nodeid
    held["sub"] = c.lookup(held["dir"], b"sub").nodeid
    held["deep"] = c.lookup(held["sub"], b"deep").nodeid
    held["link"] = c.lookup(ROOT, b"link").nodeid
    held["fh"] = c.open(held["file"], os.O_RDWR).fh
    held["dh"] = c.opendir(held["sub"]).fh
    return src, held


@pytest.mark.parametrize(
    ("src_mode", "dst_mode"),
    [
        ("never", "never"),
        ("mandatory", "mandatory"),
        ("never", "mandatory"),
        ("mandatory", "never"),
    ],
)
def test_the_guest_goes_on_with_its_numbers(
    sides: list[Side], share: Path, src_mode: str, dst_mode: str
) -> None:
    src, held = source(sides, share, inode_file_handles=FileHandles(src_mode))
    saved = src.save()
    dst = side(sides, share, inode_file_handles=FileHandles(dst_mode))
    dst.load(saved)
    c = dst.c
    assert c.read(held["file"], held["fh"], 0, 100) == b"file contents"
    assert c.write(held["file"], held["fh"], 0, b"FILE") == 4
    assert (share / "file").read_bytes() == b"FILE contents"
    assert c.readlink(held["link"]) == b"file"
    assert c.getattr(held["deep"]).size == len(b"deep contents")
    names = [entry[3] for entry in c.readdir(held["sub"], held["dh"])]
    assert sorted(names) == [b".", b"..", b"deep"]
    assert dst.fs.inodes.get(held["file"]).refcount == 2
    # New numbers never collide with the guest's.
    (share / "new").write_bytes(b"")
    assert c.lookup(ROOT, b"new").nodeid > max(v for k, v in held.items() if k not in "fh dh")
    assert c.open(held["deep"]).fh > max(held["fh"], held["dh"])
    # The source keeps all of it (the front-end may resume it).
    assert src.c.read(held["file"], held["fh"], 0, 4) == b"FILE"
    c.forget(held["file"], 2)
    assert errno_of(c.getattr, held["file"]) == errno.EBADF


def test_files_renamed_before_the_save_are_found_where_they_are(
    sides: list[Side], share: Path
) -> None:
    src, held = source(sides, share)
    (share / "dir").rename(share / "moved")
    (share / "file").rename(share / "moved" / "renamed")
    dst = side(sides, share)
    dst.load(src.save())
    assert dst.c.read(held["file"], held["fh"], 0, 4) == b"file"
    assert dst.c.getattr(held["deep"]).size == len(b"deep contents")


@pytest.mark.parametrize("mode", ["find-paths", "file-handles"])
def test_an_unlinked_open_file_goes_by_file_handle(
    sides: list[Side], share: Path, mode: str
) -> None:
    src, _ = source(sides, share, migration_mode=MigrationMode(mode))
    entry, opened = src.c.create(ROOT, b"scratch", flags=os.O_RDWR)
    src.c.write(entry.nodeid, opened.fh, 0, b"unnamed now")
    src.c.unlink(ROOT, b"scratch")
    dst = side(sides, share)
    dst.load(src.save())
    assert dst.c.read(entry.nodeid, opened.fh, 0, 100) == b"unnamed now"


def copy_without(share: Path, name: str) -> Path:
    copy = share.parent / "copy"
    shutil.copytree(share, copy, symlinks=True)
    os.unlink(copy / name)
    return copy


def test_a_file_the_destination_lacks_fails_the_load_by_name(
    sides: list[Side], share: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, held = source(sides, share)
    copy = copy_without(share, "dir/sub/deep")
    dst = side(sides, copy)
    before = fd_count()
    with pytest.raises(StateError, match="1 of the 6 inodes and 0 of the 2 open files") as e:
        dst.load(src.save())
    assert "./dir/sub/deep: No such file or directory" in str(e.value)
    assert "--migration-on-error guest-error" in str(e.value)
    assert f"inode {held['deep']} not found in {copy}" in caplog.text
    # Nothing of the half-loaded session is left.
    assert dst.fs.inodes.count() == 1 and len(dst.fs.handle_table) == 0
    assert fd_count() <= before


def test_guest_error_loses_what_is_missing_and_keeps_the_rest(
    sides: list[Side], share: Path
) -> None:
    src, held = source(sides, share)
    copy = copy_without(share, "file")
    dst = side(sides, copy, migration_on_error=MigrationOnError.GUEST_ERROR)
    dst.load(src.save())
    c = dst.c
    assert errno_of(c.getattr, held["file"]) == errno.EIO
    assert errno_of(c.read, held["file"], held["fh"], 0, 10) == errno.EIO
    assert errno_of(c.open, held["file"]) == errno.EIO
    assert c.getattr(held["deep"]).size == len(b"deep contents")
    c.release(held["file"], held["fh"])  # released quietly
    assert errno_of(c.read, held["file"], held["fh"], 0, 10) == errno.EBADF
    c.forget(held["file"], 1)
    assert errno_of(c.getattr, held["file"]) == errno.EIO  # one lookup left
    c.forget(held["file"], 1)
    assert errno_of(c.getattr, held["file"]) == errno.EBADF
    # A destination that is itself migrated carries what it lost as lost.
    src.close()
    sides.remove(src)
    again = side(sides, copy)
    again.load(dst.save())
    assert again.c.getattr(held["deep"]).size == len(b"deep contents")


def test_a_file_of_another_type_is_not_the_file(sides: list[Side], share: Path) -> None:
    src, _ = source(sides, share)
    copy = copy_without(share, "file")
    (copy / "file").mkdir()
    with pytest.raises(StateError, match=r"\./file is a directory here, a regular file on the"):
        side(sides, copy).load(src.save())


def test_file_handles_of_a_copy_on_the_same_file_system_are_refused(
    sides: list[Side], share: Path
) -> None:
    src, held = source(sides, share, migration_mode=MigrationMode.FILE_HANDLES)
    saved = src.save()
    dst = side(sides, share)
    dst.load(saved)  # the same directory: every handle names a file of the share
    assert dst.c.read(held["file"], held["fh"], 0, 4) == b"file"
    # A copy on the same file system: the source's handles name the source's files,
    # which lie outside this share.
    copy = share.parent / "copy"
    shutil.copytree(share, copy, symlinks=True)
    with pytest.raises(StateError, match="names a file outside the share"):
        side(sides, copy).load(saved)


def test_verify_handles_refuses_a_different_file_by_the_same_path(
    sides: list[Side], share: Path
) -> None:
    src, _ = source(sides, share, migration_verify_handles=True)
    saved = src.save()
    side(sides, share).load(saved)
    copy = share.parent / "copy"
    shutil.copytree(share, copy, symlinks=True)
    with pytest.raises(StateError, match="another file than the source's"):
        side(sides, copy).load(saved)
    # Without the check, the copy is taken for the files.
    src2, _ = source(sides, share)
    side(sides, copy).load(src2.save())


REG, DIR, LNK = 0o10, 0o04, 0o12


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ((2, 1, REG, 2, b"../outside"), "cross-device link"),  # RESOLVE_BENEATH
        ((2, 1, REG, 2, b"/etc/passwd"), "not a relative path"),
        ((2, 1, REG, 2, b"link"), "regular file"),  # not followed: a symlink here
        ((2, 1, REG, 2, b"dir/../../outside"), ""),
        ((2, 1, REG, 1, 1, b".."), "a bad name"),
        ((2, 1, REG, 1, 1, b"dir/sub"), "a bad name"),
        ((2, 1, REG, 1, 7, b"file"), "its directory (inode 7) was not found"),
    ],
)
def test_nothing_outside_the_share_is_reached(
    sides: list[Side], share: Path, record: tuple[Any, ...], why: str
) -> None:
    dst = side(sides, share)
    dst.c.init()
    dst.server.reset()
    with pytest.raises(StateError, match="inode 2: ") as e:
        dst.fs.load_state(state((record,)))
    assert why in str(e.value)
    assert dst.fs.inodes.count() == 1


def test_a_crafted_state_that_contradicts_itself_is_refused(sides: list[Side], share: Path) -> None:
    dst = side(sides, share)
    with pytest.raises(StateError, match="a second root"):
        dst.fs.load_state(state(((1, 1, DIR, 0),)))
    with pytest.raises(StateError, match="found in way 9"):
        dst.fs.load_state(state(((2, 1, REG, 9),)))
    with pytest.raises(StateError, match="is the same file here as inode 2"):
        dst.fs.load_state(state(((2, 1, REG, 2, b"file"), (3, 1, REG, 2, b"file"))))


def test_every_truncation_of_a_state_is_a_state_error(sides: list[Side], share: Path) -> None:
    src, _ = source(sides, share)
    saved = src.fs.save_state()
    for n in range(len(saved)):
        dst = Side(share)
        try:
            with pytest.raises(StateError):
                dst.fs.load_state(saved[:n])
        finally:
            dst.close()


def test_a_destination_gives_every_fd_back(sides: list[Side], share: Path) -> None:
    src, held = source(
        sides,
        share,
        inode_file_handles=mig.PassthroughConfig.__dataclass_fields__["inode_file_handles"].default,
    )
    saved = src.save()
    baseline = fd_count()
    dst = Side(share)
    dst.load(saved)
    c = dst.c
    c.release(held["file"], held["fh"])
    c.releasedir(held["sub"], held["dh"])
    c.batch_forget(
        [
            (held["file"], 2),
            (held["dir"], 1),
            (held["sub"], 1),
            (held["deep"], 1),
            (held["link"], 1),
        ]
    )
    dst.fs.destroy()
    dst.fs.inodes.close_all()
    assert fd_count() == baseline


# --- locks -----------------------------------------------------------------------------------


def setlk(
    c: FuseClient,
    nodeid: int,
    fh: int,
    owner: int,
    start: int,
    end: int,
    ltype: int,
    flock: bool = False,
) -> None:
    flags = abi.LK_FLOCK if flock else 0
    c.call(abi.Opcode.SETLK, nodeid, abi.LK_IN.pack(fh, owner, start, end, ltype, 4242, flags, 0))


def held_elsewhere(path: Path, start: int, length: int) -> int:
    """The lock type another open file sees on the range (F_UNLCK: free)."""
    fd = os.open(path, os.O_RDWR)
    try:
        raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, start, length, 0))
        return int(_FLOCK.unpack(raw)[0])
    finally:
        os.close(fd)


def test_locks_are_taken_again_once_the_source_lets_go(sides: list[Side], share: Path) -> None:
    src, held = source(sides, share)
    setlk(src.c, held["file"], held["fh"], 7, 0, 99, fcntl.F_WRLCK)
    setlk(src.c, held["file"], held["fh"], 7, 40, 49, fcntl.F_UNLCK)
    setlk(src.c, held["file"], held["fh"], 8, 200, OFFSET_MAX, fcntl.F_RDLCK)
    setlk(src.c, held["file"], held["fh"], 0, 0, 0, fcntl.F_WRLCK, flock=True)
    dst = side(sides, share)
    dst.load(src.save())
    store = dst.fs.inodes
    # On one host the source holds them until it goes: pending here.
    assert store.pending_locks and dst.fs.pending_flocks and dst.fs.retaker is not None
    src.close()
    sides.remove(src)
    dst.fs.retaker.join(GUARD)
    assert not dst.fs.retaker.is_alive()
    assert not store.pending_locks and not dst.fs.pending_flocks
    path = share / "file"
    assert held_elsewhere(path, 0, 40) == fcntl.F_WRLCK
    assert held_elsewhere(path, 40, 10) == fcntl.F_UNLCK
    assert held_elsewhere(path, 50, 50) == fcntl.F_WRLCK
    assert held_elsewhere(path, 1 << 40, 1) == fcntl.F_RDLCK
    probe = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(probe)
    # The guest's unlock goes through as before.
    setlk(dst.c, held["file"], held["fh"], 7, 0, OFFSET_MAX, fcntl.F_UNLCK)
    assert held_elsewhere(path, 0, 100) == fcntl.F_UNLCK


def test_the_guests_unlock_settles_a_pending_lock(sides: list[Side], share: Path) -> None:
    src, held = source(sides, share)
    setlk(src.c, held["file"], held["fh"], 7, 0, 99, fcntl.F_WRLCK)
    dst = side(sides, share)
    dst.load(src.save())
    assert dst.fs.inodes.pending_locks
    setlk(dst.c, held["file"], held["fh"], 7, 0, 49, fcntl.F_UNLCK)
    assert [r.ranges for r in dst.fs.inodes.pending_locks.values()] == [[(50, 99, fcntl.F_WRLCK)]]
    src.close()
    sides.remove(src)
    assert dst.fs.retaker is not None
    dst.fs.retaker.join(GUARD)
    path = share / "file"
    assert held_elsewhere(path, 0, 50) == fcntl.F_UNLCK
    assert held_elsewhere(path, 50, 50) == fcntl.F_WRLCK


# --- hostile states ----------------------------------------------------------------------------
#
# The state a destination loads passed through the front-end: it is untrusted bytes. Whatever
# they say, the load ends in success or a StateError naming what is wrong, opens nothing but
# regular files and directories (O_PATH aside), reaches nothing outside the share, and leaves no
# descriptor behind once the session ends.

FIFO, CHR = 0o01, 0o02


def state(
    records: tuple[tuple[Any, ...], ...] = (),
    handles: tuple[tuple[int, int, int, int], ...] = (),
    held: tuple[tuple[int, int, int, list[tuple[int, int, int]]], ...] = (),
    mounts: tuple[tuple[bytes, int], ...] = (),
    ids: tuple[int, int] = (100, 100),
) -> bytes:
    """A passthrough state: the root, then ``records`` (nodeid, refcount, type, how,
    fields...), ``handles`` (fh, nodeid, open flags, flock), ``held`` locks (nodeid, owner,
    pid, ranges) and the mount table."""
    body = StateWriter().uint(0).uint(ids[0]).uint(ids[1]).uint(len(mounts))
    for rel, fsid in mounts:
        body.bytes(rel).uint(fsid)
    body.uint(1 + len(records))
    body.uint(1).uint(1).uint(0o04).uint(0).uint(0)
    for nodeid, refcount, kind, how, *fields in records:
        body.uint(nodeid).uint(refcount).uint(kind).uint(how)
        for f in fields:
            body.bytes(f) if isinstance(f, bytes) else body.uint(f)
        body.uint(0)
    body.uint(len(handles))
    for h in handles:
        body.items(h)
    body.uint(len(held))
    for nodeid, owner, pid, ranges in held:
        body.uint(nodeid).uint(owner).uint(pid).uint(len(ranges))
        for r in ranges:
            body.items(r)
    return StateWriter().section(b"passthrough", 1, body).getvalue()


@pytest.fixture
def nodes(share: Path) -> Path:
    """A FIFO and a character device (the kernel's null device) in the share."""
    os.mkfifo(share / "fifo")
    os.mknod(share / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return share


def fresh(sides: list[Side], share: Path, **cfg: Any) -> Side:
    """A destination whose file system the guest's session reached (as a load finds it)."""
    dst = side(sides, share, **cfg)
    dst.c.init()
    return dst


@pytest.mark.parametrize("on_error", list(MigrationOnError))
@pytest.mark.parametrize(
    ("name", "kind", "flags"),
    [
        (b"fifo", FIFO, os.O_RDONLY),
        (b"fifo", FIFO, os.O_RDWR | os.O_NONBLOCK),
        (b"fifo", FIFO, os.O_RDONLY | os.O_DIRECTORY),
        (b"null", CHR, os.O_RDWR),
        (b"null", CHR, os.O_RDONLY | os.O_DIRECTORY),
    ],
)
def test_a_handle_on_a_fifo_or_device_opens_nothing(
    sides: list[Side],
    nodes: Path,
    on_error: MigrationOnError,
    name: bytes,
    kind: int,
    flags: int,
) -> None:
    dst = fresh(sides, nodes, migration_on_error=on_error)
    watch = OpenWatch(nodes / "fifo", nodes / "null")
    try:
        saved = state(
            records=((2, 1, kind, 2, name),),
            handles=((5, 2, flags, 0),),
            held=((2, 9, 1, [(0, 10, fcntl.F_WRLCK)]),),
        )
        if on_error is MigrationOnError.ABORT:
            with pytest.raises(StateError, match=r"file handle 5 .*can't be opened again"):
                dst.fs.load_state(saved)
        else:
            dst.fs.load_state(saved)
            assert errno_of(dst.c.read, 2, 5, 0, 1) == errno.EIO
            assert dst.c.getattr(2).mode & 0o170000 == kind << 12  # the inode itself is there
            assert not dst.fs.inodes.pending_locks
        assert watch.opened() == []
    finally:
        watch.close()


def test_a_file_handle_naming_a_fifo_opens_nothing(sides: list[Side], nodes: Path) -> None:
    root_fd = os.open(nodes, os.O_PATH)
    try:
        fifo, _ = mig.linux.name_to_handle_at(root_fd, b"fifo", 0)
        fsid = os.fstatvfs(root_fd).f_fsid
    finally:
        os.close(root_fd)
    dst = fresh(sides, nodes, migration_on_error=MigrationOnError.GUEST_ERROR)
    watch = OpenWatch(nodes / "fifo")
    try:
        dst.fs.load_state(
            state(
                records=((2, 1, FIFO, 3, 0, fifo),),
                handles=((5, 2, os.O_RDWR, fcntl.LOCK_EX),),
                mounts=((b"", fsid),),
            )
        )
        assert errno_of(dst.c.read, 2, 5, 0, 1) == errno.EIO
        assert watch.opened() == []
    finally:
        watch.close()


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        # Counts that can't be what follows them, and counts past any real guest's.
        (
            StateWriter()
            .section(b"passthrough", 1, StateWriter().items([0, 100, 100, 0, 1000]))
            .getvalue(),
            "1000 inodes announced",
        ),
        (
            StateWriter()
            .section(b"passthrough", 1, StateWriter().items([0, 100, 100, 0, mig._MAX_INODES + 1]))
            .getvalue(),
            rf"inodes: {mig._MAX_INODES + 1} \(at most",
        ),
        (
            state(records=((2, 1, REG, 2, b"file"),), held=((2, 7, 0, []),))[:-1] + b"\x7f",
            "127 lock ranges announced",
        ),
        # Fields out of their range.
        (state(handles=((5, 1, 1 << 40, 0),)), "open flags"),
        (state(handles=((5, 1, os.O_RDONLY | os.O_DIRECTORY, 99),)), "flock"),
        (state(handles=((0, 1, os.O_RDONLY | os.O_DIRECTORY, 0),)), "file handle 0"),
        (state(records=((2, 1, 0o777, 2, b"file"),)), "file type"),
        (state(records=((2, 1, REG, 2, b"file"),), held=((2, 7, 1 << 40, [(0, 9, 1)]),)), "pid"),
        (
            state(records=((2, 1, REG, 2, b"file"),), held=((2, 7, 1, [(0, 1 << 63, 1)]),)),
            "lock range",
        ),
        (state(records=((2, 1, REG, 2, b"file"),), held=((2, 7, 1, [(9, 3, 1)]),)), "lock range"),
        (state(records=((2, 1, REG, 2, b"file"),), held=((2, 7, 1, [(0, 9, 5)]),)), "lock type"),
        (state(ids=(1 << 63, 100)), "next inode"),
        (state(ids=(100, 1 << 63)), "next file handle"),
        (state(records=((1 << 63, 1, REG, 2, b"file"),)), "inode 9223372036854775808"),
    ],
)
def test_a_state_out_of_bounds_is_a_state_error(
    sides: list[Side], share: Path, saved: bytes, message: str
) -> None:
    dst = fresh(sides, share)
    before = fd_count()
    with pytest.raises(StateError, match=message):
        dst.fs.load_state(saved)
    assert dst.fs.inodes.count() == 1 and len(dst.fs.handle_table) == 0
    assert fd_count() == before


@pytest.mark.parametrize("rel", [b"../", b"/", b"link", b"dir/../..", b"nowhere"])
def test_a_mount_outside_the_share_finds_nothing(
    sides: list[Side], share: Path, rel: bytes
) -> None:
    root_fd = os.open(share.parent, os.O_PATH)
    try:
        outside, _ = mig.linux.name_to_handle_at(root_fd, b"outside", 0)
        fsid = os.fstatvfs(root_fd).f_fsid
    finally:
        os.close(root_fd)
    dst = fresh(sides, share)
    with pytest.raises(StateError, match="inode 2: ") as e:
        dst.fs.load_state(state(records=((2, 1, REG, 3, 0, outside),), mounts=((rel, fsid),)))
    assert "its mount at" in str(e.value) or "outside the share" in str(e.value)


def test_every_corruption_of_a_state_is_a_state_error_or_a_load(
    sides: list[Side], share: Path
) -> None:
    """Each byte of a real state set to each of a few values: the load succeeds or raises a
    StateError, and the session's end gives every descriptor back."""
    src, held = source(sides, share, migration_verify_handles=True)
    setlk(src.c, held["file"], held["fh"], 7, 0, 99, fcntl.F_RDLCK)
    saved = src.fs.save_state()
    before = fd_count()
    outcomes = {"loaded": 0, "refused": 0}
    for pos in range(len(saved)):
        for value in {0, 1, 0x7F, 0x80, 0xFF, saved[pos] ^ 0x01}:
            if value == saved[pos]:
                continue
            data = saved[:pos] + bytes([value]) + saved[pos + 1 :]
            dst = Side(share, migration_on_error=MigrationOnError.GUEST_ERROR)
            try:
                dst.c.init()
                dst.server.reset()
                try:
                    dst.fs.load_state(data)
                    outcomes["loaded"] += 1
                except StateError:
                    outcomes["refused"] += 1
            finally:
                dst.close()
            assert fd_count() == before, f"byte {pos} = {value:#x}"
    assert outcomes["loaded"] and outcomes["refused"]
