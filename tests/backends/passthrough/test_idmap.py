"""The id translation tables (:mod:`pyvirtiofsd.backends.passthrough.idmap`): virtiofsd's
rule syntax, every form in its direction, the last number a count, refused sets named rule by
rule (overlaps per direction on half-open ranges, one-to-one rules sharing ids, ranges past
4294967295, host id (uid_t)-1), unmatched ids kept unless they would alias a translated one,
and the argument lists Incus, virtiofsd's README and its work item 198 write."""

from __future__ import annotations

import errno
import itertools
import random
import re

import pytest

from pyvirtiofsd.backends.passthrough.idmap import (
    ID_LIMIT,
    NO_ID,
    IdMap,
    IdMapError,
    IdRule,
    RuleKind,
    parse_rule,
)


def build(*rules: str, kind: str = "uid") -> IdMap:
    return IdMap(kind, [parse_rule(r) for r in rules])


def refused(ids: IdMap, guest_id: int) -> str:
    with pytest.raises(PermissionError) as e:
        ids.to_host(guest_id)
    assert e.value.errno == errno.EPERM
    return str(e.value.strerror)


def collision(*rules: str) -> str:
    with pytest.raises(IdMapError) as e:
        build(*rules)
    return str(e.value)


# --- syntax -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("map:1000:5000:10", IdRule(RuleKind.MAP, 1000, 5000, 10)),
        ("guest:0:100000:65536", IdRule(RuleKind.GUEST, 0, 100000, 65536)),
        ("host:1001:1000:1", IdRule(RuleKind.HOST, 1001, 1000, 1)),
        ("squash-guest:0:1001:4294967295", IdRule(RuleKind.SQUASH_GUEST, 0, 1001, 4294967295)),
        ("squash-host:7000:4242:10", IdRule(RuleKind.SQUASH_HOST, 7000, 4242, 10)),
        ("forbid-guest:2001:100", IdRule(RuleKind.FORBID_GUEST, 2001, 0, 100)),
        # virtiofsd's reading: any separator after the type, the type in any case
        ("MAP/1/2/3", IdRule(RuleKind.MAP, 1, 2, 3)),
        ("Squash-Host,0,65534,1000", IdRule(RuleKind.SQUASH_HOST, 0, 65534, 1000)),
        ("forbid-guest:0:0", IdRule(RuleKind.FORBID_GUEST, 0, 0, 0)),  # Incus's empty gaps
        ("forbid-guest:65536:4294901760", IdRule(RuleKind.FORBID_GUEST, 65536, 0, 4294901760)),
    ],
)
def test_rules_parse(text: str, rule: IdRule) -> None:
    assert parse_rule(text) == rule
    assert parse_rule(str(rule)) == rule  # written back with ':'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("map", "expected map:GUEST:HOST:COUNT"),
        ("map:1:2", "expected map:GUEST:HOST:COUNT"),
        ("map:1:2:3:", "expected map:GUEST:HOST:COUNT"),  # no trailing separator
        ("map:1:2:3:4", "expected map:GUEST:HOST:COUNT"),
        ("forbid-guest:1:2:3", "expected forbid-guest:GUEST:COUNT"),
        ("map:1:-2:3", "expected map:GUEST:HOST:COUNT"),
        ("map:1:0x10:3", "expected map:GUEST:HOST:COUNT"),
        ("map:1: 2:3", "expected map:GUEST:HOST:COUNT"),
        ("map:1:2:4294967296", "below 4294967296"),
        (":1:2:3", "the rule's type must be one of map, guest, host"),
        ("swap:1:2:3", "the rule's type must be one of"),
        ("", "the rule's type must be one of"),
    ],
)
def test_malformed_rules_are_refused(text: str, message: str) -> None:
    with pytest.raises(IdMapError, match=re.escape(message)):
        parse_rule(text)


# --- every form, in its direction -------------------------------------------------------------


def test_map_goes_both_ways() -> None:
    ids = build("map:1000:5000:10")
    assert [ids.to_host(g) for g in (1000, 1003, 1009)] == [5000, 5003, 5009]
    assert [ids.to_guest(h) for h in (5000, 5003, 5009)] == [1000, 1003, 1009]
    # half-open: the count's end is outside
    assert ids.to_host(1010) == 1010 and ids.to_guest(5010) == 5010
    assert ids.to_host(999) == 999 and ids.to_guest(4999) == 4999


