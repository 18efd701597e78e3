"""Nothing a guest sends reaches outside the shared directory.

These drive the passthrough file system with raw FUSE requests, which can say things a kernel
never would (names with "/" or "..", lookups under symlinks, renames aimed outside).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, direct


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


def _errno(fn, *args, **kw) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    return e.value.errno


def test_dotdot_of_root_is_root(client: FuseClient) -> None:
    assert client.lookup(ROOT, b"..").nodeid == ROOT


@pytest.mark.parametrize("name", [b"../outside", b"dir/../../outside", b"/etc", b"", b"a/b"])
def test_names_with_slashes_are_refused(client: FuseClient, name: bytes) -> None:
    assert _errno(client.lookup, ROOT, name) == errno.EINVAL
    assert _errno(client.mkdir, ROOT, name) == errno.EINVAL
    assert _errno(client.create, ROOT, name) == errno.EINVAL


@pytest.mark.parametrize("link", [b"etc", b"up"])
def test_symlinks_are_not_followed(client: FuseClient, link: bytes) -> None:
    entry = client.lookup(ROOT, link)
    assert client.readlink(entry.nodeid) in (b"/etc", b"../outside")
    assert _errno(client.lookup, entry.nodeid, b"passwd") == errno.ENOTDIR
    assert _errno(client.lookup, entry.nodeid, b"secret") == errno.ENOTDIR
    assert _errno(client.open, entry.nodeid) == errno.ELOOP
    assert _errno(client.opendir, entry.nodeid) == errno.ENOTDIR
    assert _errno(client.mkdir, entry.nodeid, b"x") == errno.ENOTDIR
    assert _errno(client.create, entry.nodeid, b"x") == errno.ENOTDIR
    assert _errno(client.setattr, entry.nodeid, valid=8, size=0) == errno.EINVAL
    assert _errno(client.setattr, entry.nodeid, valid=1, mode=0o777) == errno.EOPNOTSUPP


def test_rename_and_link_stay_inside(client: FuseClient, tree: tuple[Path, Path]) -> None:
    share, outside = tree
    f = client.lookup(ROOT, b"file")
    assert _errno(client.rename, ROOT, b"file", ROOT, b"../outside/stolen") == errno.EINVAL
    assert _errno(client.link, f.nodeid, ROOT, b"../outside/stolen") == errno.EINVAL
    up = client.lookup(ROOT, b"up")
    assert _errno(client.rename, ROOT, b"file", up.nodeid, b"stolen") == errno.ENOTDIR
    assert _errno(client.link, f.nodeid, up.nodeid, b"stolen") == errno.ENOTDIR
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (share / "file").read_text() == "inside"


def test_create_does_not_follow_a_planted_symlink(
    client: FuseClient, tree: tuple[Path, Path]
) -> None:
    share, outside = tree
    (share / "trap").symlink_to(outside / "secret")
    assert _errno(client.create, ROOT, b"trap", 0o644, os.O_RDWR | os.O_TRUNC) == errno.ELOOP
    assert (outside / "secret").read_text() == "secret"


def test_directory_swapped_for_symlink(client: FuseClient, tree: tuple[Path, Path]) -> None:
    """A directory the guest holds, replaced on the host by a symlink to elsewhere: the guest's
    inode still means the original directory."""
    share, outside = tree
    d = client.lookup(ROOT, b"dir")
    (share / "dir").rename(share / "moved")
    (share / "dir").symlink_to(outside)
    assert _errno(client.lookup, d.nodeid, b"secret") == errno.ENOENT
    client.mkdir(d.nodeid, b"made")
    assert (share / "moved" / "made").is_dir()
    assert sorted(os.listdir(outside)) == ["secret"]


def test_unknown_inodes_and_handles(client: FuseClient) -> None:
    assert _errno(client.getattr, 999) == errno.EBADF
    assert _errno(client.read, ROOT, 12345, 0, 10) == errno.EBADF
    assert _errno(client.lookup, 1 << 60, b"x") == errno.EBADF


def test_forgotten_inode_is_gone(client: FuseClient) -> None:
    f = client.lookup(ROOT, b"file")
    client.lookup(ROOT, b"file")
    client.forget(f.nodeid, 1)
    assert client.getattr(f.nodeid).size == 6
    client.forget(f.nodeid, 1)
    assert _errno(client.getattr, f.nodeid) == errno.EBADF
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
    assert _errno(c.lookup, link.nodeid, b"passwd") == errno.ENOTDIR
    assert fs.inodes.root.fd >= 0
    assert all(i.fd < 0 for i in list(fs.inodes._by_id.values()) if i is not fs.inodes.root)
    fs.shutdown()
