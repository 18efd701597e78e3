"""Translate uids and gids between guest and host inside the daemon: virtiofsd's
``--translate-uid`` and ``--translate-gid``. No I/O: rules in, numbers out.

One :class:`IdMap` per kind of id (uids, gids) holds two tables, one per direction:

- **guest → host** (:meth:`IdMap.to_host`): the caller's uid, gid and supplementary groups before
  the daemon acts as it (so the owner of what it creates, and whom the host kernel checks), and
  the owner a SETATTR (chown) gives a file;
- **host → guest** (:meth:`IdMap.to_guest`): the owner and group in every attribute reply
  (LOOKUP, GETATTR, SETATTR, READDIRPLUS, the entries of CREATE, MKDIR, ...).

A rule is ``TYPE:A:B:COUNT`` (``forbid-guest:A:COUNT``); the separator is whatever character
follows the type, as virtiofsd reads it. **The last number is a count, not the end of a range**:
``forbid-guest:1001:999`` covers guest ids 1001 to 1999. Ranges are half-open, [A, A+COUNT), and a
count of 0 matches nothing (Incus writes such rules for empty gaps).

=====================  ===========  ================================================
rule                   direction    effect
=====================  ===========  ================================================
``map:G:H:N``          both         guest G+i is host H+i, and host H+i shows as G+i
``guest:G:H:N``        guest→host   guest G+i acts as host H+i
``host:H:G:N``         host→guest   host H+i shows as guest G+i
``squash-guest:G:H:N`` guest→host   guests G..G+N-1 all act as host H
``squash-host:H:G:N``  host→guest   hosts H..H+N-1 all show as guest G
``forbid-guest:G:N``   guest→host   guests G..G+N-1 are refused: EPERM
=====================  ===========  ================================================

A set of rules is refused (:class:`IdMapError`, naming the rules) when:

- two rules of one direction match the same id (``map`` counts in both directions);
- a one-to-one rule (``map``, ``guest``, ``host``) would share what it produces with another
  rule of its direction: two ids would become one that nobody asked to merge. Only squash rules
  merge ids, and several may merge into the same id;
- a range runs past 4294967295 (virtiofsd lets ``forbid-guest:6000:4294967295`` wrap and forbid
  nothing), or a rule makes a guest id host id 4294967295: that is (uid_t)-1, no id at all, and
  "leave it unchanged" to chown, so a caller switched to it would stay root.

An id no rule matches keeps its number, unless keeping it would make one number stand for two
ids:

- an unmatched **guest** id is refused (EPERM) when a ``map`` or ``guest`` rule already makes
  another guest id that host id (with ``map:1000:5000:10``, guest 5003 would act as host 5003,
  which is guest 1003), and guest id 4294967295 always is;
- an unmatched **host** id shows as 4294967295 when a ``map`` or ``host`` rule already shows
  another host id as that guest id (with ``map:1000:5000:10``, host 1003 would look like guest
  1003, who is host 5003), or when that guest id is refused. A Linux guest displays 4294967295
  as its overflow id (65534), and no one there owns such a file: not even root's capabilities
  reach an inode whose owner it cannot map, as in a user namespace.

So a map with ``forbid-guest`` rules around it (Incus's form) shows every host id outside the
map as nobody, as a user namespace would.
"""

from __future__ import annotations

import bisect
import enum
import errno
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "ID_LIMIT",
    "NO_ID",
    "IdMap",
    "IdMapError",
    "IdRule",
    "RuleKind",
    "parse_rule",
]

#: Ids are below this; ranges end at it at the latest.
ID_LIMIT = 1 << 32
#: (uid_t)-1: never an id. What an id that can't be shown safely shows as.
NO_ID = ID_LIMIT - 1


class IdMapError(ValueError):
    """A rule or a set of rules that is refused; the message names them."""


class RuleKind(enum.Enum):
    MAP = "map"
    GUEST = "guest"
    HOST = "host"
    SQUASH_GUEST = "squash-guest"
    SQUASH_HOST = "squash-host"
    FORBID_GUEST = "forbid-guest"


_FORMS = {
    RuleKind.MAP: "map:GUEST:HOST:COUNT",
    RuleKind.GUEST: "guest:GUEST:HOST:COUNT",
    RuleKind.HOST: "host:HOST:GUEST:COUNT",
    RuleKind.SQUASH_GUEST: "squash-guest:GUEST:HOST:COUNT",
    RuleKind.SQUASH_HOST: "squash-host:HOST:GUEST:COUNT",
    RuleKind.FORBID_GUEST: "forbid-guest:GUEST:COUNT",
}
#: Rules whose source is host ids (the others match guest ids).
_HOST_SOURCE = (RuleKind.HOST, RuleKind.SQUASH_HOST)


