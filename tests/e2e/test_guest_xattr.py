"""--xattrmap and --security-label with a real guest, using the rules virtiofsd documents for
SELinux guests (``:map:security.selinux:trusted.virtiofs.:``) and for daemons without
CAP_SYS_ADMIN (``:map::user.virtiofs.:``).

Two guests. One without a security module, as the harness boots them: what it sets as
``security.*`` lands on the host under the mapped name, its lists show its own names, the
host's unprefixed xattrs stay hidden, and its kernel sends every create with an empty
security-context header (nr_secctx = 0). The other boots with SELinux on and no policy
loaded: its kernel then labels every new file with the initial context ("unlabeled"), which is
a real FUSE_SECURITY_CTX from a real kernel; the label must be on the host file, mapped, as
soon as the create returns. No guest here runs an SELinux policy (the guest images have none
to load), so labels other than the initial context, and SELinux's own checks in the guest, are
not exercised.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.vm import FsDevice, run_guest
from pyvirtiofsd.vm.guest import KERNEL_ARGS
from tests.e2e.conftest import DaemonFactory, DaemonProcess, parse_report, require_assets

pytestmark = pytest.mark.vm

SELINUX_RULES = ":map:security.selinux:trusted.virtiofs.:"
USER_RULES = ":map::user.virtiofs.:"

#: The guest's side, without a security module: xattrs through both shares, and a file of
#: each kind made on each.
XATTR_SCRIPT = r"""
import errno, json, os, socket
def attempt(f):
    try:
        return f()
    except OSError as e:
        return errno.errorcode[e.errno]
