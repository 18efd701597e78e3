"""The passthrough file system mounted through the real kernel (/dev/fuse), driven by real
programs: coreutils, tar, find, Python's os module, several processes, locks, mmap."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from tests.conftest import Share, mounted_share
from tests.e2e.workloads import many_processes


def sh(script: str, cwd: Path | None = None, user: str | None = None) -> str:
    cmd = ["sh", "-euc", script]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def test_coreutils(share: Share) -> None:
    m = share.mnt
    sh(
        """
        mkdir -p tree/a/b tree/c
        printf 'one\\n' > tree/a/one
        printf 'two\\n' > tree/a/b/two
        ln -s ../a/one tree/c/link
        ln tree/a/one tree/c/hard
        chmod 640 tree/a/one
        chmod 2755 tree/c
        touch -d '2001-02-03 04:05:06' tree/a/b/two
        truncate -s 1M tree/big
        truncate -s 100 tree/big
        cp -a tree copy
        mv copy/a copy/moved
        chown 1234:5678 copy/moved/one
        """,
        cwd=m,
    )
    src = share.src
    assert (src / "tree/a/one").read_text() == "one\n"
    assert os.readlink(src / "tree/c/link") == "../a/one"
    assert (src / "tree/a/one").stat().st_ino == (src / "tree/c/hard").stat().st_ino
    assert (src / "tree/a/one").stat().st_nlink == 2
    assert stat.S_IMODE((src / "tree/a/one").stat().st_mode) == 0o640
    assert stat.S_IMODE((src / "tree/c").stat().st_mode) == 0o2755
    assert (src / "tree/a/b/two").stat().st_mtime == time.mktime((2001, 2, 3, 4, 5, 6, 0, 0, -1))
    assert (src / "tree/big").stat().st_size == 100
    # cp -a kept modes, times, symlinks
    assert (src / "copy/moved/b/two").stat().st_mtime == (src / "tree/a/b/two").stat().st_mtime
    assert os.readlink(src / "copy/c/link") == "../a/one"
    st = (src / "copy/moved/one").stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    out = sh(
        "stat -c '%s %a %h %F' tree/a/one tree/c tree/c/link; find . | sort; du -s tree", cwd=m
    )
    lines = out.splitlines()
    assert lines[0] == "4 640 2 regular file"
    assert lines[1].split()[1:] == ["2755", "2", "directory"]
    assert lines[2].endswith("symbolic link")
    host_find = sh("find . | sort", cwd=src).splitlines()
    assert lines[3:-1] == host_find


def test_dot_entries_are_listed(share: Share) -> None:
    os.mkdir(share.mnt / "d")
    assert sh("ls -a", cwd=share.mnt).split() == [".", "..", "d"]
    assert sh("ls -a d", cwd=share.mnt).split() == [".", ".."]


def test_tar_round_trip(share: Share, tmp_path: Path) -> None:
    m = share.mnt
    origin = tmp_path / "origin"
    origin.mkdir()
    for i in range(300):
        d = origin / f"d{i % 17}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(i * 37 % 5000))
    (origin / "d0" / "sym").symlink_to("f17")
    sh(f"tar -C {origin} -cf - . | tar -C {m} -xf -")
    listing = sh("find . -printf '%p %s %m %y\\n' | sort", cwd=m)
    assert listing == sh("find . -printf '%p %s %m %y\\n' | sort", cwd=origin)
    sh(
        f"tar -C {m} -cf {tmp_path}/back.tar . && mkdir {tmp_path}/back"
        f" && tar -C {tmp_path}/back -xf {tmp_path}/back.tar"
    )
    assert sh("find . -type f -exec sha256sum {} + | sort", cwd=tmp_path / "back") == sh(
        "find . -type f -exec sha256sum {} + | sort", cwd=origin
    )


def test_python_os_module(share: Share) -> None:
    m, src = share.mnt, share.src
    os.mkdir(m / "d", 0o750)
    fd = os.open(m / "d" / "f", os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
    assert os.write(fd, b"0123456789") == 10
    assert os.pread(fd, 4, 3) == b"3456"
    os.pwrite(fd, b"XY", 8)
    os.ftruncate(fd, 12)
    os.fsync(fd)
    os.fdatasync(fd)
    assert os.fstat(fd).st_size == 12
    os.close(fd)
    assert (src / "d" / "f").read_bytes() == b"01234567XY\0\0"
    with pytest.raises(FileExistsError):
        os.open(m / "d" / "f", os.O_CREAT | os.O_EXCL)
    os.rename(m / "d" / "f", m / "g")
    os.link(m / "g", m / "h")
    os.symlink("g", m / "s")
    assert os.readlink(m / "s") == "g"
    assert sorted(os.listdir(m)) == ["d", "g", "h", "s"]
    os.utime(m / "g", ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(m / "g")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.utime(m / "s", ns=(5_000_000_000, 6_000_000_000), follow_symlinks=False)
    assert os.lstat(src / "s").st_mtime_ns == 6_000_000_000
    os.chmod(m / "g", 0o4755)
    assert stat.S_IMODE(os.stat(src / "g").st_mode) == 0o4755
    os.unlink(m / "h")
    os.mkfifo(m / "fifo")
    assert stat.S_ISFIFO(os.stat(src / "fifo").st_mode)
    with pytest.raises(PermissionError):  # devices need --allow-devices
        os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert not os.path.lexists(src / "null")
    with pytest.raises(OSError) as e:
        os.rmdir(m / "d2")
    assert e.value.errno == errno.ENOENT
    (m / "d" / "x").write_text("x")
    with pytest.raises(OSError) as e:
        os.rmdir(m / "d")
    assert e.value.errno == errno.ENOTEMPTY
    sv = os.statvfs(m)
    assert sv.f_bsize > 0 and sv.f_blocks > 0
    assert os.access(m / "g", os.R_OK | os.X_OK)
    # unlinked but open: still readable
    fd = os.open(m / "d" / "x", os.O_RDONLY)
    os.unlink(m / "d" / "x")
    assert os.read(fd, 10) == b"x"
    os.close(fd)


@pytest.mark.daemon_args("--allow-devices")
def test_allow_devices_makes_devices_the_nodev_mount_refuses(share: Share) -> None:
    m, src = share.mnt, share.src
    os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert os.stat(src / "null").st_rdev == os.makedev(1, 3)
    with pytest.raises(PermissionError):  # the host mount is nodev, as FUSE mounts are
        open(m / "null", "wb")  # noqa: SIM115
    os.unlink(m / "null")


def test_many_processes_at_once(share: Share) -> None:
    many_processes(share.mnt, processes=8, files=40, scale=50)
    for n in range(8):
        assert len(os.listdir(share.src / f"p{n}")) == 40


@pytest.mark.daemon_args("--xattr")
def test_xattrs(share: Share) -> None:
    f = share.mnt / "f"
    f.write_text("x")
    os.setxattr(f, "user.color", b"blue")
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.color") == b"blue"
    assert os.getxattr(share.src / "f", "user.color") == b"blue"
    assert sorted(os.listxattr(f)) == ["user.color", "user.empty"]
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.color", b"red", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.nope", b"red", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    os.removexattr(f, "user.color")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.color")
    assert e.value.errno == errno.ENODATA
    big = os.urandom(3000)
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.big") == big
    os.mkdir(share.mnt / "d")
    os.setxattr(share.mnt / "d", "user.dir", b"1")
    assert os.getxattr(share.mnt / "d", "user.dir") == b"1"


def test_xattrs_off_by_default(share: Share) -> None:
    (share.mnt / "f").write_text("x")
    with pytest.raises(OSError) as e:
        os.setxattr(share.mnt / "f", "user.color", b"blue")
    assert e.value.errno == errno.EOPNOTSUPP


_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, bytes(old), -100, bytes(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_rename2_flags(share: Share) -> None:
    m, src = share.mnt, share.src
    (m / "a").write_text("a")
    (m / "b").write_text("b")
    with pytest.raises(FileExistsError):
        renameat2(m / "a", m / "b", 1)  # RENAME_NOREPLACE
    renameat2(m / "a", m / "c", 1)
    renameat2(m / "b", m / "c", 2)  # RENAME_EXCHANGE
    assert (src / "c").read_text() == "b" and (src / "b").read_text() == "a"
    assert (m / "c").read_text() == "b" and (m / "b").read_text() == "a"
    renameat2(m / "b", m / "w", 4)  # RENAME_WHITEOUT leaves a 0/0 char device
    st = os.lstat(src / "b")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (src / "w").read_text() == "a"


LOCKER = textwrap.dedent(
    """
    import fcntl, os, struct, sys, time
    path, kind, mode = sys.argv[1:4]
    f = open(path, "r+b")
    if kind == "posix":
        fcntl.lockf(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if mode == "try" else 0), 10, 0)
    else:
        fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if mode == "try" else 0))
    print("locked", flush=True)
    sys.stdin.readline()
    """
)


def _locker(path: Path, kind: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path), kind, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_locks_between_processes(share: Share, kind: str) -> None:
    path = share.mnt / "locked"
    path.write_bytes(b"x" * 100)
    holder = _locker(path, kind, "block")
    assert holder.stdout.readline() == "locked\n"  # type: ignore[union-attr]
    contender = _locker(path, kind, "try")
    assert contender.wait(30) != 0
    assert "Resource temporarily unavailable" in contender.stderr.read()  # type: ignore[union-attr]
    if kind == "posix":
        # F_GETLK sees the holder, with its pid
        with open(path, "r+b") as f:
            got = fcntl.fcntl(f, fcntl.F_GETLK, _flock(fcntl.F_WRLCK, 0, 10))
        ltype, _, start, length, pid = _FLOCK.unpack(got)
        assert (ltype, start, length, pid) == (fcntl.F_WRLCK, 0, 10, holder.pid)
    waiter = _locker(path, kind, "block")
    time.sleep(1.0)
    assert waiter.poll() is None, "a blocking lock must wait for the holder"
    holder.stdin.write("\n")  # type: ignore[union-attr]
    holder.stdin.flush()  # type: ignore[union-attr]
    assert holder.wait(30) == 0
    assert waiter.stdout.readline() == "locked\n"  # type: ignore[union-attr]
    waiter.stdin.write("\n")  # type: ignore[union-attr]
    waiter.stdin.flush()  # type: ignore[union-attr]
    assert waiter.wait(30) == 0


_FLOCK = struct.Struct("=hh4xqqi4x")


def _flock(ltype: int, start: int, length: int) -> bytes:
    return _FLOCK.pack(ltype, os.SEEK_SET, start, length, 0)


def test_posix_lock_ranges_in_one_process(share: Share) -> None:
    path = share.mnt / "ranges"
    path.write_bytes(b"\0" * 100)
    with open(path, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX, 10, 0)
        fcntl.lockf(f, fcntl.LOCK_EX, 10, 5)  # same owner: merge, no conflict
        fcntl.lockf(f, fcntl.LOCK_UN, 5, 5)
    # closing released everything: another process gets the whole file
    holder = _locker(path, "posix", "try")
    assert holder.stdout.readline() == "locked\n"  # type: ignore[union-attr]
    holder.stdin.write("\n")  # type: ignore[union-attr]
    holder.stdin.flush()  # type: ignore[union-attr]
    assert holder.wait(30) == 0


def test_interrupted_lock_wait(share: Share) -> None:
    path = share.mnt / "intr"
    path.write_bytes(b"x")
    holder = _locker(path, "posix", "block")
    assert holder.stdout.readline() == "locked\n"  # type: ignore[union-attr]
    waiter = _locker(path, "posix", "block")
    time.sleep(0.5)
    waiter.kill()
    assert waiter.wait(30) != 0
    holder.stdin.write("\n")  # type: ignore[union-attr]
    holder.stdin.flush()  # type: ignore[union-attr]
    assert holder.wait(30) == 0


def test_sparse_seek_data_hole(share: Share) -> None:
    path = share.mnt / "sparse"
    with open(path, "wb") as f:
        f.write(b"a" * 4096)
        f.seek(16 << 20)
        f.write(b"b" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert 4096 <= hole < 16 << 20
        assert os.lseek(fd, hole, os.SEEK_DATA) == 16 << 20
        assert os.lseek(fd, 16 << 20, os.SEEK_HOLE) == (16 << 20) + 4096
        with pytest.raises(OSError) as e:
            os.lseek(fd, (16 << 20) + 4096, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    assert os.stat(share.src / "sparse").st_blocks * 512 < 1 << 20


def test_append_and_trunc(share: Share) -> None:
    path = share.mnt / "log"
    for i in range(5):
        with open(path, "ab") as f:
            f.write(b"line %d\n" % i)
    (share.src / "log").open("ab").write(b"host\n")
    with open(path, "ab") as f:
        f.write(b"last\n")
    assert (share.src / "log").read_bytes().splitlines()[-2:] == [b"host", b"last"]
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    assert (share.src / "log").read_bytes() == b"new"


def test_shared_mmap_writes(share: Share) -> None:
    path = share.mnt / "mapped"
    path.write_bytes(b"\0" * 65536)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 65536, mmap.MAP_SHARED)
        mm[100:105] = b"hello"
        mm[60000:60005] = b"world"
        mm.flush()
        mm.close()
    data = (share.src / "mapped").read_bytes()
    assert data[100:105] == b"hello" and data[60000:60005] == b"world"
    (share.src / "mapped").write_bytes(b"z" * 65536)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 65536, mmap.MAP_SHARED, mmap.PROT_READ)
        assert mm[:3] in (b"zzz", b"\0\0\0")  # cache=auto may still show the old page
        mm.close()


def _mount_options(mnt: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if x.split()[4] == os.path.realpath(mnt))
    return line.split(" - ")[1].split()[2].split(",")


def test_only_the_daemons_user_may_use_a_mount_without_allow_other(share: Share) -> None:
    # As libfuse mounts by default: the kernel turns everyone else away at the mount.
    assert "allow_other" not in _mount_options(share.mnt)
    os.mkdir(share.mnt / "pub", 0o777)
    os.chmod(share.mnt / "pub", 0o777)
    f = share.mnt / "pub" / "f"
    f.write_text("hello")
    os.chmod(f, 0o644)
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run([*user, "cat", str(f)], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    # Not even the mount point's own attributes: stat is refused before any request.
    r = subprocess.run([*user, "stat", str(share.mnt)], capture_output=True, text=True)
    assert r.returncode != 0, r
    assert f.read_text() == "hello"


@pytest.mark.parametrize("allow_other", [False, True], ids=["own", "allow-other"])
def test_the_kernel_checks_permissions_even_for_the_daemons_user(
    share: Share, tmp_path: Path, allow_other: bool
) -> None:
    """The server acts with all of root's rights and checks none itself: the kernel checks
    every caller's (default_permissions), so root without capabilities, which the mount lets
    in as the daemon's user, gets no more through it than in the share itself."""
    if allow_other:
        # A second daemon on the same source, mounted for everyone.
        ctx = mounted_share(share.src, tmp_path / "mnt-ao", "--allow-other")
    else:
        ctx = contextlib.nullcontext(share)
    with ctx as s:
        assert "default_permissions" in _mount_options(s.mnt)
        assert ("allow_other" in _mount_options(s.mnt)) == allow_other
        os.mkdir(share.src / "theirs", 0o755)
        os.chown(share.src / "theirs", 65534, 65534)
        (share.src / "secret").write_text("nobody's")
        os.chown(share.src / "secret", 65534, 65534)
        os.chmod(share.src / "secret", 0o600)
        no_caps = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
        for where in (share.src, s.mnt):
            r = subprocess.run([*no_caps, "cat", str(where / "secret")], capture_output=True)
            assert r.returncode != 0 and b"Permission denied" in r.stderr, (where, r)
            r = subprocess.run(
                [*no_caps, "touch", str(where / "theirs" / "x")], capture_output=True
            )
            assert r.returncode != 0, (where, r)
            r = subprocess.run(
                [*no_caps, "chown", "0:0", str(where / "secret")], capture_output=True
            )
            assert r.returncode != 0, (where, r)
        assert not (share.src / "theirs" / "x").exists()
        assert os.stat(share.src / "secret").st_uid == 65534
        assert (s.mnt / "secret").read_text() == "nobody's"  # root with its capabilities