@dataclass(frozen=True)
class IdRule:
    """One rule: ``count`` ids from ``source`` (guest ids, or host ids for ``host`` and
    ``squash-host``) go to ``target`` onwards, or all to ``target`` for the squash rules
    (``forbid-guest`` has no target)."""

    kind: RuleKind
    source: int
    target: int
    count: int

    def __str__(self) -> str:
        if self.kind is RuleKind.FORBID_GUEST:
            return f"{self.kind.value}:{self.source}:{self.count}"
        return f"{self.kind.value}:{self.source}:{self.target}:{self.count}"


def parse_rule(text: str) -> IdRule:
    """A rule as virtiofsd spells it (``map:0:100000:65536``). Raises :class:`IdMapError` with
    a message fit for the user."""
    i = 0
    while i < len(text) and (text[i].isalnum() or text[i] in "-_"):
        i += 1
    name, sep = text[:i].lower(), text[i : i + 1]
    try:
        kind = RuleKind(name)
    except ValueError:
        kinds = ", ".join(k.value for k in RuleKind)
        raise IdMapError(f"{text!r}: the rule's type must be one of {kinds}") from None
    fields = text[i + 1 :].split(sep) if sep else []
    wanted = 2 if kind is RuleKind.FORBID_GUEST else 3
    if len(fields) != wanted or not all(f.isascii() and f.isdigit() for f in fields):
        raise IdMapError(f"{text!r}: expected {_FORMS[kind]} (decimal numbers)")
    numbers = [int(f, 10) for f in fields]
    if any(n >= ID_LIMIT for n in numbers):
        raise IdMapError(f"{text!r}: ids and counts are below {ID_LIMIT}")
    if kind is RuleKind.FORBID_GUEST:
        rule = IdRule(kind, numbers[0], 0, numbers[1])
    else:
        rule = IdRule(kind, *numbers)
    _check_bounds(rule)
    return rule


def _check_bounds(rule: IdRule) -> None:
    if not all(0 <= n < ID_LIMIT for n in (rule.source, rule.target, rule.count)):
        raise IdMapError(f"'{rule}': ids and counts are between 0 and {NO_ID}")
    end = rule.source + rule.count
    if end > ID_LIMIT:
        fits = ID_LIMIT - rule.source
        fix = str(IdRule(rule.kind, rule.source, rule.target, fits))
        raise IdMapError(
            f"'{rule}' runs past id {NO_ID}: the last number is a count, not the end of the "
            f"range ('{fix}' reaches the last id)"
        )
    kind = rule.kind
    if kind in (RuleKind.MAP, RuleKind.GUEST, RuleKind.SQUASH_GUEST):
        last_host = rule.target if kind is RuleKind.SQUASH_GUEST else rule.target + rule.count - 1
        if last_host >= NO_ID and (rule.count or kind is RuleKind.SQUASH_GUEST):
            raise IdMapError(
                f"'{rule}' makes a guest id host id {NO_ID}, which is (uid_t)-1: no id, and "
                "'unchanged' to chown and setfsuid"
            )
    if kind is RuleKind.HOST and rule.target + rule.count > ID_LIMIT:
        raise IdMapError(f"'{rule}' shows host ids as guest ids past {NO_ID}")


# --- one direction ----------------------------------------------------------------------------

_OFFSET, _CONST, _REFUSE = 0, 1, 2


@dataclass(frozen=True)
class _Piece:
    """What a rule does in one direction: ids [start, end) go by ``how``."""

    start: int
    end: int
    how: int
    #: _OFFSET: added to the id; _CONST: the id they all become.
    value: int
    rule: IdRule

    def produces(self) -> tuple[int, int]:
        """The ids this piece makes, as [first, end)."""
        if self.how == _OFFSET:
            return self.start + self.value, self.end + self.value
        return self.value, self.value + 1


