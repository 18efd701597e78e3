"""``--keep-listening``: one daemon serves one front-end after another on the same socket, each
from a clean slate, and a signal still ends it at any point.

* The project's front-end (no guest) connects, sends INIT, looks files up, opens them, maps
  one into the DAX window, and disconnects without releasing or forgetting anything, several
  times over. After each departure the daemon's descriptors (``/proc/PID/fd``) are back at
  their count before the first front-end, its threads too; the next front-end gets EIO before
  its INIT, and EBADF for the nodeids and file handles of the one before.
* Three QEMU processes (11.1, 7.2, 11.1), one after another, boot a guest against one daemon;
  each guest writes files and reads back its own and those of the guests before it. The first
  one's QEMU is killed while its guest holds a file open (no unmount, no device reset: a VMM
  that crashes); the others power off. After each run the daemon's descriptors are back at
  their count before the first guest and its threads bounded.
* SIGTERM ends the daemon while it waits for the next front-end and while it serves one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.testing.dax_window import FrontendDaxWindow
from pyvirtiofsd.testing.frontend import Frontend, FrontendError
from pyvirtiofsd.testing.fuse_client import FuseClient
from pyvirtiofsd.vhost_user.messages import ProtocolFeature
from pyvirtiofsd.vm import FsDevice, run_guest
from pyvirtiofsd.vm.guest import GuestError, kill_child, spawn_child, wait_for_socket
from tests.e2e.conftest import parse_report, require_assets

K = 4096
#: The daemon's line once a front-end has gone and the next may come (vhost_user/runner.py).
GONE = "gone ("
#: Threads a daemon may have beyond its main one between front-ends: lock waiters idle out
#: after a while, and the guests here take no blocking locks, so none is expected; a little
#: room keeps the bound about leaks, not about exact counts.
SPARE_THREADS = 2


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for ``condition`` (a bound for a broken run, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.02)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_gone(self, count: int) -> None:
        """Wait until ``count`` front-ends have gone and been cleaned up after."""
        until(
            lambda: self.text().count(GONE) >= count or self.proc.poll() is not None,
            f"front-end {count} cleaned up after",
        )
        assert self.proc.poll() is None, f"the daemon exited:\n{self.text()[-3000:]}"

    def stop(self, *provoked: str) -> str:
        """SIGTERM; the exit must be clean (status 0, nothing logged above info but the
        ``provoked`` complaints)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            kill_child(self.proc)
            pytest.fail(f"SIGTERM did not end the daemon:\n{self.text()[-3000:]}")
        text = self.text()
        assert rc == 0, text[-3000:]
        assert "Traceback" not in text, text[-5000:]
        complaints = [
            line
            for line in text.splitlines()
            if (" WARNING " in line or " ERROR " in line) and not any(p in line for p in provoked)
        ]
        assert not complaints, "\n".join(complaints[:20])
        assert not self.socket.exists(), "the socket outlived the daemon"
        return text


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def run(share: Path, *options: str) -> Daemon:
        sock = tmp_path / f"keep-{len(started)}.sock"
        log = tmp_path / f"keep-{len(started)}.log"
        with log.open("wb") as out:
            proc = spawn_child(
                [sys.executable, "-m", "pyvirtiofsd", "--socket-path", str(sock),
                 "--shared-dir", str(share), "--keep-listening", *options],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        daemon = Daemon(proc, sock, log)
        started.append(daemon)
        wait_for_socket(str(sock), proc)
        # The socket listens before the file system is built: wait for all of the daemon's
        # start-up descriptors before anyone counts them.
        until(
            lambda: "waiting for a vhost-user front-end" in daemon.text() or not daemon.alive(),
            "the daemon serving",
        )
        assert daemon.alive(), daemon.text()
        return daemon

    yield run
    for daemon in started:
        kill_child(daemon.proc, grace=5.0)


@dataclass
class Session:
    frontend: Frontend
    window: FrontendDaxWindow
    fuse: FuseClient

    def close(self) -> None:
        self.frontend.close()
        self.window.close()


def connect(sock: Path) -> Session:
    """A front-end with a DAX window and one request queue; no INIT sent yet."""
    frontend = Frontend.connect(str(sock))
    try:
        q = frontend.setup(queues=(0, 1), arena_size=8 << 20, ram_size=64 << 20)[1]
        # A window even when the daemon offers none: it is then never mapped into.
        has_window = frontend.has_protocol(ProtocolFeature.SHMEM)
        window = FrontendDaxWindow(frontend.get_shmem_config()[0] if has_window else 2 << 20)
        frontend.open_backend_channel(window.hook)
    except BaseException:
        frontend.close()
        raise
    fuse = FuseClient(lambda req, size: q.request([req], [size] if size else [], timeout=20))
    return Session(frontend, window, fuse)


def errno_of(fn: Callable[..., object], *args: object) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def test_front_ends_one_after_another_start_clean(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "file").write_bytes(b"F" * (4 * K))
    (share / "dir").mkdir()
    daemon = start(share, "--dax-window", "64M", "--thread-pool-size", "2")
    pid = daemon.proc.pid
    ident = daemon.socket.stat().st_ino
    fds, threads = fd_count(pid), thread_count(pid)
    stale: tuple[int, int, int] | None = None
    rounds = 4
    for i in range(rounds):
        s = connect(daemon.socket)
        try:
            fuse = s.fuse
            if stale is not None:
                nodeid, fh, dir_fh = stale
                assert errno_of(fuse.getattr, nodeid) == errno.EIO  # INIT comes first
            fuse.init(abi.InitFlag.MAP_ALIGNMENT | abi.InitFlag.HAS_INODE_DAX)
            if stale is not None:
                # The previous session's numbers mean nothing in this one.
                assert errno_of(fuse.getattr, nodeid) == errno.EBADF
                assert errno_of(fuse.read, nodeid, fh, 0, 16) == errno.EBADF
                assert errno_of(fuse.readdir, abi.ROOT_ID, dir_fh) == errno.EBADF
            entry = fuse.lookup(abi.ROOT_ID, b"file")
            assert stale is None or entry.nodeid != stale[0]
            opened = fuse.open(entry.nodeid)
            assert fuse.read(entry.nodeid, opened.fh, 0, 16) == b"F" * 16
            created, new = fuse.create(abi.ROOT_ID, f"made-{i}".encode())
            fuse.write(created.nodeid, new.fh, 0, f"round {i}".encode())
            fuse.flush(created.nodeid, new.fh)
            dir_entry = fuse.lookup(abi.ROOT_ID, b"dir")
            dir_fh = fuse.opendir(dir_entry.nodeid).fh
            fuse.setupmapping(entry.nodeid, opened.fh, 0, K, abi.SETUPMAPPING_FLAG_READ, 0)
            assert s.window.read(0, 16) == b"F" * 16
            stale = (entry.nodeid, opened.fh, dir_fh)
            assert fd_count(pid) > fds  # this session holds descriptors in the daemon
        finally:
            s.close()  # without RELEASE, FORGET or REMOVEMAPPING, as a VMM that quits
        daemon.wait_gone(i + 1)
        assert fd_count(pid) == fds, f"round {i}: the last front-end's fds are still open"
        until(lambda: thread_count(pid) <= threads, f"round {i}: threads back to {threads}")
        assert daemon.socket.stat().st_ino == ident, "the socket was made anew"
        assert (share / f"made-{i}").read_bytes() == f"round {i}".encode()
    text = daemon.stop("before INIT")
    assert text.count("FUSE session 7.") == rounds


def test_a_second_front_end_is_refused_while_one_is_served(
    tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    daemon = start(share)
    first = connect(daemon.socket)
    try:
        first.fuse.init()
        # Closed at once: a hang-up or a reset, depending on whether its first message had
        # arrived.
        with (
            Frontend.connect(str(daemon.socket), timeout=20) as second,
            pytest.raises((FrontendError, ConnectionError)),
        ):
            second.get_features()
        assert first.fuse.getattr(abi.ROOT_ID)
    finally:
        first.close()
    daemon.wait_gone(1)
    again = connect(daemon.socket)
    try:
        again.fuse.init()
        assert again.fuse.getattr(abi.ROOT_ID)
    finally:
        again.close()
    daemon.wait_gone(2)
    assert "another front-end connected" in daemon.stop("another front-end connected")


@pytest.mark.parametrize("when", ["waiting", "serving"])
def test_sigterm_ends_it_at_any_point(
    when: str, tmp_path: Path, start: Callable[..., Daemon]
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    daemon = start(share)
    s = connect(daemon.socket)
    try:
        s.fuse.init()
        s.fuse.getattr(abi.ROOT_ID)
        if when == "waiting":
            s.close()
            daemon.wait_gone(1)
        daemon.stop()
        if when == "serving":
            with pytest.raises(FrontendError):
                s.frontend.get_queue_num()  # the daemon hung up
    finally:
        s.close()


# -- real guests --------------------------------------------------------------------------------

#: QEMU of each run: a VMM restarted, once as another version.
RUNS = ("sid", "bookworm", "sid")
BLOB = 1 << 20


#: The first guest's line when it is ready to lose its VMM (padded, as the harness holds back
#: the last 128 characters of output).
KILL_ME = "@@KILL_THE_VMM@@"


def guest_script(run: int, device: FsDevice) -> str:
    """Guest ``run`` reads what the guests before it left, then writes its own files.

    The first one then holds a file open and asks for its QEMU to be killed: the daemon sees
    its front-end vanish mid-session, with no FUSE_DESTROY (which an unmount sends) and no
    RESET_DEVICE (which QEMU sends when a guest powers off), as when a VMM crashes or is
    killed. The others power off as usual."""
    lines = ["set -eu", device.mount_command("/mnt/s"), "cd /mnt/s"]
    for earlier in range(run):
        lines.append(f'echo "READ_{earlier} $(cat run-{earlier}.txt)"')
        lines.append(f'echo "BLOB_{earlier} $(md5sum < run-{earlier}.bin | cut -d" " -f1)"')
    lines += [
        f"echo 'written by guest {run}' > run-{run}.txt",
        f"dd if=/dev/urandom of=run-{run}.bin bs=64k count={BLOB // 65536} 2>/dev/null",
        f'echo "BLOB_{run} $(md5sum < run-{run}.bin | cut -d" " -f1)"',
        f"mkdir -p dir-{run}/sub && echo nested > dir-{run}/sub/file",
        f"mv dir-{run}/sub/file dir-{run}/moved && rmdir dir-{run}/sub",
        f'echo "OWN $(cat run-{run}.txt) $(cat dir-{run}/moved)"',
        'echo "LISTING $(ls | tr "\\n" " ")"',
        'echo "DONE yes"',
    ]
    if run == 0:
        lines += ["sync", f"echo {KILL_ME}", "printf '%200s\\n' ''", "sleep 100000 < run-0.txt"]
    return "\n".join(lines) + "\n"


class KillVmm:
    """Output callback: SIGKILLs the QEMU connected to ``sock`` once the guest asks."""

    def __init__(self, sock: Path) -> None:
        self.sock = str(sock).encode()
        self.seen = ""
        self.killed = False

    def __call__(self, text: str) -> None:
        self.seen += text
        if self.killed or KILL_ME not in self.seen:
            return
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"qemu-system" in a for a in argv) and any(self.sock in a for a in argv):
                os.kill(int(entry), signal.SIGKILL)
                self.killed = True
                return
        raise AssertionError("no QEMU connected to the daemon's socket")


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.vm
def test_three_guests_one_after_another(tmp_path: Path, start: Callable[..., Daemon]) -> None:
    for qemu in set(RUNS):
        require_assets(qemu)
    share = tmp_path / "share"
    share.mkdir()
    daemon = start(share, "--thread-pool-size", "2")
    pid = daemon.proc.pid
    ident = daemon.socket.stat().st_ino
    fds, threads = fd_count(pid), thread_count(pid)
    device = FsDevice(str(daemon.socket), "keep")
    blobs: dict[int, str] = {}
    for run, qemu in enumerate(RUNS):
        script = guest_script(run, device)
        if run == 0:
            kill = KillVmm(daemon.socket)
            with pytest.raises(GuestError):  # it never finishes: its VMM is killed
                run_guest(script, [device], qemu=qemu, timeout=300, on_output=kill)
            assert kill.killed
            output = kill.seen
        else:
            result = run_guest(script, [device], qemu=qemu, timeout=300)
            assert result.status == 0, result.output + result.kernel_log[-3000:]
            output = result.output
        report = parse_report(output)
        assert report.get("DONE") == "yes", output
        # What the guests before it left, as they left it.
        for earlier in range(run):
            assert report[f"READ_{earlier}"] == f"written by guest {earlier}"
            assert report[f"BLOB_{earlier}"] == blobs[earlier]
        blobs[run] = report[f"BLOB_{run}"]
        assert report["OWN"] == f"written by guest {run} nested"
        assert md5_of(share / f"run-{run}.bin") == blobs[run]
        assert (share / f"dir-{run}" / "moved").read_text() == "nested\n"

        daemon.wait_gone(run + 1)
        assert fd_count(pid) == fds, f"run {run}: descriptors of the last guest still open"
        until(
            lambda: thread_count(pid) <= threads + SPARE_THREADS,
            f"run {run}: threads back near {threads}",
        )
        assert daemon.socket.stat().st_ino == ident, "the socket was made anew"
    text = daemon.stop()
    assert text.count("FUSE session 7.") == len(RUNS)
    served = re.findall(r"requests served: .*$", text, re.MULTILINE)[-1]
    # The first session ended by its VMM's death alone: the daemon dropped it by itself.
    assert re.search(rf"\bDESTROY={len(RUNS) - 1}\b", served), served
