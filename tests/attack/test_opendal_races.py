"""Interleavings of FUSE requests that once lost fsync-acknowledged data or let a name hold
what POSIX says it can't, each forced deterministically: a store call is held at a gate (on the
real Operator of memory, fs, or s3 against moto_server) while the racing request runs, and let go
once that request has either gone through or is seen waiting for the first one.

What the store holds afterwards is read without the daemon (boto3, the directory, the raw
memory Operator)."""

from __future__ import annotations

import errno
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opendal")

from pyvirtiofsd.backends.opendal.staging import Blob
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.buffers import ReplyWriter
from pyvirtiofsd.fuse.filesystem import ROOT, Context
from pyvirtiofsd.fuse.policy import CachePolicy
from tests.attack.opendal_direct import Direct, serve, wait_until
from tests.opendal_fixtures import NoView, Service

CTX = Context(uid=0, gid=0, pid=1)
NO_IF_NOT_EXISTS = {"write_with_if_not_exists": False}
NO_EMPTY_WRITES = {"write_with_if_not_exists": False, "write_can_empty": False}


class Racer(threading.Thread):
    """Runs one request in its own thread, keeping its result or its OSError."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # handed to the test
            self.error = e

    def value(self) -> Any:
        self.join(60)
        assert not self.is_alive(), "request did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def went_through_or_waits(d: Direct, racer: Racer, path: str, gate: Any = None, n: int = 1):
    """The racing request has finished, reached the held store call too (``gate`` holds ``n``
    of them), or waits for the name lock of ``path``: either way it can't get further until
    the gate opens."""

    def cond() -> bool:
        if not racer.is_alive() or d.lock_waiters(path) > 0:
            return True
        return gate is not None and gate.arrivals >= n

    return cond


def cache(tmp: Path) -> Path:
    return tmp / "cache"


# --- 8: blob creation is atomic per object ----------------------------------------------------


def _other_open(d: Direct, ino: int) -> Callable[[], Any]:
    c = d.client_for()
    return lambda: c.open(ino, os.O_RDWR).fh


def _other_truncate(d: Direct, ino: int) -> Callable[[], Any]:
    c = d.client_for()
    return lambda: c.setattr(ino, valid=abi.FATTR_SIZE, size=5)


def _other_dax(d: Direct, ino: int) -> Callable[[], Any]:
    def run() -> None:
        os.close(d.fs.dax_fd(ino, None, 0, 4096, False))

    return run


@pytest.mark.parametrize("other", ["open", "truncate", "dax"])
def test_concurrent_blob_creation_keeps_fsynced_data(
    service: Service, work: Path, other: str
) -> None:
    """Finding 8: a second OPEN (or a truncate by path, or a DAX mapping) of a file with no
    local copy made a second copy and cut the first one off: writes through the first handle
    were acknowledged by fsync and never uploaded."""
    with serve(service, cache(work), cache=CachePolicy.NEVER) as d:
        d.view.put("f", b"0123456789")
        c = d.client
        ino = c.lookup(ROOT, b"f").nodeid
        gate = d.op.gate("stat", "f", after=True)
        first = Racer(lambda: d.client_for().open(ino, os.O_RDWR).fh)
        wait_until(lambda: gate.arrivals >= 1, "the first open at the store")
        make = {"open": _other_open, "truncate": _other_truncate, "dax": _other_dax}[other]
        second = Racer(make(d, ino))
        wait_until(went_through_or_waits(d, second, "f", gate, 2), "the second request")
        if gate.arrivals >= 2:
            # Not kept out: let the second request on to the store call it makes right before
            # its copy (a truncate by path asks twice).
            for i in range(1, {"open": 1, "truncate": 2, "dax": 1}[other]):
                gate.release(i)
                wait_until(lambda i=i: gate.arrivals >= i + 2 or not second.is_alive())
        # The first goes on alone: its copy is made before the second request's.
        gate.release(0)
        fh = first.value()
        gate.open()
        fh2 = second.value()
        c.write(ino, fh, 0, b"AB")
        c.fsync(ino, fh)
        expected = b"AB234" if other == "truncate" else b"AB23456789"
        assert d.store("f") == expected
        c.release(ino, fh)
        if other == "open":
            c.release(ino, fh2)
        assert d.store("f") == expected
        assert c.read(ino, c.open(ino).fh, 0, 100) == expected


# --- 9: ranges being read are pinned -----------------------------------------------------------


class PausingOut:
    """A READ reply buffer that stops before the file data is copied into it, until let go."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size + ReplyWriter.HEADER)
        self.writer = ReplyWriter([memoryview(self.buf)])
        self.arrived = threading.Event()
        self.go = threading.Event()

    def read_from_fd(self, fd: int, offset: int, n: int) -> Any:
        self.arrived.set()
        self.go.wait(60)
        return self.writer.read_from_fd(fd, offset, n)

    def data(self) -> bytes:
        return bytes(self.buf[ReplyWriter.HEADER : self.writer.length])