def _guest_piece(rule: IdRule) -> _Piece | None:
    """The rule's guest → host part."""
    s, t, n = rule.source, rule.target, rule.count
    if rule.kind in (RuleKind.MAP, RuleKind.GUEST):
        return _Piece(s, s + n, _OFFSET, t - s, rule)
    if rule.kind is RuleKind.SQUASH_GUEST:
        return _Piece(s, s + n, _CONST, t, rule)
    if rule.kind is RuleKind.FORBID_GUEST:
        return _Piece(s, s + n, _REFUSE, 0, rule)
    return None


def _host_piece(rule: IdRule) -> _Piece | None:
    """The rule's host → guest part."""
    s, t, n = rule.source, rule.target, rule.count
    if rule.kind is RuleKind.MAP:
        return _Piece(t, t + n, _OFFSET, s - t, rule)
    if rule.kind is RuleKind.HOST:
        return _Piece(s, s + n, _OFFSET, t - s, rule)
    if rule.kind is RuleKind.SQUASH_HOST:
        return _Piece(s, s + n, _CONST, t, rule)
    return None


def _ids(side: str, kind: str, start: int, end: int) -> str:
    if end - start == 1:
        return f"{side} {kind} {start}"
    return f"{side} {kind}s {start}-{end - 1}"


def _check_sources(option: str, side: str, kind: str, pieces: Sequence[_Piece]) -> None:
    # Sorted by start, a piece overlaps an earlier one iff it overlaps the one reaching furthest.
    furthest: _Piece | None = None
    for b in sorted(pieces, key=lambda p: (p.start, p.end)):
        a = furthest
        if a is not None and b.start < a.end:
            raise IdMapError(
                f"{option} rules '{a.rule}' ({_ids(side, kind, a.start, a.end)}) and "
                f"'{b.rule}' ({_ids(side, kind, b.start, b.end)}) both match "
                f"{_ids(side, kind, b.start, min(a.end, b.end))}: an id may match one rule of "
                "each direction only (the last number of a rule is a count, not the end of its "
                "range)"
            )
        if a is None or b.end > a.end:
            furthest = b


def _check_products(option: str, side: str, kind: str, pieces: Sequence[_Piece]) -> None:
    """One-to-one rules keep what they produce to themselves; squash rules may share."""
    made = sorted(((*p.produces(), p) for p in pieces), key=lambda m: (m[0], m[1]))
    # The products reaching furthest so far: of any rule, and of one-to-one rules.
    any_rule: tuple[int, _Piece] | None = None
    one_to_one: tuple[int, _Piece] | None = None
    for b0, b1, b in made:
        earlier = any_rule if b.how == _OFFSET else one_to_one
        if earlier is not None and b0 < earlier[0]:
            a1, a = earlier
            raise IdMapError(
                f"{option} rules '{a.rule}' and '{b.rule}' both make "
                f"{_ids(side, kind, b0, min(a1, b1))}: a map, guest or host rule gives its ids "
                "to the ids it matches alone (only squash rules merge ids)"
            )
        if any_rule is None or b1 > any_rule[0]:
            any_rule = (b1, b)
        if b.how == _OFFSET and (one_to_one is None or b1 > one_to_one[0]):
            one_to_one = (b1, b)


#: A segment of a table: (start, how, value, rule, matched). ``rule`` is the rule that matches
#: the ids (``matched``), or for ids no rule matches but which are blocked, the rule that took
#: their number (None for guest id 4294967295 and for host ids shown as NO_ID).
_Segment = tuple[int, int, int, IdRule | None, bool]


class _Table:
    """One direction as sorted, disjoint segments covering every id: a bisect per lookup.

    ``pieces`` are the rules' parts (disjoint). Ids they leave are themselves, except those in
    ``blocked`` (sorted, disjoint (start, end, rule) spans), which go by ``(how, value)``."""

    def __init__(
        self,
        pieces: Iterable[_Piece],
        blocked: Sequence[tuple[int, int, IdRule | None]],
        how: int,
        value: int,
    ) -> None:
        segments: list[_Segment] = []
        # Gaps come in order, so the blocked spans are walked once.
        next_blocked = 0

        def unmatched(start: int, end: int) -> None:
            nonlocal next_blocked
            while next_blocked < len(blocked) and blocked[next_blocked][1] <= start:
                next_blocked += 1
            cursor, i = start, next_blocked
            while i < len(blocked) and blocked[i][0] < end:
                b0, b1, why = blocked[i]
                b0, b1 = max(b0, start), min(b1, end)
                if cursor < b0:
                    segments.append((cursor, _OFFSET, 0, None, False))
                segments.append((b0, how, value, why, False))
                cursor = b1
                i += 1
            if cursor < end:
                segments.append((cursor, _OFFSET, 0, None, False))

        cursor = 0
        for p in sorted(pieces, key=lambda p: p.start):
            unmatched(cursor, p.start)
            segments.append((p.start, p.how, p.value, p.rule, True))
            cursor = p.end
        unmatched(cursor, ID_LIMIT)
        self.segments = segments
        self.starts = [s[0] for s in segments]

    def find(self, ident: int) -> _Segment:
        return self.segments[bisect.bisect_right(self.starts, ident) - 1]

    def spans(self) -> Iterator[tuple[int, int, _Segment]]:
        """Each segment with its [start, end)."""
        ends = [*self.starts[1:], ID_LIMIT]
        for seg, end in zip(self.segments, ends, strict=True):
            yield seg[0], end, seg


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int, IdRule | None]]:
    out: list[tuple[int, int, IdRule | None]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e), None)
        else:
            out.append((s, e, None))
    return out