def test_guest_rules_go_guest_to_host_only() -> None:
    ids = build("guest:0:100000:10")
    assert ids.to_host(0) == 100000 and ids.to_host(9) == 100009
    assert ids.to_guest(100000) == NO_ID  # host 100000 is no guest id (see aliasing below)
    assert ids.to_guest(0) == 0


def test_host_rules_go_host_to_guest_only() -> None:
    ids = build("host:100000:0:10")
    assert ids.to_guest(100000) == 0 and ids.to_guest(100009) == 9
    assert ids.to_host(100000) == 100000


def test_squash_guest_makes_many_guest_ids_one_host_id() -> None:
    ids = build("squash-guest:1000:7000:10")
    assert {ids.to_host(g) for g in range(1000, 1010)} == {7000}
    assert ids.to_host(1010) == 1010
    assert ids.to_guest(7000) == 7000  # squashing takes no id for itself


def test_squash_host_shows_many_host_ids_as_one_guest_id() -> None:
    ids = build("squash-host:7000:4242:10")
    assert {ids.to_guest(h) for h in range(7000, 7010)} == {4242}
    assert ids.to_guest(7010) == 7010
    assert ids.to_host(4242) == 4242


def test_forbidden_guest_ids_are_eperm() -> None:
    ids = build("forbid-guest:2001:100")
    assert ids.to_host(2000) == 2000 and ids.to_host(2101) == 2101
    for g in (2001, 2050, 2100):
        assert "refused: by 'forbid-guest:2001:100'" in refused(ids, g)
    # a host id that would show as a guest id the guest may not use shows as no one
    assert ids.to_guest(2050) == NO_ID


def test_no_rules_is_identity() -> None:
    ids = IdMap("gid")
    assert ids.identity
    assert [ids.to_host(i) for i in (0, 1, 65534)] == [0, 1, 65534]
    assert [ids.to_guest(i) for i in (0, 1, 65534, NO_ID)] == [0, 1, 65534, NO_ID]
    assert build("forbid-guest:5:0").identity  # a count of 0 matches nothing
    assert not build("forbid-guest:5:1").identity


def test_guest_id_4294967295_is_always_refused() -> None:
    """(uid_t)-1 is no id: setfsuid takes it as 'unchanged' and the caller would stay root."""
    ids = build("map:0:100000:65536")
    assert "(uid_t)-1 is no id" in refused(ids, NO_ID)
    assert ids.to_guest(NO_ID) == NO_ID


# --- refused sets -----------------------------------------------------------------------------


def test_overlapping_sources_name_both_rules() -> None:
    message = collision("forbid-guest:0:1000", "map:999:5:1")
    assert "rules 'forbid-guest:0:1000' (guest uids 0-999) and 'map:999:5:1'" in message
    assert "both match guest uid 999" in message
    assert "the last number of a rule is a count" in message


def test_ranges_are_half_open() -> None:
    build("forbid-guest:0:1000", "map:1000:5:1")  # 0..999 and 1000: touching, not overlapping
    build("map:0:100:10", "map:10:110:10")


def test_overlaps_are_per_direction() -> None:
    build("guest:0:0:10", "host:0:0:10")  # one rule each way: fine
    build("guest:0:5000:10", "squash-host:5000:0:10")
    assert "both match host uids 5000-5009" in collision("map:0:5000:10", "host:5000:100:10")
    assert "both match guest uid 5" in collision("squash-guest:0:1:10", "forbid-guest:5:1")


def test_a_long_rule_collides_with_one_far_inside_it() -> None:
    message = collision("map:30:900:5", "forbid-guest:0:100", "map:200:0:5", "map:50:500:1")
    assert "'forbid-guest:0:100' (guest uids 0-99) and 'map:30:900:5'" in message
    message = collision("forbid-guest:0:100", "map:200:0:5", "map:50:500:1")
    assert "'forbid-guest:0:100' (guest uids 0-99) and 'map:50:500:1'" in message
    # and many rules that touch without overlapping are fine
    many = [f"map:{i * 10}:{100000 + i * 10}:10" for i in range(2000)]
    assert build(*many).to_host(12345) == 112345


