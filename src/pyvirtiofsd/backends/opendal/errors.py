"""OpenDAL errors as errno values.

Every call into the store goes through :func:`store_call`, so that an OpenDAL exception never
reaches the FUSE server (which would answer EIO and log a traceback) and every failure the caller
cannot act on leaves one log line behind.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import TypeVar

from opendal import exceptions as ex

__all__ = [
    "ERRNO_OF",
    "T",
    "errno_of",
    "first_line",
    "store_call",
    "to_oserror",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: OpenDAL's error kinds and what a POSIX caller should see for them. RateLimited only gets
#: here once the retry layer has given up, so the caller is told to try again later.
ERRNO_OF: dict[type[BaseException], int] = {
    ex.NotFound: errno.ENOENT,
    ex.PermissionDenied: errno.EACCES,
    ex.AlreadyExists: errno.EEXIST,
    ex.IsADirectory: errno.EISDIR,
    ex.NotADirectory: errno.ENOTDIR,
    ex.Unsupported: errno.EOPNOTSUPP,
    ex.RateLimited: errno.EAGAIN,
    ex.IsSameFile: errno.EINVAL,
    ex.ConditionNotMatch: errno.ESTALE,
    ex.RangeNotSatisfied: errno.EINVAL,
    ex.Conflict: errno.EBUSY,
    ex.ConfigInvalid: errno.EINVAL,
}

#: Kinds that are an ordinary answer (a name that is not there, say): no log line for them.
_EXPECTED = (ex.NotFound, ex.AlreadyExists, ex.IsADirectory, ex.NotADirectory)


def errno_of(exc: BaseException) -> int:
    for kind, code in ERRNO_OF.items():
        if isinstance(exc, kind):
            return code
    return errno.EIO


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def to_oserror(exc: BaseException, what: str, path: str) -> OSError:
    """The OSError a FUSE reply carries for ``exc``, logged unless it is an ordinary answer."""
    if isinstance(exc, OSError):
        return exc
    code = errno_of(exc)
    if not isinstance(exc, _EXPECTED):
        # OpenDAL's messages carry the service's own explanation (an S3 error code, the HTTP
        # failure); the errno alone would lose it.
        level = logging.WARNING if code != errno.EIO else logging.ERROR
        log.log(level, "%s %r: %s -> %s", what, path, first_line(exc), errno.errorcode[code])
    return OSError(code, os.strerror(code), path)


def store_call(what: str, path: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call ``fn`` (an Operator method) and turn whatever it raises into an OSError."""
    try:
        return fn(*args, **kwargs)
    except OSError:
        raise
    except Exception as e:
        raise to_oserror(e, what, path) from None
