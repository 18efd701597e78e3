"""The object store as the file system sees it (:mod:`pyvirtiofsd.backends.opendal.store`):
calls fail with OSError, and names the store can't hold are refused before they reach it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pyvirtiofsd.fuse.filesystem import ROOT
from tests.backends.opendal.conftest import CTX, make_fs


def test_store_errors_are_oserrors(tmp_path: Path) -> None:
    fs = make_fs(tmp_path)
    with pytest.raises(OSError) as e:
        fs.store.read("nothing", 0, 10)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(OSError) as e:
        fs.lookup(CTX, ROOT, b"x" * 300)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        fs.lookup(CTX, ROOT, b"\xff\xfe")
    assert e.value.errno == errno.EINVAL
    fs.shutdown()
