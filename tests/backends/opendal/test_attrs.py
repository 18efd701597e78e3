"""POSIX attributes for objects (:mod:`pyvirtiofsd.backends.opendal.attrs`): the user-metadata
encoding (s3fs's keys, times in decimal seconds), what junk metadata decodes to, how stored,
kept and synthesized attributes combine, and the in-memory table following renames."""

from __future__ import annotations

import stat

import pytest

from pyvirtiofsd.backends.opendal.attrs import (
    Defaults,
    LocalAttrs,
    Meta,
    Overrides,
    build,
    decode,
    encode,
    format_time,
    overrides_of,
    parse_time,
)

S = 1_000_000_000
DEFAULTS = Defaults(uid=1000, gid=100, file_mode=0o644, dir_mode=0o755, start_ns=7 * S)


@pytest.mark.parametrize(
    ("ns", "text"),
    [(0, "0"), (12 * S, "12"), (1 * S + 500_000_000, "1.5"), (3 * S + 1, "3.000000001")],
)
def test_times_are_decimal_seconds(ns: int, text: str) -> None:
    assert format_time(ns) == text
    assert parse_time(text) == ns


def test_parse_time_takes_what_others_write_and_refuses_junk() -> None:
    assert parse_time(" 1700000000 ") == 1_700_000_000 * S  # s3fs: whole seconds
    assert parse_time("-2.25") == -2_250_000_000
    assert parse_time("1.1234567891") == 1_123_456_789  # beyond ns: cut
    for junk in ("", "abc", "1.x", "1e9", "0x10", "1..2"):
        assert parse_time(junk) is None, junk


def test_metadata_round_trips() -> None:
    meta = Meta(stat.S_IFREG | 0o4750, 10, 1234, 5678, 5 * S + 1, 6 * S, 7 * S + 250_000_000)
    um = encode(meta)
    assert um == {
        "mode": str(stat.S_IFREG | 0o4750),
        "uid": "1234",
        "gid": "5678",
        "mtime": "5.000000001",
        "atime": "6",
        "ctime": "7.25",
    }
    assert decode(um) == overrides_of(meta)
    # Keys come back in any case (S3 lower-cases them; other services may not).
    assert decode({k.upper(): v for k, v in um.items()}) == overrides_of(meta)


def test_junk_metadata_is_as_good_as_none() -> None:
    assert decode(None) == Overrides()
    assert decode({}) == Overrides()
    over = decode({"mode": str(1 << 32), "uid": "root", "gid": "-", "mtime": "soon"})
    assert over == Overrides()
    assert decode({"mode": "-1", "uid": " 7 "}) == Overrides(uid=7)


def test_nothing_kept_is_synthesized_from_the_defaults() -> None:
    f = build(stat.S_IFREG, 3, 9 * S, ("etag", 3, 9 * S), Overrides(), DEFAULTS)
    assert f == Meta(stat.S_IFREG | 0o644, 3, 1000, 100, 9 * S, 9 * S, 9 * S, ("etag", 3, 9 * S))
    # No time from the store (the memory service): the daemon's start.
    d = build(stat.S_IFDIR, 0, None, None, Overrides(), DEFAULTS)
    assert d.mode == stat.S_IFDIR | 0o755
    assert (d.mtime_ns, d.atime_ns, d.ctime_ns) == (7 * S, 7 * S, 7 * S)


def test_kept_attributes_win_but_not_over_the_kind() -> None:
    kept = Overrides(mode=stat.S_IFLNK | 0o777, uid=0, gid=0, mtime_ns=2 * S)
    # A regular object may really be a symlink (as s3fs stores them).
    link = build(stat.S_IFREG, 4, 9 * S, None, kept, DEFAULTS)
    assert (link.mode, link.uid, link.gid) == (stat.S_IFLNK | 0o777, 0, 0)
    # atime follows mtime when not kept; ctime is never before the store's own time.
    assert (link.mtime_ns, link.atime_ns, link.ctime_ns) == (2 * S, 2 * S, 9 * S)
    # A directory stays a directory, keeping only the permission bits it was given.
    d = build(stat.S_IFDIR, 0, None, None, Overrides(mode=stat.S_IFREG | 0o700), DEFAULTS)
    assert d.mode == stat.S_IFDIR | 0o700
    # Permission bits alone take the kind of the object.
    f = build(stat.S_IFREG, 0, None, None, Overrides(mode=0o600), DEFAULTS)
    assert f.mode == stat.S_IFREG | 0o600 and f.kind == stat.S_IFREG


def test_local_attrs_follow_renames() -> None:
    table = LocalAttrs()
    assert table.get("nothing") == Overrides()
    for path in ("d/", "d/a", "d/sub/", "d/sub/b", "dx", "e"):
        table.set(path, Overrides(uid=len(path)))
    table.move("d/", "n/", tree=True)
    assert table.get("n/") == Overrides(uid=2)
    assert table.get("n/sub/b") == Overrides(uid=7)
    assert table.get("d/a") == Overrides()
    assert table.get("dx") == Overrides(uid=2)  # a sibling that shares the prefix "d" stays
    table.move("e", "f", tree=False)
    assert table.get("f") == Overrides(uid=1) and table.get("e") == Overrides()
    table.drop("f")
    table.drop("never")
    assert len(table) == 5
