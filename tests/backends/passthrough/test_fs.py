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
import random
import resource
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd.backends.passthrough import (
    PassthroughConfig,
    PassthroughFs,
    SecurityLabel,
    XattrMap,
)
from pyvirtiofsd.backends.passthrough import fs as passthrough_fs
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import (
    FuseClient,
    decode_reply,
    direct,
    encode_request,
    groups_extension,
    secctx_extension,
)
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
from tests.backends.windows import OwnerWindow, dax_client, owners_told

_O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY


# --- confinement ----------------------------------------------------------------------------


def test_dotdot_of_root_is_root(client: FuseClient) -> None:
    assert client.lookup(ROOT, b"..").nodeid == ROOT


@pytest.mark.parametrize("parent", [b"file", b"etc", b"fifo"])
@pytest.mark.parametrize("name", [b".", b"..", b"x"])
def test_nothing_is_found_in_what_is_no_directory(
    client: FuseClient, tree: tuple[Path, Path], parent: bytes, name: bytes
) -> None:
    """A LOOKUP whose parent is a file, a symlink or a FIFO is ENOTDIR, "." and ".." as any
    other name: no entry (and no lookup reference) for the file itself or for the share."""
    os.mkfifo(tree[0] / "fifo")
    node = client.lookup(ROOT, parent).nodeid
    assert errno_of(client.lookup, node, name) == errno.ENOTDIR
    assert (
        client.lookup(ROOT, b"dir").nodeid
        == client.lookup(client.lookup(ROOT, b"dir").nodeid, b".").nodeid
    )


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


@pytest.mark.parametrize("cut", [[(1 << 20) + 64], [16, 1 << 20], [20, 4092, 4096]])
def test_read_at_any_offset_into_reply_buffers_cut_any_way(
    tree: tuple[Path, Path], cut: list[int]
) -> None:
    """A guest's READ may name any 64-bit offset and any size, and its reply buffers come one
    whole (/dev/fuse) or a header then pages: the data is the file's, clipped to the room,
    empty past the end, EINVAL where the offset and size pass what a file offset holds, in
    either build (the compiled one reads into a single view in C)."""
    content = bytes(range(256)) * 40
    (tree[0] / "data").write_bytes(content)
    server = Server(PassthroughFs(PassthroughConfig(str(tree[0]))))
    client = FuseClient(direct(server))
    client.init()
    node = client.lookup(ROOT, b"data").nodeid
    fh = client.open(node, os.O_RDONLY).fh
    room = sum(cut) - 16
    for offset in (0, 9990, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        for size in (0, 1, 4096, 1 << 20):
            request = encode_request(
                abi.Opcode.READ, node, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), unique=9
            )
            bufs = [memoryview(bytearray(n)) for n in cut]
            n = server.handle([memoryview(request)], bufs)
            reply = b"".join(bytes(b) for b in bufs)[:n]
            length, error, unique = abi.OUT_HEADER.struct.unpack_from(reply)
            assert (length, unique) == (n, 9)
            if size and offset >= (1 << 63) - 1:
                assert (error, n) == (-errno.EINVAL, 16), (offset, size)
            else:
                assert error == 0, (offset, size)
                assert reply[16:] == content[offset : offset + min(size, room)], (offset, size)


def test_a_read_of_nothing_is_refused_as_the_host_refuses_it(tree: tuple[Path, Path]) -> None:
    """A guest may READ 0 bytes through a handle opened write-only (its kernel would not): the
    host's answer to that is EBADF, and so is ours, not an empty read."""
    (tree[0] / "data").write_bytes(b"data")
    client = FuseClient(direct(Server(PassthroughFs(PassthroughConfig(str(tree[0]))))))
    client.init()
    node = client.lookup(ROOT, b"data").nodeid
    for flags, expected in ((os.O_WRONLY, errno.EBADF), (os.O_RDONLY, 0), (os.O_RDWR, 0)):
        fh = client.open(node, flags).fh
        fd = os.open(tree[0] / "data", flags)
        try:
            host = 0
            try:
                os.pread(fd, 0, 0)
            except OSError as e:
                host = e.errno or 0
        finally:
            os.close(fd)
        assert host == expected
        if expected:
            assert errno_of(client.read, node, fh, 0, 0) == expected
        else:
            assert client.read(node, fh, 0, 0) == b""


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


@pytest.mark.pure_python
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
    c = dax_client(fs, window)
    try:
        ino = c.lookup(ROOT, b"f").nodeid
        read = abi.SETUPMAPPING_FLAG_READ
        c.setupmapping(ino, abi.INVALID_FH, 0, 8192, read, 0)
        assert window.modes == [os.O_RDONLY]
        write = read | abi.SETUPMAPPING_FLAG_WRITE
        assert errno_of(c.setupmapping, ino, abi.INVALID_FH, 0, 8192, write, 0) == errno.EROFS
    finally:
        fs.shutdown()


# --- security labels (FUSE_SECURITY_CTX) and the xattr map -----------------------------------

SELINUX = ":map:security.selinux:trusted.virtiofs.:"  # virtiofsd's rules for SELinux guests
EVERYTHING = ":map::user.virtiofs.:"  # its rules for a daemon without CAP_SYS_ADMIN
CONTEXT = (b"security.selinux", b"system_u:object_r:container_file_t:s0\0")


class Labelled:
    """A passthrough with --security-label (and a map), its raw FUSE client, and the share."""

    def __init__(self, share: Path, rules: str | None = SELINUX, **cfg: Any) -> None:
        self.share = share
        xmap = None if rules is None else XattrMap.parse(rules)
        cfg.setdefault("security_label", SecurityLabel.ALWAYS)
        self.fs = PassthroughFs(PassthroughConfig(str(share), xattrmap=xmap, **cfg))
        self.c = FuseClient(direct(Server(self.fs)))
        self.c.init(abi.InitFlag.SECURITY_CTX | abi.InitFlag.SETXATTR_EXT)
        assert self.c.flags & abi.InitFlag.SECURITY_CTX

    def names(self) -> list[str]:
        return sorted(os.listdir(self.share))


