"""The passthrough file system (:mod:`pyvirtiofsd.backends.passthrough.fs`) through raw FUSE
requests: nothing a guest sends reaches outside the shared directory (names with "/" or "..",
lookups under symlinks, renames aimed outside), and nothing but regular files and directories is
ever opened (CREATE over a device node or a FIFO, MKNOD of devices, O_TMPFILE through OPEN,
SYNCFS), and a handle's descriptor lives as long as a request uses it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

import pytest

from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import Server, TransportCaps
from pyvirtiofsd.testing.fuse_client import FuseClient, direct
from tests.backends.passthrough.conftest import (
    GUARD,
    SPECIAL,
    Daemon,
    OpenWatch,
    Pause,
    create,
    errno_of,
    fd_count,
    guarded,
    in_thread,
    is_open,
    open_fds,
    unblock_fifo,
)

_O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY


# --- confinement ----------------------------------------------------------------------------


def test_dotdot_of_root_is_root(client: FuseClient) -> None:
    assert client.lookup(ROOT, b"..").nodeid == ROOT


@pytest.mark.parametrize("name", [b"../outside", b"dir/../../outside", b"/etc", b"", b"a/b"])
def test_names_with_slashes_are_refused(client: FuseClient, name: bytes) -> None:
    assert errno_of(client.lookup, ROOT, name) == errno.EINVAL
    assert errno_of(client.mkdir, ROOT, name) == errno.EINVAL
    assert errno_of(client.create, ROOT, name) == errno.EINVAL


@pytest.mark.parametrize("link", [b"etc", b"up"])
def test_symlinks_are_not_followed(client: FuseClient, link: bytes) -> None:
    entry = client.lookup(ROOT, link)
    assert client.readlink(entry.nodeid) in (b"/etc", b"../outside")
    assert errno_of(client.lookup, entry.nodeid, b"passwd") == errno.ENOTDIR
    assert errno_of(client.lookup, entry.nodeid, b"secret") == errno.ENOTDIR
    assert errno_of(client.open, entry.nodeid) == errno.ELOOP
    assert errno_of(client.opendir, entry.nodeid) == errno.ENOTDIR
    assert errno_of(client.mkdir, entry.nodeid, b"x") == errno.ENOTDIR
    assert errno_of(client.create, entry.nodeid, b"x") == errno.ENOTDIR
    assert errno_of(client.setattr, entry.nodeid, valid=8, size=0) == errno.EINVAL
    assert errno_of(client.setattr, entry.nodeid, valid=1, mode=0o777) == errno.EOPNOTSUPP


def test_rename_and_link_stay_inside(client: FuseClient, tree: tuple[Path, Path]) -> None:
    share, outside = tree
    f = client.lookup(ROOT, b"file")
    assert errno_of(client.rename, ROOT, b"file", ROOT, b"../outside/stolen") == errno.EINVAL
    assert errno_of(client.link, f.nodeid, ROOT, b"../outside/stolen") == errno.EINVAL
    up = client.lookup(ROOT, b"up")
    assert errno_of(client.rename, ROOT, b"file", up.nodeid, b"stolen") == errno.ENOTDIR
    assert errno_of(client.link, f.nodeid, up.nodeid, b"stolen") == errno.ENOTDIR
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (share / "file").read_text() == "inside"


def test_create_does_not_follow_a_planted_symlink(
    client: FuseClient, tree: tuple[Path, Path]
) -> None:
    share, outside = tree
    (share / "trap").symlink_to(outside / "secret")
    assert errno_of(client.create, ROOT, b"trap", 0o644, os.O_RDWR | os.O_TRUNC) == errno.ELOOP
    assert (outside / "secret").read_text() == "secret"


def test_directory_swapped_for_symlink(client: FuseClient, tree: tuple[Path, Path]) -> None:
    """A directory the guest holds, replaced on the host by a symlink to elsewhere: the guest's
    inode still means the original directory."""
    share, outside = tree
    d = client.lookup(ROOT, b"dir")
    (share / "dir").rename(share / "moved")
    (share / "dir").symlink_to(outside)
    assert errno_of(client.lookup, d.nodeid, b"secret") == errno.ENOENT
    client.mkdir(d.nodeid, b"made")
    assert (share / "moved" / "made").is_dir()
    assert sorted(os.listdir(outside)) == ["secret"]


def test_unknown_inodes_and_handles(client: FuseClient) -> None:
    assert errno_of(client.getattr, 999) == errno.EBADF
    assert errno_of(client.read, ROOT, 12345, 0, 10) == errno.EBADF
    assert errno_of(client.lookup, 1 << 60, b"x") == errno.EBADF


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
        unblock_fifo(fifo),
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


# --- finding 4: SYNCFS ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SPECIAL, "link", "file", "dir"])
def test_syncfs_on_any_inode_opens_no_special_file(daemon: Daemon, name: str) -> None:
    ino = daemon.ino(name)
    guarded(
        lambda: daemon.c.call(abi.Opcode.SYNCFS, ino, abi.SYNCFS_IN.pack(0)),
        unblock_fifo(daemon.share / "fifo"),
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
    if not is_open(fd):
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
