"""Helpers of the object-storage backend's module tests: the file system called directly, as
the FUSE server calls it, on a real OpenDAL Operator (memory unless a test gives another).

The store services shared with the end-to-end and attack suites (memory, fs, and s3 on a real
``moto_server``) are fixtures of :mod:`tests.opendal_fixtures`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opendal")

import opendal

from pyvirtiofsd.backends.opendal import OpendalConfig, OpendalFs
from pyvirtiofsd.fuse.buffers import ReplyWriter, WriteData
from pyvirtiofsd.fuse.filesystem import Context

CTX = Context(uid=0, gid=0, pid=1)


class CountingOperator:
    """A real Operator that counts the reads it serves, and can hold them: with `hold` set, a
    read announces itself on `held` and waits until `hold` is cleared."""

    def __init__(self, op: Any) -> None:
        self._op = op
        self.reads = 0
        self.hold = False
        self.held = threading.Event()
        self._release = threading.Event()

    def release(self) -> None:
        self.hold = False
        self._release.set()

    def read(self, path: str, **kwargs: Any) -> bytes:
        self.reads += 1
        if self.hold:
            self.held.set()
            self._release.wait(60)
        return self._op.read(path, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._op, name)


def make_fs(tmp_path: Path, op: Any = None, **cfg: Any) -> OpendalFs:
    config = OpendalConfig("memory", cache_dir=str(tmp_path / "cache"), **cfg)
    return OpendalFs(config, op if op is not None else opendal.Operator("memory"))


def write(fs: OpendalFs, ino: int, fh: int, offset: int, data: bytes) -> int:
    return fs.write(CTX, ino, fh, offset, WriteData([memoryview(data)], len(data)), 0)


def read(fs: OpendalFs, ino: int, fh: int, offset: int, size: int) -> bytes:
    buf = bytearray(size + ReplyWriter.HEADER)
    out = ReplyWriter([memoryview(buf)])
    fs.read(CTX, ino, fh, offset, size, out)
    return bytes(buf[ReplyWriter.HEADER : out.length])
