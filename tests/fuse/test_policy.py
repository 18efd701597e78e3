"""The FUSE policy every backend applies: what each cache mode tells the kernel, and which
opens a read-only share refuses."""

from __future__ import annotations

import os

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.policy import (
    CachePolicy,
    dir_open_flags,
    file_open_flags,
    may_write,
    readdirplus_allowed,
)


def test_parse_takes_virtiofsd_old_spelling() -> None:
    assert CachePolicy.parse("none") is CachePolicy.NEVER
    assert [CachePolicy.parse(m.value) for m in CachePolicy] == list(CachePolicy)
    with pytest.raises(ValueError):
        CachePolicy.parse("sometimes")


def test_modes() -> None:
    never, auto, always, metadata = (
        CachePolicy.NEVER,
        CachePolicy.AUTO,
        CachePolicy.ALWAYS,
        CachePolicy.METADATA,
    )
    assert (never.timeout, auto.timeout, always.timeout, metadata.timeout) == (0, 1, 86400, 86400)
    # Data: never and metadata keep no page cache; always keeps it across opens.
    assert file_open_flags(never) == file_open_flags(metadata) == abi.FOPEN_DIRECT_IO
    assert file_open_flags(auto) == 0
    assert file_open_flags(always) == abi.FOPEN_KEEP_CACHE
    assert dir_open_flags(never) == dir_open_flags(auto) == 0
    assert dir_open_flags(always) == abi.FOPEN_CACHE_DIR
    assert dir_open_flags(metadata) == abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE


def test_readdirplus_only_where_entries_last() -> None:
    assert readdirplus_allowed(CachePolicy.AUTO, True)
    assert not readdirplus_allowed(CachePolicy.AUTO, False)
    assert not readdirplus_allowed(CachePolicy.NEVER, True)


@pytest.mark.parametrize(
    ("flags", "writes"),
    [
        (os.O_RDONLY, False),
        (os.O_RDONLY | os.O_APPEND | os.O_NOATIME, False),
        (os.O_WRONLY, True),
        (os.O_RDWR, True),
        (os.O_ACCMODE, True),  # no valid access mode: never taken for read-only
        (os.O_RDONLY | os.O_TRUNC, True),
    ],
)
def test_may_write(flags: int, writes: bool) -> None:
    assert may_write(flags) is writes
