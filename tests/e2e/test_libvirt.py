"""libvirt itself runs pyvirtiofsd as the virtio-fs daemon of a real domain.

The test starts libvirt's system daemons when they are not running (PID 1 may not be systemd),
creates a transient TCG domain whose `<filesystem>` names a wrapper around ``python -m
pyvirtiofsd`` as its `<binary path>`, boots the harness's guest kernel and busybox initramfs with
a script that mounts the share, and checks what the guest saw, what it left on the host, the
command line libvirt gave the daemon and how the daemon ended. See docs/libvirt.md.

It installs nothing: `.ci/setup` provides libvirt (libvirt-daemon-system, libvirt-clients); the
test skips when libvirt or the VM assets are missing, or when not run as root.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pyvirtiofsd
from pyvirtiofsd.vm import assets, missing_assets
from pyvirtiofsd.vm.guest import KERNEL_ARGS, _Console

URI = "qemu:///system"
PACKAGES = "libvirt-daemon-system libvirt-clients"
# Debian's name for the user QEMU runs as under libvirt's system instance.
QEMU_USER = "libvirt-qemu"
# Where libvirt's system instance writes per-domain logs, the daemon's output among them.
LOG_DIR = Path("/var/log/libvirt/qemu")
KVM = Path("/dev/kvm")
TAG = "hostshare"
MEMORY_MB = 1024
# Generous bounds for a loaded machine: they only keep a broken run from hanging.
LIBVIRTD_READY_TIMEOUT = 120.0
GUEST_TIMEOUT = 240.0
DAEMON_EXIT_TIMEOUT = 60.0
DAEMON_STOP_TIMEOUT = 30.0

HOST_TEXT = "hello from the host, through libvirt\n"
GUEST_TEXT = "written by the guest\n"
# The daemon's log format puts the level after the timestamp: "[date time LEVEL logger] ...".
_COMPLAINT = re.compile(r"^\[[^\]]* (WARNING|ERROR|CRITICAL) ")


def virsh(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", URI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def libvirtd_answers() -> bool:
    try:
        return virsh("version", timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pid_alive(pid: int, name: str) -> bool:
    """Whether `pid` is still the daemon `name` (a pid file may outlive its process)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def pidfile_daemon(name: str) -> int | None:
    """The pid of a running libvirt daemon from its default pid file (root instance)."""
    try:
        pid = int(Path(f"/run/{name}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid, name) else None


def start_daemon(name: str) -> int:
    """Start a libvirt daemon in the background (`-d`) and return the pid it runs as."""
    with tempfile.TemporaryFile() as out:
        # A file, not a pipe: a daemon that kept an inherited pipe would hang the wait for EOF.
        result = subprocess.run(
            [name, "-d"], stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=120
        )
        out.seek(0)
        text = out.read().decode(errors="replace")
    if result.returncode != 0:
        pytest.fail(f"`{name} -d` failed with status {result.returncode}:\n{text}")
    # `-d` returns once the daemon has set up, after it wrote its pid file; a short grace
    # anyway, as the pid file is the only handle left on the daemonised process.
    deadline = time.monotonic() + 10
    while (pid := pidfile_daemon(name)) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"`{name} -d` left no live pid file:\n{text}")
        time.sleep(0.05)
    return pid


def stop_daemon(name: str, pid: int) -> None:
    if not pid_alive(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DAEMON_STOP_TIMEOUT
    while pid_alive(pid, name):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def kvm_acl_missing() -> bool:
    """Whether QEMU's user lacks the /dev/kvm ACL entry that spares libvirtd a slow start.

    libvirtd probes whether its QEMU user can open /dev/kvm; when the node is root-only (as in
    this project's containers) that probe stalls libvirtd's start by about a minute.
    """
    if not KVM.exists() or shutil.which("setfacl") is None or shutil.which("getfacl") is None:
        return False
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        return False
    acl = subprocess.run(
        ["getfacl", "-p", str(KVM)], capture_output=True, text=True, check=False
    ).stdout
    return f"user:{QEMU_USER}:" not in acl


@dataclass
class LibvirtSystem:
    started: list[tuple[str, int]]  # (daemon, pid) that this module started, to stop


@pytest.fixture(scope="module")
def libvirt_system() -> Iterator[LibvirtSystem]:
    """libvirt's system instance, started here (and stopped afterwards) unless it runs."""
    if os.geteuid() != 0:
        pytest.skip("libvirt's system instance (qemu:///system) needs root")
    missing = [p for p in ("virsh", "libvirtd", "virtlogd") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install {PACKAGES})")
    reasons = missing_assets(qemu="bookworm")
    if reasons:
        pytest.skip("; ".join(reasons))

    system = LibvirtSystem(started=[])
    acl_added = False
    try:
        if not libvirtd_answers():
            if kvm_acl_missing():
                subprocess.run(["setfacl", "-m", f"u:{QEMU_USER}:rw", str(KVM)], check=True)
                acl_added = True
            # virtlogd first: libvirtd hands it the domain's and the daemon's output.
            for name in ("virtlogd", "libvirtd"):
                if pidfile_daemon(name) is None:
                    system.started.append((name, start_daemon(name)))
            deadline = time.monotonic() + LIBVIRTD_READY_TIMEOUT
            while not libvirtd_answers():
                if time.monotonic() > deadline:
                    pytest.fail(f"libvirtd did not answer within {LIBVIRTD_READY_TIMEOUT:.0f} s")
                time.sleep(0.2)
        yield system
    finally:
        for name, pid in reversed(system.started):
            stop_daemon(name, pid)
        if acl_added:
            subprocess.run(["setfacl", "-x", f"u:{QEMU_USER}", str(KVM)], check=False)


def traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


@pytest.fixture
def work() -> Iterator[Path]:
    """A directory QEMU (running as libvirt's unprivileged user) can reach into."""
    base = Path(tempfile.gettempdir())
    if not traversable_by_others(base):
        base = Path("/tmp")
    path = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-libvirt-", dir=base))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# libvirt clears the environment of the daemon it starts and gives it only a path to run, so the
# wrapper names the interpreter and the package this test imported. It records the arguments and
# open descriptors, and runs the daemon as a child rather than exec'ing it so that it can record
# the exit status; libvirt stops the daemon with SIGTERM through its pid file, which then names
# the wrapper, so the wrapper passes that signal on.
WRAPPER = """#!/bin/sh
printf '%s\\n' "$@" > {argv}
for f in /proc/$$/fd/*; do printf '%s %s\\n' "${{f##*/}}" "$(readlink "$f")"; done > {fds}
trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
PYTHONPATH={pythonpath} {python} -m pyvirtiofsd "$@" &
child=$!
while :; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
done
echo "$status" > {status}
exit "$status"
"""


@dataclass
class Run:
    """The files of one domain run."""

    work: Path

    @property
    def share(self) -> Path:
        return self.work / "share"

    @property
    def wrapper(self) -> Path:
        return self.work / "pyvirtiofsd-wrapper"

    @property
    def argv(self) -> Path:
        return self.work / "daemon.argv"

    @property
    def fds(self) -> Path:
        return self.work / "daemon.fds"

    @property
    def status(self) -> Path:
        return self.work / "daemon.status"

    @property
    def console(self) -> Path:
        return self.work / "console.log"


def write_wrapper(run: Run) -> None:
    package_root = Path(pyvirtiofsd.__file__).resolve().parent.parent
    text = WRAPPER.format(
        argv=shlex.quote(str(run.argv)),
        fds=shlex.quote(str(run.fds)),
        status=shlex.quote(str(run.status)),
        pythonpath=shlex.quote(str(package_root)),
        python=shlex.quote(sys.executable),
    )
    run.wrapper.write_text(text)
    run.wrapper.chmod(0o755)


def write_initrd(path: Path, script: str, nonce: str) -> None:
    """The harness's base initramfs plus a per-run archive with the script, as run_guest does."""
    env = f"HARNESS_NONCE={nonce}\nHARNESS_ROOTFS=\n"
    with path.open("wb") as out, assets.base_initramfs().open("rb") as base:
        shutil.copyfileobj(base, out)
        out.write(
            assets.run_archive(
                [
                    ("harness/env", env.encode(), 0o644),
                    ("harness/script", script.encode(), 0o755),
                ]
            )
        )
    path.chmod(0o644)


def domain_xml(name: str, kernel: Path, initrd: Path, run: Run) -> str:
    dom = ET.Element("domain", type="qemu")  # TCG: /dev/kvm here is PVM, no stock kernel boots
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(MEMORY_MB)
    ET.SubElement(dom, "vcpu").text = "2"
    # vhost-user back-ends map guest RAM: it must be shareable.
    backing = ET.SubElement(dom, "memoryBacking")
    ET.SubElement(backing, "source", type="memfd")
    ET.SubElement(backing, "access", mode="shared")
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(kernel)
    ET.SubElement(os_, "initrd").text = str(initrd)
    ET.SubElement(os_, "cmdline").text = KERNEL_ARGS
    # ACPI lets the guest's poweroff actually end the domain.
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    fs = ET.SubElement(devices, "filesystem", type="mount", accessmode="passthrough")
    ET.SubElement(fs, "driver", type="virtiofs", queue="1024")
    binary = ET.SubElement(fs, "binary", path=str(run.wrapper))
    ET.SubElement(binary, "cache", mode="none")
    ET.SubElement(binary, "lock", posix="on", flock="on")
    ET.SubElement(fs, "source", dir=str(run.share))
    ET.SubElement(fs, "target", dir=TAG)
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(run.console))
    ET.SubElement(serial, "target", port="0")
    # Nothing the guest needs: fewer devices to emulate and probe.
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def guest_script(blob_name: str) -> str:
    return f"""set -e
mkdir -p /mnt
mount -t virtiofs {TAG} /mnt || exit 125
echo "read: $(cat /mnt/from-host.txt)"
md5sum /mnt/{blob_name}
printf '{GUEST_TEXT.strip()}\\n' > /mnt/from-guest.txt
mkdir /mnt/guest-dir
printf nested > /mnt/guest-dir/file
ls /mnt
"""


def domain_running(name: str) -> bool:
    listing = virsh("list", "--name")
    return name in listing.stdout.split()


def tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError as exc:
        return f"({exc})"


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_libvirt_runs_pyvirtiofsd(libvirt_system: LibvirtSystem, work: Path) -> None:
    run = Run(work)
    run.share.mkdir()
    run.share.chmod(0o755)
    (run.share / "from-host.txt").write_text(HOST_TEXT)
    blob = os.urandom(256 * 1024 + 123)
    (run.share / "blob.bin").write_bytes(blob)
    write_wrapper(run)

    nonce = secrets.token_hex(8)
    initrd = work / "initrd.cpio"
    write_initrd(initrd, guest_script("blob.bin"), nonce)
    # A private copy: libvirt relabels (chowns) the kernel for QEMU while the domain runs, which
    # must not touch the harness's shared asset.
    kernel = work / "kernel"
    shutil.copyfile(assets.kernel(), kernel)
    kernel.chmod(0o644)

    name = f"pyvirtiofsd-test-{secrets.token_hex(4)}"
    xml = work / "domain.xml"
    xml.write_text(domain_xml(name, kernel, initrd, run))
    domain_log = LOG_DIR / f"{name}.log"

    def diagnostics() -> str:
        daemon_logs = sorted(LOG_DIR.glob(f"{name}-*virtiofsd.log"))
        parts = [
            *(f"--- {p.name} (the daemon) ---\n{tail(p)}" for p in daemon_logs),
            f"--- console (tail) ---\n{tail(run.console)}",
            f"--- libvirt's domain log ---\n{tail(domain_log)}",
        ]
        return "\n".join(parts)

    console = _Console(nonce, None)
    created = False
    ended_by_itself = False
    try:
        created_result = virsh("create", str(xml), timeout=120)
        assert created_result.returncode == 0, (
            f"virsh create failed:\n{created_result.stderr}\n{diagnostics()}"
        )
        created = True
        deadline = time.monotonic() + GUEST_TIMEOUT
        offset = 0
        while True:
            # Read what the console gained before checking the domain, so that all output
            # written before it ended is seen.
            if run.console.exists():
                with run.console.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
                offset += len(data)
                console.feed(data)
            if not domain_running(name):
                ended_by_itself = True
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        console.feed(b"", final=True)
        assert ended_by_itself, f"the domain ran past {GUEST_TIMEOUT:.0f} s\n{diagnostics()}"
    finally:
        if created and not ended_by_itself:
            virsh("destroy", name)

    # The guest's side.
    assert console.status is not None, f"the guest script never finished\n{diagnostics()}"
    output = console.output()
    assert console.status == 0, f"guest script status {console.status}:\n{output}\n{diagnostics()}"
    assert f"read: {HOST_TEXT.strip()}" in output, output
    assert f"{hashlib.md5(blob).hexdigest()}  /mnt/blob.bin" in output, output
    listed = output.split()
    for entry in ("blob.bin", "from-host.txt", "from-guest.txt", "guest-dir"):
        assert entry in listed, output
    assert console.finished(), f"the guest did not get to power off\n{diagnostics()}"

    # What the guest left on the host.
    assert (run.share / "from-guest.txt").read_bytes() == GUEST_TEXT.encode()
    assert (run.share / "guest-dir" / "file").read_bytes() == b"nested"

    # libvirt ran our daemon, its way: an inherited listening socket and virtiofsd's -o form.
    argv = run.argv.read_text().splitlines()
    assert len(argv) >= 3, argv
    fd_arg = re.fullmatch(r"--fd=(\d+)", argv[0])
    assert fd_arg, argv
    assert argv[1] == "-o", argv
    source, *options = argv[2].split(",")
    assert source == f"source={run.share}", argv
    assert {"cache=none", "flock", "posix_lock"} <= set(options), argv
    fds = dict(line.split(" ", 1) for line in run.fds.read_text().splitlines() if " " in line)
    assert fds.get(fd_arg.group(1), "").startswith("socket:"), fds

    # The daemon ended cleanly once the domain was gone (libvirt stops it with the domain).
    deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
    while not run.status.exists():
        assert time.monotonic() < deadline, f"the daemon did not exit\n{diagnostics()}"
        time.sleep(0.1)
    daemon_logs = sorted(LOG_DIR.glob(f"{name}-*virtiofsd.log"))
    assert len(daemon_logs) == 1, (daemon_logs, diagnostics())
    log = daemon_logs[0].read_text(errors="replace")
    assert run.status.read_text().strip() == "0", f"daemon exit status:\n{log[-4000:]}"
    assert "Traceback" not in log, log[-6000:]
    complaints = [line for line in log.splitlines() if _COMPLAINT.search(line)]
    assert not complaints, "\n".join(complaints[:20])

    # Only a passing run's logs go: a failing one leaves them for reading.
    for path in [domain_log, *daemon_logs]:
        path.unlink(missing_ok=True)