@pytest.mark.daemon_args("--allow-other")
def test_non_root_caller(share: Share) -> None:
    m, src = share.mnt, share.src
    os.mkdir(m / "pub", 0o777)
    os.chmod(m / "pub", 0o777)
    os.mkdir(m / "priv", 0o755)
    (m / "priv" / "secret").write_text("root only")
    os.chmod(m / "priv" / "secret", 0o600)
    sh("echo mine > pub/mine; mkdir pub/dir; ln -s mine pub/link", cwd=m, user="65534")
    for name in ("mine", "dir", "link"):
        st = os.lstat(src / "pub" / name)
        assert (st.st_uid, st.st_gid) == (65534, 65534), name
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            f"touch {m}/priv/new; echo $?; cat {m}/priv/secret; echo $?; "
            f"echo x > {m}/priv/secret; echo $?; rm {m}/pub/mine; echo $?",
        ],
        capture_output=True,
        text=True,
    )
    codes = [int(line) for line in r.stdout.split() if line.isdigit()]
    assert [bool(c) for c in codes] == [True, True, True, False], r
    assert "Permission denied" in r.stderr
    assert not (src / "priv" / "new").exists()


@pytest.mark.daemon_args("--allow-other")
def test_setgid_directory_and_supplementary_group(share: Share) -> None:
    m, src = share.mnt, share.src
    os.mkdir(m / "team", 0o2770)
    os.chown(m / "team", 0, 4242)
    os.chmod(m / "team", 0o2770)
    # uid 65534 may write there only through its supplementary group 4242
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--groups=4242",
            "sh",
            "-c",
            f"echo hi > {m}/team/f && mkdir {m}/team/d",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    st = os.stat(src / "team" / "f")
    assert (st.st_uid, st.st_gid) == (65534, 4242)
    assert os.stat(src / "team" / "d").st_mode & stat.S_ISGID


