"""The system-call wrappers (:mod:`pyvirtiofsd.linux`) on a scratch directory: each does what its
call does, raises ``OSError`` with the call's errno, and those that act on the calling thread
(file-system ids, groups, the fs struct) leave the other threads alone."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd import linux
from tests.conftest import in_thread

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def errno_of(fn: Callable[..., Any], *args: Any, **kw: Any) -> int:
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    return e.value.errno


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"data")
    (tmp_path / "d" / "link").symlink_to("f")
    (tmp_path / "outside").write_bytes(b"out")
    return tmp_path


def test_openat2_resolves_beneath_and_refuses_symlinks(tree: Path) -> None:
    d = os.open(tree / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        fd = linux.openat2(d, "f", os.O_RDONLY, resolve=linux.RESOLVE_BENEATH)
        assert os.read(fd, 10) == b"data"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.close(fd)
        beneath = linux.RESOLVE_BENEATH
        assert errno_of(linux.openat2, d, "../outside", os.O_RDONLY, resolve=beneath) == errno.EXDEV
        no_links = linux.RESOLVE_NO_SYMLINKS
        assert errno_of(linux.openat2, d, "link", os.O_RDONLY, resolve=no_links) == errno.ELOOP
        with pytest.raises(FileNotFoundError) as e:
            linux.openat2(d, "missing", os.O_RDONLY)
        assert e.value.filename == "missing"
    finally:
        os.close(d)


def test_renameat2_noreplace_and_exchange(tree: Path) -> None:
    d = os.open(tree / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        (tree / "d" / "g").write_bytes(b"other")
        assert errno_of(linux.renameat2, d, b"f", d, b"g", linux.RENAME_NOREPLACE) == errno.EEXIST
        linux.renameat2(d, b"f", d, b"g", linux.RENAME_EXCHANGE)
        assert (tree / "d" / "f").read_bytes() == b"other"
        assert (tree / "d" / "g").read_bytes() == b"data"
        linux.renameat2(d, b"g", d, b"h")
        assert not (tree / "d" / "g").exists()
    finally:
        os.close(d)


@needs_root
def test_file_handles_round_trip(tree: Path) -> None:
    d = os.open(tree / "d", os.O_PATH | os.O_DIRECTORY)
    # open_by_handle_at wants a real fd on the mount (it refuses O_PATH ones).
    mount_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            handle, mount_id = linux.name_to_handle_at(d, b"f", 0)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                pytest.skip("no file handles on this file system")
            raise
        assert mount_id > 0
        fd = linux.open_by_handle_at(mount_fd, handle, os.O_RDONLY)
        assert os.read(fd, 10) == b"data"
        assert os.fstat(fd).st_ino == os.stat(tree / "d" / "f").st_ino
        os.close(fd)
        # The handle names the inode, not the name: it still opens the file after a rename.
        os.rename(tree / "d" / "f", tree / "d" / "renamed")
        fd = linux.open_by_handle_at(mount_fd, handle, os.O_RDONLY)
        assert os.read(fd, 10) == b"data"
        os.close(fd)
    finally:
        os.close(mount_fd)
        os.close(d)


@needs_root
def test_fchownat_without_following_changes_the_link_itself(tree: Path) -> None:
    d = os.open(tree / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        linux.fchownat(d, b"link", 1234, 5678, linux.AT_SYMLINK_NOFOLLOW)
        link, target = os.lstat(tree / "d" / "link"), os.stat(tree / "d" / "f")
        assert (link.st_uid, link.st_gid) == (1234, 5678)
        assert (target.st_uid, target.st_gid) == (0, 0)
        assert errno_of(linux.fchownat, d, b"missing", 0, 0, 0) == errno.ENOENT
    finally:
        os.close(d)


def test_utimensat_sets_leaves_and_takes_now(tree: Path) -> None:
    d = os.open(tree / "d", os.O_PATH | os.O_DIRECTORY)
    f = tree / "d" / "f"
    try:
        linux.utimensat(d, b"f", 1_000_000_001, 2_000_000_002)
        st = os.stat(f)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
        linux.utimensat(d, b"f", None, 3_000_000_000)  # None leaves atime alone
        st = os.stat(f)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 3_000_000_000)
        linux.utimensat(d, b"f", None, None, mtime_now=True)
        assert os.stat(f).st_mtime_ns > 3_000_000_000
        linux.utimensat(d, b"link", 5_000_000_000, None, flags=linux.AT_SYMLINK_NOFOLLOW)
        assert os.lstat(tree / "d" / "link").st_atime_ns == 5_000_000_000
        assert os.stat(f).st_atime_ns == 1_000_000_001
    finally:
        os.close(d)


@needs_root
def test_fs_ids_are_per_thread(open_tmp: Path) -> None:
    shared = open_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)

    def as_caller() -> tuple[int, int]:
        previous = linux.setfsuid(1234), linux.setfsgid(5678)
        try:
            (shared / "theirs").touch()
        finally:
            linux.setfsuid(0)
            linux.setfsgid(0)
        return previous

    assert in_thread(as_caller) == (0, 0)
    st = os.stat(shared / "theirs")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    (shared / "mine").touch()  # this thread never changed its ids
    st = os.stat(shared / "mine")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


@needs_root
def test_thread_setgroups_changes_only_the_calling_thread() -> None:
    before = sorted(os.getgroups())

    def groups_of_this_thread() -> str:
        linux.thread_setgroups((4321, 8765))
        with open("/proc/thread-self/status") as f:
            return next(line for line in f if line.startswith("Groups:"))

    assert in_thread(groups_of_this_thread).split()[1:] == ["4321", "8765"]
    assert sorted(os.getgroups()) == before


def test_getdents64_lists_the_directory(tree: Path) -> None:
    fd = os.open(tree / "d", os.O_RDONLY | os.O_DIRECTORY)
    buf = ctypes.create_string_buffer(4096)
    names = {}
    try:
        while n := linux.getdents64(fd, buf):
            raw, pos = buf.raw[:n], 0
            while pos < n:
                # linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name NUL-terminated
                reclen = int.from_bytes(raw[pos + 16 : pos + 18], "little")
                dtype = raw[pos + 18]
                name = raw[pos + 19 : pos + reclen].split(b"\0", 1)[0]
                names[name] = dtype
                pos += reclen
    finally:
        os.close(fd)
    assert names == {b".": 4, b"..": 4, b"f": 8, b"link": 10}  # DT_DIR, DT_REG, DT_LNK
    assert errno_of(linux.getdents64, -1, buf) == errno.EBADF


def test_fallocate_and_syncfs(tree: Path) -> None:
    fd = os.open(tree / "d" / "f", os.O_RDWR)
    try:
        linux.fallocate(fd, 0, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
        linux.syncfs(fd)
        assert errno_of(linux.fallocate, fd, 0, -1, 10) == errno.EINVAL
    finally:
        os.close(fd)
    assert errno_of(linux.syncfs, fd) == errno.EBADF


def test_unshare_fs_gives_the_thread_its_own_umask() -> None:
    mask = os.umask(0o022)
    os.umask(mask)

    def own_umask() -> int:
        linux.unshare(linux.CLONE_FS)
        os.umask(0o077)
        return os.umask(0o077)

    assert in_thread(own_umask) == 0o077
    assert os.umask(mask) == mask  # this thread's umask never moved


def test_ioctls_with_a_buffer_and_an_int() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"12345")
        buf = bytearray(4)
        assert linux.ioctl_buffer(r, termios.FIONREAD, buf) == 0
        assert int.from_bytes(buf, sys.byteorder) == 5
        assert os.get_blocking(r)
        linux.ioctl_int(r, termios.FIONBIO, 1)
        assert not os.get_blocking(r)
        assert errno_of(linux.ioctl_int, r, 0x7FFF_0000, 0) == errno.ENOTTY
    finally:
        os.close(r)
        os.close(w)


@needs_root
def test_mount_and_umount2_in_a_namespace_of_their_own(tmp_path: Path) -> None:
    """In a child process with its own mount namespace, so that nothing here sees the mount."""
    script = f"""
import os
from pyvirtiofsd import linux
linux.unshare(linux.CLONE_NEWNS)
linux.mount("none", "/", "", 0x4000 | 0x40000, "")  # MS_REC | MS_PRIVATE
target = {str(tmp_path)!r}
linux.mount("tmpfs", target, "tmpfs", linux.MS_NODEV | linux.MS_NOSUID, "size=1m")
flags = os.statvfs(target).f_flag
open(os.path.join(target, "inside"), "w").close()
linux.umount2(target, linux.MNT_DETACH)
try:
    linux.umount2(target)
except OSError as e:
    print(flags, e.errno)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    flags, err = int(out[0]), int(out[1])
    assert flags & os.ST_NODEV and flags & os.ST_NOSUID
    assert err == errno.EINVAL  # nothing mounted there any more
    assert os.listdir(tmp_path) == []  # the file went with the tmpfs, in the child only
    assert stat.S_ISDIR(os.stat(tmp_path).st_mode)
