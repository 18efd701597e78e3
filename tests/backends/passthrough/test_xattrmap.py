"""The xattr map (:mod:`pyvirtiofsd.backends.passthrough.xattrmap`) on its own: virtiofsd's
grammar, every rule type in each scope, the ``map`` shorthand, the examples virtiofsd documents,
and the maps it refuses, including those that leave a name undecided (virtiofsd panics on
them)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtiofsd.backends.passthrough.xattrmap import (
    Kind,
    Rule,
    Scope,
    XattrMap,
    XattrMapError,
)

ALL, CLIENT, SERVER = Scope.ALL, Scope.CLIENT, Scope.SERVER
PREFIX, OK, BAD, UNSUPPORTED = Kind.PREFIX, Kind.OK, Kind.BAD, Kind.UNSUPPORTED

#: The rules the research notes measured virtiofsd 1.14 with (B3), and what it did.
MEASURED = (
    "/prefix/all/trusted./user.virtiofs./ /bad/server//trusted./ /bad/client/user.virtiofs.// "
    "/unsupported/all/user.nosup./user.nosup./ /ok/all///"
)


def rules(m: XattrMap) -> list[tuple[Kind, Scope, bytes, bytes]]:
    return [(r.kind, r.scope, r.key, r.prepend) for r in m.rules]


# --- grammar --------------------------------------------------------------------------------------


def test_one_rule_of_each_form() -> None:
    m = XattrMap.parse(":prefix:all:trusted.:user.virtiofs.: :ok:all:::")
    assert rules(m) == [
        (PREFIX, ALL, b"trusted.", b"user.virtiofs."),
        (OK, ALL, b"", b""),
    ]
    assert [r.number for r in m.rules] == [1, 2]


def test_each_rule_has_its_own_separator_and_whitespace_between_rules_is_skipped() -> None:
    text = "\n\t :bad:client:a.b:: \n/ok/server//x:y/\r\n|prefix|client||p.|\x0c,ok,all,,,  "
    assert rules(XattrMap.parse(text)) == [
        (BAD, CLIENT, b"a.b", b""),
        (OK, SERVER, b"", b"x:y"),
        (PREFIX, CLIENT, b"", b"p."),
        (OK, ALL, b"", b""),
    ]


def test_whitespace_inside_a_field_is_kept_and_any_character_separates() -> None:
    m = XattrMap.parse("qprefixqallq user. q y.q §ok§all§§§")
    assert rules(m)[0] == (PREFIX, ALL, b" user. ", b" y.")
    assert rules(m)[1] == (OK, ALL, b"", b"")


def test_rules_are_not_separated_by_anything_but_their_own_end() -> None:
    # Example 1 of virtiofsd's documentation: two rules back to back.
    assert rules(XattrMap.parse(":prefix:all::user.virtiofs.::bad:all:::")) == [
        (PREFIX, ALL, b"", b"user.virtiofs."),
        (BAD, ALL, b"", b""),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no rules"),
        (" \n\t ", "no rules"),
        (":prefix:all:a:b", "rule 1 (at character 1) has no closing ':'"),
        (":ok:all::: /ok/all//", "rule 2 (at character 12) has no closing '/'"),
        (":ok:all", "has no closing"),
        (":", "has no closing"),
        (":map:a", "has no closing"),
        (":Prefix:all:::", "rule 1: unknown type 'Prefix' (prefix, ok, bad, unsupported or map)"),
        (":ok:all::: :deny:all:::", "rule 2: unknown type 'deny'"),
        (":ok:both:::", "rule 1: unknown scope 'both' (client, server or all)"),
        (":ok:ALL:::", "unknown scope 'ALL'"),
        (":map::user.virtiofs.: :ok:all:::", "rule 1: a map rule must be the last rule"),
        (":ok:all::: :map::a.: :map::b.:", "rule 2: a map rule must be the last rule"),
    ],
)
def test_refused_text(text: str, message: str) -> None:
    with pytest.raises(XattrMapError) as e:
        XattrMap.parse(text)
    assert message in str(e.value)


# --- a map always decides -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "guest", "host"),
    [
        # virtiofsd 1.14 starts with this one and panics at its start-up probe.
        (":prefix:client:trusted.:user.virtiofs.:", True, True),
        ("/prefix/all/trusted./user.virtiofs./ /bad/server//trusted./", True, True),
        (":ok:server::: :bad:client:a::", True, False),
        (":ok:client::: :ok:server::x:", False, True),
        (":prefix:all::user.v.:", False, True),
        (":ok:all:a:b: :bad:all:c:d:", True, True),
    ],
)
def test_a_map_that_leaves_names_undecided_is_refused(text: str, guest: bool, host: bool) -> None:
    with pytest.raises(XattrMapError) as e:
        XattrMap.parse(text)
    assert ("no rule decides every guest name" in str(e.value)) is guest
    assert ("no rule decides every host name" in str(e.value)) is host
    assert "such as ':ok:all:::'" in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        ":ok:all:::",
        ":bad:all:::",
        ":unsupported:all:::",
        ":prefix:all:::",
        ":prefix:all::user.v.: :ok:server:::",
        ":ok:client::x: :bad:server:y::",
        ":map:a.:b.:",
        ":map::b.:",
    ],
)
def test_a_map_that_always_decides_is_taken(text: str) -> None:
    XattrMap.parse(text)


def test_built_from_rules_the_same_check_holds() -> None:
    with pytest.raises(XattrMapError):
        XattrMap((Rule(OK, CLIENT, b"", b""),))
    XattrMap((Rule(OK, CLIENT, b"", b""), Rule(OK, SERVER, b"", b"")))


# --- rule types, by scope -------------------------------------------------------------------------


def test_prefix_prepends_the_whole_guest_name_and_strips_from_host_names() -> None:
    m = XattrMap.parse(":prefix:all:trusted.:user.virtiofs.: :ok:all:::")
    # The key only selects: it is not replaced.
    assert m.to_host(b"trusted.foo") == b"user.virtiofs.trusted.foo"
    assert m.to_host(b"user.foo") == b"user.foo"
    assert m.to_guest(b"user.virtiofs.trusted.foo") == b"trusted.foo"
    # Server side matches prepend, whatever follows it.
    assert m.to_guest(b"user.virtiofs.other") == b"other"
    assert m.to_guest(b"user.foo") == b"user.foo"


def test_a_host_name_stripped_to_nothing_is_hidden() -> None:
    m = XattrMap.parse(":prefix:all::user.virtiofs.: :ok:all:::")
    assert m.to_guest(b"user.virtiofs.") is None
    assert m.list_to_guest([b"user.virtiofs.", b"user.virtiofs.a"]) == [b"a"]


@pytest.mark.parametrize("kind", [BAD, UNSUPPORTED])
def test_bad_and_unsupported_refuse_guest_names_and_hide_host_names(kind: Kind) -> None:
    m = XattrMap.parse(f":{kind.value}:all:user.secret.:trusted.: :ok:all:::")
    assert m.to_host(b"user.secret.x") is kind
    assert m.to_host(b"trusted.x") == b"trusted.x"  # client scope matches the key only
    assert m.to_guest(b"trusted.x") is None
    assert m.to_guest(b"user.secret.x") == b"user.secret.x"  # server scope: prepend only


def test_ok_passes_both_ways_unchanged() -> None:
    m = XattrMap.parse(":ok:all:user.:security.: :bad:all:::")
    assert m.to_host(b"user.a") == b"user.a"
    assert m.to_host(b"security.a") is BAD
    assert m.to_guest(b"security.a") == b"security.a"
    assert m.to_guest(b"user.a") is None


def test_scopes_apply_a_rule_to_one_side_only() -> None:
    m = XattrMap.parse(
        ":prefix:client:trusted.:user.t.: :prefix:server::user.s.: :bad:client::: :ok:server:::"
    )
    assert m.to_host(b"trusted.a") == b"user.t.trusted.a"
    assert m.to_host(b"user.s.a") is BAD  # the server rule is not asked
    assert m.to_guest(b"user.s.a") == b"a"
    assert m.to_guest(b"user.t.trusted.a") == b"user.t.trusted.a"  # nor the client rule


def test_the_first_matching_rule_decides() -> None:
    m = XattrMap.parse(":ok:all:user.keep.:user.keep.: :bad:all:user.:user.: :ok:all:::")
    assert m.to_host(b"user.keep.a") == b"user.keep.a"
    assert m.to_host(b"user.other") is BAD
    assert m.list_to_guest([b"user.other", b"user.keep.b", b"trusted.c"]) == [
        b"user.keep.b",
        b"trusted.c",
    ]


def test_the_measured_rules_of_virtiofsd() -> None:
    """The table the research notes measured with virtiofsd 1.14 (B3), at the map's level:
    guest names to host names or refusals, and the host's list as the guest sees it."""
    m = XattrMap.parse(MEASURED)
    assert m.to_host(b"trusted.foo") == b"user.virtiofs.trusted.foo"
    assert m.to_host(b"trusted.hostonly") == b"user.virtiofs.trusted.hostonly"
    assert m.to_host(b"user.virtiofs.x") is BAD
    assert m.to_host(b"user.virtiofs.trusted.pre") is BAD
    assert m.to_host(b"user.nosup.a") is UNSUPPORTED
    assert m.to_host(b"user.other") == b"user.other"
    host = [b"trusted.hostonly", b"user.plain", b"user.nosup.h", b"user.virtiofs.trusted.pre"]
    assert sorted(m.list_to_guest(host)) == [b"trusted.pre", b"user.plain"]