def test_duplicate_rules_collide() -> None:
    assert "both match guest uids 0-9" in collision("map:0:0:10", "map:0:0:10")


def test_one_to_one_rules_keep_their_ids() -> None:
    message = collision("map:0:5000:10", "guest:100:5005:10")
    assert "'map:0:5000:10' and 'guest:100:5005:10' both make host uids 5005-5009" in message
    assert "both make host uid 5003" in collision("map:100:5000:10", "squash-guest:0:5003:10")
    assert "both make guest uid 3" in collision("host:100:0:10", "squash-host:0:3:10")
    # squash rules may merge into the same id
    build("squash-guest:0:7:10", "squash-guest:10:7:10")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # virtiofsd accepts the first and forbids nothing: the end wraps to 5999
        ("forbid-guest:6000:4294967295", "'forbid-guest:6000:4294961296' reaches the last id"),
        ("forbid-guest:4294967295:2", "runs past id 4294967295"),
        ("map:4294967000:0:1000", "runs past id 4294967295"),
        ("squash-host:4294967290:0:7", "runs past id 4294967295"),
        ("map:0:4294967295:1", "makes a guest id host id 4294967295"),
        ("guest:0:4294967290:6", "makes a guest id host id 4294967295"),
        ("squash-guest:0:4294967295:10", "makes a guest id host id 4294967295"),
        ("host:0:4294967290:7", "shows host ids as guest ids past 4294967295"),
    ],
)
def test_ranges_past_the_last_id_are_refused(text: str, message: str) -> None:
    with pytest.raises(IdMapError, match=re.escape(message)):
        parse_rule(text)


def test_ranges_may_reach_the_last_id() -> None:
    ids = build("forbid-guest:6000:4294961296")
    assert "refused: by" in refused(ids, 6000) and "refused: by" in refused(ids, NO_ID)
    build("squash-host:1:65534:4294967295")
    build("host:0:0:4294967295")


def test_rules_built_in_code_are_checked_too() -> None:
    with pytest.raises(IdMapError):
        IdMap("uid", [IdRule(RuleKind.FORBID_GUEST, 6000, 0, 4294967295)])
    with pytest.raises(IdMapError):
        IdMap("uid", [IdRule(RuleKind.MAP, -1, 0, 1)])


def test_messages_say_which_option() -> None:
    with pytest.raises(IdMapError, match="--translate-gid rules"):
        build("map:0:0:2", "map:1:5:1", kind="gid")


# --- aliasing ---------------------------------------------------------------------------------


def test_an_unmatched_guest_id_cannot_become_a_translated_guest_ids_host_id() -> None:
    """map:1000:5000:10 and a chown to 5003: virtiofsd stores host 5003, which reads back as
    guest 1003, and lets guest user 5003 create files as guest user 1003's host id."""
    ids = build("map:1000:5000:10")
    message = refused(ids, 5003)
    assert "'map:1000:5000:10' makes another guest uid host uid 5003" in message
    assert ids.to_host(1003) == 5003
    assert ids.to_host(4999) == 4999 and ids.to_host(5010) == 5010


def test_an_unmatched_host_id_cannot_look_like_a_translated_one() -> None:
    ids = build("map:1000:5000:10")
    assert ids.to_guest(1003) == NO_ID  # it would look like guest 1003, who is host 5003
    assert ids.to_guest(999) == 999 and ids.to_guest(1010) == 1010
    only_guest = build("guest:1000:5000:10")
    assert only_guest.to_guest(5003) == NO_ID  # guest 5003 is refused: no one shows as it


def test_squash_takes_no_ids() -> None:
    ids = build("squash-host:7000:4242:10")
    assert ids.to_host(4242) == 4242 and ids.to_guest(4242) == 4242
    assert ids.to_host(7005) == 7005  # guest 7005 acts as itself, and sees its files as 4242


# --- what users write -------------------------------------------------------------------------