def test_read_range_is_pinned_against_eviction(work: Path) -> None:
    """Finding 9: another reader's fetch trimmed the cache (file larger than the cache) between
    a read's fetch and its copy out of the local file: the read returned zeros."""
    data = random.Random(9).randbytes(24 << 20)
    service = Service("memory", {}, NoView())
    with serve(service, cache(work), cache_size=2 << 20) as d:
        d.view.put("big", data)
        fs = d.fs
        e = fs.lookup(CTX, ROOT, b"big")
        fh = fs.open(CTX, e.ino, os.O_RDONLY, False).fh

        def read(offset: int, out: Any) -> bytes:
            fs.read(CTX, e.ino, fh, offset, 4096, out)
            return out.data()

        paused = PausingOut(4096)
        first = Racer(lambda: read(0, paused))
        assert paused.arrived.wait(60)
        # Two more readers far ahead: their fetches push the cache over its bound.
        for off in (20 << 20, 16 << 20):
            out = PausingOut(4096)
            out.go.set()
            assert read(off, out) == data[off : off + 4096]
        paused.go.set()
        assert first.value() == data[:4096]
        fs.release(CTX, e.ino, fh, 0, 0, True, False)


# --- 10: CREATE never replaces an object it has not checked ------------------------------------


@pytest.mark.parametrize(
    "caps", [None, NO_IF_NOT_EXISTS, NO_EMPTY_WRITES], ids=["cond", "stat", "noempty"]
)
def test_create_over_a_stale_negative_entry_keeps_the_object(
    service: Service, work: Path, caps: dict[str, Any] | None
) -> None:
    """Finding 10: CREATE without O_EXCL of a name the kernel believed absent (another client
    made it since) replaced the object: O_CREAT|O_APPEND left only the appended bytes."""
    with serve(service, cache(work), caps) as d:
        c = d.client
        d.view.put("f", b"theirs\n")
        entry, opened = c.create(ROOT, b"f", flags=os.O_WRONLY | os.O_APPEND)
        c.write(entry.nodeid, opened.fh, 0, b"mine\n")
        c.flush(entry.nodeid, opened.fh)
        assert d.store("f") == b"theirs\nmine\n"
        c.release(entry.nodeid, opened.fh)
        assert d.store("f") == b"theirs\nmine\n"
        d.view.put("g", b"theirs")
        with pytest.raises(OSError) as err:
            c.create(ROOT, b"g", flags=os.O_WRONLY | os.O_EXCL)
        assert err.value.errno == errno.EEXIST
        d.view.put("h", b"theirs")
        with pytest.raises(OSError) as err:
            c.mknod(ROOT, b"h", 0o100644)
        assert err.value.errno == errno.EEXIST
        with pytest.raises(OSError) as err:
            c.symlink(ROOT, b"h", b"target")
        assert err.value.errno == errno.EEXIST
        assert d.store("g") == b"theirs" and d.store("h") == b"theirs"
        # A name nobody has: created, and in the store as soon as it is committed.
        entry, opened = c.create(ROOT, b"new", flags=os.O_WRONLY)
        c.write(entry.nodeid, opened.fh, 0, b"fresh")
        c.release(entry.nodeid, opened.fh)
        assert d.store("new") == b"fresh"


# --- 11: what a name holds follows POSIX -------------------------------------------------------


