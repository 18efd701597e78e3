"""The object store as the file system sees it: paths, capabilities, and calls that fail with
OSError.

Paths follow OpenDAL: relative to the service's root, no leading slash, directories with a
trailing one ("a/b/"), the root itself "". OpenDAL's synchronous calls release the GIL, so a slow
store only ties up the worker thread that asked.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

from opendal import exceptions as ex

from pyvirtiofsd.backends.opendal.attrs import datetime_ns
from pyvirtiofsd.backends.opendal.errors import store_call, to_oserror

__all__ = [
    "Listed",
    "Stat",
    "Store",
    "parent_of",
]

log = logging.getLogger(__name__)


class Listed(NamedTuple):
    """One entry of a directory listing."""

    name: str
    is_dir: bool
    size: int
    last_modified_ns: int | None
    etag: str | None


class Stat(NamedTuple):
    is_dir: bool
    size: int
    last_modified_ns: int | None
    etag: str | None
    user_metadata: dict[str, str] | None

    @property
    def version(self) -> tuple[str | None, int, int | None]:
        return (self.etag, self.size, self.last_modified_ns)


def parent_of(path: str) -> str:
    """The directory path holding ``path`` ("a/b/c" and "a/b/c/" -> "a/b/"; "a" -> "")."""
    cut = path.rstrip("/").rfind("/")
    return "" if cut < 0 else path[: cut + 1]


class Store:
    def __init__(self, op: Any, part_size: int, multipart_threshold: int) -> None:
        self.op = op
        cap = op.capability()
        #: Mode, owner and times can travel with the object.
        self.user_metadata: bool = bool(cap.write_with_user_metadata)
        self.can_rename: bool = bool(cap.rename)
        self.can_copy: bool = bool(cap.copy)
        self.can_multi: bool = bool(cap.write_can_multi)
        self.can_write_empty: bool = bool(cap.write_can_empty)
        #: A write can be made conditional on the object not existing (one atomic request).
        self.can_create_new: bool = bool(cap.write_with_if_not_exists)
        min_part = cap.write_multi_min_size or 0
        self.part_size = max(part_size, min_part)
        self.multipart_threshold = max(multipart_threshold, self.part_size)

    # --- metadata --------------------------------------------------------------------------

    def _stat(self, path: str) -> Stat | None:
        try:
            m = self.op.stat(path)
        except Exception as e:
            err = to_oserror(e, "stat", path)
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise err from None
        return Stat(
            bool(m.is_dir),
            int(m.content_length or 0),
            datetime_ns(m.last_modified),
            m.etag,
            m.user_metadata,
        )

    def stat_name(self, path: str) -> Stat | None:
        """What ``path`` (no trailing slash) names: an object, else a directory (a marker or a
        prefix with something under it), else None."""
        st = self._stat(path)
        if st is not None:
            return st
        st = self._stat(path + "/")
        if st is not None and not st.is_dir:
            return None
        return st

    def stat_object(self, path: str) -> Stat | None:
        return self._stat(path)

    def stat_dir(self, path: str) -> Stat | None:
        st = self._stat(path)
        return st if st is not None and st.is_dir else None

    def list(self, dirpath: str, start_after: str | None = None) -> Iterator[Listed]:
        """The entries directly under ``dirpath``, in the store's order (paginated by OpenDAL
        underneath: each page is fetched when the previous one is used up)."""
        kwargs: dict[str, Any] = {}
        if start_after is not None:
            kwargs["start_after"] = start_after
        it = iter(store_call("list", dirpath, self.op.list, dirpath, **kwargs))
        while True:
            try:
                entry = next(it)
            except StopIteration:
                return
            except Exception as e:
                raise to_oserror(e, "list", dirpath) from None
            path = entry.path
            # Listings name the directory itself ("d/"; "/" for the root of fs): skip it.
            if path == dirpath or path == "/" or not path.startswith(dirpath):
                continue
            name = path[len(dirpath) :]
            is_dir = name.endswith("/")
            name = name.rstrip("/")
            if not name or "/" in name:
                continue
            m = entry.metadata
            yield Listed(
                name,
                is_dir,
                0 if is_dir else int(m.content_length or 0),
                datetime_ns(m.last_modified),
                m.etag,
            )

    def has_children(self, dirpath: str) -> bool:
        return next(iter(self.list(dirpath)), None) is not None

    def list_tree(self, dirpath: str) -> Iterator[str]:
        """Every path under ``dirpath``: objects and directory markers, deepest last."""
        stack = [dirpath]
        while stack:
            d = stack.pop()
            for entry in self.list(d):
                path = d + entry.name + ("/" if entry.is_dir else "")
                yield path
                if entry.is_dir:
                    stack.append(path)

    # --- data ------------------------------------------------------------------------------

    def read(self, path: str, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        return store_call("read", path, self.op.read, path, offset=offset, size=size)

    def read_all(self, path: str) -> bytes:
        return store_call("read", path, self.op.read, path)

    def write(self, path: str, data: bytes, user_metadata: dict[str, str] | None) -> None:
        kwargs: dict[str, Any] = {}
        if user_metadata is not None and self.user_metadata:
            kwargs["user_metadata"] = user_metadata
        store_call("write", path, self.op.write, path, data, **kwargs)

    def create(self, path: str, data: bytes, user_metadata: dict[str, str] | None) -> bool:
        """Write ``path`` in one request conditional on no object being there (the service
        must have ``can_create_new``): False, and nothing written, when one is."""
        kwargs: dict[str, Any] = {"if_not_exists": True}
        if user_metadata is not None and self.user_metadata:
            kwargs["user_metadata"] = user_metadata
        try:
            self.op.write(path, data, **kwargs)
        except (ex.ConditionNotMatch, ex.AlreadyExists):
            return False
        except Exception as e:
            raise to_oserror(e, "write", path) from None
        return True

    def single_put(self, size: int) -> bool:
        """Whether an object of ``size`` bytes is uploaded in one request."""
        return size < self.multipart_threshold or not self.can_multi

    def write_from_fd(
        self, path: str, fd: int, size: int, user_metadata: dict[str, str] | None
    ) -> None:
        """Upload ``size`` bytes of ``fd`` as the object: one PUT when small, else a multipart
        upload streamed part by part (only one part is in memory at a time)."""
        if self.single_put(size):
            data = os.pread(fd, size, 0) if size else b""
            if len(data) != size:
                raise OSError(errno.EIO, "short read of a staged file", path)
            self.write(path, data, user_metadata)
            return
        kwargs: dict[str, Any] = {"chunk": self.part_size}
        if user_metadata is not None and self.user_metadata:
            kwargs["user_metadata"] = user_metadata
        f = store_call("write", path, self.op.open, path, "wb", **kwargs)
        try:
            pos = 0
            while pos < size:
                chunk = os.pread(fd, min(self.part_size, size - pos), pos)
                if not chunk:
                    raise OSError(errno.EIO, "short read of a staged file", path)
                store_call("write", path, f.write, chunk)
                pos += len(chunk)
        except BaseException:
            # Dropping the writer without closing aborts the multipart upload: the previous
            # version of the object stays as it was.
            del f
            raise
        store_call("write", path, f.close)

    # --- namespace -------------------------------------------------------------------------

    def delete(self, path: str) -> None:
        store_call("delete", path, self.op.delete, path)

    def create_dir(self, dirpath: str) -> None:
        store_call("create_dir", dirpath, self.op.create_dir, dirpath)

    def move(self, src: str, dst: str) -> None:
        """Move one object: the service's rename, else copy and delete, else read, write and
        delete (the ``memory`` service can do neither). The user metadata goes along."""
        if self.can_rename:
            store_call("rename", src, self.op.rename, src, dst)
            return
        if self.can_copy:
            store_call("copy", src, self.op.copy, src, dst)
        else:
            st = self.stat_object(src)
            data = self.read_all(src)
            self.write(dst, data, st.user_metadata if st is not None else None)
        self.delete(src)
