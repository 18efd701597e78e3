"""virtiofsd's xattr map (``--xattrmap``): which extended-attribute names pass between the
guest and the host, under which name, and which are hidden or refused. No I/O here: the map
turns names into names or verdicts, and the file system acts on them.

Grammar (virtiofsd's). The text is trimmed, and whitespace between rules is skipped. A rule's
first character is its separator, whatever it is; each field runs to the next occurrence of it,
whitespace included. A rule is ``SEP type SEP scope SEP key SEP prepend SEP``, or the shorthand
``SEP map SEP key SEP prepend SEP``, which must be the last rule and expands to::

    prefix all KEY PREPEND
    bad    all PREPEND KEY     then  ok all "" ""    (KEY not empty)
    bad    all "" ""                                 (KEY empty)

Matching. Rules are tried in order and the first that matches decides. A name from the guest
(getxattr, setxattr, removexattr, and the name of a security label) is matched against ``key``
by rules of scope ``client`` or ``all``; a name from the host (listxattr) against ``prepend``
by rules of scope ``server`` or ``all``. Every match is a prefix match.

What a match does:

======================  =================================  ====================================
type                    guest name (client)                host name (server)
======================  =================================  ====================================
``prefix``              ``prepend`` + the whole name       the name without ``prepend``
``ok``                  unchanged                          unchanged
``bad``                 refused (:attr:`Kind.BAD`)         hidden
``unsupported``         refused (:attr:`Kind.UNSUPPORTED`) hidden
======================  =================================  ====================================

The file system turns a refusal into the errno virtiofsd gives: ``bad`` is EPERM (ENODATA for
getxattr), ``unsupported`` ENOTSUP.

Rules this module keeps:

* A map always decides. virtiofsd panics on the first name no rule matches, at start-up or in
  the middle of serving; here such a map is refused when it is parsed. Every guest name is
  matched only if a rule of scope client or all has an empty key (names are arbitrary, and
  matching is by prefix), and every host name only if one of scope server or all has an empty
  prepend; :class:`XattrMapError` names the side that lacks one.
* A host name that a ``prefix`` rule would strip to nothing is hidden: an empty name means
  nothing to the guest (virtiofsd would list an empty string).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CAPABILITY",
    "Kind",
    "Rule",
    "Scope",
    "XattrMap",
    "XattrMapError",
]

#: The xattr that holds file capabilities; the kernel strips it, but only under this name.
CAPABILITY = b"security.capability"

#: What Rust's ``is_ascii_whitespace`` skips between rules.
_BETWEEN_RULES = " \t\n\x0c\r"
#: Separators tried, in order, when a rule is written back out.
_SEPARATORS = ":/|,;#%@!"


class Kind(enum.Enum):
    """A rule's type."""

    PREFIX = "prefix"
    OK = "ok"
    BAD = "bad"
    UNSUPPORTED = "unsupported"


class Scope(enum.Flag):
    """Which names a rule is matched against: the guest's, the host's, or both."""

    CLIENT = 1
    SERVER = 2
    ALL = 3


_SCOPES = {"client": Scope.CLIENT, "server": Scope.SERVER, "all": Scope.ALL}


class XattrMapError(ValueError):
    """The text is no map, or a map that would leave some name undecided."""


@dataclass(frozen=True)
class Rule:
    kind: Kind
    scope: Scope
    #: Prefix of the guest names it matches (client scope).
    key: bytes
    #: Prefix of the host names it matches (server scope), and what ``prefix`` prepends.
    prepend: bytes
    #: Its place in the text (1: the first rule); the rules a ``map`` expands to share one.
    number: int = 0

    def __str__(self) -> str:
        key, prepend = os.fsdecode(self.key), os.fsdecode(self.prepend)
        sep = next((s for s in _SEPARATORS if s not in key + prepend), "\x1f")
        scope = self.scope.name.lower()  # type: ignore[union-attr]
        return sep + sep.join((self.kind.value, scope, key, prepend)) + sep