@pytest.mark.parametrize("caps", [None, NO_EMPTY_WRITES], ids=["default", "noempty"])
def test_rename_unuploaded_over_object_then_unlink(
    service: Service, work: Path, caps: dict[str, Any] | None
) -> None:
    """Finding 11: a file not yet uploaded renamed over an object, then unlinked: the old
    object came back."""
    with serve(service, cache(work), caps) as d:
        c = d.client
        d.view.put("b", b"old")
        entry, opened = c.create(ROOT, b"a", flags=os.O_WRONLY)
        c.write(entry.nodeid, opened.fh, 0, b"new")
        c.rename(ROOT, b"a", ROOT, b"b")
        c.unlink(ROOT, b"b")
        assert not d.exists("b") and not d.exists("a")
        c.fsync(entry.nodeid, opened.fh)
        c.release(entry.nodeid, opened.fh)
        assert d.view.files() == set()


def test_open_racing_unlink(service: Service, work: Path) -> None:
    """Finding 11: an OPEN that had asked the store before an UNLINK of the name made its
    local copy after it, at the unlinked name: its fsync brought the deleted object back, and a
    later CREATE of the name opened that leftover copy."""
    with serve(service, cache(work), cache=CachePolicy.NEVER) as d:
        c = d.client
        d.view.put("f", b"0123456789")
        ino = c.lookup(ROOT, b"f").nodeid
        gate = d.op.gate("stat", "f", after=True, limit=1)
        opener = Racer(lambda: d.client_for().open(ino, os.O_RDWR | os.O_TRUNC).fh)
        wait_until(lambda: gate.arrivals >= 1, "the open at the store")
        c2 = d.client_for()
        unlinker = Racer(lambda: c2.unlink(ROOT, b"f"))
        wait_until(went_through_or_waits(d, unlinker, "f"), "the unlink")
        gate.open()
        fh = opener.value()
        unlinker.value()
        c.write(ino, fh, 0, b"AB")
        c.fsync(ino, fh)
        assert not d.exists("f")
        # The unlinked file is still open: it reads what it holds.
        assert c.read(ino, fh, 0, 100) == b"AB"
        entry, opened = c.create(ROOT, b"f", flags=os.O_RDWR)
        assert c.read(entry.nodeid, opened.fh, 0, 100) == b""
        c.release(ino, fh)
        c.release(entry.nodeid, opened.fh)
        assert d.store("f") == b""


def test_open_racing_rename(service: Service, work: Path) -> None:
    """Finding 11: an OPEN racing a RENAME of its file made its local copy at the old name:
    its fsync put an object at the name the file had been renamed away from."""
    with serve(service, cache(work), cache=CachePolicy.NEVER) as d:
        c = d.client
        d.view.put("f", b"0123456789")
        ino = c.lookup(ROOT, b"f").nodeid
        gate = d.op.gate("stat", "f", after=True, limit=1)
        opener = Racer(lambda: d.client_for().open(ino, os.O_RDWR | os.O_TRUNC).fh)
        wait_until(lambda: gate.arrivals >= 1, "the open at the store")
        c2 = d.client_for()
        renamer = Racer(lambda: c2.rename(ROOT, b"f", ROOT, b"g"))
        wait_until(went_through_or_waits(d, renamer, "f"), "the rename")
        gate.open()
        fh = opener.value()
        renamer.value()
        c.write(ino, fh, 0, b"AB")
        c.fsync(ino, fh)
        c.release(ino, fh)
        assert d.view.files() == {"g"}
        assert d.store("g") == b"AB"


def test_lookup_racing_unlink(service: Service, work: Path) -> None:
    """Finding 11: a LOOKUP answered by the store before an UNLINK bound its inode after it:
    the name lived on here, and a write through it brought the deleted object back."""
    with serve(service, cache(work)) as d:
        c = d.client
        d.view.put("f", b"0123456789")
        gate = d.op.gate("stat", "f", after=True, limit=1)
        looker = Racer(lambda: d.client_for().lookup(ROOT, b"f").nodeid)
        wait_until(lambda: gate.arrivals >= 1, "the lookup at the store")
        c2 = d.client_for()
        unlinker = Racer(lambda: c2.unlink(ROOT, b"f"))
        wait_until(went_through_or_waits(d, unlinker, "f"), "the unlink")
        gate.open()
        ino = looker.value()
        unlinker.value()
        try:
            fh = c.open(ino, os.O_WRONLY | os.O_TRUNC).fh
        except OSError as e:
            assert e.errno == errno.ENOENT
        else:
            c.write(ino, fh, 0, b"resurrected")
            c.fsync(ino, fh)
            c.release(ino, fh)
        assert not d.exists("f")
        # Gone here too (a negative entry: the cache timeout is not 0).
        assert c.lookup(ROOT, b"f").nodeid == 0


