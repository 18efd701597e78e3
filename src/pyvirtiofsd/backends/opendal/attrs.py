"""POSIX attributes for objects that have none of their own.

An object store knows a name, a length, maybe a modification time and an ETag. Mode, owner and
the three times are kept here:

* in the object's **user metadata** (``x-amz-meta-*`` on S3, extended attributes on ``fs``) when
  the service can store it: keys ``mode`` (decimal st_mode, file type included), ``uid``,
  ``gid``, and ``mtime``/``atime``/``ctime`` as decimal seconds with up to nine fractional
  digits. These are the keys s3fs uses for mode, uid, gid and mtime, so buckets written by one
  are read sensibly by the other;
* otherwise in :class:`LocalAttrs`, a table in the daemon's memory that lives as long as the
  daemon (exactly as long as the data of the ``memory`` service, longer than nothing
  elsewhere). Directories always use it: a directory marker can't carry metadata through
  OpenDAL.

Whatever is found in neither is synthesized: the configured default owner and mode, and the
store's last-modified time (else the daemon's start time) for all three times.
"""

from __future__ import annotations

import stat
import threading
import time
from datetime import datetime
from typing import NamedTuple

__all__ = [
    "Defaults",
    "LocalAttrs",
    "Meta",
    "Overrides",
    "build",
    "datetime_ns",
    "decode",
    "encode",
    "format_time",
    "now_ns",
    "overrides_of",
    "parse_time",
]

_NS = 1_000_000_000


class Meta(NamedTuple):
    """The attributes of one object or directory, compact enough to cache per inode."""

    mode: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    #: What tells that the object changed behind our back: (etag, length, last-modified ns),
    #: or None when unknown (just written by us; adopted from the next stat).
    version: tuple[str | None, int, int | None] | None = None

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


def format_time(ns: int) -> str:
    sec, frac = divmod(ns, _NS)
    return f"{sec}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(sec)


def parse_time(text: str) -> int | None:
    """Decimal seconds (s3fs writes whole seconds, we write up to nanoseconds) as ns."""
    text = text.strip()
    neg = text.startswith("-")
    if neg:
        text = text[1:]
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        return None
    ns = int(whole) * _NS + int((frac + "000000000")[:9] or 0)
    return -ns if neg else ns


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def encode(meta: Meta) -> dict[str, str]:
    """User metadata for ``meta`` (S3 lower-cases keys; ours already are)."""
    return {
        "mode": str(meta.mode),
        "uid": str(meta.uid),
        "gid": str(meta.gid),
        "mtime": format_time(meta.mtime_ns),
        "atime": format_time(meta.atime_ns),
        "ctime": format_time(meta.ctime_ns),
    }


class Overrides(NamedTuple):
    """The attributes one place (user metadata or :class:`LocalAttrs`) has for an object;
    None where it has nothing."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None
    ctime_ns: int | None = None


def decode(user_metadata: dict[str, str] | None) -> Overrides:
    if not user_metadata:
        return Overrides()
    um = {k.lower(): v for k, v in user_metadata.items()}

    def t(key: str) -> int | None:
        v = um.get(key)
        return None if v is None else parse_time(v)

    mode = _int(um.get("mode"))
    if mode is not None and not 0 <= mode < 1 << 32:
        mode = None
    return Overrides(
        mode, _int(um.get("uid")), _int(um.get("gid")), t("mtime"), t("atime"), t("ctime")
    )


def datetime_ns(value: datetime | None) -> int | None:
    if value is None:
        return None
    return int(value.timestamp()) * _NS + value.microsecond * 1000


def overrides_of(meta: Meta) -> Overrides:
    return Overrides(meta.mode, meta.uid, meta.gid, meta.mtime_ns, meta.atime_ns, meta.ctime_ns)


class Defaults(NamedTuple):
    uid: int
    gid: int
    file_mode: int
    dir_mode: int
    #: Times of objects whose store has none (the ``memory`` service).
    start_ns: int


def build(
    kind: int,
    size: int,
    last_modified_ns: int | None,
    version: tuple[str | None, int, int | None] | None,
    over: Overrides,
    defaults: Defaults,
) -> Meta:
    """Combine what the store said with what was kept and what is synthesized."""
    if over.mode is not None and (stat.S_IFMT(over.mode) == kind or kind == stat.S_IFREG):
        # A regular object may really be a symlink (s3fs style); a directory stays one.
        mode = over.mode
        if not stat.S_IFMT(mode):
            mode |= kind
    else:
        perm = defaults.dir_mode if kind == stat.S_IFDIR else defaults.file_mode
        mode = kind | (stat.S_IMODE(over.mode) if over.mode is not None else perm)
    base = last_modified_ns if last_modified_ns is not None else defaults.start_ns
    mtime = over.mtime_ns if over.mtime_ns is not None else base
    return Meta(
        mode,
        size,
        defaults.uid if over.uid is None else over.uid,
        defaults.gid if over.gid is None else over.gid,
        mtime,
        over.atime_ns if over.atime_ns is not None else mtime,
        over.ctime_ns if over.ctime_ns is not None else max(mtime, base),
        version,
    )


def now_ns() -> int:
    return time.time_ns()


class LocalAttrs:
    """Attributes kept in the daemon's memory, by path: for directories always, for objects
    when the service has no user metadata. Only paths whose attributes were set through the
    daemon are in it; everything else is synthesized and costs nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: dict[str, Overrides] = {}

    def get(self, path: str) -> Overrides:
        return self._by_path.get(path) or Overrides()

    def set(self, path: str, over: Overrides) -> None:
        with self._lock:
            self._by_path[path] = over

    def drop(self, path: str) -> None:
        with self._lock:
            self._by_path.pop(path, None)

    def move(self, old: str, new: str, tree: bool) -> None:
        """Follow a rename; ``tree``: ``old`` is a directory prefix ("d/"), move what is under
        it as well (a scan of the table: directory renames are rare and this table small)."""
        with self._lock:
            over = self._by_path.pop(old, None)
            if over is not None:
                self._by_path[new] = over
            if tree:
                moved = [p for p in self._by_path if p.startswith(old)]
                for p in moved:
                    self._by_path[new + p[len(old) :]] = self._by_path.pop(p)

    def __len__(self) -> int:
        return len(self._by_path)