@pytest.fixture
def labelled(tmp_path: Path) -> Iterator[Callable[..., Labelled]]:
    made: list[Labelled] = []

    def make(rules: str | None = SELINUX, **cfg: Any) -> Labelled:
        share = tmp_path / f"share{len(made)}"
        share.mkdir(mode=0o777)
        share.chmod(0o777)
        made.append(Labelled(share, rules, **cfg))
        return made[-1]

    yield make
    for d in made:
        d.fs.shutdown()


def ext(*contexts: tuple[bytes, bytes]) -> dict[str, bytes]:
    return {"ext": secctx_extension(list(contexts))}


#: Each request that makes a file, with a context, as the kernel sends them: what it made.
def make_one(c: FuseClient, op: str, name: bytes, **kw: Any) -> Any:
    if op == "create":
        entry, opened = c.create(ROOT, name, 0o640, os.O_RDWR, **kw)
        c.release(entry.nodeid, opened.fh)
        return entry
    if op == "mkdir":
        return c.mkdir(ROOT, name, 0o750, **kw)
    if op == "fifo":
        return c.mknod(ROOT, name, stat.S_IFIFO | 0o640, **kw)
    if op == "socket":
        return c.mknod(ROOT, name, stat.S_IFSOCK | 0o640, **kw)
    if op == "mknod-file":
        return c.mknod(ROOT, name, stat.S_IFREG | 0o640, **kw)
    if op == "symlink":
        return c.symlink(ROOT, name, b"somewhere", **kw)
    if op == "tmpfile":
        entry, opened = c.tmpfile(ROOT, 0o640, **kw)
        c.link(entry.nodeid, ROOT, name)  # named only now, labelled all along
        c.release(entry.nodeid, opened.fh)
        return entry
    raise AssertionError(op)


MAKE_OPS = ["create", "mkdir", "fifo", "socket", "mknod-file", "symlink", "tmpfile"]


def host_xattrs(path: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
    }


@pytest.mark.parametrize("op", MAKE_OPS)
def test_label_is_stored_under_the_mapped_name(labelled: Callable[..., Labelled], op: str) -> None:
    d = labelled()
    entry = make_one(d.c, op, b"new", **ext(CONTEXT))
    assert d.names() == ["new"]  # nothing else: no temporary name left
    assert host_xattrs(d.share / "new") == {"trusted.virtiofs.security.selinux": CONTEXT[1]}
    # The guest sees it under its own name.
    assert d.c.listxattr(entry.nodeid) == [b"security.selinux"]
    assert d.c.getxattr(entry.nodeid, b"security.selinux") == CONTEXT[1]


@pytest.mark.parametrize("op", MAKE_OPS)
def test_without_a_map_the_label_keeps_its_name(labelled: Callable[..., Labelled], op: str) -> None:
    d = labelled(rules=None)
    make_one(d.c, op, b"new", **ext(CONTEXT))
    assert host_xattrs(d.share / "new") == {"security.selinux": CONTEXT[1]}


@pytest.mark.parametrize("op", MAKE_OPS)
def test_no_context_no_label(labelled: Callable[..., Labelled], op: str) -> None:
    # What a guest kernel without a security module sends: the header, no context.
    d = labelled()
    make_one(d.c, op, b"new", **ext())
    make_one(d.c, op, b"new2")
    assert d.names() == ["new", "new2"]
    assert host_xattrs(d.share / "new") == host_xattrs(d.share / "new2") == {}


def test_label_of_a_users_new_file_is_set_whatever_its_mode(
    labelled: Callable[..., Labelled],
) -> None:
    """Made as the caller (a user who may not write a 0444 file's user.* xattrs), labelled
    by the daemon; the guest's read-only open stays read-only."""
    d = labelled(EVERYTHING)
    user = {"uid": 1000, "gid": 1000, **ext(CONTEXT)}
    payload = abi.CREATE_IN.pack(os.O_RDONLY | os.O_CREAT, 0o444, 0, 0) + b"ro\0"
    raw = d.c.call(abi.Opcode.CREATE, ROOT, payload, **user)
    entry, opened = abi.ENTRY_OUT.unpack(raw), abi.OPEN_OUT.unpack(raw, abi.ENTRY_OUT.size)
    st = os.lstat(d.share / "ro")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o444)
    assert host_xattrs(d.share / "ro") == {"user.virtiofs.security.selinux": CONTEXT[1]}
    assert errno_of(d.c.write, entry.nodeid, opened.fh, 0, b"x") == errno.EBADF
    payload = abi.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT, 0o444, 0, 0) + b"wo\0"
    raw = d.c.call(abi.Opcode.CREATE, ROOT, payload, **user)
    entry, opened = abi.ENTRY_OUT.unpack(raw), abi.OPEN_OUT.unpack(raw, abi.ENTRY_OUT.size)
    assert d.c.write(entry.nodeid, opened.fh, 0, b"x") == 1
    made = d.c.mkdir(ROOT, b"d", 0o500, **user)
    assert os.lstat(d.share / "d").st_uid == 1000
    assert d.c.getxattr(made.nodeid, b"security.selinux") == CONTEXT[1]


@pytest.mark.parametrize("op", ["symlink", "fifo", "socket"])
def test_label_the_host_refuses_makes_nothing(labelled: Callable[..., Labelled], op: str) -> None:
    """user.* xattrs exist only on regular files and directories: with everything mapped
    under user.virtiofs., labelling a symlink or a node fails (EPERM, as with virtiofsd),
    and what was made is taken back."""
    d = labelled(EVERYTHING)
    before = fd_count()
    assert errno_of(make_one, d.c, op, b"new", **ext(CONTEXT)) == errno.EPERM
    assert d.names() == []
    assert fd_count() == before


