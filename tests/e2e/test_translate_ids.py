"""--translate-uid/--translate-gid at work: through /dev/fuse, where host processes of several
users are the callers, from a real guest with a map and a forbid set, and under --uid-map, where
the translation reaches namespace ids that the kernel maps on.

What is checked is what each side sees: the ids the callers see (stat, ls -ln, access as
each user), who owns on the host what they create, chown, the supplementary group the kernel
sends, and refusals: a forbidden id, or one that would alias a translated id, gets EPERM; a
host id that would alias a guest id shows as nobody, and no one, root included, owns it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from pyvirtiofsd.vm import FsDevice, run_guest
from tests.conftest import Share
from tests.e2e.conftest import DaemonFactory, parse_report, require_assets

# --- /dev/fuse --------------------------------------------------------------------------------

#: guest 1000-1009 <-> host 5000-5009; guest 2001-2100 refused; host 7000-7009 shows as 4242.
MOUNT_RULES = (
    "--translate-uid", "map:1000:5000:10", "--translate-uid", "forbid-guest:2001:100",
    "--translate-uid", "squash-host:7000:4242:10",
    "--translate-gid", "map:1000:5000:10", "--translate-gid", "forbid-guest:2001:100",
)  # fmt: skip
#: What stat(2) shows for an id the kernel cannot map (4294967295 in the reply).
OVERFLOW = 65534

_PROBE = r"""
import errno, json, os, sys
M = sys.argv[1]
out = {}
def t(name, fn):
    try:
        value = fn()
        out[name] = "ok" if value is None else value
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
def make(path):
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
def owner(path):
    st = os.lstat(path)
    return [st.st_uid, st.st_gid]