# --- file handles are reference counted --------------------------------------------------------


def test_release_waits_for_a_read_on_the_same_handle(work: Path) -> None:
    """RELEASE of a handle with a READ in flight on it closed the local file under the read
    (an unlinked file's copy goes with its last handle): the read failed or read another
    file's descriptor."""
    service = Service("memory", {}, NoView())
    data = random.Random(4).randbytes(100_000)
    with serve(service, cache(work)) as d:
        d.view.put("f", data)
        fs = d.fs
        e = fs.lookup(CTX, ROOT, b"f")
        fh = fs.open(CTX, e.ino, os.O_RDONLY, False).fh
        assert len(bytes(d.client.read(e.ino, fh, 0, 10))) == 10
        fs.unlink(CTX, ROOT, b"f")
        out = PausingOut(4096)
        reader = Racer(lambda: (fs.read(CTX, e.ino, fh, 50_000, 4096, out), out.data())[1])
        assert out.arrived.wait(60)
        releaser = Racer(lambda: fs.release(CTX, e.ino, fh, 0, 0, True, False))
        # Out of the table: the release is waiting for the read, or (the bug) past it.
        wait_until(lambda: not releaser.is_alive() or fh not in fs._handles, "the release")
        # Whatever the release closed, a new file may now get its descriptor number.
        other = os.open(work / "decoy", os.O_RDWR | os.O_CREAT, 0o600)
        os.write(other, b"\xee" * 100_000)
        out.go.set()
        try:
            assert reader.value() == data[50_000:54_096]
        finally:
            os.close(other)
        releaser.value()


# --- found by the model-based test (test_opendal_model.py), kept as plain regressions ----------


def waits_in(thread: threading.Thread, function: str) -> bool:
    """``thread`` is blocked on a lock taken in ``function`` (its innermost Python frame)."""
    frame = sys._current_frames().get(thread.ident or -1)
    return frame is not None and frame.f_code.co_name == function


def test_commit_forgets_the_old_version(service: Service, work: Path) -> None:
    """After a commit the inode kept the version the file had before it: the next open saw a
    "changed" object, made a fresh copy, and cut off the handles of the one in use (a truncate
    through one of them was lost)."""
    with serve(service, cache(work)) as d:
        c = d.client
        d.view.put("b", b"\x00")
        ino = c.lookup(ROOT, b"b").nodeid
        first = c.open(ino, os.O_RDWR).fh
        reader = c.open(ino, os.O_RDONLY).fh
        c.release(ino, first)
        c.setattr(ino, valid=abi.FATTR_SIZE, size=0)
        again = c.open(ino, os.O_RDWR).fh
        c.setattr(ino, valid=abi.FATTR_SIZE | abi.FATTR_FH, fh=reader, size=1)
        assert c.getattr(ino).size == 1
        assert c.read(ino, again, 0, 10) == b"\x00"
        c.release(ino, again)
        c.release(ino, reader)
        assert d.store("b") == b"\x00"


def test_rename_over_an_open_file_keeps_it_readable(service: Service, work: Path) -> None:
    """A file renamed over while open (and never read) lost its data with its object: reads
    through its handle failed with ESTALE, as unlink had long been careful to avoid."""
    with serve(service, cache(work)) as d:
        c = d.client
        d.view.put("b", b"old b")
        d.view.put("c", b"new c")
        ino = c.lookup(ROOT, b"b").nodeid
        fh = c.open(ino).fh
        c.rename(ROOT, b"c", ROOT, b"b")
        assert c.read(ino, fh, 0, 100) == b"old b"
        c.release(ino, fh)
        assert d.view.files() == {"b"} and d.store("b") == b"new c"


