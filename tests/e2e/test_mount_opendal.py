"""The object-storage backend mounted through the real kernel (/dev/fuse), on the memory, fs and
s3 (a real moto_server process) services, driven by real programs; what lands in the store is
checked without the daemon (boto3 for s3, the directory for fs)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("opendal")

from tests.e2e.workloads import many_processes
from tests.opendal_fixtures import MountStore, Service


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sh(script: str, cwd: Path) -> str:
    r = subprocess.run(["sh", "-euc", script], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def check_store(service: Service, expected: dict[str, bytes]) -> None:
    """The store holds exactly ``expected`` (as objects; directory markers aside)."""
    view = service.view
    if not view.independent:
        return
    assert view.files() == set(expected), sorted(view.files() ^ set(expected))
    for key, data in expected.items():
        got = view.get(key)
        assert got == data, f"{key}: {len(got)} bytes in the store, {len(data)} expected"


def test_write_read_sizes(service: Service, mount_store: MountStore) -> None:
    sizes = [0, 1, 4095, 4096, 65537, 1 << 20, 3 * (1 << 20) + 5]
    files = {f"f{n}": blob(n, n) for n in sizes}
    with mount_store(service) as m:
        for name, data in files.items():
            (m.mnt / name).write_bytes(data)
        for name, data in files.items():
            assert (m.mnt / name).read_bytes() == data
            assert (m.mnt / name).stat().st_size == len(data)
        check_store(service, files)
    if service.view.independent:
        # A new daemon, a cold cache: everything comes from the store.
        with mount_store(service) as m:
            for name, data in files.items():
                assert (m.mnt / name).read_bytes() == data


def test_big_file_multipart(service: Service, mount_store: MountStore) -> None:
    data = blob(21 << 20, 7)
    with mount_store(service) as m:
        with open(m.mnt / "big", "wb") as f:
            for i in range(0, len(data), 1 << 20):
                f.write(data[i : i + (1 << 20)])
        check_store(service, {"big": data})
        with open(m.mnt / "big", "rb") as f:
            f.seek(13 << 20)
            assert f.read(4096) == data[13 << 20 : (13 << 20) + 4096]
        assert (
            hashlib.sha256((m.mnt / "big").read_bytes()).digest() == hashlib.sha256(data).digest()
        )


def test_overwrite_append_truncate(service: Service, mount_store: MountStore) -> None:
    size = 3 * (1 << 20) + 123
    model = bytearray(blob(size, 1))
    with mount_store(service) as m:
        p = m.mnt / "f"
        p.write_bytes(model)
        # Overwrite in the middle.
        with open(p, "r+b") as f:
            f.seek(1_500_000)
            f.write(b"M" * 1000)
        model[1_500_000:1_501_000] = b"M" * 1000
        check_store(service, {"f": bytes(model)})
        assert p.read_bytes() == model
        # Append, twice, through O_APPEND.
        with open(p, "ab") as f:
            f.write(b"tail-1")
            f.write(b"tail-2")
        model += b"tail-1tail-2"
        assert p.read_bytes() == model
        check_store(service, {"f": bytes(model)})
        # Shrink, then extend: the extension reads as zeros, not as the old bytes.
        os.truncate(p, 1000)
        del model[1000:]
        assert p.stat().st_size == 1000
        os.truncate(p, 5000)
        model += b"\0" * 4000
        assert p.read_bytes() == model
        check_store(service, {"f": bytes(model)})
        # O_TRUNC.
        with open(p, "wb") as f:
            f.write(b"short")
        model = bytearray(b"short")
        assert p.read_bytes() == model
        check_store(service, {"f": b"short"})


def test_random_writes_against_a_model(service: Service, mount_store: MountStore) -> None:
    rng = random.Random(42)
    model = bytearray(blob(2 << 20, 2))
    with mount_store(service) as m:
        p = m.mnt / "r"
        p.write_bytes(model)
    if not service.view.independent:
        pytest.skip("the memory service's data does not outlive its daemon")
    # A new daemon: the writes land on a file none of whose ranges are cached yet.
    with mount_store(service) as m:
        p = m.mnt / "r"
        fd = os.open(p, os.O_RDWR)
        try:
            for _ in range(300):
                off = rng.randrange(0, len(model) + 200_000)
                data = rng.randbytes(rng.randrange(1, 70_000))
                os.pwrite(fd, data, off)
                if off > len(model):
                    model += b"\0" * (off - len(model))
                model[off : off + len(data)] = data
                if rng.random() < 0.2:
                    roff = rng.randrange(0, len(model))
                    assert os.pread(fd, 50_000, roff) == model[roff : roff + 50_000]
            os.fsync(fd)
            check_store(service, {"r": bytes(model)})
        finally:
            os.close(fd)
        assert p.read_bytes() == model


def test_directories_and_2000_entries(service: Service, mount_store: MountStore) -> None:
    with mount_store(service) as m:
        d = m.mnt / "many"
        d.mkdir()
        names = {f"entry-{i:04d}" for i in range(2000)}
        for name in names:
            (d / name).write_bytes(name.encode())
        (d / "sub").mkdir()
        assert set(os.listdir(d)) == names | {"sub"}
        # ls -l stats every entry; find walks and stats too.
        lines = sh("ls -l many | tail -n +2", m.mnt).splitlines()
        assert len(lines) == 2001
        assert sum(1 for line in lines if line.startswith("-")) == 2000
        found = sh("find many -type f | wc -l", m.mnt).strip()
        assert found == "2000"
        assert (d / "entry-1234").read_bytes() == b"entry-1234"
        assert stat.S_ISDIR((d / "sub").stat().st_mode)
        expected = {f"many/{n}": n.encode() for n in names}
        check_store(service, expected)
        # Remove them all: the directory stays (it has a marker), empty, then goes.
        sh("rm many/entry-*", m.mnt)
        assert os.listdir(d) == ["sub"]
        with pytest.raises(OSError) as e:
            d.rmdir()
        assert e.value.errno == errno.ENOTEMPTY
        (d / "sub").rmdir()
        assert os.listdir(d) == []
        d.rmdir()
        assert not d.exists()
        check_store(service, {})
        if service.view.independent:
            assert service.view.names() == set()


def test_rename(service: Service, mount_store: MountStore) -> None:
    with mount_store(service) as m:
        mnt = m.mnt
        (mnt / "a").write_bytes(b"A" * 100)
        (mnt / "b").write_bytes(b"B")
        os.rename(mnt / "a", mnt / "c")
        assert not (mnt / "a").exists()
        assert (mnt / "c").read_bytes() == b"A" * 100
        # Over an existing file.
        os.rename(mnt / "c", mnt / "b")
        assert (mnt / "b").read_bytes() == b"A" * 100
        assert sorted(os.listdir(mnt)) == ["b"]
        # A directory with a tree under it.
        sh("mkdir -p t/x/y && echo 1 > t/one && echo 2 > t/x/two && echo 3 > t/x/y/three", mnt)
        os.mkdir(mnt / "t" / "empty")
        os.rename(mnt / "t", mnt / "u")
        assert not (mnt / "t").exists()
        assert sh("find u | sort", mnt).split() == [
            "u",
            "u/empty",
            "u/one",
            "u/x",
            "u/x/two",
            "u/x/y",
            "u/x/y/three",
        ]
        assert (mnt / "u/x/y/three").read_text() == "3\n"
        # A file being written, renamed before it is closed: it lands under the new name only.
        f = open(mnt / "u" / "open", "wb")  # noqa: SIM115
        f.write(b"written before the rename")
        f.flush()
        os.rename(mnt / "u" / "open", mnt / "moved")
        f.write(b", and after")
        f.close()
        assert (mnt / "moved").read_bytes() == b"written before the rename, and after"
        # Into a non-empty directory: refused.
        os.mkdir(mnt / "full")
        (mnt / "full" / "x").write_bytes(b"")
        os.mkdir(mnt / "src")
        with pytest.raises(OSError) as e:
            os.rename(mnt / "src", mnt / "full")
        assert e.value.errno == errno.ENOTEMPTY
        # A file over a directory, a directory over a file.
        with pytest.raises(OSError) as e:
            os.rename(mnt / "b", mnt / "src")
        assert e.value.errno == errno.EISDIR
        with pytest.raises(OSError) as e:
            os.rename(mnt / "src", mnt / "b")
        assert e.value.errno == errno.ENOTDIR
        check_store(
            service,
            {
                "b": b"A" * 100,
                "u/one": b"1\n",
                "u/x/two": b"2\n",
                "u/x/y/three": b"3\n",
                "moved": b"written before the rename, and after",
                "full/x": b"",
            },
        )


def test_unlink_rmdir_and_open_unlinked(service: Service, mount_store: MountStore) -> None:
    with mount_store(service) as m:
        mnt = m.mnt
        data = blob(3 << 20, 3)
        (mnt / "gone").write_bytes(data)
        fd = os.open(mnt / "gone", os.O_RDONLY)
        try:
            os.unlink(mnt / "gone")
            assert not (mnt / "gone").exists()
            # Still readable through the open file, all of it.
            assert os.pread(fd, len(data) + 10, 0) == data
        finally:
            os.close(fd)
        with pytest.raises(FileNotFoundError):
            os.unlink(mnt / "gone")
        os.mkdir(mnt / "d")
        with pytest.raises(OSError) as e:
            os.unlink(mnt / "d")
        assert e.value.errno in (errno.EISDIR, errno.EPERM)
        (mnt / "d" / "f").write_bytes(b"x")
        with pytest.raises(OSError) as e:
            os.rmdir(mnt / "d")
        assert e.value.errno == errno.ENOTEMPTY
        with pytest.raises(NotADirectoryError):
            os.rmdir(mnt / "d" / "f")
        os.unlink(mnt / "d" / "f")
        os.rmdir(mnt / "d")
        assert os.listdir(mnt) == []
        check_store(service, {})


def test_implicit_directories(service: Service, mount_store: MountStore) -> None:
    """Directories that exist only as the prefix of their objects (written by another client
    of the store) are seen, and survive the removal of their last entry."""
    if not service.view.independent:
        pytest.skip("needs another client of the store")
    service.view.put("imp/deep/x", b"x")
    service.view.put("imp/y", b"yy")
    with mount_store(service) as m:
        mnt = m.mnt
        assert sorted(os.listdir(mnt / "imp")) == ["deep", "y"]
        assert stat.S_ISDIR((mnt / "imp" / "deep").stat().st_mode)
        assert (mnt / "imp" / "deep" / "x").read_bytes() == b"x"
        os.unlink(mnt / "imp" / "deep" / "x")
        assert os.listdir(mnt / "imp" / "deep") == []
        assert sorted(os.listdir(mnt / "imp")) == ["deep", "y"]
        os.rmdir(mnt / "imp" / "deep")
        assert os.listdir(mnt / "imp") == ["y"]


def test_attributes(service: Service, mount_store: MountStore) -> None:
    with mount_store(service) as m:
        p = m.mnt / "f"
        p.write_bytes(b"data")
        os.chmod(p, 0o640)
        os.chown(p, 1234, 5678)
        os.utime(p, ns=(1_000_000_123, 2_000_000_456))
        st = p.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
        assert p.read_bytes() == b"data"
        os.mkdir(m.mnt / "d", 0o700)
        os.chmod(m.mnt / "d", 0o751)
        assert stat.S_IMODE((m.mnt / "d").stat().st_mode) == 0o751
        # Through an open file: the change goes up with the data at close.
        with open(m.mnt / "g", "wb") as f:
            f.write(b"g")
            f.flush()
            os.fchmod(f.fileno(), 0o600)
            os.utime(f.fileno(), ns=(5_000_000_000, 6_000_000_000))
        st = (m.mnt / "g").stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_mtime_ns == 6_000_000_000
        if service.scheme == "s3":
            md = service.view.metadata("f")
            assert int(md["mode"]) == stat.S_IFREG | 0o640
            assert (md["uid"], md["gid"]) == ("1234", "5678")
            assert md["mtime"] == "2.000000456"
    if service.view.independent:
        # User metadata travels with the object: a new daemon sees the same attributes.
        with mount_store(service) as m:
            st = (m.mnt / "f").stat()
            assert stat.S_IMODE(st.st_mode) == 0o640
            assert (st.st_uid, st.st_gid) == (1234, 5678)
            assert st.st_mtime_ns == 2_000_000_456
            assert stat.S_IMODE((m.mnt / "g").stat().st_mode) == 0o600


def test_links(service: Service, mount_store: MountStore) -> None:
    with mount_store(service) as m:
        (m.mnt / "target").write_bytes(b"t")
        os.symlink("target", m.mnt / "s")
        assert os.readlink(m.mnt / "s") == "target"
        assert stat.S_ISLNK(os.lstat(m.mnt / "s").st_mode)
        assert (m.mnt / "s").read_bytes() == b"t"
        with pytest.raises(PermissionError):
            os.link(m.mnt / "target", m.mnt / "h")
        with pytest.raises(PermissionError):
            os.mkfifo(m.mnt / "fifo")
    if service.view.independent:
        with mount_store(service) as m:
            assert os.readlink(m.mnt / "s") == "target"
            assert stat.S_ISLNK(os.lstat(m.mnt / "s").st_mode)
            assert sorted(os.listdir(m.mnt)) == ["s", "target"]


def test_changes_by_other_clients(service: Service, mount_store: MountStore) -> None:
    """With --cache auto (1 s), a change made in the store by someone else shows within a
    second or so, also for a file whose data is cached locally."""
    if not service.view.independent:
        pytest.skip("needs another client of the store")
    service.view.put("ext", b"first version")
    with mount_store(service) as m:
        p = m.mnt / "ext"
        assert p.read_bytes() == b"first version"
        service.view.put("ext", b"the second version")
        service.view.put("new", b"new")
        time.sleep(1.5)
        assert p.read_bytes() == b"the second version"
        assert (m.mnt / "new").read_bytes() == b"new"


def test_many_processes_at_once(service: Service, mount_store: MountStore) -> None:
    with mount_store(service) as m:
        many_processes(m.mnt, processes=6, files=25, scale=40)
        for n in range(6):
            assert len(os.listdir(m.mnt / f"p{n}")) == 25
        if service.view.independent:
            assert len(service.view.files()) == 150


def test_tar_round_trip(service: Service, mount_store: MountStore, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    rng = random.Random(5)
    for i in range(120):
        d = origin / f"d{i % 7}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(rng.randbytes(i * 997 % 300_000))
    (origin / "d0" / "sym").symlink_to("f7")
    with mount_store(service) as m:
        sh(f"tar -C {origin} -cf - . | tar -C {m.mnt} -xf -", m.mnt)
        listing = "find . \\( -type d -printf '%p d\\n' \\) -o -printf '%p %s %y\\n' | sort"
        assert sh(listing, m.mnt) == sh(listing, origin)
        sums = "find . -type f -exec sha256sum {} + | sort"
        assert sh(sums, m.mnt) == sh(sums, origin)


def test_sigkill_after_fsync(service: Service, mount_store: MountStore) -> None:
    """What fsync acknowledged is in the store, whatever happens to the daemon right after."""
    if not service.view.independent:
        pytest.skip("the memory service's data dies with its daemon")
    big = blob(5 << 20, 9)
    with mount_store(service) as m:
        (m.mnt / "base").write_bytes(big)
    with mount_store(service) as m:
        fd = os.open(m.mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"acknowledged")
        os.fsync(fd)
        fd2 = os.open(m.mnt / "base", os.O_RDWR)
        os.pwrite(fd2, b"patched", 4_000_000)
        os.fsync(fd2)
        m.kill()
        for f in (fd, fd2):
            try:
                os.close(f)
            except OSError:
                pass
    expected = bytearray(big)
    expected[4_000_000:4_000_007] = b"patched"
    assert service.view.get("new") == b"acknowledged"
    assert service.view.get("base") == expected


def test_cache_size_bound(service: Service, mount_store: MountStore) -> None:
    data = blob(24 << 20, 11)
    digest = hashlib.sha256(data).hexdigest()
    with mount_store(service, "--opendal-cache-size", "4M") as m:
        (m.mnt / "big").write_bytes(data)
        for _ in range(2):
            assert hashlib.sha256((m.mnt / "big").read_bytes()).hexdigest() == digest
        (m.mnt / "small").write_bytes(b"s" * 100_000)
        assert (m.mnt / "small").read_bytes() == b"s" * 100_000
        used = int(sh(f"du -s --block-size=1 {m.cache_dir}", m.mnt).split()[0])
        # The bound, plus what one sequential reader keeps ahead and behind it.
        assert used <= (4 << 20) + (20 << 20), used


@pytest.mark.parametrize("flag", ["--readonly"])
def test_readonly(service: Service, mount_store: MountStore, flag: str) -> None:
    if service.view.independent:
        service.view.put("ro", b"read only")
    with mount_store(service, flag) as m:
        if service.view.independent:
            assert (m.mnt / "ro").read_bytes() == b"read only"
        with pytest.raises(OSError) as e:
            (m.mnt / "x").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.mkdir(m.mnt / "d")
        assert e.value.errno == errno.EROFS