def incus(entries: list[tuple[int, int, int]]) -> list[str]:
    """The rules Incus (internal/server/device/device_utils_disk.go) writes for a VM's sorted
    idmap entries (nsid, hostid, range): a map each, a forbid-guest for each gap before it
    (a count of 0 where there is none), and one up to 4294967295, which it leaves out."""
    rules, last = [], 0
    for nsid, hostid, count in entries:
        rules.append(f"map:{nsid}:{hostid}:{count}")
        rules.append(f"forbid-guest:{last}:{nsid - last}")
        last = nsid + count
    if last < 4294967295:
        rules.append(f"forbid-guest:{last}:{4294967295 - last}")
    return rules


def test_incus_default_idmap() -> None:
    rules = incus([(0, 1000000, 1000000000)])
    assert rules == [
        "map:0:1000000:1000000000",
        "forbid-guest:0:0",
        "forbid-guest:1000000000:3294967295",
    ]
    ids = build(*rules)
    assert ids.to_host(0) == 1000000 and ids.to_host(1000) == 1001000
    assert "refused: by 'forbid-guest:1000000000:3294967295'" in refused(ids, 1000000000)
    assert "(uid_t)-1" in refused(ids, NO_ID)  # the one id Incus's rules leave
    assert ids.to_guest(1001000) == 1000
    # as in a user namespace, the host's own ids show as no one: host root too
    assert [ids.to_guest(h) for h in (0, 1000, 999999)] == [NO_ID] * 3
    assert ids.to_guest(1001000000) == NO_ID  # it would show as a forbidden guest id


def test_incus_idmap_with_a_host_user_passed_through() -> None:
    """raw.idmap 'both 1000 1000' splits the range: three maps and their gaps."""
    rules = incus([(0, 1000000, 1000), (1000, 1000, 1), (1001, 1001001, 64535)])
    assert "forbid-guest:1000:0" in rules and "forbid-guest:1001:0" in rules
    ids = build(*rules)
    assert ids.to_host(1000) == 1000 and ids.to_guest(1000) == 1000
    assert ids.to_host(999) == 1000999 and ids.to_host(1001) == 1001001
    assert ids.to_guest(0) == NO_ID
    refused(ids, 65536)


def test_work_item_198() -> None:
    """Only ids 1000 and 2000 usable: the set written as if the last number were an end is
    refused, naming the rules that collide, and the set with counts works."""
    as_ends = ["forbid-guest:0:999", "map:1000:1000:1", "forbid-guest:1001:1999",
               "map:2000:2000:1"]  # fmt: skip
    message = collision(*as_ends)
    assert "'forbid-guest:1001:1999' (guest uids 1001-2999) and 'map:2000:2000:1'" in message
    with pytest.raises(IdMapError, match="runs past id 4294967295"):
        parse_rule("forbid-guest:2001:4294967295")
    ids = build("forbid-guest:0:1000", "map:1000:1000:1", "forbid-guest:1001:999",
                "map:2000:2000:1", "forbid-guest:2001:4294965294")  # fmt: skip
    assert ids.to_host(1000) == 1000 and ids.to_host(2000) == 2000
    for g in (0, 999, 1001, 1999, 2001, 4294967294, NO_ID):
        refused(ids, g)
    assert ids.to_guest(0) == NO_ID and ids.to_guest(2000) == 2000


def test_virtiofsd_readme_example() -> None:
    """Every guest id creates as host 1001, host 1001 shows as guest 1000, the rest as they
    are (but host 1000, which would look like guest 1000)."""
    ids = build("squash-guest:0:1001:4294967295", "host:1001:1000:1")
    assert {ids.to_host(g) for g in (0, 1000, 4294967294)} == {1001}
    assert ids.to_guest(1001) == 1000
    assert ids.to_guest(0) == 0 and ids.to_guest(4242) == 4242
    assert ids.to_guest(1000) == NO_ID


def test_one_user_pinned_with_everything_else_hidden() -> None:
    """map:G:H:1 with everything around forbidden and shown as the overflow id, to the last
    id (virtiofsd refuses ranges ending at 2^32; here they may)."""
    ids = build("map:1000:1234:1", "forbid-guest:0:1000", "forbid-guest:1001:4294966295",
                "squash-host:0:65534:1234", "squash-host:1235:65534:4294966061")  # fmt: skip
    assert ids.to_host(1000) == 1234 and ids.to_guest(1234) == 1000
    assert ids.to_guest(0) == 65534 and ids.to_guest(NO_ID) == 65534
    refused(ids, 0)