# --- both directions --------------------------------------------------------------------------


class IdMap:
    """The translation of one kind of id (``"uid"`` or ``"gid"``), built from its rules.
    Raises :class:`IdMapError` for a set of rules that collide (see the module's rules)."""

    def __init__(self, kind: str, rules: Sequence[IdRule] = ()) -> None:
        self.kind = kind
        self.rules = tuple(rules)
        option = f"--translate-{kind}"
        for rule in self.rules:
            _check_bounds(rule)
        # A rule with a count of 0 matches nothing and makes nothing.
        guest = [p for r in self.rules if (p := _guest_piece(r)) and p.start < p.end]
        host = [p for r in self.rules if (p := _host_piece(r)) and p.start < p.end]
        _check_sources(option, "guest", kind, guest)
        _check_sources(option, "host", kind, host)
        to_host = [p for p in guest if p.how != _REFUSE]
        _check_products(option, "host", kind, to_host)
        _check_products(option, "guest", kind, host)
        # What one-to-one rules make is theirs (disjoint, as just checked, and never NO_ID).
        taken_host = sorted((*p.produces(), p.rule) for p in to_host if p.how == _OFFSET)
        taken_guest = [p.produces() for p in host if p.how == _OFFSET]
        self._to_host = _Table(guest, [*taken_host, (NO_ID, ID_LIMIT, None)], _REFUSE, 0)
        refused = [(s, e) for s, e, seg in self._to_host.spans() if seg[1] == _REFUSE]
        self._to_guest = _Table(host, _merge([*taken_guest, *refused]), _CONST, NO_ID)

    @property
    def identity(self) -> bool:
        """No rule matches anything: every id is itself (guest 4294967295 aside, which the
        credential switch refuses on its own)."""
        return not any(r.count for r in self.rules)

    def to_host(self, guest_id: int) -> int:
        """The host id guest id ``guest_id`` acts as; PermissionError (EPERM) if refused."""
        _, how, value, rule, matched = self._to_host.find(guest_id)
        if how == _OFFSET:
            return guest_id + value
        if how == _CONST:
            return value
        kind = self.kind
        if matched:
            why = f"by '{rule}'"
        elif rule is not None:
            why = f"'{rule}' makes another guest {kind} host {kind} {guest_id}"
        else:
            why = "(uid_t)-1 is no id"
        raise PermissionError(errno.EPERM, f"guest {kind} {guest_id} is refused: {why}")

    def to_guest(self, host_id: int) -> int:
        """The guest id host id ``host_id`` shows as."""
        _, how, value, _, _ = self._to_guest.find(host_id)
        return host_id + value if how == _OFFSET else value

    def describe(self) -> list[str]:
        """The tables as lines for the log: each span of ids and where it goes."""
        lines = []
        for side, table in (("guest", self._to_host), ("host", self._to_guest)):
            other = "host" if side == "guest" else "guest"
            for start, end, (_, how, value, rule, matched) in table.spans():
                if how == _OFFSET and not matched:
                    continue
                span = _ids(side, self.kind, start, end)
                if how == _OFFSET:
                    to = _ids(other, self.kind, start + value, end + value)
                elif how == _CONST:
                    to = f"{other} {self.kind} {value}"
                else:
                    to = "refused"
                if matched:
                    to += f" ({rule})"
                elif rule is not None:
                    to += f" (what '{rule}' makes)"
                lines.append(f"{span} -> {to}")
        return lines