def test_read_is_atomic_with_a_growing_write(work: Path) -> None:
    """A READ clamped its length to the size before a concurrent WRITE and copied the data
    after it: "01234567AB", neither what was there nor what was written."""
    service = Service("memory", {}, NoView())
    with serve(service, cache(work)) as d:
        c = d.client
        d.view.put("f", b"0123456789")
        ino = c.lookup(ROOT, b"f").nodeid
        fh = c.open(ino, os.O_RDWR).fh
        gate = d.op.gate("read", "f")
        c2 = d.client_for()
        reader = Racer(lambda: c2.read(ino, fh, 0, 100))
        wait_until(lambda: gate.arrivals >= 1, "the read at the store")
        c.write(ino, fh, 8, b"ABCD")
        gate.open()
        assert reader.value() in (b"0123456789", b"01234567ABCD")
        c.release(ino, fh)


def test_truncates_by_path_reach_the_store(service: Service, work: Path) -> None:
    """Two truncates by path at once: the second saw the first one's passing reference as a
    writer that would commit it, but that one's upload was already under way: the store kept
    the first size."""
    with serve(service, cache(work)) as d:
        c = d.client
        d.view.put("a", b"\x00")
        ino = c.lookup(ROOT, b"a").nodeid
        gate = d.op.gate("write", "a")
        c1, c2 = d.client_for(), d.client_for()
        first = Racer(lambda: c1.setattr(ino, valid=abi.FATTR_SIZE, size=3))
        wait_until(lambda: gate.arrivals >= 1, "the first truncate's upload")
        second = Racer(lambda: c2.setattr(ino, valid=abi.FATTR_SIZE, size=0))
        wait_until(went_through_or_waits(d, second, "a"), "the second truncate")
        gate.open()
        first.value()
        second.value()
        assert d.store("a") == b""
        assert c.getattr(ino).size == 0


def test_truncate_by_path_during_the_last_release(service: Service, work: Path) -> None:
    """A truncate by path while the last writer's release was uploading: it left the change to
    that writer, whose upload did not have it: the store kept the old size."""
    with serve(service, cache(work)) as d:
        c = d.client
        entry, opened = c.create(ROOT, b"a", flags=os.O_RDWR)
        ino = entry.nodeid
        c.write(ino, opened.fh, 0, b"0123456789")
        gate = d.op.gate("write", "a")
        c1, c2 = d.client_for(), d.client_for()
        releaser = Racer(lambda: c1.release(ino, opened.fh))
        wait_until(lambda: gate.arrivals >= 1, "the release's upload")
        truncater = Racer(lambda: c2.setattr(ino, valid=abi.FATTR_SIZE, size=4))
        wait_until(
            lambda: not truncater.is_alive() or waits_in(truncater, "commit"), "the truncate"
        )
        gate.open()
        releaser.value()
        truncater.value()
        assert d.store("a") == b"0123"


def next_second() -> None:
    """Wait into the next second of the wall clock: an object the store writes or copies from
    now on has a later modification time than one it wrote before, also where it keeps them to
    the second (S3's Last-Modified)."""
    start = int(time.time())
    while int(time.time()) <= start:
        time.sleep(0.01)


@pytest.mark.parametrize("known", ["copy", "attributes"])
def test_rename_leaves_the_copy_of_an_open_file_current(
    service: Service, work: Path, known: str
) -> None:
    """On S3 a rename is a copy, which gives the object a new Last-Modified: the next open
    after it took the object for one another client had changed, and a fresh copy replaced the
    one a read-only handle held. Reads through that handle no longer saw what the file's other
    handles wrote, and (before SETATTR through a handle went to the current copy) a truncation
    through it was acknowledged and never stored. The version the rename left behind was
    either the local copy's (``copy``: the file was open across it) or the inode's cached
    attributes' (``attributes``: a copy made from them after the rename, within their
    timeout)."""
    policy = CachePolicy.NEVER if known == "copy" else CachePolicy.AUTO
    with serve(service, cache(work), cache=policy) as d:
        c = d.client
        d.view.put("a", b"0123456789A")
        ino = c.lookup(ROOT, b"a").nodeid
        if known == "copy":
            reader = c.open(ino, os.O_RDONLY).fh
            assert c.read(ino, reader, 0, 100) == b"0123456789A"
        next_second()
        c.rename(ROOT, b"a", ROOT, b"b")
        if known == "attributes":
            reader = c.open(ino, os.O_RDONLY).fh
            assert c.read(ino, reader, 0, 100) == b"0123456789A"
            # The cached attributes expire: the next open asks the store.
            time.sleep(CachePolicy.AUTO.timeout + 0.1)
        write_through_another(d, ino, reader, "b")
        c.setattr(ino, valid=abi.FATTR_SIZE | abi.FATTR_FH, fh=reader, size=1)
        assert d.store("b") == b"X"
        c.release(ino, reader)
        assert d.view.files() == {"b"} and d.store("b") == b"X"