def test_describe_lists_the_tables() -> None:
    lines = build("map:1000:5000:10", "forbid-guest:2001:100").describe()
    assert "guest uids 1000-1009 -> host uids 5000-5009 (map:1000:5000:10)" in lines
    assert "guest uids 2001-2100 -> refused (forbid-guest:2001:100)" in lines
    assert "guest uids 5000-5009 -> refused (what 'map:1000:5000:10' makes)" in lines
    assert "host uids 1000-1009 -> guest uid 4294967295" in lines


def test_lookups_cover_every_id() -> None:
    ids = build("map:0:100000:65536", "forbid-guest:65536:4294901759")
    for table in (ids._to_host, ids._to_guest):
        assert table.starts[0] == 0 and table.starts == sorted(set(table.starts))
        assert all(0 <= s < ID_LIMIT for s in table.starts)


# --- against a plain reading of the rules -----------------------------------------------------


def _reference(rules: list[IdRule]) -> tuple[bool, dict[int, int | None], dict[int, int]]:
    """The module's rules read as literally as possible, id by id over a small universe: whether
    the set collides, and else where each guest id goes (None: refused) and how each host id
    shows."""
    universe = range(0, 300)
    guest_side, host_side = [], []
    for r in rules:
        s, t, n = r.source, r.target, r.count
        if r.kind in (RuleKind.MAP, RuleKind.GUEST):
            guest_side.append((r, range(s, s + n), lambda i, s=s, t=t: t + i - s, True))
        if r.kind is RuleKind.SQUASH_GUEST:
            guest_side.append((r, range(s, s + n), lambda i, t=t: t, False))
        if r.kind is RuleKind.FORBID_GUEST:
            guest_side.append((r, range(s, s + n), lambda i: None, False))
        if r.kind is RuleKind.MAP:
            host_side.append((r, range(t, t + n), lambda i, s=s, t=t: s + i - t, True))
        if r.kind is RuleKind.HOST:
            host_side.append((r, range(s, s + n), lambda i, s=s, t=t: t + i - s, True))
        if r.kind is RuleKind.SQUASH_HOST:
            host_side.append((r, range(s, s + n), lambda i, t=t: t, False))
    for side in (guest_side, host_side):
        if any(sum(i in rng for _, rng, _, _ in side) > 1 for i in universe):
            return True, {}, {}
        made = [({f(i) for i in rng} - {None}, one) for _, rng, f, one in side]
        for (a, a_one), (b, b_one) in itertools.combinations(made, 2):
            if (a_one or b_one) and a & b:
                return True, {}, {}
    taken_host = {f(i) for _, rng, f, one in guest_side if one for i in rng}
    taken_guest = {f(i) for _, rng, f, one in host_side if one for i in rng}

    def to_host(g: int) -> int | None:
        for _, rng, f, _ in guest_side:
            if g in rng:
                return f(g)  # type: ignore[no-any-return]
        return None if g == NO_ID or g in taken_host else g

    def to_guest(h: int) -> int:
        for _, rng, f, _ in host_side:
            if h in rng:
                return f(h)  # type: ignore[no-any-return]
        return NO_ID if h in taken_guest or to_host(h) is None else h

    ids = [*universe, NO_ID - 1, NO_ID]
    return False, {g: to_host(g) for g in ids}, {h: to_guest(h) for h in ids}


def test_tables_agree_with_a_plain_reading_of_the_rules() -> None:
    rng = random.Random(198)
    kinds = list(RuleKind)
    checked = 0
    for _ in range(400):
        rules = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(kinds)
            rules.append(IdRule(kind, rng.randrange(120), rng.randrange(120), rng.randrange(12)))
        collides, to_host, to_guest = _reference(rules)
        try:
            ids = IdMap("uid", rules)
        except IdMapError:
            assert collides, rules
            continue
        assert not collides, rules
        checked += 1
        for g, expected in to_host.items():
            if expected is None:
                refused(ids, g)
            else:
                assert ids.to_host(g) == expected, (rules, g)
        for h, shown in to_guest.items():
            assert ids.to_guest(h) == shown, (rules, h)
    assert checked > 100
