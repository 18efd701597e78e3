"""OpenDAL errors as errno values (:mod:`pyvirtiofsd.backends.opendal.errors`)."""

from __future__ import annotations

import errno

from opendal import exceptions as ex

from pyvirtiofsd.backends.opendal.errors import errno_of


def test_errno_map() -> None:
    cases = {
        ex.NotFound: errno.ENOENT,
        ex.PermissionDenied: errno.EACCES,
        ex.AlreadyExists: errno.EEXIST,
        ex.IsADirectory: errno.EISDIR,
        ex.NotADirectory: errno.ENOTDIR,
        ex.Unsupported: errno.EOPNOTSUPP,
        ex.RateLimited: errno.EAGAIN,
        ex.Unexpected: errno.EIO,
    }
    for kind, code in cases.items():
        assert errno_of(kind("x")) == code
    assert errno_of(RuntimeError("x")) == errno.EIO
