"""A request that never comes back from the backend must not keep the daemon alive.

Inside the share sits a FUSE file system whose server never answers: /dev/fuse is opened and
mounted with mount(2), as :mod:`pyvirtiofsd.transport.fusedev` does, and then never read. A
LOOKUP of its mount point makes the daemon stat it, and that stat waits in the kernel for good.
The daemon must still end on SIGTERM, or when its front-end leaves, within a few seconds: with
status 0, its socket removed and no traceback in its log.

The hung mount lives in a mount namespace of the daemon's own (made by a small prelude that
then execs the daemon, which inherits the /dev/fuse descriptor), so nothing else on the host
can trip over it, and it goes away with the daemon. The test still aborts the connection
through the fusectl file system before it lets go, in case the daemon outlived the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.testing.frontend import DriverQueue, Frontend
from pyvirtiofsd.testing.fuse_client import FuseClient, encode_request
from pyvirtiofsd.vhost_user.messages import FrontendReq, VringState
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket
from tests.e2e.conftest import DaemonProcess

MiB = 1 << 20
REPLY = 4096 + abi.OUT_HEADER.size
#: An upper bound for "a few seconds", far above what the daemon needs: reaching it means the
#: daemon hangs, not that it was slow.
EXIT_BOUND = 30.0
_SYS_FUTEX = 202  # x86_64

# Runs as root in the child: a private mount namespace with a FUSE file system nobody serves on
# argv[1] and fusectl on its usual place, then the daemon (argv[2:]) with /dev/fuse inherited.
PRELUDE = """
import os, stat, sys
from pyvirtiofsd import linux
linux.unshare(0x00020000)  # CLONE_NEWNS
linux.mount("none", "/", "", 0x4000 | 0x40000, "")  # MS_REC | MS_PRIVATE
fd = os.open("/dev/fuse", os.O_RDWR)
os.set_inheritable(fd, True)  # closing the last descriptor would end the connection
options = f"fd={fd},rootmode={stat.S_IFDIR:o},user_id=0,group_id=0,allow_other"
linux.mount("hung", sys.argv[1], "fuse.hung", linux.MS_NOSUID | linux.MS_NODEV, options)
try:
    linux.mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, "")
