"""Options of the object-storage file system, and the checks run before anything listens.

Rules: :class:`OpendalConfig` is complete and frozen, and is filled from the command line by
field name (``--opendal`` is the scheme, ``--opendal-opt`` the options, ``--opendal-cache-*`` the
cache fields; the rest share the passthrough backend's names). The cache modes come from
:mod:`pyvirtiofsd.fuse.policy`, shared with every backend.

The service is named by its OpenDAL scheme (``memory``, ``fs``, ``s3``, ``gcs``, ...) and
configured with that service's own option keys, exactly as ``opendal.Operator(scheme, **opts)``
takes them. :func:`check_service` refuses a scheme the installed wheel does not have, an option
key the service does not know (OpenDAL itself ignores those silently, which turns a typo into a
confusing failure later) and a store that does not answer.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofsd.fuse.policy import CachePolicy

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_DIR_RENAME_LIMIT",
    "OpendalConfig",
    "check_service",
    "service_option_keys",
]

#: Default bound of the local read cache (dirty staged data is never dropped, so it may exceed
#: this while files are being written).
DEFAULT_CACHE_SIZE = 1 << 30
#: A directory rename moves every object under the prefix one by one; beyond this many objects
#: it is refused with EXDEV, which makes ``mv`` fall back to copying and deleting by itself.
DEFAULT_DIR_RENAME_LIMIT = 10_000

_SCHEME_RE = re.compile(r"Literal\[['\"]([^'\"]+)['\"]\]")


def service_option_keys(scheme: str) -> frozenset[str] | None:
    """The option keys OpenDAL's typed configuration lists for ``scheme`` (None: not listed)."""
    import opendal.config as typed

    for name in dir(typed):
        cls = getattr(typed, name)
        annotations = getattr(cls, "__annotations__", None)
        if not name.endswith("Config") or not isinstance(annotations, dict):
            continue
        ann = annotations.get("scheme")
        text = getattr(ann, "__forward_arg__", None) or str(ann)
        m = _SCHEME_RE.search(text)
        if m and m.group(1) == scheme:
            return frozenset(k for k in annotations if k != "scheme")
    return None


def check_service(scheme: str, options: dict[str, str], probe: bool = True) -> str | None:
    """Why ``scheme`` with ``options`` can't be served, or None when it can.

    Builds the Operator and, with ``probe``, asks the store once (``check()``: a listing of the
    root), so that a missing bucket, a refused connection or bad credentials end the daemon
    with a message before it listens, rather than turn into EIO in the guest later.
    """
    try:
        import opendal
    except ImportError:
        return "the opendal package is not installed (pip install 'pyvirtiofsd[opendal]')"
    keys = service_option_keys(scheme)
    if keys is not None:
        unknown = sorted(set(options) - keys)
        if unknown:
            return (
                f"unknown option{'s' if len(unknown) > 1 else ''} for the {scheme} service: "
                f"{', '.join(unknown)} (known: {', '.join(sorted(keys))})"
            )
    from pyvirtiofsd.backends.opendal.errors import first_line

    try:
        op = opendal.Operator(scheme, **options)
    except Exception as e:
        return f"cannot build the {scheme} service: {first_line(e)}"
    if probe:
        from opendal.layers import TimeoutLayer

        try:
            op.layer(TimeoutLayer(timeout=15.0, io_timeout=15.0)).check()
        except Exception as e:
            return f"the {scheme} service does not answer: {first_line(e)}"
    return None


@dataclass(frozen=True)
class OpendalConfig:
    scheme: str
    options: dict[str, str] = field(default_factory=dict)
    cache: CachePolicy = CachePolicy.AUTO
    #: Where staged writes and cached ranges live (a private directory is made inside it).
    cache_dir: str | None = None
    cache_size: int | None = None
    readonly: bool = False
    readdirplus: bool = True
    writeback: bool = False
    dir_rename_limit: int = DEFAULT_DIR_RENAME_LIMIT
    #: Owner and permission bits of objects that carry none (written by other clients).
    default_uid: int = field(default_factory=os.geteuid)
    default_gid: int = field(default_factory=os.getegid)
    file_mode: int = 0o644
    dir_mode: int = 0o755
    #: Retries of temporary failures (rate limits, dropped connections), with backoff.
    retries: int = 4
    retry_min_delay: float = 0.1
    retry_max_delay: float = 5.0
    #: Seconds allowed for one metadata call and for one data call.
    timeout: float = 30.0
    io_timeout: float = 120.0
    #: Objects at least this large are uploaded as multipart, in parts of ``part_size``.
    multipart_threshold: int = 16 << 20
    part_size: int = 8 << 20

    @property
    def entry_timeout(self) -> float:
        return self.cache.timeout

    @property
    def cache_bytes(self) -> int:
        return DEFAULT_CACHE_SIZE if self.cache_size is None else self.cache_size

    def cache_parent(self) -> str:
        return self.cache_dir or tempfile.gettempdir()

    def build_operator(self) -> Any:
        """The Operator, behind a retry layer (temporary errors, with backoff and jitter) and
        a timeout layer (a stalled connection must end in an error, not hang a worker)."""
        import opendal
        from opendal.layers import RetryLayer, TimeoutLayer

        op = opendal.Operator(self.scheme, **self.options)
        op = op.layer(TimeoutLayer(timeout=self.timeout, io_timeout=self.io_timeout))
        if self.retries > 0:
            op = op.layer(
                RetryLayer(
                    max_times=self.retries,
                    factor=2.0,
                    jitter=True,
                    min_delay=self.retry_min_delay,
                    max_delay=self.retry_max_delay,
                )
            )
        return op
