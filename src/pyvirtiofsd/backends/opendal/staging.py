"""Local sparse files that stage writes and cache object ranges.

An object can't be changed in part: a write in the middle, an append or a truncate means
uploading the whole object again. So every open file gets a :class:`Blob`, a sparse file in the
cache directory as long as the file, and a :class:`Ranges` set of the bytes it holds:

* reads fill missing ranges from the object (ranged reads, a few MiB at a time and further
  ahead when the file is read front to back), then are served from the local file;
* writes and truncates go to the local file and make the blob dirty;
* a commit (flush, fsync, release) fills whatever part of the object the blob still lacks and
  uploads the file: one PUT, or a multipart upload streamed through OpenDAL's writer.

Blobs outlive the open file: they stay in :class:`BlobCache`, keyed by object path, so that a
re-read is local, until the cache is over its size bound and they are the least recently used
clean ones. A blob remembers the object version it holds (ETag, length, last-modified); when the
store reports another, the blob is dropped and a fresh one made. After a commit or a rename of
ours the version is unknown until the next stat, whose version is taken if its length is the
blob's (a rename by copy, as on S3, gives the object a new modification time: the version from
before it would pass for another client's change). The same file is what DAX maps
(:meth:`Blob.dax_fd`), so the guest's mapping, READ and WRITE all see one copy of the data.

Locking: ``Blob.lock`` guards the blob's bookkeeping and is held only for local file I/O, never
across a store call. ``Blob.commit_lock`` orders uploads, renames and deletes of one object: an
upload goes to the path the blob has while it holds the lock, and a rename or unlink changes that
path (or ends it) only while holding it, so no upload lands at a name its file has left. The
order is name locks (:mod:`.names`), then ``commit_lock``, then ``BlobCache._lock``, then
``Blob.lock``. Fills of one range by several readers are merged: the first claims the range, the
others wait for it (``inflight``).

Binding: a blob is bound to a path (``BlobCache`` by path, ``Blob.path``) from its creation until
it is renamed, detached (unlink, replaced by a newer version of the object) or evicted. Callers
create and replace blobs only under the name lock of the path, and :meth:`BlobCache.create`
refuses to replace a bound blob: a second copy of one object would cut the first one off, and
with it whatever was written through it.

Pinning: bytes being read out of the local file (READ, DAX fills, the fill and upload of a
commit, the fill before an unlink) are pinned from before they are fetched until they are
copied out: :meth:`BlobCache._trim` never punches a pinned range, so a read never returns the
zeros of a hole that another reader's fetch made room with.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pyvirtiofsd import linux
from pyvirtiofsd.backends.opendal.attrs import Meta, encode, now_ns
from pyvirtiofsd.backends.opendal.ranges import Ranges
from pyvirtiofsd.backends.opendal.store import Store, parent_of

if TYPE_CHECKING:
    from pyvirtiofsd.fuse.buffers import ReplyWriter, WriteData

__all__ = [
    "GRANULE",
    "MAX_FETCH",
    "MAX_FILES",
    "Blob",
    "BlobCache",
    "SharedLock",
]

log = logging.getLogger(__name__)

#: Unit of fills and of the in-flight table.
GRANULE = 1 << 20
#: Largest single ranged read: a random read fetches its granule, a sequential one runs
#: ahead up to this much.
MAX_FETCH = 8 << 20
_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_DIR_PREFIX = "run-"
#: Most blobs kept at once: each holds a file descriptor and a few hundred bytes, so a walk over
#: many small files must not keep all of them however small they are.
MAX_FILES = 8192


class SharedLock:
    """Many holders shared, or one exclusive; exclusive ones waiting go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class Blob:
    __slots__ = (
        "base_limit",
        "cache",
        "commit_lock",
        "committed_ns",
        "dax",
        "dax_writable",
        "dirty",
        "fd",
        "file",
        "inflight",
        "io",
        "last_end",
        "lock",
        "meta",
        "next_pin",
        "opens",
        "path",
        "pins",
        "present",
        "size",
        "stored",
        "version",
        "wgen",
        "writers",
    )

    def __init__(
        self, cache: BlobCache, path: str, file: str, fd: int, meta: Meta, stored: bool
    ) -> None:
        self.cache = cache
        #: The object this blob stages; None once unlinked (then it is never uploaded).
        self.path: str | None = path
        self.file = file
        self.fd = fd
        #: Mode, owner and times to commit with the data (size is :attr:`size`).
        self.meta = meta
        self.size = meta.size
        #: Bytes of the object worth fetching: [0, base_limit). A truncate lowers it, so that
        #: extending the file again gives zeros, not the old bytes.
        self.base_limit = meta.size if stored else 0
        self.present = Ranges()
        self.version = meta.version
        #: The object exists in the store (False for a file created and not yet committed).
        self.stored = stored
        self.dirty = not stored
        #: Bumped by every change, so that a commit knows whether what it uploaded is current.
        self.wgen = 0
        self.committed_ns = 0
        self.opens = 0
        self.writers = 0
        self.dax = False
        self.dax_writable = False
        self.last_end = -1
        self.inflight: dict[int, threading.Event] = {}
        #: Ranges being read out of the local file, by token: their start offsets.
        self.pins: dict[int, int] = {}
        self.next_pin = 0
        self.lock = threading.Lock()
        #: Reads of the local file shared, writes and truncates exclusive: POSIX makes read,
        #: write and truncate of a regular file atomic with respect to each other.
        self.io = SharedLock()
        self.commit_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Blob({self.path!r}, size={self.size}, dirty={self.dirty})"

    def needs_commit(self) -> bool:
        return self.path is not None and (self.dirty or self.dax_writable)

    def current_meta(self) -> Meta:
        # No version: ``meta`` keeps the one the blob was made with, which a commit makes
        # stale, and even the blob's own, cached in an inode with these attributes, may be
        # older than the one a commit running meanwhile makes (our upload would then pass for
        # another client's change). Until the attributes expire the blob is trusted; then a
        # stat tells.
        return self.meta._replace(size=self.size, version=None)

    # --- reading ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def pinned(self, start: int) -> Iterator[None]:
        """Keep everything from ``start`` on in the local file for the ``with`` block (taken
        before the bytes are fetched, so that a fetch never makes room by dropping them)."""
        with self.lock:
            token = self.next_pin
            self.next_pin += 1
            self.pins[token] = start
        try:
            yield
        finally:
            with self.lock:
                del self.pins[token]

    def ensure(self, store: Store, start: int, end: int) -> None:
        """Make [start, end) local, fetching what is missing from the object."""
        while True:
            with self.lock:
                limit = min(self.base_limit, self.size)
                stop = min(end, limit)
                if start >= stop:
                    self.last_end = end
                    return
                missing = self.present.missing(start, stop)
                if not missing:
                    self.last_end = end
                    return
                first = missing[0][0]
                g0 = first // GRANULE
                g1 = min((missing[-1][1] - 1) // GRANULE, g0 + MAX_FETCH // GRANULE - 1)
                busy = next(
                    (self.inflight[g] for g in range(g0, g1 + 1) if g in self.inflight), None
                )
                if busy is None:
                    if start == self.last_end:
                        # Read front to back: fetch ahead, as far as nothing else is under way.
                        while (
                            g1 - g0 + 1 < MAX_FETCH // GRANULE
                            and (g1 + 1) * GRANULE < limit
                            and g1 + 1 not in self.inflight
                        ):
                            g1 += 1
                    fetch_start = max(g0 * GRANULE, first)
                    fetch_end = min((g1 + 1) * GRANULE, limit)
                    gaps = self.present.missing(fetch_start, fetch_end)
                    fetch_start, fetch_end = gaps[0][0], gaps[-1][1]
                    claim = threading.Event()
                    granules = range(fetch_start // GRANULE, (fetch_end - 1) // GRANULE + 1)
                    for g in granules:
                        self.inflight[g] = claim
                    path = self.path
            if busy is not None:
                busy.wait()
                continue
            self._fetch(store, path, fetch_start, fetch_end, claim, granules)

    def _fetch(
        self,
        store: Store,
        path: str | None,
        start: int,
        end: int,
        claim: threading.Event,
        granules: range,
    ) -> None:
        added = 0
        try:
            if path is None:
                raise OSError(errno.ESTALE, "the object of an unlinked file is gone")
            try:
                data = store.read(path, start, end - start)
            except OSError as e:
                # Renamed while we fetched: the data is under the new name now.
                if self.path is not None and self.path != path:
                    data = store.read(self.path, start, end - start)
                elif e.errno in (errno.ENOENT, errno.EINVAL):
                    # The object shrank or went away behind our back.
                    raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), path) from None
                else:
                    raise
            with self.lock:
                stop = min(start + len(data), self.base_limit, self.size)
                view = memoryview(data)
                for a, b in self.present.missing(start, stop):
                    os.pwrite(self.fd, view[a - start : b - start], a)
                    added += self.present.add(a, b)
                if len(data) < end - start and stop == start + len(data):
                    # The store has less than we were told: what it lacks reads as zeros
                    # rather than being asked for forever.
                    self.base_limit = min(self.base_limit, stop)
        finally:
            with self.lock:
                for g in granules:
                    if self.inflight.get(g) is claim:
                        del self.inflight[g]
            claim.set()
        if added:
            self.cache.account(added, self)

    def fill_all(self, store: Store) -> None:
        self.ensure(store, 0, self.size)

    def read_into(self, out: ReplyWriter, offset: int, end: int) -> None:
        """Copy [offset, end) (clamped to the size) of the local file into ``out``; the range
        must have been made local (and pinned) first."""
        with self.io.shared():
            # No write nor truncate runs meanwhile: the size holds still.
            end = min(end, self.size)
            if end > offset:
                out.read_from_fd(self.fd, offset, end - offset)

    # --- writing ---------------------------------------------------------------------------

    def write(self, data: WriteData, offset: int, append: bool) -> int:
        with self.io.exclusive(), self.lock:
            if append:
                offset = self.size
            n = data.to_fd(self.fd, offset)
            end = offset + n
            added = 0
            if offset > self.size:
                # The hole between the old end and the write reads as zeros: it is "present".
                added += self.present.add(self.size, offset)
            added += self.present.add(offset, end)
            if end > self.size:
                self.size = end
            t = now_ns()
            self.meta = self.meta._replace(mtime_ns=t, ctime_ns=t)
            self.dirty = True
            self.wgen += 1
        if added:
            self.cache.account(added, self)
        return n

    def truncate(self, size: int) -> None:
        with self.io.exclusive(), self.lock:
            old = self.size
            delta = 0
            if size < old:
                delta = -self.present.cut(size)
                self.base_limit = min(self.base_limit, size)
            os.ftruncate(self.fd, size)
            if size > old:
                delta += self.present.add(old, size)
            self.size = size
            t = now_ns()
            self.meta = self.meta._replace(mtime_ns=t, ctime_ns=t)
            self.dirty = True
            self.wgen += 1
        if delta:
            self.cache.account(delta, self)

    def set_meta(self, meta: Meta, dirty: bool) -> None:
        with self.lock:
            self.meta = meta._replace(size=self.size)
            if dirty:
                self.dirty = True
                self.wgen += 1

    # --- committing ------------------------------------------------------------------------

    def commit(self, store: Store, on_done: Callable[[Blob, Meta], None] | None = None) -> None:
        """Upload the blob if it holds changes; when this returns, the store has them."""
        with self.commit_lock:
            self.commit_locked(store, on_done)

    def commit_locked(
        self, store: Store, on_done: Callable[[Blob, Meta], None] | None = None
    ) -> None:
        """:meth:`commit` for a caller that holds ``commit_lock``."""
        with self.lock:
            if not self.needs_commit():
                return
            wgen = self.wgen
        with self.pinned(0):
            self.fill_all(store)
            with self.lock:
                path = self.path
                size = self.size
                # Its version is unknown until a stat tells (adopt_version).
                meta = self.meta._replace(size=size, version=None)
                # One PUT uploads a snapshot taken here, which no write can tear (writes hold
                # the lock); a multipart upload streams the file, and a write meanwhile just
                # leaves the blob dirty for the next commit.
                data = os.pread(self.fd, size, 0) if store.single_put(size) else None
            if path is None:
                return
            started = now_ns()
            if data is not None:
                if len(data) != size:
                    raise OSError(errno.EIO, "short read of a staged file", path)
                store.write(path, data, encode(meta))
            else:
                store.write_from_fd(path, self.fd, size, encode(meta))
        # What the object is now goes to the inode before the blob turns clean: whoever then
        # finds the blob clean finds these attributes, never older ones.
        if on_done is not None:
            on_done(self, meta)
        with self.lock:
            if self.wgen == wgen:
                self.dirty = False
            self.stored = True
            self.version = None
            self.committed_ns = started
            self.base_limit = min(self.size, size)
        self.cache.committed(self)

    # --- DAX -------------------------------------------------------------------------------

    def dax_fd(self, store: Store, offset: int, length: int, writable: bool) -> int:
        """A new fd of the local file with [offset, offset+length) filled (clamped to the
        file's size); the caller maps it and closes it. A writable mapping changes the file
        where we can't see it, so from then on every commit of this blob uploads. A blob DAX
        has seen is never evicted nor replaced: the guest's mappings would go on showing the
        old file."""
        with self.pinned(offset):
            self.ensure(store, offset, offset + length)
        with self.lock:
            self.dax = True
            if writable:
                self.dax_writable = True
                self.wgen += 1
        return os.dup(self.fd)

    def adopt_version(self, version: tuple[str | None, int, int | None] | None) -> bool:
        """Whether the store's ``version`` of the object is what this blob holds; a blob we
        committed (or moved) learns its version here, from the first stat after the upload
        (the rename)."""
        with self.lock:
            if self.dirty or version is None:
                return True
            if self.version is not None:
                return self.version == version
            _, length, modified = version
            # Ours if the length is what we uploaded and it was not modified before we began
            # (second-granular clocks: allow for the truncation).
            if length == self.size and (
                modified is None or modified >= self.committed_ns - 2_000_000_000
            ):
                self.version = version
                return True
            return False