def test_directory_rename_leaves_the_copies_of_open_files_current(
    service: Service, work: Path
) -> None:
    """As above, for a file moved with its directory (one copy per object on S3)."""
    with serve(service, cache(work), cache=CachePolicy.NEVER) as d:
        c = d.client
        d.view.put("d/a", b"0123456789A")
        dino = c.lookup(ROOT, b"d").nodeid
        ino = c.lookup(dino, b"a").nodeid
        reader = c.open(ino, os.O_RDONLY).fh
        assert c.read(ino, reader, 0, 100) == b"0123456789A"
        next_second()
        c.rename(ROOT, b"d", ROOT, b"e")
        write_through_another(d, ino, reader, "e/a")
        c.release(ino, reader)
        assert d.view.files() == {"e/a"} and d.store("e/a") == b"XY23456789A"


# --- commits against revalidations and other changes of the same file -------------------------


def write_through_another(d: Direct, ino: int, reader: int, path: str) -> None:
    """Write "XY" over the start of ``ino`` (stored as ``path``, "0123456789A") through a
    writer of its own and fsync it: the store holds it, and so does the read-only handle
    ``reader`` (its copy is the file's, not one left behind)."""
    c = d.client
    writer = c.open(ino, os.O_RDWR).fh
    c.write(ino, writer, 0, b"XY")
    c.fsync(ino, writer)
    assert d.store(path) == b"XY23456789A"
    assert c.read(ino, reader, 0, 100) == b"XY23456789A"
    c.release(ino, writer)


def open_twice(d: Direct) -> tuple[int, int, int]:
    """``a``, stored with 11 bytes, read through a read-only handle, then opened for writing:
    (its node, the reader, the writer)."""
    c = d.client
    d.view.put("a", b"0123456789A")
    ino = c.lookup(ROOT, b"a").nodeid
    reader = c.open(ino, os.O_RDONLY).fh
    assert c.read(ino, reader, 0, 100) == b"0123456789A"
    return ino, reader, c.open(ino, os.O_RDWR).fh


def copy_of(d: Direct, fh: int) -> Any:
    """The local copy the file handle ``fh`` holds."""
    h = d.fs._handles.use(fh)
    d.fs._handles.done(h)
    return h.blob


def _commit_request(c: Any, commit: str, ino: int, writer: int, reader: int) -> Callable[[], Any]:
    """A request that uploads the file: through its writer, or a truncate through a read-only
    handle when no writer is left (it commits at once)."""
    if commit == "truncate":
        return lambda: c.setattr(ino, valid=abi.FATTR_SIZE | abi.FATTR_FH, fh=reader, size=7)
    return lambda: getattr(c, commit)(ino, writer)