except OSError as e:
    if e.errno != 16:  # EBUSY: the host has it mounted there already, and so has this copy
        raise
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@dataclass
class Stuck:
    daemon: DaemonProcess
    fe: Frontend
    q: DriverQueue
    fuse: FuseClient
    connection: Path  # the hung mount's directory in fusectl, as the daemon sees it

    def waiting(self) -> int:
        return int((self.connection / "waiting").read_text())

    def block_a_request(self) -> None:
        """Send a LOOKUP of the hung mount point and wait until the daemon is stuck in it."""
        before = self.waiting()
        lookup = encode_request(abi.Opcode.LOOKUP, abi.ROOT_ID, b"hung\0", 777)
        self.q.submit([lookup], [REPLY])
        self.q.kick()
        deadline = time.monotonic() + EXIT_BOUND
        while self.waiting() <= before:
            assert self.daemon.alive(), self.daemon.log_text()[-3000:]
            assert time.monotonic() < deadline, "the LOOKUP never reached the hung mount"
            time.sleep(0.02)

    def main_thread_waits(self) -> None:
        """Wait until the daemon's main thread (the vhost-user connection) sleeps in a futex,
        as it does while it waits for a ring to stop."""
        pid = self.daemon.proc.pid
        deadline = time.monotonic() + EXIT_BOUND
        while True:
            syscall = Path(f"/proc/{pid}/task/{pid}/syscall").read_text().split()[0]
            if syscall == str(_SYS_FUTEX):
                return
            assert time.monotonic() < deadline, f"main thread in syscall {syscall}"
            time.sleep(0.02)

    def exits_cleanly(self) -> str:
        try:
            rc = self.daemon.proc.wait(EXIT_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon hangs:\n{self.daemon.log_text()[-4000:]}")
        log = self.daemon.log_text()
        assert rc == 0, log[-4000:]
        assert "Traceback" not in log, log[-6000:]
        assert not Path(self.daemon.socket).exists(), "the socket outlived the daemon"
        return log


def _connection_of(pid: int, mountpoint: Path) -> Path:
    """fusectl's directory for the FUSE mount on ``mountpoint`` in ``pid``'s namespace."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            minor = fields[2].split(":")[1]
            return Path(f"/proc/{pid}/root/sys/fs/fuse/connections/{minor}")
    raise AssertionError(f"no mount on {mountpoint} in process {pid}")


@contextlib.contextmanager
def stuck_daemon(workdir: Path, *options: str) -> Iterator[Stuck]:
    share = workdir / "share"
    (share / "hung").mkdir(parents=True)
    sock = str(workdir / "daemon.sock")
    log_path = workdir / "daemon.log"
    argv = [sys.executable, "-c", PRELUDE, str(share / "hung")]
    argv += ["-m", "pyvirtiofsd", "--socket-path", sock, "--shared-dir", str(share), *options]
    with log_path.open("wb") as log:
        proc = spawn_child(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    daemon = DaemonProcess(proc, sock, share, log_path)
    fe: Frontend | None = None
    connection: Path | None = None
    try:
        try:
            wait_for_socket(sock, proc)
        except Exception:
            raise AssertionError(f"daemon did not start:\n{daemon.log_text()}") from None
        connection = _connection_of(proc.pid, share / "hung")
        fe = Frontend.connect(sock)
        q = fe.setup(queues=(0, 1), queue_size=64, ram_size=64 * MiB, arena_size=8 * MiB)[1]

        def transact(request: bytes, reply_size: int) -> bytes:
            return q.request([request], [reply_size] if reply_size else [])

        fuse = FuseClient(transact)
        fuse.init()
        yield Stuck(daemon, fe, q, fuse, connection)
    finally:
        if proc.poll() is None and connection is not None:
            # Let go of whatever waits on the hung mount before stopping the daemon.
            with contextlib.suppress(OSError):
                (connection / "abort").write_text("1")
        kill_child(proc, grace=5.0)
        if fe is not None:
            fe.close()


@pytest.mark.parametrize("pool", [0, 2], ids=["inline", "pool"])
def test_sigterm_with_a_request_stuck_in_the_backend(workdir: Path, pool: int) -> None:
    with stuck_daemon(workdir, f"--thread-pool-size={pool}") as s:
        s.fuse.getattr(abi.ROOT_ID)
        s.block_a_request()
        s.daemon.proc.send_signal(signal.SIGTERM)
        log = s.exits_cleanly()
    assert "still running in the backend" in log
    # The daemon knows, and doesn't wait on the file system's shutdown for good.
    assert "shutting the file system down without them" in log


def test_frontend_leaves_while_a_request_is_stuck(workdir: Path) -> None:
    with stuck_daemon(workdir) as s:
        s.block_a_request()
        s.fe.close()
        log = s.exits_cleanly()
    assert "still running in the backend" in log


@pytest.mark.parametrize("end", ["sigterm", "disconnect"])
def test_ring_stop_waiting_for_a_stuck_request(workdir: Path, end: str) -> None:
    # GET_VRING_BASE must wait for the ring's requests, and this one never ends: the connection
    # waits too (as it should), yet a signal or the front-end's departure still ends the daemon.
    with stuck_daemon(workdir) as s:
        s.block_a_request()
        s.fe.send(FrontendReq.GET_VRING_BASE, VringState(1, 0).encode())
        s.main_thread_waits()
        if end == "sigterm":
            s.daemon.proc.send_signal(signal.SIGTERM)
        else:
            s.fe.close()
        log = s.exits_cleanly()
    assert "still running in the backend" in log


def test_sigterm_with_a_request_stuck_on_a_host_mount(workdir: Path) -> None:
    # The same through /dev/fuse: a stat of the hung mount through the daemon's host mount
    # leaves one of its workers stuck in the backend.
    share = workdir / "share"
    (share / "hung").mkdir(parents=True)
    mnt = workdir / "mnt"
    mnt.mkdir()
    log_path = workdir / "daemon.log"
    argv = [sys.executable, "-c", PRELUDE, str(share / "hung")]
    argv += ["-m", "pyvirtiofsd", "--mount", str(mnt), "--shared-dir", str(share)]
    with log_path.open("wb") as log:
        proc = spawn_child(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    daemon = DaemonProcess(proc, str(workdir / "no.sock"), share, log_path)
    stat: subprocess.Popen[bytes] | None = None
    connection: Path | None = None
    try:
        daemon.wait_for_log("mounted on", timeout=EXIT_BOUND)
        connection = _connection_of(proc.pid, share / "hung")
        before = int((connection / "waiting").read_text())
        # A process in the daemon's mount namespace looks at the hung mount through it.
        ns = f"--mount=/proc/{proc.pid}/ns/mnt"
        stat = spawn_child(["nsenter", ns, "stat", str(mnt / "hung")], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + EXIT_BOUND
        while int((connection / "waiting").read_text()) <= before:
            assert daemon.alive(), daemon.log_text()[-3000:]
            assert time.monotonic() < deadline, "the stat never reached the hung mount"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(EXIT_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon hangs:\n{daemon.log_text()[-4000:]}")
        log_text = daemon.log_text()
        assert rc == 0, log_text[-4000:]
        assert "Traceback" not in log_text, log_text[-6000:]
        assert "still running in the backend" in log_text
        assert "shutting the file system down without them" in log_text
    finally:
        if proc.poll() is None and connection is not None:
            with contextlib.suppress(OSError):
                (connection / "abort").write_text("1")
        kill_child(proc, grace=5.0)
        # With the daemon gone its mounts are aborted: the stat ends (with an error).
        kill_child(stat, grace=10.0)


def test_the_daemon_never_changes_the_hung_mount(workdir: Path) -> None:
    # A sanity check of the setup itself: the hung mount exists only for the daemon.
    with stuck_daemon(workdir) as s:
        assert os.path.ismount(s.daemon.shared_dir / "hung") is False
        assert s.waiting() >= 1  # INIT, never answered
        s.fe.close()
        s.exits_cleanly()