@pytest.mark.parametrize(
    ("rules", "name", "err"),
    [
        ("/bad/all/security./security./ /ok/all///", b"security.selinux", errno.EPERM),
        (":unsupported:client:security.:: :ok:all:::", b"security.selinux", errno.EOPNOTSUPP),
        (SELINUX, b"trusted.virtiofs.x", errno.EPERM),  # may not name the target directly
        (None, b"system.posix_acl_access", errno.EOPNOTSUPP),  # ACLs are off
    ],
)
@pytest.mark.parametrize("op", MAKE_OPS)
def test_label_name_refused_by_the_map_makes_nothing(
    labelled: Callable[..., Labelled], op: str, rules: str | None, name: bytes, err: int
) -> None:
    d = labelled(rules)
    assert errno_of(make_one, d.c, op, b"new", **ext((name, b"v"))) == err
    assert d.names() == []


@pytest.mark.parametrize(
    "shape",
    [
        secctx_extension([CONTEXT, CONTEXT]),
        secctx_extension([(b"security.selinux", b"")]),
        secctx_extension([CONTEXT])[:-8],
    ],
    ids=["two-contexts", "zero-size", "overrun"],
)
@pytest.mark.parametrize("op", ["create", "mkdir", "fifo", "symlink", "tmpfile"])
def test_hostile_context_makes_nothing(
    labelled: Callable[..., Labelled], op: str, shape: bytes
) -> None:
    d = labelled()
    before = fd_count()
    assert errno_of(make_one, d.c, op, b"new", ext=shape) == errno.EINVAL
    assert d.names() == []
    assert fd_count() == before


@pytest.mark.parametrize("op", ["create", "mkdir", "fifo", "symlink"])
def test_taken_name_is_eexist_and_untouched(labelled: Callable[..., Labelled], op: str) -> None:
    d = labelled()
    (d.share / "new").mkdir() if op == "mkdir" else (d.share / "new").write_bytes(b"old")
    payload_flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    if op == "create":
        payload = abi.CREATE_IN.pack(payload_flags, 0o644, 0, 0) + b"new\0"
        err = errno_of(d.c.call, abi.Opcode.CREATE, ROOT, payload, **ext(CONTEXT))
    else:
        err = errno_of(make_one, d.c, op, b"new", **ext(CONTEXT))
    assert err == errno.EEXIST
    assert d.names() == ["new"]
    assert host_xattrs(d.share / "new") == {}


def test_create_of_a_taken_name_without_o_excl_opens_it_unlabelled(
    labelled: Callable[..., Labelled],
) -> None:
    d = labelled()
    (d.share / "old").write_bytes(b"contents")
    entry, opened = d.c.create(ROOT, b"old", 0o644, os.O_RDWR, **ext(CONTEXT))
    assert d.c.read(entry.nodeid, opened.fh, 0, 100) == b"contents"
    assert d.names() == ["old"]
    assert host_xattrs(d.share / "old") == {}


def pause_label(monkeypatch: pytest.MonkeyPatch) -> Pause:
    """Stop the next label being stored, the new file made but not yet labelled."""
    pause = Pause(lambda *args: True)  # disarmed once it has stopped one
    monkeypatch.setattr(passthrough_fs, "_set_label", pause.wrap(passthrough_fs._set_label))
    return pause


def _while_labelling(
    d: Labelled, monkeypatch: pytest.MonkeyPatch, op: str
) -> tuple[list[str], bool]:
    """Make ``new`` with a label, and look at the share while the label is being stored:
    the names there, and whether ``new`` exists."""
    pause = pause_label(monkeypatch)
    t, result = in_thread(lambda: make_one(d.c, op, b"new", **ext(CONTEXT)))
    pause.wait()
    seen = d.names()
    exists = os.path.lexists(d.share / "new")
    pause.go()
    t.join(GUARD)
    assert "error" not in result, result
    assert d.names() == ["new"]
    assert host_xattrs(d.share / "new") == {"trusted.virtiofs.security.selinux": CONTEXT[1]}
    return seen, exists


