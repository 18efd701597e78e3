"""The id-map parsing and checks of --uid-map/--gid-map, without a namespace (the guest test in
tests/e2e/test_userns.py enters real ones)."""

from __future__ import annotations

import pytest

from pyvirtiofsd.userns import IdRange, check_map, parse_range


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":0:1000:1:", IdRange(0, 1000, 1)),
        (":1:100000:65535:", IdRange(1, 100000, 65535)),
        ("/0/4294901760/65535/", IdRange(0, 4294901760, 65535)),  # any separator
    ],
)
def test_parse(text: str, expected: IdRange) -> None:
    assert parse_range(text) == expected
    assert expected.line() == f"{expected.inside} {expected.outside} {expected.count}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0:1000:1", "expected :inside:outside:count:"),
        ("", "expected :inside:outside:count:"),
        (":0:1000:1", "expected :inside:outside:count:"),
        (":0:1000:1:2:", "expected :inside:outside:count:"),
        (":0:x:1:", "decimal numbers"),
        (":0:-5:1:", "decimal numbers"),
        (":0:1000:0:", "at least 1"),
        (":0:4294967290:10:", "below"),
    ],
)
def test_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_range(text)


def test_check_map() -> None:
    check_map("uid", [IdRange(0, 1000, 1), IdRange(1, 100000, 65535)])
    with pytest.raises(ValueError, match="must map uid 0"):
        check_map("uid", [IdRange(1, 100000, 10)])
    with pytest.raises(ValueError, match="overlap inside"):
        check_map("gid", [IdRange(0, 1000, 5), IdRange(4, 2000, 5)])
    with pytest.raises(ValueError, match="overlap outside"):
        check_map("gid", [IdRange(0, 1000, 5), IdRange(10, 1004, 5)])