COMMITS = ["flush", "fsync", "release", "truncate"]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("other", ["open", "getattr", "lookup"])
@pytest.mark.parametrize("commit", COMMITS)
def test_revalidation_racing_a_commit_keeps_the_copy(
    service: Service, work: Path, commit: str, other: str, when: str
) -> None:
    """A request that asks the store what the object is (OPEN, GETATTR, LOOKUP with no
    attribute cache) while a commit of the same file uploads it (held before its write, or
    after it, before the copy is marked clean) must not take our own upload for another
    client's change: a fresh copy in place of the one open would leave a read-only handle
    reading, and truncating, a copy that is no longer the file's."""
    with serve(service, cache(work), cache=CachePolicy.NEVER) as d:
        c = d.client
        ino, reader, writer = open_twice(d)
        c.write(ino, writer, 0, b"XY")
        if commit == "truncate":
            c.release(ino, writer)
        copy = copy_of(d, reader)
        gate = d.op.gate("write", "a", after=when == "after", limit=1)
        committer = Racer(_commit_request(d.client_for(), commit, ino, writer, reader))
        wait_until(lambda: gate.arrivals >= 1, "the commit's upload")
        c2 = d.client_for()
        racing: Callable[[], Any] = {
            "open": lambda: c2.open(ino, os.O_RDONLY).fh,
            "getattr": lambda: c2.getattr(ino).size,
            "lookup": lambda: c2.lookup(ROOT, b"a").nodeid,
        }[other]
        racer = Racer(racing)
        wait_until(went_through_or_waits(d, racer, "a"), "the racing request")
        gate.open()
        committer.value()
        result = racer.value()
        content = b"XY23456" if commit == "truncate" else b"XY23456789A"
        assert d.store("a") == content
        if other == "getattr":
            assert result in (11, len(content))
        elif other == "lookup":
            assert result == ino
        assert d.fs.cache.peek("a") is copy
        # Asked again once the commit is over: our upload is still not another client's.
        again = c.open(ino, os.O_RDONLY).fh
        assert d.fs.cache.peek("a") is copy and copy_of(d, again) is copy
        assert c.getattr(ino).size == len(content)
        if commit in ("flush", "fsync"):
            c.release(ino, writer)
        c.setattr(ino, valid=abi.FATTR_SIZE, size=1)
        assert d.store("a") == b"X"
        for fh in (reader, again) + ((result,) if other == "open" else ()):
            assert c.read(ino, fh, 0, 100) == b"X"
            c.release(ino, fh)
        assert d.store("a") == b"X"


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(
    ("commit", "change"),
    [
        (k, ch)
        for k in COMMITS
        for ch in ("write", "ftruncate", "truncate")
        # A truncate commits only with no writer open, and a write needs one.
        if not (k == "truncate" and ch == "write")
    ],
)
def test_change_racing_a_commit_is_stored(
    service: Service, work: Path, commit: str, change: str, when: str
) -> None:
    """A WRITE through another handle, a truncate through a read-only one or by path, while a
    commit of the same file is uploading (held before its write or after it): the change is
    in the store when its request returns if no writer is left to take it up, and at the
    latest once the last one is released; nothing acknowledged is lost."""
    with serve(service, cache(work), cache=CachePolicy.NEVER) as d:
        c = d.client
        d.view.put("a", b"0123456789A")
        ino = c.lookup(ROOT, b"a").nodeid
        reader = c.open(ino, os.O_RDONLY).fh
        writer = c.open(ino, os.O_RDWR).fh
        c.write(ino, writer, 0, b"XY")
        other = c.open(ino, os.O_RDWR).fh if change == "write" else None
        if commit == "truncate":
            c.release(ino, writer)
        gate = d.op.gate("write", "a", after=when == "after", limit=1)
        committer = Racer(_commit_request(d.client_for(), commit, ino, writer, reader))
        wait_until(lambda: gate.arrivals >= 1, "the commit's upload")
        c2 = d.client_for()
        racing: Callable[[], Any] = {
            "write": lambda: c2.write(ino, other, 5, b"Q"),
            "ftruncate": lambda: c2.setattr(
                ino, valid=abi.FATTR_SIZE | abi.FATTR_FH, fh=reader, size=4
            ),
            "truncate": lambda: c2.setattr(ino, valid=abi.FATTR_SIZE, size=4),
        }[change]
        changer = Racer(racing)
        wait_until(
            lambda: (
                not changer.is_alive() or waits_in(changer, "commit") or d.lock_waiters("a") > 0
            ),
            "the change",
        )
        gate.open()
        committer.value()
        changer.value()
        committed = b"XY23456" if commit == "truncate" else b"XY23456789A"
        # Either order is a linearization: the commit's content, then the change on it; or
        # the change first, then the commit (a truncate to 7 then extends with zeros).
        after_change = {"write": b"XY234Q6789A", "ftruncate": b"XY23", "truncate": b"XY23"}
        final_options = {b"XY23", b"XY23\0\0\0"} if commit == "truncate" else {after_change[change]}
        if commit in ("flush", "fsync") or other is not None:
            # A writer is left: the change goes up with its commits, at the latest its release.
            assert d.store("a") in {committed} | final_options
        else:
            assert d.store("a") in final_options
        if commit in ("flush", "fsync"):
            c.release(ino, writer)
        if other is not None:
            c.release(ino, other)
        stored = d.store("a")
        assert stored in final_options
        assert c.read(ino, reader, 0, 100) == stored
        c.release(ino, reader)
        fresh = c.open(ino, os.O_RDONLY).fh
        assert c.read(ino, fresh, 0, 100) == stored
        c.release(ino, fresh)