@pytest.mark.pure_python
@pytest.mark.parametrize("op", ["create", "mkdir", "fifo", "symlink", "mknod-file"])
def test_the_name_never_exists_without_its_label(
    labelled: Callable[..., Labelled], monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    d = labelled()
    seen, exists = _while_labelling(d, monkeypatch, op)
    assert not exists
    if op == "create":
        assert seen == []  # unnamed until labelled (O_TMPFILE)
    else:
        assert len(seen) == 1 and seen[0].startswith(".pyvirtiofsd-label-")


@pytest.mark.pure_python
def test_create_without_unnamed_files_uses_a_temporary_name(
    labelled: Callable[..., Labelled], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system without O_TMPFILE, CREATE takes the temporary-name way."""
    real_open = os.open

    def no_tmpfile(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & _O_TMPFILE_BIT:
            raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE here")
        return real_open(path, flags, *args, **kw)

    module = type("os", (), {})()
    for name in dir(os):
        setattr(module, name, getattr(os, name))
    module.open = no_tmpfile  # type: ignore[attr-defined]
    monkeypatch.setattr(passthrough_fs, "os", module)
    d = labelled()
    seen, exists = _while_labelling(d, monkeypatch, "create")
    assert not exists and len(seen) == 1 and seen[0].startswith(".pyvirtiofsd-label-")


@pytest.mark.parametrize("op", ["mkdir", "fifo", "symlink"])
def test_without_rename_noreplace_the_label_follows_the_name(
    labelled: Callable[..., Labelled], monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """Where renameat2(RENAME_NOREPLACE) is refused, virtiofsd's way: the name first, the
    label right after (and the file removed if the label fails)."""

    def no_noreplace(*args: Any) -> None:
        raise OSError(errno.EINVAL, "no RENAME_NOREPLACE here")

    monkeypatch.setattr(passthrough_fs.linux, "renameat2", no_noreplace)
    d = labelled()
    # The first try learns that the file system can't, and takes virtiofsd's way.
    make_one(d.c, op, b"first", **ext(CONTEXT))
    assert host_xattrs(d.share / "first") == {"trusted.virtiofs.security.selinux": CONTEXT[1]}
    os.rmdir(d.share / "first") if op == "mkdir" else os.unlink(d.share / "first")
    # The next goes that way at once.
    seen, exists = _while_labelling(d, monkeypatch, op)
    assert exists and seen == ["new"]
    if op != "mkdir":
        # A label the host refuses there: the file made under its name is taken back.
        d2 = labelled(EVERYTHING)
        make_one(d2.c, "mkdir", b"learn", **ext(CONTEXT))
        assert errno_of(make_one, d2.c, op, b"new", **ext(CONTEXT)) == errno.EPERM
        assert d2.names() == ["learn"]


def test_security_label_negotiation(tmp_path: Path) -> None:
    def init(mode: SecurityLabel, offer: int) -> tuple[int, int]:
        fs = PassthroughFs(PassthroughConfig(str(tmp_path), security_label=mode))
        c = FuseClient(direct(Server(fs)))
        try:
            return 0, int(c.init(offer).flags2 << 32) & abi.InitFlag.SECURITY_CTX
        except OSError as e:
            return e.errno or 0, 0
        finally:
            fs.shutdown()

    ctx = abi.InitFlag.SECURITY_CTX
    assert init(SecurityLabel.ALWAYS, ctx) == (0, ctx)
    assert init(SecurityLabel.ALWAYS, 0) == (errno.EPROTO, 0)
    assert init(SecurityLabel.AUTO, ctx) == (0, ctx)
    assert init(SecurityLabel.AUTO, 0) == (0, 0)
    assert init(SecurityLabel.NEVER, ctx) == (0, 0)


#: A valid file-capability value (VFS_CAP_REVISION_2, cap_net_bind_service permitted): the
#: daemon stores it as opaque bytes under the renamed name.
FILE_CAPS = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)
RENAMED_CAPS = "user.virtiofs.security.capability"


@pytest.mark.parametrize(
    "operation", ["write", "truncate", "chown", "setxattr", "open-trunc", "create-trunc"]
)
def test_renamed_capability_is_stripped_where_the_kernel_strips_the_real_one(
    tmp_path: Path, operation: str
) -> None:
    """With security.capability renamed, the host kernel no longer knows the xattr for a
    file capability: the daemon strips it itself (no guest kernel involved here)."""
    (tmp_path / "f").write_bytes(b"binary")
    (tmp_path / "d").mkdir()
    fs = PassthroughFs(PassthroughConfig(str(tmp_path), xattrmap=XattrMap.parse(EVERYTHING)))
    c = FuseClient(direct(Server(fs)))
    c.init(abi.InitFlag.SETXATTR_EXT)
    try:
        ino = c.lookup(ROOT, b"f").nodeid
        d = c.lookup(ROOT, b"d").nodeid
        c.setxattr(ino, b"security.capability", FILE_CAPS)
        c.setxattr(d, b"security.capability", FILE_CAPS)
        assert os.getxattr(tmp_path / "f", RENAMED_CAPS) == FILE_CAPS
        if operation == "write":
            opened = c.open(ino, os.O_WRONLY)
            c.write(ino, opened.fh, 0, b"B")
        elif operation == "truncate":
            c.setattr(ino, valid=abi.FATTR_SIZE, size=3)
        elif operation == "chown":
            c.setattr(ino, valid=abi.FATTR_UID | abi.FATTR_GID, uid=0, gid=0)
        elif operation == "setxattr":
            c.setxattr(ino, b"user.other", b"o")
        elif operation == "open-trunc":
            c.open(ino, os.O_WRONLY | os.O_TRUNC)
        else:
            c.create(ROOT, b"f", 0o644, os.O_WRONLY | os.O_TRUNC)
        assert RENAMED_CAPS not in os.listxattr(tmp_path / "f")
        # Only regular files carry file capabilities.
        c.setattr(d, valid=abi.FATTR_UID, uid=0)
        assert os.getxattr(tmp_path / "d", RENAMED_CAPS) == FILE_CAPS
    finally:
        fs.shutdown()


def test_capability_left_alone_when_the_map_keeps_its_name(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"binary")
    fs = PassthroughFs(PassthroughConfig(str(tmp_path), xattrmap=XattrMap.parse(SELINUX)))
    c = FuseClient(direct(Server(fs)))
    c.init(abi.InitFlag.SETXATTR_EXT)
    try:
        ino = c.lookup(ROOT, b"f").nodeid
        os.setxattr(tmp_path / "f", "user.virtiofs.security.capability", b"not-a-cap")
        opened = c.open(ino, os.O_WRONLY)
        c.write(ino, opened.fh, 0, b"B")
        assert "user.virtiofs.security.capability" in os.listxattr(tmp_path / "f")
    finally:
        fs.shutdown()


@pytest.mark.parametrize("acls", [False, True])
def test_acl_names_are_decided_before_the_map(tmp_path: Path, acls: bool) -> None:
    """Without --posix-acl, the ACL xattrs are ENOTSUP and left out of lists whatever the map
    says; with it, they are names like any other, and the map renames them."""
    (tmp_path / "f").write_text("x")
    fs = PassthroughFs(
        PassthroughConfig(str(tmp_path), posix_acl=acls, xattrmap=XattrMap.parse(EVERYTHING))
    )
    c = FuseClient(direct(Server(fs)))
    c.init(abi.InitFlag.SETXATTR_EXT | abi.InitFlag.POSIX_ACL | abi.InitFlag.DONT_MASK)
    acl = b"system.posix_acl_access"
    try:
        ino = c.lookup(ROOT, b"f").nodeid
        os.setxattr(tmp_path / "f", "user.virtiofs." + acl.decode(), b"opaque")
        if acls:
            assert c.getxattr(ino, acl) == b"opaque"
            assert c.listxattr(ino) == [acl]
            c.removexattr(ino, acl)
            assert os.listxattr(tmp_path / "f") == []
        else:
            for call in (c.getxattr, c.removexattr):
                assert errno_of(call, ino, acl) == errno.EOPNOTSUPP
            assert errno_of(c.setxattr, ino, acl, b"x") == errno.EOPNOTSUPP
            assert c.listxattr(ino) == []
            assert c.listxattr(ino, size=0) == 0
    finally:
        fs.shutdown()


def test_listxattr_size_and_erange_are_of_the_guests_list(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for i in range(20):
        os.setxattr(tmp_path / "f", f"user.hidden{i:02}", b"h")
    os.setxattr(tmp_path / "f", "user.virtiofs.user.shown", b"s")
    fs = PassthroughFs(PassthroughConfig(str(tmp_path), xattrmap=XattrMap.parse(EVERYTHING)))
    c = FuseClient(direct(Server(fs)))
    c.init(abi.InitFlag.SETXATTR_EXT)
    try:
        ino = c.lookup(ROOT, b"f").nodeid
        needed = len(b"user.shown\0")
        assert c.listxattr(ino, size=0) == needed
        # The host's list would not fit; the guest's does.
        assert c.listxattr(ino, size=needed) == [b"user.shown"]
        assert errno_of(c.listxattr, ino, needed - 1) == errno.ERANGE
    finally:
        fs.shutdown()


# --- --translate-uid / --translate-gid --------------------------------------------------------

#: guest 1000-1009 <-> host 5000-5009 both ways; guest 2001-2100 refused; host 7000-7009 shows
#: as guest 4242 (uids only).
TRANSLATE_UID = ("map:1000:5000:10", "forbid-guest:2001:100", "squash-host:7000:4242:10")
TRANSLATE_GID = ("map:1000:5000:10", "forbid-guest:2001:100")
NOBODY = 0xFFFFFFFF


class Translated:
    """The passthrough with the rules above, driven by raw requests as any guest caller."""

    def __init__(self, share: Path) -> None:
        from pyvirtiofsd.backends.passthrough.idmap import parse_rule

        self.share = share
        self.fs = PassthroughFs(
            PassthroughConfig(
                str(share),
                translate_uid=tuple(parse_rule(r) for r in TRANSLATE_UID),
                translate_gid=tuple(parse_rule(r) for r in TRANSLATE_GID),
            )
        )
        self.c = FuseClient(direct(Server(self.fs)))
        self.c.init()

    def call(self, op: int, nodeid: int, payload: bytes, uid: int, gid: int, groups=()) -> bytes:  # type: ignore[no-untyped-def]
        ext = groups_extension(list(groups)) if groups else b""
        return self.c.call(op, nodeid, payload, uid=uid, gid=gid, ext=ext)

    def entry(self, raw: bytes) -> tuple[int, int]:
        e = abi.ENTRY_OUT.unpack(raw)
        return e.uid, e.gid

    def making(self, uid: int, gid: int, groups: tuple[int, ...] = ()) -> dict[str, object]:
        """Every create-like request as the caller: what each answered (ids or errno)."""
        z = b"\0"
        requests = {
            "create": (abi.Opcode.CREATE,
                       abi.CREATE_IN.pack(os.O_CREAT | os.O_RDWR, 0o644, 0, 0) + b"c" + z),
            "mkdir": (abi.Opcode.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"d" + z),
            "mknod": (abi.Opcode.MKNOD,
                      abi.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0, 0) + b"p" + z),
            "symlink": (abi.Opcode.SYMLINK, b"l" + z + b"target" + z),
            "tmpfile": (abi.Opcode.TMPFILE, abi.CREATE_IN.pack(os.O_RDWR, 0o600, 0, 0)),
        }  # fmt: skip
        out: dict[str, object] = {}
        for name, (op, payload) in requests.items():
            try:
                out[name] = self.entry(self.call(op, ROOT, payload, uid, gid, groups))
            except OSError as e:
                out[name] = errno.errorcode[e.errno]
        return out

    def close(self) -> None:
        self.fs.shutdown()


@pytest.fixture
def translated(tmp_path: Path) -> Iterator[Translated]:
    if os.geteuid() != 0:
        pytest.skip("acting as the caller needs root")
    share = tmp_path / "share"
    share.mkdir()
    share.chmod(0o777)
    for name, uid, gid in [("mapped", 5003, 5004), ("aliased", 1003, 1003),
                           ("squashed", 7005, 7005), ("root", 0, 0)]:  # fmt: skip
        (share / name).write_text(name)
        os.chown(share / name, uid, gid)
    t = Translated(share)
    yield t
    t.close()


def test_attribute_replies_show_guest_ids(translated: Translated) -> None:
    c = translated.c
    expected = {b"mapped": (1003, 1004), b"aliased": (NOBODY, NOBODY),
                b"squashed": (4242, 7005), b"root": (0, 0)}  # fmt: skip
    for name, ids in expected.items():
        e = c.lookup(ROOT, name)
        assert (e.uid, e.gid) == ids, name
        a = c.getattr(e.nodeid)
        assert (a.uid, a.gid) == ids, name
    os.chown(translated.share, 5001, 5002)
    root = c.lookup(ROOT, b".")
    assert (root.uid, root.gid) == (1001, 1002)
    dh = c.opendir(ROOT).fh
    plus = {name: (e.uid, e.gid) for e, name in c.readdirplus(ROOT, dh, size=65536)}
    c.releasedir(ROOT, dh)
    assert {k: plus[k] for k in expected} == expected
    e = c.lookup(ROOT, b"mapped")
    a = c.setattr(e.nodeid, valid=abi.FATTR_MODE, mode=0o600)
    assert (a.uid, a.gid) == (1003, 1004)


def test_files_are_made_as_the_translated_caller(translated: Translated) -> None:
    made = translated.making(1001, 1002)
    assert made == dict.fromkeys(["create", "mkdir", "mknod", "symlink", "tmpfile"], (1001, 1002))
    share = translated.share
    for name in ("c", "d", "p", "l"):
        st = os.lstat(share / name)
        assert (st.st_uid, st.st_gid) == (5001, 5002), name
    # guest root is no rule's: it stays root
    assert translated.making(0, 0)["tmpfile"] == (0, 0)


@pytest.mark.parametrize(
    ("uid", "gid", "groups"),
    [(2050, 1002, ()), (1001, 2100, ()), (1001, 1002, (2001,)),
     (5003, 1002, ()),  # guest 5003 would act as host 5003, which is guest 1003
     (NOBODY, 1002, ())],
    ids=["forbidden-uid", "forbidden-gid", "forbidden-group", "aliasing-uid", "no-id"],
)  # fmt: skip
def test_a_refused_caller_gets_eperm_and_makes_nothing(
    translated: Translated, uid: int, gid: int, groups: tuple[int, ...]
) -> None:
    before = sorted(os.listdir(translated.share))
    made = translated.making(uid, gid, groups)
    assert made == dict.fromkeys(["create", "mkdir", "mknod", "symlink", "tmpfile"], "EPERM")
    assert sorted(os.listdir(translated.share)) == before


def test_supplementary_groups_are_translated(translated: Translated) -> None:
    """The kernel sends the parent's group when the caller is in it (CREATE_SUPP_GROUP); the
    host checks the caller against the host group it stands for."""
    team = translated.share / "team"
    team.mkdir()
    team.chmod(0o770)
    os.chown(team, 0, 5007)  # host group 5007: guest group 1007
    c = translated.c
    t = c.lookup(ROOT, b"team")
    assert (t.uid, t.gid) == (0, 1007)
    payload = abi.MKDIR_IN.pack(0o755, 0) + b"mine\0"
    with pytest.raises(PermissionError):
        translated.call(abi.Opcode.MKDIR, t.nodeid, payload, 1001, 1001)
    made = translated.entry(translated.call(abi.Opcode.MKDIR, t.nodeid, payload, 1001, 1001,
                                            groups=(1007,)))  # fmt: skip
    assert made == (1001, 1001)
    st = os.stat(team / "mine")
    assert (st.st_uid, st.st_gid) == (5001, 5001)


def test_chown_gives_the_translated_owner(translated: Translated) -> None:
    c = translated.c
    e = c.lookup(ROOT, b"root")
    fields = abi.FATTR_UID | abi.FATTR_GID
    a = c.setattr(e.nodeid, valid=fields, uid=1003, gid=1004)
    assert (a.uid, a.gid) == (1003, 1004)
    st = os.stat(translated.share / "root")
    assert (st.st_uid, st.st_gid) == (5003, 5004)
    a = c.setattr(e.nodeid, valid=abi.FATTR_UID, uid=4242)  # unmatched: itself
    assert (a.uid, a.gid) == (4242, 1004) and os.stat(translated.share / "root").st_uid == 4242


@pytest.mark.parametrize(
    ("uid", "gid"),
    [(2050, None), (None, 2100), (5003, None), (1003, 5004)],
    ids=["forbidden-uid", "forbidden-gid", "aliasing-uid", "aliasing-gid"],
)
def test_chown_to_a_refused_id_is_eperm_and_changes_nothing(
    translated: Translated, uid: int | None, gid: int | None
) -> None:
    c = translated.c
    e = c.lookup(ROOT, b"mapped")
    path = translated.share / "mapped"
    path.chmod(0o644)
    valid = abi.FATTR_MODE | (abi.FATTR_UID if uid is not None else 0)
    valid |= abi.FATTR_GID if gid is not None else 0
    assert errno_of(c.setattr, e.nodeid, valid=valid, mode=0o600, uid=uid or 0,
                    gid=gid or 0) == errno.EPERM  # fmt: skip
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (5003, 5004, 0o644)


def test_access_is_checked_for_the_translated_caller(translated: Translated) -> None:
    path = translated.share / "mapped"
    path.chmod(0o600)  # host 5003: guest 1003's alone
    e = translated.c.lookup(ROOT, b"mapped")

    def access(uid: int, mask: int = os.R_OK | os.W_OK) -> str:
        try:
            translated.call(abi.Opcode.ACCESS, e.nodeid, abi.ACCESS_IN.pack(mask, 0), uid, uid)
        except OSError as err:
            return errno.errorcode[err.errno]
        return "ok"

    assert access(1003) == "ok"
    assert access(1002) == "EACCES"
    assert access(5003) == "EPERM"  # would be host 5003 itself: refused, not let in
    assert access(2050, os.F_OK) == "EPERM"
    assert access(0) == "ok"


def test_no_rules_change_nothing(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_text("f")
    os.chown(share / "f", 5003, 5004)
    fs = PassthroughFs(PassthroughConfig(str(share)))
    c = FuseClient(direct(Server(fs)))
    c.init()
    try:
        e = c.lookup(ROOT, b"f")
        assert (e.uid, e.gid) == (5003, 5004)
        a = c.setattr(e.nodeid, valid=abi.FATTR_UID, uid=2050)
        assert a.uid == 2050
    finally:
        fs.shutdown()


# --- attributes through a handle of another inode --------------------------------------------


class _ResizeWindow(_RecordingWindow):
    """A DAX window that maps every file and notes each size it is told a file now has."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[object, int]] = []

    def holds(self, owner: object) -> bool:
        return True

    def resized(self, owner: object, size: int) -> None:
        self.sizes.append((owner, size))


def _attr_of(raw: bytes) -> tuple[int, int, int]:
    a = abi.ATTR_OUT.unpack(raw)
    return a.ino, a.mode, a.size


@pytest.mark.parametrize("dax", [None, 1], ids=["plain", "dax-file-size"])
def test_a_handle_of_another_inode_gives_getattr_and_setattr_nothing_of_its_file(
    share: Path, dax: int | None
) -> None:
    """GETATTR and SETATTR name an inode; a handle the guest pairs with it (FUSE_GETATTR_FH,
    FATTR_FH) is of use only if it is that inode's. One of another file is ignored, as a
    released one is: the reply is the inode's own attributes, a truncation truncates the
    inode's file, and its DAX mappings are kept within its own size, never the other's."""
    (share / "big").write_bytes(b"b" * 100_000)
    fs = PassthroughFs(PassthroughConfig(str(share), dax_file_size=dax))
    window = _ResizeWindow()
    c = dax_client(fs, window)
    try:
        big = c.lookup(ROOT, b"big").nodeid
        fh = c.open(big, os.O_RDWR).fh
        for name in ("file", "dir", "link", "fifo", "null"):
            node = c.lookup(ROOT, name.encode()).nodeid
            st = os.lstat(share / name)
            window.sizes.clear()
            raw = c.call(abi.Opcode.GETATTR, node, abi.GETATTR_IN.pack(abi.GETATTR_FH, 0, fh))
            assert _attr_of(raw) == (st.st_ino, st.st_mode, st.st_size), name
            assert window.sizes == [(node, st.st_size)], name
        node = c.lookup(ROOT, b"file").nodeid
        window.sizes.clear()
        setattr_in = abi.SETATTR_IN.pack(valid=abi.FATTR_SIZE | abi.FATTR_FH, fh=fh, size=4)
        raw = c.call(abi.Opcode.SETATTR, node, setattr_in)
        assert (share / "big").stat().st_size == 100_000
        assert (share / "file").read_bytes() == b"file"
        st = os.lstat(share / "file")
        assert _attr_of(raw) == (st.st_ino, st.st_mode, 4)
        assert window.sizes == [(node, 4)]
        # Its own handle still counts.
        raw = c.call(abi.Opcode.GETATTR, big, abi.GETATTR_IN.pack(abi.GETATTR_FH, 0, fh))
        assert _attr_of(raw)[2] == 100_000
    finally:
        fs.shutdown()


def test_requests_on_a_handle_keep_the_dax_window_of_the_handles_file(share: Path) -> None:
    """READ, WRITE, FALLOCATE, COPY_FILE_RANGE, FSYNC, FLUSH and RELEASE act on the handle's
    file, whatever inode the guest names with it: that file's window pages are put into it
    first (else an fsync would acknowledge data still in the window) and its mappings follow
    its new size. The named inode's are left alone (resized to the other file's size, they
    would map past its end)."""
    (share / "other").write_bytes(b"o" * 10)
    fs = PassthroughFs(PassthroughConfig(str(share)))
    window = OwnerWindow()
    c = dax_client(fs, window)
    try:
        named = c.lookup(ROOT, b"file").nodeid
        other = c.lookup(ROOT, b"other").nodeid
        fh = c.open(other, os.O_RDWR).fh
        requests = {
            "read": lambda: c.read(named, fh, 0, 4096),
            "write": lambda: c.write(named, fh, 0, b"x" * 8192),
            "fallocate": lambda: c.call(
                abi.Opcode.FALLOCATE, named, abi.FALLOCATE_IN.pack(fh, 0, 16384, 0, 0)
            ),
            "copy_file_range": lambda: c.call(
                abi.Opcode.COPY_FILE_RANGE,
                named,
                abi.COPY_FILE_RANGE_IN.pack(fh, 0, named, fh, 20000, 100, 0),
            ),
            "fsync": lambda: c.fsync(named, fh),
            "flush": lambda: c.flush(named, fh),
            "release": lambda: c.release(named, fh),
        }
        assert owners_told(window, requests) == {name: {other} for name in requests}
        assert (share / "file").read_bytes() == b"file contents"
    finally:
        fs.shutdown()


# --- READDIRPLUS that fails part way ----------------------------------------------------------


@pytest.mark.pure_python
def test_readdirplus_keeps_its_lookups_when_an_entrys_attributes_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As below, with the failure after the open: the fstat and inode of the fifth name
    fail, the four before are answered with their references, and the next READDIRPLUS
    gets the error."""
    for i in range(8):
        (tmp_path / f"f{i}").write_bytes(b"")
    fs = PassthroughFs(PassthroughConfig(str(tmp_path)))
    c = FuseClient(direct(Server(fs)))
    c.init(abi.InitFlag.DO_READDIRPLUS)
    real = fs._entry
    calls = []

    def failing(parent: Any, fd: int) -> Any:
        calls.append(fd)
        if len(calls) >= 5:
            os.close(fd)
            raise OSError(errno.EIO, "injected")
        return real(parent, fd)

    monkeypatch.setattr(fs, "_entry", failing)
    fh = c.opendir(ROOT).fh
    before = fs.inodes.count()
    entries = c.readdirplus(ROOT, fh, 0, 65536)
    looked = [n for e, n in entries if n not in (b".", b"..")]
    assert len(looked) == 4
    assert fs.inodes.count() == before + 4
    with pytest.raises(OSError) as got:
        c.readdirplus(ROOT, fh, entries[-1][0].d_off, 65536)
    assert got.value.errno == errno.EIO
    fs.shutdown()


def _free_fd_numbers_below(limit: int) -> int:
    taken = {int(n) for n in os.listdir("/proc/self/fd")}
    return sum(1 for n in range(limit) if n not in taken)


def test_readdirplus_that_fails_part_way_answers_the_entries_it_looked_up(
    tmp_path: Path,
) -> None:
    """Each READDIRPLUS entry is a lookup the kernel will forget. When a later lookup of the
    same reply fails (here: the daemon out of descriptors, which a guest holding many inodes
    brings about), the entries already looked up are answered, not thrown away with their
    references, which the kernel would then never forget; the next READDIRPLUS starts at the
    one that failed and gets the error."""
    for i in range(12):
        (tmp_path / f"f{i:02}").write_bytes(b"x")
    fs = PassthroughFs(PassthroughConfig(str(tmp_path)))
    c = FuseClient(direct(Server(fs)))
    c.init(abi.InitFlag.DO_READDIRPLUS)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        fh = c.opendir(ROOT).fh
        before = fs.inodes.count()
        limit = 3
        while _free_fd_numbers_below(limit) < 4:  # room for four lookups, not twelve
            limit += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            entries = c.readdirplus(ROOT, fh, 0, 65536)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        looked = [(e, n) for e, n in entries if n not in (b".", b"..")]
        assert 0 < len(looked) < 12
        assert fs.inodes.count() == before + len(looked)
        # The rest comes with the next READDIRPLUS, once there is room again.
        rest = c.readdirplus(ROOT, fh, entries[-1][0].d_off, 65536)
        names = sorted(n for _, n in looked + rest if n not in (b".", b".."))
        assert names == [f"f{i:02}".encode() for i in range(12)]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        fs.shutdown()


# --- FLUSH and RELEASE that skip the lock book; LOOKUP answered None ---------------------------

_HOST_FLOCK = struct.Struct("=hh4xqqi4x")


def test_a_flush_or_release_after_a_granted_lock_always_drops_it(tmp_path: Path) -> None:
    """FLUSH and RELEASE look at the lock book without its lock, to skip files that never had
    a lock: a lock granted before them is still dropped, while other owners lock, test and
    close the same files on other threads."""
    for name in ("f", "g"):
        (tmp_path / name).write_bytes(b"x" * 4096)
    fs = PassthroughFs(PassthroughConfig(shared_dir=str(tmp_path)))
    server = Server(fs)
    client = FuseClient(direct(server))
    client.init(int(abi.InitFlag.POSIX_LOCKS))
    f, g = client.lookup(ROOT, b"f").nodeid, client.lookup(ROOT, b"g").nodeid
    fhf, fhg = client.open(f, os.O_RDWR).fh, client.open(g, os.O_RDWR).fh
    lock, unique = threading.Lock(), [1000]

    def raw(op: int, nid: int, payload: bytes) -> Any:
        with lock:
            unique[0] += 1
            u = unique[0]
        out = bytearray(4096)
        request = [memoryview(encode_request(op, nid, payload, unique=u))]
        n = server.handle(request, [memoryview(out)])
        return decode_reply(bytes(out[:n]))

    stop = threading.Event()

    def churn(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            nid, fh = rnd.choice([(f, fhf), (g, fhg)])
            owner = 0x100 + rnd.randrange(4)
            pick = rnd.random()
            if pick < 0.5:
                start = rnd.randrange(100)
                ltype = rnd.choice([fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK])
                lk = abi.LK_IN.pack(fh, owner, start, start + 50, ltype, 1, 0, 0)
                raw(abi.Opcode.SETLK, nid, lk)
            elif pick < 0.7:
                lk = abi.LK_IN.pack(fh, owner, 0, 200, fcntl.F_WRLCK, 1, 0, 0)
                raw(abi.Opcode.GETLK, nid, lk)
            else:
                raw(abi.Opcode.FLUSH, nid, abi.FLUSH_IN.pack(fh, 0, 0, owner))

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    host = os.open(tmp_path / "f", os.O_RDWR)
    try:
        for i in range(600):
            owner = 0x9000 + i % 7
            lk = abi.LK_IN.pack(fhf, owner, 1000, 1000, fcntl.F_WRLCK, 1, 0, 0)
            assert raw(abi.Opcode.SETLK, f, lk).error == 0
            if i % 2:
                assert raw(abi.Opcode.FLUSH, f, abi.FLUSH_IN.pack(fhf, 0, 0, owner)).error == 0
            else:
                fh = client.open(f, os.O_RDWR).fh
                release = abi.RELEASE_IN.pack(fh, os.O_RDWR, abi.RELEASE_FLUSH, owner)
                assert raw(abi.Opcode.RELEASE, f, release).error == 0
            probe = _HOST_FLOCK.pack(fcntl.F_WRLCK, 0, 1000, 1, 0)
            held = _HOST_FLOCK.unpack(fcntl.fcntl(host, fcntl.F_OFD_GETLK, probe))
            assert held[0] == fcntl.F_UNLCK, (i, held)
    finally:
        stop.set()
        for t in threads:
            t.join()
        os.close(host)
        fs.shutdown()


def test_a_missing_name_takes_no_reference_and_no_descriptor(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    fs = PassthroughFs(PassthroughConfig(shared_dir=str(tmp_path)))
    client = FuseClient(direct(Server(fs)))
    client.init()
    d = client.lookup(ROOT, b"d").nodeid
    before = (fs.inodes.count(), len(os.listdir("/proc/self/fd")))
    for parent in (ROOT, d):
        for name in (b"missing", b"\xff", b"a" * 255, b"..."):
            for _ in range(50):
                with pytest.raises(OSError) as got:
                    client.lookup(parent, name)
                assert got.value.errno == errno.ENOENT
    assert (fs.inodes.count(), len(os.listdir("/proc/self/fd"))) == before
    fs.shutdown()