# --- the map shorthand and the documented examples ------------------------------------------------


def test_map_with_a_key_expands_to_three_rules() -> None:
    assert rules(XattrMap.parse("/map/trusted./user.virtiofs./")) == [
        (PREFIX, ALL, b"trusted.", b"user.virtiofs."),
        (BAD, ALL, b"user.virtiofs.", b"trusted."),
        (OK, ALL, b"", b""),
    ]


def test_map_without_a_key_expands_to_two_rules() -> None:
    assert rules(XattrMap.parse(":map::user.virtiofs.:")) == [
        (PREFIX, ALL, b"", b"user.virtiofs."),
        (BAD, ALL, b"", b""),
    ]


def test_map_may_follow_other_rules() -> None:
    m = XattrMap.parse(":unsupported:all:user.no.:user.no.: :map::user.virtiofs.:")
    assert rules(m)[0] == (UNSUPPORTED, ALL, b"user.no.", b"user.no.")
    assert [r.number for r in m.rules] == [1, 2, 2]
    assert m.to_host(b"user.no.x") is UNSUPPORTED
    assert m.to_host(b"user.x") == b"user.virtiofs.user.x"


def test_documented_example_1_everything_under_one_prefix() -> None:
    long = XattrMap.parse(":prefix:all::user.virtiofs.::bad:all:::")
    short = XattrMap.parse(":map::user.virtiofs.:")
    assert rules(long) == rules(short)
    for m in (long, short):
        assert m.to_host(b"security.selinux") == b"user.virtiofs.security.selinux"
        assert m.to_host(b"user.virtiofs.x") == b"user.virtiofs.user.virtiofs.x"
        # Unprefixed host xattrs are hidden.
        assert m.list_to_guest([b"user.virtiofs.trusted.a", b"user.raw", b"security.raw"]) == [
            b"trusted.a"
        ]