class HeldAfter:
    """Holds the threads ``holds`` picks right after a method of a class returns, until let go:
    a request paused between what it read and what it does with it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
        self.arrived = threading.Event()
        self.go = threading.Event()
        self.holds: Callable[[], bool] = lambda: False
        real = getattr(cls, name)

        def held(obj: Any, *args: Any, **kwargs: Any) -> Any:
            result = real(obj, *args, **kwargs)
            if self.holds():
                self.arrived.set()
                assert self.go.wait(60), "never let go"
            return result

        monkeypatch.setattr(cls, name, held)


@pytest.mark.parametrize("other", ["lookup", "readdirplus"])
@pytest.mark.parametrize("commit", ["flush", "fsync", "release", "clean"])
def test_attributes_of_a_copy_being_committed_keep_no_old_version(
    service: Service, work: Path, monkeypatch: pytest.MonkeyPatch, commit: str, other: str
) -> None:
    """A LOOKUP (or READDIRPLUS entry) of a file open for writing answers with its copy's
    attributes and caches them in the inode. Taken while a commit uploaded the copy (or while
    it was still clean, before a write and a flush), and cached once that commit was over,
    they carried the version of the object from before the commit: the next open within the
    attribute timeout took our own upload for another client's change and replaced the copy a
    read-only handle held, which then no longer saw the file."""
    with serve(service, cache(work), cache=CachePolicy.AUTO) as d:
        c = d.client
        ino, reader, writer = open_twice(d)
        copy = copy_of(d, reader)
        held = HeldAfter(monkeypatch, Blob, "current_meta")
        committer: Racer | None = None
        if commit != "clean":
            c.write(ino, writer, 11, b"Z")
            gate = d.op.gate("write", "a", after=True, limit=1)
            committer = Racer(_commit_request(d.client_for(), commit, ino, writer, reader))
            wait_until(lambda: gate.arrivals >= 1, "the commit's upload")
        held.holds = lambda: threading.current_thread() not in (threading.main_thread(), committer)
        c2 = d.client_for()
        if other == "lookup":
            racer = Racer(lambda: c2.lookup(ROOT, b"a").nodeid)
        else:

            def listing() -> list[Any]:
                dh = c2.opendir(ROOT).fh
                try:
                    return c2.readdirplus(ROOT, dh)
                finally:
                    c2.releasedir(ROOT, dh)

            racer = Racer(listing)
        wait_until(lambda: held.arrived.is_set() or not racer.is_alive(), "the racing request")
        assert held.arrived.is_set(), racer.value()
        if committer is not None:
            gate.open()
            committer.value()
        else:
            c.write(ino, writer, 11, b"Z")
            c.flush(ino, writer)
        held.go.set()
        racer.value()
        assert d.store("a") == b"0123456789AZ"
        if commit != "release":
            c.release(ino, writer)
        # Within the attribute timeout: the inode's cached attributes are trusted.
        again = c.open(ino, os.O_RDONLY).fh
        assert d.fs.cache.peek("a") is copy and copy_of(d, again) is copy
        writer = c.open(ino, os.O_RDWR).fh
        c.write(ino, writer, 0, b"XY")
        c.fsync(ino, writer)
        assert c.read(ino, reader, 0, 100) == b"XY23456789AZ"
        for fh in (writer, again, reader):
            c.release(ino, fh)
        assert d.store("a") == b"XY23456789AZ"