@dataclass(frozen=True)
class XattrMap:
    """Rules in the order they are tried (``map`` already expanded). Made from text by
    :meth:`parse`; a map that would leave a name undecided can't be made at all."""

    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        missing = []
        if not any(r.scope & Scope.CLIENT and not r.key for r in self.rules):
            missing.append(
                "no rule decides every guest name (one of scope client or all with an empty "
                "key, such as ':ok:all:::' or ':bad:all:::' at the end)"
            )
        if not any(r.scope & Scope.SERVER and not r.prepend for r in self.rules):
            missing.append(
                "no rule decides every host name (one of scope server or all with an empty "
                "prepend, such as ':ok:all:::' or ':bad:all:::' at the end)"
            )
        if missing:
            raise XattrMapError(
                "the map does not always decide, and virtiofsd would stop on the first name it "
                "leaves undecided: " + "; ".join(missing)
            )

    @classmethod
    def parse(cls, text: str) -> XattrMap:
        rules: list[Rule] = []
        text = text.strip()
        pos = 0
        number = 0
        while pos < len(text):
            if text[pos] in _BETWEEN_RULES:
                pos += 1
                continue
            number += 1
            rule = _RuleText(text, pos, number)
            kind = rule.field()
            if kind == "map":
                key, prepend = os.fsencode(rule.field()), os.fsencode(rule.field())
                if text[rule.pos :].strip(_BETWEEN_RULES):
                    raise XattrMapError(f"rule {number}: a map rule must be the last rule")
                rules += _expand_map(key, prepend, number)
                break
            try:
                kind_ = Kind(kind)
            except ValueError:
                raise XattrMapError(
                    f"rule {number}: unknown type {kind!r} (prefix, ok, bad, unsupported or map)"
                ) from None
            scope = rule.field()
            if scope not in _SCOPES:
                raise XattrMapError(
                    f"rule {number}: unknown scope {scope!r} (client, server or all)"
                )
            key, prepend = os.fsencode(rule.field()), os.fsencode(rule.field())
            rules.append(Rule(kind_, _SCOPES[scope], key, prepend, number))
            pos = rule.pos
        if not rules:
            raise XattrMapError("no rules")
        return cls(tuple(rules))

    def _client_rule(self, name: bytes) -> Rule:
        for rule in self.rules:
            if rule.scope & Scope.CLIENT and name.startswith(rule.key):
                return rule
        raise AssertionError("a map decides every name")  # __post_init__ saw to it

    def _server_rule(self, name: bytes) -> Rule:
        for rule in self.rules:
            if rule.scope & Scope.SERVER and name.startswith(rule.prepend):
                return rule
        raise AssertionError("a map decides every name")

    def to_host(self, name: bytes) -> bytes | Kind:
        """The host's name for the guest's ``name``, or the refusal (:attr:`Kind.BAD` or
        :attr:`Kind.UNSUPPORTED`)."""
        rule = self._client_rule(name)
        if rule.kind is Kind.PREFIX:
            return rule.prepend + name
        if rule.kind is Kind.OK:
            return name
        return rule.kind

    def to_guest(self, name: bytes) -> bytes | None:
        """The guest's name for the host's ``name``; None when it is hidden."""
        rule = self._server_rule(name)
        if rule.kind is Kind.PREFIX:
            return name[len(rule.prepend) :] or None
        if rule.kind is Kind.OK:
            return name
        return None

    def list_to_guest(self, names: Iterable[bytes]) -> list[bytes]:
        """A host listxattr, as the guest sees it: renamed, hidden names left out."""
        out = []
        for name in names:
            guest = self.to_guest(name)
            if guest is not None:
                out.append(guest)
        return out

    @property
    def capability_name(self) -> bytes | None:
        """The host name ``security.capability`` is stored under when the map renames it
        (the daemon then strips it where the kernel would strip the real one), else None."""
        host = self.to_host(CAPABILITY)
        return host if isinstance(host, bytes) and host != CAPABILITY else None

    def __str__(self) -> str:
        return " ".join(str(r) for r in self.rules)


class _RuleText:
    """One rule's fields, read from ``text`` at ``start`` (its separator)."""

    def __init__(self, text: str, start: int, number: int) -> None:
        self.text = text
        self.start = start
        self.number = number
        self.sep = text[start]
        #: Where the next field starts.
        self.pos = start + 1

    def field(self) -> str:
        end = self.text.find(self.sep, self.pos)
        if end < 0:
            raise XattrMapError(
                f"rule {self.number} (at character {self.start + 1}) has no closing "
                f"{self.sep!r}: {self.text[self.start :]!r}"
            )
        value = self.text[self.pos : end]
        self.pos = end + 1
        return value


def _expand_map(key: bytes, prepend: bytes, number: int) -> list[Rule]:
    """``map KEY PREPEND``: KEY... stored as PREPEND KEY...; the guest may not name PREPEND...
    itself, and host names under KEY that lack the prefix are hidden; everything else passes.
    With an empty KEY, everything is prefixed and nothing unprefixed passes."""
    rules = [Rule(Kind.PREFIX, Scope.ALL, key, prepend, number)]
    if key:
        rules.append(Rule(Kind.BAD, Scope.ALL, prepend, key, number))
        rules.append(Rule(Kind.OK, Scope.ALL, b"", b"", number))
    else:
        rules.append(Rule(Kind.BAD, Scope.ALL, b"", b"", number))
    return rules