for tag in ("sel", "usr"):
    m = "/mnt/" + tag
    h = m + "/h"
    print("BEFORE_" + tag.upper(), json.dumps(sorted(os.listxattr(h))))
    os.setxattr(h, "security.selinux", b"guest_label")
    os.setxattr(h, "user.mine", b"mine")
    print("LIST_" + tag.upper(), json.dumps(sorted(os.listxattr(h))))
    print("GET_" + tag.upper(), os.getxattr(h, "security.selinux").decode())
    target = "trusted.virtiofs.x" if tag == "sel" else "user.virtiofs.x"
    print("TARGET_" + tag.upper(), attempt(lambda: os.setxattr(h, target, b"x")))
    open(m + "/f", "w").close()
    os.mkdir(m + "/d")
    os.symlink("f", m + "/l")
    os.mkfifo(m + "/p")
    s = socket.socket(socket.AF_UNIX)
    s.bind(m + "/s")
    s.close()
    fd = os.open(m, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.close(fd)
    print("MADE_" + tag.upper(), json.dumps(sorted(os.listdir(m))))
print("DONE yes")
"""

#: The guest's side with SELinux on: make one file of each kind (busybox only).
LABEL_SCRIPT = """
__MOUNTS__
cat /proc/self/attr/current; echo
for m in /mnt/sel /mnt/raw; do
    touch $m/f && mkdir $m/d && ln -s f $m/l && mknod $m/p p && echo "MADE $m"
done
echo "DONE yes"
"""


def xattrs(path: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
    }


def agreed_security_ctx(daemon: DaemonProcess) -> bool:
    found = re.findall(r"FUSE session 7\.\d+, flags (0x[0-9a-f]+)", daemon.log_text())
    assert found, daemon.log_text()[-2000:]
    return bool(int(found[-1], 16) & abi.InitFlag.SECURITY_CTX)


def test_guest_xattrs_through_the_documented_maps(
    workdir: Path, start_daemon: DaemonFactory
) -> None:
    require_assets("sid", rootfs="sid")
    sel, usr = workdir / "sel", workdir / "usr"
    for share in (sel, usr):
        share.mkdir()
        (share / "h").write_text("from the host")
    # The host's own label, and a host xattr outside the prefix: neither is the guest's.
    os.setxattr(sel / "h", "security.selinux", b"host_label")
    os.setxattr(sel / "h", "user.shared", b"shared")
    os.setxattr(usr / "h", "user.raw", b"hidden")
    sel_daemon = start_daemon(sel, "--security-label", "--xattrmap", SELINUX_RULES)
    usr_daemon = start_daemon(usr, "--security-label=auto", "--xattrmap", USER_RULES)
    devices = [FsDevice(sel_daemon.socket, "sel"), FsDevice(usr_daemon.socket, "usr")]
    script = "\n".join(
        [
            devices[0].mount_command("/mnt/sel"),
            devices[1].mount_command("/mnt/usr"),
            "python3 - <<'EOF'",
            XATTR_SCRIPT,
            "EOF",
        ]
    )
    result = run_guest(script, devices, rootfs="sid", timeout=300)
    sel_daemon.finish()
    usr_daemon.finish()
    assert result.status == 0, result.output + result.kernel_log[-3000:]
    report = parse_report(result.output)
    assert report.get("DONE") == "yes", result.output

    # The SELinux rules: the guest's security.selinux is trusted.virtiofs.security.selinux;
    # the host's own security.selinux is hidden and untouched; other names pass.
    assert json.loads(report["BEFORE_SEL"]) == ["user.shared"]
    assert json.loads(report["LIST_SEL"]) == ["security.selinux", "user.mine", "user.shared"]
    assert report["GET_SEL"] == "guest_label"
    assert report["TARGET_SEL"] == "EPERM"
    assert xattrs(sel / "h") == {
        "security.selinux": b"host_label",
        "trusted.virtiofs.security.selinux": b"guest_label",
        "user.mine": b"mine",
        "user.shared": b"shared",
    }
    # Everything under user.virtiofs.: security.* set in the guest is a user.* xattr here,
    # and the host's unprefixed xattrs are out of sight.
    assert json.loads(report["BEFORE_USR"]) == []
    assert json.loads(report["LIST_USR"]) == ["security.selinux", "user.mine"]
    assert report["GET_USR"] == "guest_label"
    # With every name prefixed, even the prefix itself is only a name under it.
    assert report["TARGET_USR"] == "None"
    assert xattrs(usr / "h") == {
        "user.raw": b"hidden",
        "user.virtiofs.security.selinux": b"guest_label",
        "user.virtiofs.user.mine": b"mine",
        "user.virtiofs.user.virtiofs.x": b"x",
    }
    # No security module in the guest: every create came without a context (the header
    # with nr_secctx = 0, once FUSE_SECURITY_CTX was agreed), so nothing is labelled.
    for daemon, share, tag in ((sel_daemon, sel, "SEL"), (usr_daemon, usr, "USR")):
        assert agreed_security_ctx(daemon)
        assert json.loads(report[f"MADE_{tag}"]) == ["d", "f", "h", "l", "p", "s"]
        for name in ("d", "f", "l", "p", "s"):
            assert xattrs(share / name) == {}, name


def test_guest_kernel_labels_new_files(workdir: Path, start_daemon: DaemonFactory) -> None:
    """SELinux on in the guest (no policy: every new file gets the initial "unlabeled"
    context). The kernel sends it with each create; it is on the host file under the
    mapped name (with the SELinux rules) or its own (without a map)."""
    require_assets("sid")
    sel, raw = workdir / "sel", workdir / "raw"
    sel.mkdir()
    raw.mkdir()
    sel_daemon = start_daemon(sel, "--security-label=always", "--xattrmap", SELINUX_RULES)
    raw_daemon = start_daemon(raw, "--security-label=auto")
    devices = [FsDevice(sel_daemon.socket, "sel"), FsDevice(raw_daemon.socket, "raw")]
    mounts = "\n".join([devices[0].mount_command("/mnt/sel"), devices[1].mount_command("/mnt/raw")])
    kernel_args = KERNEL_ARGS.replace("security=none", "lsm=capability,selinux")
    assert kernel_args != KERNEL_ARGS
    result = run_guest(
        LABEL_SCRIPT.replace("__MOUNTS__", mounts), devices, kernel_args=kernel_args, timeout=300
    )
    sel_daemon.finish()
    raw_daemon.finish()
    assert result.status == 0, result.output + result.kernel_log[-3000:]
    assert parse_report(result.output).get("DONE") == "yes", result.output
    assert "SELinux:  Initializing" in result.kernel_log
    label = b"unlabeled\0"
    for name in ("d", "f", "l", "p"):
        assert xattrs(sel / name) == {"trusted.virtiofs.security.selinux": label}, name
        assert xattrs(raw / name) == {"security.selinux": label}, name
    assert sorted(os.listdir(sel)) == sorted(os.listdir(raw)) == ["d", "f", "l", "p"]