"""


def run_as(mnt: Path, uid: int, gid: int, code: str, groups: tuple[int, ...] = ()) -> dict:  # type: ignore[type-arg]
    """``code`` (with ``t``, ``make``, ``owner`` and ``M``, the mount) run by the system's
    python3 as uid:gid with ``groups``; what it put in ``out``."""
    python = shutil.which("python3", path="/usr/bin") or "python3"
    script = _PROBE + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    result = subprocess.run(
        [python, "-c", script, str(mnt)],
        user=uid,
        group=gid,
        extra_groups=list(groups),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _host_owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


# --allow-other: the guest ids act as host users other than the daemon's.
@pytest.mark.daemon_args(*MOUNT_RULES, "--allow-other")
def test_translated_ids_through_dev_fuse(share: Share) -> None:
    src, mnt = share.src, share.mnt
    for name, uid, gid, mode in [("mapped", 5003, 5004, 0o644), ("aliased", 1003, 1003, 0o600),
                                 ("squashed", 7005, 7005, 0o644), ("mine", 5001, 5001, 0o600),
                                 ("forbidden", 2050, 2050, 0o644)]:  # fmt: skip
        (src / name).write_text(name)
        os.chown(src / name, uid, gid)
        (src / name).chmod(mode)
    (src / "team").mkdir()
    (src / "team").chmod(0o770)
    os.chown(src / "team", 0, 5007)  # guest group 1007

    # The first look at the share is a listing: READDIRPLUS brings the attributes with it.
    listed = {e.name: (e.stat(follow_symlinks=False).st_uid, e.stat().st_gid)
              for e in os.scandir(mnt)}  # fmt: skip
    assert listed == {
        "mapped": (1003, 1004),
        "aliased": (OVERFLOW, OVERFLOW),  # host 1003 would look like guest 1003 (host 5003)
        "squashed": (4242, 7005),
        "mine": (1001, 1001),
        "forbidden": (OVERFLOW, OVERFLOW),  # guest 2050 may not be used
        "team": (0, 1007),
    }

    as_1001 = run_as(mnt, 1001, 1001, """
        t("create", lambda: make(M + "/by-1001"))
        t("mkdir", lambda: os.mkdir(M + "/dir-1001"))
        t("owner", lambda: owner(M + "/by-1001"))
        t("read mine", lambda: open(M + "/mine").read())
        t("access mine", lambda: os.access(M + "/mine", os.R_OK | os.W_OK))
        t("access mapped", lambda: os.access(M + "/mapped", os.W_OK))
        t("team without the group", lambda: make(M + "/team/no"))
    """)  # fmt: skip
    assert as_1001 == {"create": "ok", "mkdir": "ok", "owner": [1001, 1001],
                       "read mine": "mine", "access mine": True, "access mapped": False,
                       "team without the group": "EACCES"}  # fmt: skip
    assert _host_owner(src / "by-1001") == (5001, 5001)
    assert _host_owner(src / "dir-1001") == (5001, 5001)

    # The kernel sends the directory's group (guest 1007) as the supplementary group; the host
    # checks host group 5007.
    with_group = run_as(mnt, 1001, 1001, """
        t("team", lambda: make(M + "/team/yes"))
        t("owner", lambda: owner(M + "/team/yes"))
    """, groups=(1007,))  # fmt: skip
    assert with_group == {"team": "ok", "owner": [1001, 1001]}
    assert _host_owner(src / "team" / "yes") == (5001, 5001)

    assert run_as(mnt, 1002, 1002, """
        t("access mine", lambda: os.access(M + "/mine", os.R_OK))
        t("read mine", lambda: open(M + "/mine").read())
    """) == {"access mine": False, "read mine": "EACCES"}  # fmt: skip

    for uid, gid in [(2050, 1001), (1001, 2050), (5003, 1001)]:
        refused = run_as(mnt, uid, gid, """
            t("create", lambda: make(M + "/refused"))
            t("mkdir", lambda: os.mkdir(M + "/refused-dir"))
        """)  # fmt: skip
        assert refused == {"create": "EPERM", "mkdir": "EPERM"}, (uid, gid)
    assert not (src / "refused").exists() and not (src / "refused-dir").exists()

    # chown, as root through the mount
    os.chown(mnt / "by-1001", 1003, 1004)
    assert _host_owner(src / "by-1001") == (5003, 5004)
    assert _host_owner(mnt / "by-1001") == (1003, 1004)
    for uid, gid in [(2050, -1), (-1, 2100), (5003, -1)]:
        with pytest.raises(PermissionError):
            os.chown(mnt / "by-1001", uid, gid)
    assert _host_owner(src / "by-1001") == (5003, 5004)

    # Nobody owns what shows as nobody: root's capabilities don't reach an unmapped owner.
    with pytest.raises(PermissionError):
        (mnt / "aliased").read_text()
    assert (mnt / "mapped").read_text() == "mapped"
    share.stop()
    assert "READDIRPLUS=" in share.log_text()
    assert "translating ids: 3 uid and 2 gid rules" in share.log_text()


# --- a real guest -----------------------------------------------------------------------------

BASE = 100_000
#: Incus's form: guest 0-1999 are host BASE.., guest 2000 and up are refused (to the last id,
#: which is refused anyway).
GUEST_RULES = [
    f"--translate-{kind}={rule}"
    for kind in ("uid", "gid")
    for rule in (f"map:0:{BASE}:2000", "forbid-guest:2000:4294965295")
]

GUEST_SCRIPT = r"""
mkdir -p /mnt/t && mount -t virtiofs translated /mnt/t
cd /mnt/t
as() { /mnt/t/probe as "$@" 2>/dev/null; }
try() {
    name=$1; shift
    if "$@" 2>/dev/null; then echo "$name done"; else echo "$name refused"; fi
}
echo "SEEN $(stat -c %u:%g host-500) $(stat -c %u:%g host-root) $(stat -c %u:%g host-2500)"
echo "LS $(ls -ln | awk '$9 == "host-500" {print $3":"$4}')"
echo made by guest root > by-root
mkdir users && chown 1000:1000 users
as 1000 1000 sh -c 'echo made by 1000 > /mnt/t/users/by-1000'; echo "USER $?"
echo "USER_SEES $(stat -c %u:%g users/by-1000)"
touch chowned && chown 7:8 chowned; echo "CHOWN $?"
touch refused
if chown 2500 refused 2>/tmp/err; then echo "FORBIDDEN_CHOWN done"
else echo "FORBIDDEN_CHOWN $(cat /tmp/err)"; fi
try ALIAS_CHOWN chown 100500 refused
mkdir open && chmod 1777 open
as 2500 2500 sh -c 'echo x > /mnt/t/open/by-2500'; echo "FORBIDDEN_USER $?"
as 2500 2500 mkdir /mnt/t/open/dir-2500 2>/dev/null; echo "FORBIDDEN_MKDIR $?"
mkdir team && chown 0:1007 team && chmod 0770 team
as 1001 1001 sh -c 'echo no > /mnt/t/team/no'; echo "TEAM_WITHOUT $?"
as 1001 1001,1007 sh -c 'echo yes > /mnt/t/team/yes'; echo "TEAM_WITH $?"
try HOST_SECRET sh -c 'cat /mnt/t/host-secret >/dev/null'
try HOST_ROOT sh -c 'echo more >> /mnt/t/host-root'
echo "LISTED $(ls open | wc -l)"
cd / && umount /mnt/t
echo "DONE yes"
"""


@pytest.mark.vm
def test_guest_with_a_map_and_a_forbid_set(
    workdir: Path, guest_probe: Path, start_daemon: DaemonFactory
) -> None:
    require_assets("sid")
    share = workdir / "translated"
    share.mkdir()
    share.chmod(0o755)
    os.chown(share, BASE, BASE)  # guest root's
    for name, ids, mode in [("host-500", BASE + 500, 0o644), ("host-root", 0, 0o644),
                            ("host-secret", 0, 0o600), ("host-2500", 2500, 0o644)]:  # fmt: skip
        (share / name).write_text(f"{name}\n")
        os.chown(share / name, ids, ids)
        (share / name).chmod(mode)
    shutil.copy(guest_probe, share / "probe")
    os.chown(share / "probe", BASE, BASE)
    daemon = start_daemon(share, "--tag", "translated", *GUEST_RULES)
    result = run_guest(GUEST_SCRIPT, [FsDevice(daemon.socket, "translated")], timeout=300)
    text = daemon.finish()
    report = parse_report(result.output)
    assert report.get("DONE") == "yes", result.output

    # What the guest sees: the map's ids, and nobody for the host's own and for forbidden ids.
    assert report["SEEN"] == "500:500 65534:65534 65534:65534"
    assert report["LS"] == "500:500"  # from a listing (READDIRPLUS)
    # Who owns on the host what the guest made.
    assert _host_owner(share / "by-root") == (BASE, BASE)
    assert report["USER"] == "0" and report["USER_SEES"] == "1000:1000"
    assert _host_owner(share / "users") == (BASE + 1000, BASE + 1000)
    assert _host_owner(share / "users" / "by-1000") == (BASE + 1000, BASE + 1000)
    assert report["CHOWN"] == "0" and _host_owner(share / "chowned") == (BASE + 7, BASE + 8)
    # Refused: a forbidden id (EPERM, not virtiofsd's EIO), and a map's host id as a guest id.
    assert "Operation not permitted" in report["FORBIDDEN_CHOWN"]
    assert report["ALIAS_CHOWN"] == "refused"
    assert _host_owner(share / "refused") == (BASE, BASE)
    assert report["FORBIDDEN_USER"] != "0" and report["FORBIDDEN_MKDIR"] != "0"
    assert report["LISTED"] == "0" and list((share / "open").iterdir()) == []
    # The supplementary group the guest kernel sends is translated too.
    assert report["TEAM_WITHOUT"] != "0" and report["TEAM_WITH"] == "0"
    assert _host_owner(share / "team" / "yes") == (BASE + 1001, BASE + 1001)
    # The host's root is nobody in there: even guest root may not read its private file.
    assert report["HOST_SECRET"] == "refused" and report["HOST_ROOT"] == "refused"
    assert (share / "host-root").read_text() == "host-root\n"
    assert "translating ids: 2 uid and 2 gid rules" in text


# --- with --uid-map/--gid-map -----------------------------------------------------------------


def test_translation_composes_with_a_user_namespace(
    workdir: Path, start_daemon: DaemonFactory
) -> None:
    """Translation works on the ids the daemon sees, which in its user namespace are namespace
    ids; the kernel then maps those to host ids. Guest 1000 -> namespace 0 -> host 100000."""
    from pyvirtiofsd.fuse import abi
    from pyvirtiofsd.testing.frontend import Frontend
    from pyvirtiofsd.testing.fuse_client import FuseClient

    if os.geteuid() != 0:
        pytest.skip("writing any id map needs root")
    share = workdir / "ns"
    share.mkdir()
    share.chmod(0o777)
    (share / "ns-root").write_text("x")
    os.chown(share / "ns-root", BASE, BASE)  # namespace 0
    (share / "ns-7").write_text("x")
    os.chown(share / "ns-7", BASE + 7, BASE + 7)
    maps = [f"--{kind}-map=:0:{BASE}:65536:" for kind in ("uid", "gid")]
    rules = [f"--translate-{kind}=map:1000:0:1" for kind in ("uid", "gid")]
    daemon = start_daemon(share, *maps, *rules)
    with Frontend.connect(daemon.socket) as fe:
        q = fe.setup(queues=(0, 1), queue_size=64)[1]
        fuse = FuseClient(lambda req, size: q.request([req], [size] if size else []))
        fuse.init()
        ns_root = fuse.lookup(abi.ROOT_ID, b"ns-root")
        ns_7 = fuse.lookup(abi.ROOT_ID, b"ns-7")
        made = fuse.create(abi.ROOT_ID, b"by-1000", uid=1000, gid=1000)[0]
        with pytest.raises(PermissionError):  # guest 0 would be namespace root: aliasing
            fuse.create(abi.ROOT_ID, b"by-0", uid=0, gid=0)
    daemon.finish()
    assert (ns_root.uid, ns_root.gid) == (1000, 1000)
    assert (ns_7.uid, ns_7.gid) == (7, 7)
    assert (made.uid, made.gid) == (1000, 1000)
    assert _host_owner(share / "by-1000") == (BASE, BASE)
    assert not (share / "by-0").exists()