def test_documented_example_2_trusted_under_a_prefix() -> None:
    long = XattrMap.parse(
        """/prefix/all/trusted./user.virtiofs./
            /bad/server//trusted./
            /bad/client/user.virtiofs.//
            /ok/all///"""
    )
    short = XattrMap.parse("/map/trusted./user.virtiofs./")
    for m in (long, short):
        assert m.to_host(b"trusted.a") == b"user.virtiofs.trusted.a"
        assert m.to_host(b"user.virtiofs.a") is BAD
        assert m.to_host(b"user.a") == b"user.a"
        assert m.list_to_guest(
            [b"user.virtiofs.trusted.a", b"trusted.hostonly", b"user.a", b"security.b"]
        ) == [b"trusted.a", b"user.a", b"security.b"]


def test_documented_example_3_hide_security() -> None:
    m = XattrMap.parse("/bad/all/security./security./ /ok/all///")
    assert m.to_host(b"security.selinux") is BAD
    assert m.to_host(b"user.a") == b"user.a"
    assert m.list_to_guest([b"security.selinux", b"user.a"]) == [b"user.a"]


def test_documented_selinux_guest_rules() -> None:
    m = XattrMap.parse(":map:security.selinux:trusted.virtiofs.:")
    assert m.to_host(b"security.selinux") == b"trusted.virtiofs.security.selinux"
    assert m.to_host(b"trusted.virtiofs.x") is BAD
    assert m.to_host(b"user.a") == b"user.a"
    assert m.list_to_guest(
        [b"trusted.virtiofs.security.selinux", b"security.selinux", b"user.a"]
    ) == [b"security.selinux", b"user.a"]


# --- security.capability --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "renamed"),
    [
        (":map::user.virtiofs.:", b"user.virtiofs.security.capability"),
        (":map:security.:trusted.v.:", b"trusted.v.security.capability"),
        (":map:security.selinux:trusted.virtiofs.:", None),
        (":ok:all:::", None),
        (":bad:all:security.::  :ok:all:::", None),
        (":unsupported:client:security.capability:: :ok:all:::", None),
    ],
)
def test_capability_name(text: str, renamed: bytes | None) -> None:
    assert XattrMap.parse(text).capability_name == renamed


# --- written back out -----------------------------------------------------------------------------


def test_str_gives_the_expanded_rules() -> None:
    m = XattrMap.parse("/map/trusted./user.virtiofs./")
    assert str(m) == (
        ":prefix:all:trusted.:user.virtiofs.: :bad:all:user.virtiofs.:trusted.: :ok:all:::"
    )
    assert str(XattrMap.parse("/ok/all/a:b// :ok:all:::")) == "/ok/all/a:b// :ok:all:::"


_NAMES = (
    st.binary(max_size=6)
    .filter(lambda b: b"\0" not in b)
    .map(lambda b: b.decode("latin-1").encode())
)
_RULES = st.lists(
    st.tuples(st.sampled_from(list(Kind)), st.sampled_from([ALL, CLIENT, SERVER]), _NAMES, _NAMES),
    max_size=5,
)


@given(_RULES)
def test_written_out_and_read_back_it_is_the_same_map(parts: list) -> None:
    made = [Rule(k, s, key, pre, i + 1) for i, (k, s, key, pre) in enumerate(parts)]
    made.append(Rule(OK, ALL, b"", b"", len(made) + 1))
    m = XattrMap(tuple(made))
    assert XattrMap.parse(str(m)) == m