class BlobCache:
    """The blobs by object path, least recently used first, within a byte budget."""

    def __init__(self, parent_dir: str, limit: int, max_files: int = MAX_FILES) -> None:
        os.makedirs(parent_dir, exist_ok=True)
        _remove_stale_runs(parent_dir)
        self.dir = os.path.join(parent_dir, f"{_DIR_PREFIX}{os.getpid()}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.mkdir(self.dir, 0o700)
        self.limit = limit
        self.max_files = max_files
        self._lock = threading.Lock()
        self._by_path: OrderedDict[str, Blob] = OrderedDict()
        #: Files created here and not yet in the store, by parent directory path, so that
        #: listings show them.
        self._unstored: dict[str, set[str]] = {}
        self._next = 0
        #: Bytes held locally (the sum of every blob's present ranges).
        self.total = 0

    # --- blobs by path ---------------------------------------------------------------------

    def peek(self, path: str) -> Blob | None:
        return self._by_path.get(path)

    def acquire(self, path: str) -> Blob | None:
        """The blob of ``path`` with one more open reference, or None."""
        with self._lock:
            blob = self._by_path.get(path)
            if blob is not None:
                blob.opens += 1
                self._by_path.move_to_end(path)
            return blob

    def create(self, path: str, meta: Meta, stored: bool, opens: int = 1) -> Blob:
        """A new blob bound to ``path``, which must have none (the caller holds the name lock
        and has looked)."""
        blob = self._new(path, meta, stored, opens)
        with self._lock:
            bound = path in self._by_path
            if not bound:
                self._by_path[path] = blob
                self._clear_unstored(path)
                if not stored:
                    self._mark_unstored(path)
        if bound:
            blob.opens = 0
            self._destroy(blob)
            raise RuntimeError(f"a second local copy of {path!r}")
        return blob

    def replace(self, old: Blob, meta: Meta, opens: int = 1) -> Blob:
        """A fresh blob (the object changed in the store) in place of ``old``, which must be
        bound and hold nothing of its own; its readers keep their copy."""
        path = old.path
        assert path is not None
        blob = self._new(path, meta, True, opens)
        with self._lock:
            current = self._by_path.get(path) is old
            if current:
                self._by_path[path] = blob
        if not current:
            blob.opens = 0
            self._destroy(blob)
            raise RuntimeError(f"the local copy of {path!r} is not the one replaced")
        self._detach(old)
        return blob

    def _new(self, path: str, meta: Meta, stored: bool, opens: int) -> Blob:
        with self._lock:
            self._next += 1
            name = os.path.join(self.dir, str(self._next))
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, meta.size if stored else 0)
        except BaseException:
            os.close(fd)
            os.unlink(name)
            raise
        blob = Blob(self, path, name, fd, meta if stored else meta._replace(size=0), stored)
        blob.opens = opens
        return blob

    def release(self, blob: Blob) -> None:
        """Drop one open reference; an unlinked blob goes when the last one does."""
        with self._lock:
            blob.opens -= 1
            gone = blob.opens <= 0 and self._by_path.get(blob.path or "") is not blob
        if gone:
            self._destroy(blob)
        self.evict()

    def committed(self, blob: Blob) -> None:
        with self._lock:
            if blob.path is not None and self._by_path.get(blob.path) is blob:
                self._clear_unstored(blob.path)

    def _mark_unstored(self, path: str) -> None:
        self._unstored.setdefault(parent_of(path), set()).add(_name_of(path))

    def _clear_unstored(self, path: str) -> None:
        parent = parent_of(path)
        names = self._unstored.get(parent)
        if names is not None:
            names.discard(_name_of(path))
            if not names:
                del self._unstored[parent]

    def unstored_names(self, dirpath: str) -> list[str]:
        with self._lock:
            return sorted(self._unstored.get(dirpath, ()))

    def has_unstored(self, dirpath: str) -> bool:
        return bool(self._unstored.get(dirpath))

    def detach(self, blob: Blob) -> None:
        """The object is gone (unlink, or replaced): forget the blob's path; open handles keep
        reading it, and its file goes with the last of them."""
        with self._lock:
            if blob.path is not None and self._by_path.get(blob.path) is blob:
                del self._by_path[blob.path]
                self._clear_unstored(blob.path)
        self._detach(blob)

    def _detach(self, blob: Blob) -> None:
        with blob.lock:
            blob.path = None
            blob.dirty = False
        with self._lock:
            gone = blob.opens <= 0
        if gone:
            self._destroy(blob)

    def rename(self, old: str, new: str) -> None:
        """Follow a rename of ``old`` (an object, or a directory prefix ending in "/")."""
        tree = old.endswith("/")
        with self._lock:
            if tree:
                moves = [p for p in self._by_path if p.startswith(old)]
            else:
                moves = [old] if old in self._by_path else []
            replaced = []
            for p in moves:
                target = new + p[len(old) :] if tree else new
                blob = self._by_path.pop(p)
                prev = self._by_path.pop(target, None)
                if prev is not None:
                    replaced.append(prev)
                self._by_path[target] = blob
                with blob.lock:
                    blob.path = target
                    # The object there is what the blob holds, in a version it has not seen:
                    # a rename by copy (S3) gives it a new modification time, a native one
                    # keeps the old. The next stat tells, whatever time it shows.
                    blob.version = None
                    blob.committed_ns = 0
                self._clear_unstored(p)
                self._clear_unstored(target)
                if not blob.stored:
                    self._mark_unstored(target)
            if not tree and new in self._by_path and not moves:
                replaced.append(self._by_path.pop(new))
                self._clear_unstored(new)
        for blob in replaced:
            self._detach(blob)

    def under(self, dirpath: str) -> list[Blob]:
        with self._lock:
            return [b for p, b in self._by_path.items() if p.startswith(dirpath)]

    def all(self) -> list[Blob]:
        with self._lock:
            return list(self._by_path.values())

    # --- the byte budget -------------------------------------------------------------------

    def account(self, delta: int, blob: Blob) -> None:
        with self._lock:
            self.total += delta
            over = self.total > self.limit
        if over and delta > 0:
            self.evict(blob)

    def evict(self, current: Blob | None = None) -> None:
        """Bring the cache under its bound: first drop the least recently used clean blobs
        nobody has open, then, if one open file alone is larger than the bound, drop what lies
        behind the reader in it (never in a blob DAX has mapped: the guest would see holes)."""
        if self.total <= self.limit and len(self._by_path) <= self.max_files:
            return
        victims: list[Blob] = []
        with self._lock:
            excess = self.total - self.limit
            extra = len(self._by_path) - self.max_files
            for path, blob in list(self._by_path.items()):
                if excess <= 0 and extra <= 0:
                    break
                if blob.opens > 0 or blob.dirty or blob.inflight or blob.dax or blob.pins:
                    # DAX may still map this very file: a new copy would split the data.
                    continue
                del self._by_path[path]
                victims.append(blob)
                excess -= blob.present.total()
                extra -= 1
        for blob in victims:
            with blob.lock:
                blob.path = None
            self._destroy(blob)
        if self.total > self.limit and current is not None:
            self._trim(current)

    def _trim(self, blob: Blob) -> None:
        with blob.lock:
            if blob.dirty or blob.dax or blob.last_end <= 0 or blob.path is None:
                # A detached blob's object is gone: what it holds can't be fetched again.
                return
            keep_from = max(0, (blob.last_end - MAX_FETCH) // GRANULE * GRANULE)
            if blob.pins:
                keep_from = min(keep_from, *blob.pins.values())
            dropped = 0
            for a, b in blob.present.pairs():
                if a >= keep_from:
                    break
                hi = min(b, keep_from)
                try:
                    linux.fallocate(blob.fd, _PUNCH, a, hi - a)
                except OSError as e:
                    log.debug("punching %s: %s", blob.file, e)
                    break
                dropped += blob.present.remove(a, hi)
        if dropped:
            with self._lock:
                self.total -= dropped

    def _destroy(self, blob: Blob) -> None:
        with blob.lock:
            fd, blob.fd = blob.fd, -1
            dropped = blob.present.total()
            blob.present = Ranges()
        if fd < 0:
            return
        with self._lock:
            self.total -= dropped
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(blob.file)

    def close(self) -> None:
        with self._lock:
            blobs = list(self._by_path.values())
            self._by_path.clear()
        for blob in blobs:
            with blob.lock:
                blob.path = None
            blob.opens = 0
            self._destroy(blob)
        shutil.rmtree(self.dir, ignore_errors=True)


def _name_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _remove_stale_runs(parent: str) -> None:
    """Remove the staging directories of daemons that are gone (killed: no cleanup ran). What
    they staged and never committed was never acknowledged by fsync, so nothing is lost."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        pid = name[len(_DIR_PREFIX) :]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