def test_nothing_leaves_the_share(share: Share, tmp_path: Path) -> None:
    m, src = share.mnt, share.src
    (src / "etc").symlink_to("/etc")
    (m / "f").write_text("f")
    assert os.readlink(m / "etc") == "/etc"
    with pytest.raises(OSError) as e:
        os.rename(m / "f", tmp_path / "stolen")
    assert e.value.errno == errno.EXDEV
    with pytest.raises(OSError) as e:
        os.link(m / "f", tmp_path / "stolen")
    assert e.value.errno == errno.EXDEV


@pytest.mark.daemon_args("--cache", "never")
def test_cache_never_sees_host_changes(share: Share) -> None:
    (share.src / "f").write_text("first")
    assert (share.mnt / "f").read_text() == "first"
    (share.src / "f").write_text("second version")
    assert (share.mnt / "f").read_text() == "second version"
    (share.src / "new").write_text("n")
    assert "new" in os.listdir(share.mnt)
    os.unlink(share.src / "new")
    assert not (share.mnt / "new").exists()


@pytest.mark.daemon_args("--readonly")
def test_readonly(share: Share) -> None:
    (share.src / "f").write_text("ro")
    assert (share.mnt / "f").read_text() == "ro"
    for fn in (
        lambda: (share.mnt / "g").write_text("x"),
        lambda: os.mkdir(share.mnt / "d"),
        lambda: os.unlink(share.mnt / "f"),
        lambda: open(share.mnt / "f", "r+b"),  # noqa: SIM115
    ):
        with pytest.raises(OSError) as e:
            fn()
        assert e.value.errno == errno.EROFS


