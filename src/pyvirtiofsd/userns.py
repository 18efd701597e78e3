"""Run the daemon as root of its own user namespace: virtiofsd's ``--uid-map``/``--gid-map``.

A user who is not root (rootless libvirt, a developer's VM) can still serve a directory whose
files belong to many owners: ids inside the namespace, which are what the guest sees, stand for
host ids the user owns (the user's own id, and the ranges /etc/subuid and /etc/subgid delegate).
A guest's root then creates files owned by the user, a guest's uid 1000 by, say, host uid 100999.
The kernel does all translation: ownership on the host, st_uid in replies and permission checks.

The process that unshares cannot write its own mappings for anything but its own id, so a helper
forked beforehand, still outside, writes them: directly when it is privileged or when the map is
just the user's own id, otherwise through the setuid ``newuidmap``/``newgidmap`` of shadow-utils,
which check /etc/subuid and /etc/subgid. The daemon keeps its pid, so a pidfile and SIGTERM still
reach it. Call :func:`enter` while the process has one thread: the kernel refuses to move a
threaded process into a new user namespace.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from pyvirtiofsd import linux

__all__ = [
    "IdRange",
    "check_map",
    "enter",
    "parse_range",
]

_ID_MAX = 1 << 32


@dataclass(frozen=True)
class IdRange:
    """``count`` ids from ``inside`` in the namespace are ``outside`` on the host."""

    inside: int
    outside: int
    count: int

    def line(self) -> str:
        return f"{self.inside} {self.outside} {self.count}\n"


def parse_range(text: str) -> IdRange:
    """virtiofsd's form ``:inside:outside:count:``: the first character is the separator, and
    the text ends with it. Raises ValueError with a message fit for the user."""
    sep = text[:1]
    if not sep or sep.isdigit() or sep.isspace():
        raise ValueError(f"{text!r}: expected :inside:outside:count: (e.g. :0:1000:1:)")
    parts = text.split(sep)
    if len(parts) != 5 or parts[0] or parts[4]:
        raise ValueError(f"{text!r}: expected {sep}inside{sep}outside{sep}count{sep}")
    if not all(p.isascii() and p.isdigit() for p in parts[1:4]):
        raise ValueError(f"{text!r}: ids and count are decimal numbers")
    inside, outside, count = (int(p, 10) for p in parts[1:4])
    if count < 1:
        raise ValueError(f"{text!r}: the count must be at least 1")
    if max(inside, outside) + count > _ID_MAX - 1:
        raise ValueError(f"{text!r}: ids must stay below {_ID_MAX - 1}")
    return IdRange(inside, outside, count)


def check_map(kind: str, ranges: Sequence[IdRange]) -> None:
    """Refuse what the kernel would refuse later, and a map without root: the daemon acts as
    root inside the namespace and switches to each caller's ids from there."""
    for side in ("inside", "outside"):
        spans = sorted((getattr(r, side), getattr(r, side) + r.count) for r in ranges)
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise ValueError(f"--{kind}-map ranges overlap {side} the namespace")
    if not any(r.inside == 0 for r in ranges):
        raise ValueError(f"--{kind}-map must map {kind} 0 (the daemon is root in its namespace)")


def _own_id_only(ranges: Sequence[IdRange], own: int) -> bool:
    return len(ranges) == 1 and ranges[0].count == 1 and ranges[0].outside == own


def _write_maps(pid: int, uid_map: Sequence[IdRange], gid_map: Sequence[IdRange]) -> None:
    """In the helper, outside the namespace: give process ``pid`` its maps."""
    privileged = os.geteuid() == 0
    for kind, ranges, own in (("uid", uid_map, os.getuid()), ("gid", gid_map, os.getgid())):
        if not ranges:
            continue
        if privileged or _own_id_only(ranges, own):
            if kind == "gid" and not privileged:
                # The kernel lets an unprivileged user map its own gid only once it promises
                # never to call setgroups in the namespace.
                with open(f"/proc/{pid}/setgroups", "w") as f:
                    f.write("deny")
            with open(f"/proc/{pid}/{kind}_map", "w") as f:
                f.write("".join(r.line() for r in ranges))
            continue
        tool = shutil.which(f"new{kind}map")
        if tool is None:
            raise OSError(f"mapping these {kind}s needs new{kind}map (package uidmap)")
        args = [str(v) for r in ranges for v in (r.inside, r.outside, r.count)]
        done = subprocess.run([tool, str(pid), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(done.stderr.strip() or f"new{kind}map exited with {done.returncode}")


def enter(uid_map: Sequence[IdRange], gid_map: Sequence[IdRange]) -> None:
    """Move this process into a new user namespace with these maps, as its root.

    Raises OSError with the reason if the namespace or a map can't be set up."""
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    parent = os.getpid()
    helper = os.fork()
    if helper == 0:  # pragma: no cover - runs in the forked helper
        status = 1
        try:
            os.close(go_w)
            os.close(err_r)
            if os.read(go_r, 1) == b"u":
                _write_maps(parent, uid_map, gid_map)
                status = 0
        except BaseException as e:  # the helper must reach os._exit, whatever happens
            os.write(err_w, str(e).encode()[:4000])
        finally:
            os._exit(status)
    os.close(go_r)
    os.close(err_w)
    try:
        try:
            linux.unshare(linux.CLONE_NEWUSER)
        except OSError:
            os.write(go_w, b"x")
            raise
        os.write(go_w, b"u")
    finally:
        os.close(go_w)
        _, wait_status = os.waitpid(helper, 0)
        with os.fdopen(err_r, "rb") as f:
            message = f.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(wait_status) != 0:
        raise OSError(message or "the id-mapping helper failed")
    # Root of the namespace from here on; drop the host's supplementary groups, which mean
    # nothing in here (where setgroups is allowed at all).
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    try:
        os.setgroups([])
    except PermissionError:
        pass