@pytest.mark.daemon_args("--writeback")
def test_writeback(share: Share) -> None:
    path = share.mnt / "wb"
    with open(path, "wb") as f:
        f.write(b"a" * 100000)
        f.flush()
        os.fsync(f.fileno())
        assert (share.src / "wb").stat().st_size == 100000
    with open(path, "ab") as f:
        f.write(b"tail")
    with open(path, "wb") as f:  # O_WRONLY, which writeback turns into O_RDWR on the host
        f.write(b"short")
    assert (share.src / "wb").read_bytes() == b"short"


@pytest.mark.daemon_args("--inode-file-handles", "mandatory")
def test_file_handles_keep_fds_flat(share: Share) -> None:
    for i in range(300):
        (share.src / f"f{i}").write_text(str(i))
    assert sum(1 for _ in os.scandir(share.mnt)) == 300
    for i in range(0, 300, 7):
        assert (share.mnt / f"f{i}").read_text() == str(i)
    fds = len(os.listdir(f"/proc/{share.proc.pid}/fd"))
    assert fds < 100


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_one_gib_file(share: Share, tmp_path: Path) -> None:
    source = tmp_path / "source"
    with open(source, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(1024):
            f.write(hashlib.sha256(block + bytes([i % 256, i // 256])).digest() * 32768)
    expected = sha256(source)
    sh(f"cp {source} {share.mnt}/big")
    assert sha256(share.src / "big") == expected
    sh("echo 3 > /proc/sys/vm/drop_caches || true")
    assert sha256(share.mnt / "big") == expected


@pytest.mark.daemon_args("--fuse-passthrough")
def test_fuse_passthrough_serves_data_in_the_kernel(share: Share) -> None:
    data = os.urandom(3 << 20)
    (share.mnt / "p").write_bytes(data)
    assert (share.mnt / "p").read_bytes() == data
    with open(share.mnt / "p", "r+b") as f:
        f.seek(1000)
        f.write(b"patched")
    assert (share.src / "p").read_bytes()[1000:1007] == b"patched"
    os.kill(share.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "requests served" not in share.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    counters = dict(
        kv.split("=")
        for kv in share.log_text().split("requests served: ")[-1].split()[:40]
        if "=" in kv
    )
    # the file's data never went through the daemon
    assert "READ" not in counters and "WRITE" not in counters, counters


@pytest.mark.daemon_args("--posix-acl", "--allow-other")
def test_posix_acls(share: Share) -> None:
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl not installed")
    d = share.mnt / "d"
    d.mkdir()
    sh(f"setfacl -m u:65534:rwx {d} && setfacl -d -m u:65534:r-x {d}")
    assert "user:65534:rwx" in sh(f"getfacl -pn {share.src}/d")
    (d / "f").write_text("x")
    assert "user:65534:r-x" in sh(f"getfacl -pn {share.src}/d/f")  # inherited default ACL
    sh(f"echo more >> {d}/added", user="65534")  # the ACL, not the mode, lets 65534 in
    assert (share.src / "d" / "added").stat().st_uid == 65534


def test_tmpfile_copy_file_range_fallocate(share: Share) -> None:
    fd = os.open(share.mnt, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, b"anonymous")
    # linkat(fd, "", ..., AT_EMPTY_PATH): the kernel refuses a /proc/self/fd path here
    assert _libc.linkat(fd, b"", -100, bytes(share.mnt / "named"), 0x1000) == 0
    os.close(fd)
    assert (share.src / "named").read_bytes() == b"anonymous"
    src = os.open(share.mnt / "named", os.O_RDONLY)
    dst = os.open(share.mnt / "copy", os.O_CREAT | os.O_WRONLY, 0o644)
    assert os.copy_file_range(src, dst, 9, 0, 100) == 9
    os.close(src)
    os.posix_fallocate(dst, 0, 1 << 20)
    os.close(dst)
    data = (share.src / "copy").read_bytes()
    assert len(data) == 1 << 20 and data[100:109] == b"anonymous"
    assert os.stat(share.src / "copy").st_blocks * 512 >= 1 << 20


# --- --xattrmap and --security-label ------------------------------------------------------------

#: The rules the research notes measured virtiofsd 1.14 with, through a guest.
MEASURED_RULES = (
    "/prefix/all/trusted./user.virtiofs./ /bad/server//trusted./ /bad/client/user.virtiofs.// "
    "/unsupported/all/user.nosup./user.nosup./ /ok/all///"
)


def xattr_errno(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.errno or 0


def listxattr_size(path: Path) -> int:
    """listxattr(path, NULL, 0): the size the file system says a list needs."""
    _libc.listxattr.restype = ctypes.c_ssize_t
    n = _libc.listxattr(bytes(path), None, ctypes.c_size_t(0))
    assert n >= 0, os.strerror(ctypes.get_errno())
    return int(n)


def getfattr(path: Path) -> dict[str, str]:
    """Every xattr a real tool sees (getfattr -d -m -), by name."""
    out = subprocess.run(
        ["getfattr", "--absolute-names", "-d", "-m", "-", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return dict(
        line.split("=", 1) for line in out.splitlines() if "=" in line and not line.startswith("#")
    )


@pytest.mark.daemon_args("--xattrmap", MEASURED_RULES)
def test_xattrmap_each_operation(share: Share) -> None:
    """Each xattr operation through the kernel, with the rules virtiofsd 1.14 was measured
    with (and the same results)."""
    h, host = share.mnt / "h", share.src / "h"
    host.write_text("x")
    for name, value in [
        ("trusted.hostonly", b"T"),
        ("user.plain", b"P"),
        ("user.nosup.h", b"N"),
        ("user.virtiofs.trusted.pre", b"V"),
    ]:
        os.setxattr(host, name, value)
    # listxattr: renamed back, hidden what the map hides; the size query is this list's.
    assert sorted(os.listxattr(h)) == ["trusted.pre", "user.plain"]
    assert listxattr_size(h) == len(b"trusted.pre\0user.plain\0")
    assert getfattr(h) == {"trusted.pre": '"V"', "user.plain": '"P"'}
    # setxattr, getxattr: the guest's name, stored under the host's.
    os.setxattr(h, "trusted.foo", b"F")
    assert os.getxattr(host, "user.virtiofs.trusted.foo") == b"F"
    assert os.getxattr(h, "trusted.foo") == b"F"
    assert os.getxattr(h, "trusted.pre") == b"V"
    subprocess.run(["setfattr", "-n", "trusted.tool", "-v", "by-setfattr", str(h)], check=True)
    assert os.getxattr(host, "user.virtiofs.trusted.tool") == b"by-setfattr"
    # A raw host trusted.* is looked up under the prefix: not there.
    assert xattr_errno(os.getxattr, h, "trusted.hostonly") == errno.ENODATA
    # bad: EPERM to set or remove, ENODATA to get (as virtiofsd)
    assert xattr_errno(os.setxattr, h, "user.virtiofs.x", b"X") == errno.EPERM
    assert xattr_errno(os.getxattr, h, "user.virtiofs.trusted.pre") == errno.ENODATA
    assert xattr_errno(os.removexattr, h, "user.virtiofs.trusted.pre") == errno.EPERM
    # unsupported: ENOTSUP whatever the operation
    assert xattr_errno(os.setxattr, h, "user.nosup.a", b"A") == errno.EOPNOTSUPP
    assert xattr_errno(os.getxattr, h, "user.nosup.h") == errno.EOPNOTSUPP
    assert xattr_errno(os.removexattr, h, "user.nosup.h") == errno.EOPNOTSUPP
    os.setxattr(h, "user.other", b"O")
    assert os.getxattr(host, "user.other") == b"O"
    # removexattr: of the host's name
    os.removexattr(h, "trusted.pre")
    assert "user.virtiofs.trusted.pre" not in os.listxattr(host)
    assert sorted(os.listxattr(h)) == ["trusted.foo", "trusted.tool", "user.other", "user.plain"]
    assert sorted(os.listxattr(host)) == [
        "trusted.hostonly",
        "user.nosup.h",
        "user.other",
        "user.plain",
        "user.virtiofs.trusted.foo",
        "user.virtiofs.trusted.tool",
    ]


@pytest.mark.daemon_args("--xattrmap", ":map:security.selinux:trusted.virtiofs.:")
def test_xattrmap_selinux_rules(share: Share) -> None:
    """virtiofsd's rules for SELinux guests: the guest's security.selinux is the host's
    trusted.virtiofs.security.selinux; the host's own label is out of the guest's reach."""
    f, host = share.mnt / "f", share.src / "f"
    f.write_text("x")
    os.setxattr(host, "security.selinux", b"host_label")
    os.setxattr(host, "user.shared", b"u")
    assert getfattr(f) == {"user.shared": '"u"'}
    subprocess.run(["setfattr", "-n", "security.selinux", "-v", "guest_label", str(f)], check=True)
    assert os.getxattr(host, "trusted.virtiofs.security.selinux") == b"guest_label"
    assert os.getxattr(host, "security.selinux") == b"host_label"
    assert getfattr(f) == {"security.selinux": '"guest_label"', "user.shared": '"u"'}
    assert xattr_errno(os.setxattr, f, "trusted.virtiofs.security.selinux", b"x") == errno.EPERM


@pytest.mark.daemon_args("--xattrmap", ":map::user.virtiofs.:")
def test_xattrmap_everything_under_a_user_prefix(share: Share) -> None:
    """virtiofsd's rules for an unprivileged daemon: every guest xattr under user.virtiofs.,
    security.* included; unprefixed host xattrs hidden; file capabilities stripped on write
    under their renamed name."""
    f, host = share.mnt / "f", share.src / "f"
    f.write_text("x")
    os.setxattr(host, "user.raw", b"hidden")
    assert os.listxattr(f) == []
    os.setxattr(f, "security.selinux", b"guest_label")
    os.setxattr(f, "user.mine", b"m")
    assert sorted(os.listxattr(host)) == [
        "user.raw",
        "user.virtiofs.security.selinux",
        "user.virtiofs.user.mine",
    ]
    assert sorted(os.listxattr(f)) == ["security.selinux", "user.mine"]
    assert listxattr_size(f) == len(b"security.selinux\0user.mine\0")
    subprocess.run(["setcap", "cap_net_bind_service=ep", str(f)], check=True)
    assert "user.virtiofs.security.capability" in os.listxattr(host)
    assert (
        "cap_net_bind_service"
        in subprocess.run(["getcap", str(f)], capture_output=True, text=True, check=True).stdout
    )
    with open(f, "a") as out:
        out.write("more")
    assert "user.virtiofs.security.capability" not in os.listxattr(host)


@pytest.mark.daemon_args(
    "--security-label", "--xattrmap", ":map:security.selinux:trusted.virtiofs.:"
)
def test_security_label_with_a_kernel_that_sends_no_context(share: Share) -> None:
    """This host's kernel has no security module: it agrees to FUSE_SECURITY_CTX (so
    --security-label=always mounts) and sends every create without a context."""
    m = share.mnt
    (m / "f").write_text("x")
    os.mkdir(m / "d")
    os.symlink("f", m / "l")
    os.mkfifo(m / "p")
    os.mknod(m / "s", stat.S_IFSOCK | 0o600)
    fd = os.open(m, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.close(fd)
    assert sorted(os.listdir(share.src)) == ["d", "f", "l", "p", "s"]
    for name in ("d", "f", "l", "p", "s"):
        assert os.listxattr(share.src / name, follow_symlinks=False) == []
    agreed = re.search(r"FUSE session 7\.\d+, flags (0x[0-9a-f]+)", share.log_text())
    assert agreed and int(agreed.group(1), 16) & abi.InitFlag.SECURITY_CTX
