"""The daemon as a real process (``python -m pyvirtiofsd``) for end-to-end tests.

Every test that starts one checks, when it is done, that the daemon exited with status 0 once
its front-end left, and that nothing in its log is a Python traceback.
"""

from __future__ import annotations

import ast
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.vm import missing_assets
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket

# The daemon's closing lines (see transport/virtiofs.py and daemon.py).
_PER_QUEUE = re.compile(r"requests per queue: (\[[0-9, ]*\])")
_SERVED = re.compile(r"requests served: ?(.*)$", re.MULTILINE)
_COMPLAINT = re.compile(r"^\[[^\]]* (WARNING|ERROR|CRITICAL) ")


def require_assets(qemu: str = "sid", rootfs: str | None = None) -> None:
    reasons = missing_assets(qemu=qemu, rootfs=rootfs)
    if reasons:
        pytest.skip("; ".join(reasons))


@dataclass
class DaemonProcess:
    """One ``python -m pyvirtiofsd`` serving ``shared_dir`` on ``socket``."""

    proc: subprocess.Popen[bytes]
    socket: str
    shared_dir: Path
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it contains ``text``; the daemon writes it from another process, so a
        line may land a moment after the reply that follows it."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log or time.monotonic() > deadline:
                assert text in log, f"{text!r} never appeared in the daemon log:\n{log[-3000:]}"
                return log
            time.sleep(0.02)

    def finish(self, timeout: float = 60.0, *, allow_warnings: bool = False) -> str:
        """Wait for the exit that follows the front-end's departure; check it was clean.

        A real QEMU and guest send nothing the daemon should refuse or complain about, so
        unless a test provokes them, warnings and errors in the log fail it too."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_child(self.proc)
            pytest.fail(f"daemon still running after its front-end left:\n{self.log_text()}")
        log = self.log_text()
        assert rc == 0, f"daemon exited with status {rc}:\n{log[-4000:]}"
        assert "Traceback" not in log, log[-6000:]
        if not allow_warnings:
            complaints = [line for line in log.splitlines() if _COMPLAINT.search(line)]
            assert not complaints, "\n".join(complaints[:20])
        return log

    def requests_per_queue(self) -> list[int]:
        """From the exit log: requests served by queue 0 (hiprio), 1, 2, ..."""
        found = _PER_QUEUE.findall(self.log_text())
        assert found, self.log_text()[-3000:]
        return list(ast.literal_eval(found[-1]))

    def served(self) -> list[dict[str, int]]:
        """Every "requests served" line of the log (SIGUSR1 and exit), as opcode counts."""
        return [
            {k: int(v) for k, v in (item.split("=") for item in line.split())}
            for line in _SERVED.findall(self.log_text())
        ]


DaemonFactory = Callable[..., DaemonProcess]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory removed afterwards (pytest keeps old tmp_paths: too big here), that
    every user can traverse."""
    path = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-e2e-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_daemon(workdir: Path) -> Iterator[DaemonFactory]:
    """``start_daemon(shared_dir, *options)`` runs the daemon and waits for its socket.

    With ``inherit_socket=True`` it is started the way libvirt starts it: the test creates and
    listens on the socket, and the daemon gets ``--fd=N -o source=DIR`` (then pass further
    ``-o`` options in ``options``).
    """
    started: list[DaemonProcess] = []

    def start(shared_dir: Path, *options: str, inherit_socket: bool = False) -> DaemonProcess:
        n = len(started)
        sock = str(workdir / f"daemon-{n}.sock")
        log_path = workdir / f"daemon-{n}.log"
        command = [sys.executable, "-m", "pyvirtiofsd"]
        listener = None
        if inherit_socket:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sock)
            listener.listen(1)
            argv = [*command, f"--fd={listener.fileno()}", "-o", f"source={shared_dir}"]
            pass_fds: tuple[int, ...] = (listener.fileno(),)
        else:
            argv = [*command, "--socket-path", sock, "--shared-dir", str(shared_dir)]
            pass_fds = ()
        try:
            with log_path.open("wb") as log:
                proc = spawn_child(
                    [*argv, *options],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=pass_fds,
                )
        finally:
            if listener is not None:
                listener.close()  # the daemon has its own copy
        daemon = DaemonProcess(proc, sock, shared_dir, log_path)
        started.append(daemon)
        try:
            if inherit_socket:
                daemon.wait_for_log("waiting for a vhost-user front-end", timeout=30)
            else:
                wait_for_socket(sock, proc)
        except Exception:
            raise AssertionError(f"daemon did not start:\n{daemon.log_text()}") from None
        return daemon

    yield start
    # Only reached for daemons a failing test left behind; passing tests call finish().
    for daemon in started:
        kill_child(daemon.proc, grace=5.0)


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_random(path: Path, size: int, seed: int) -> None:
    """Incompressible bytes, reproducible from ``seed``, written in 1 MiB pieces."""
    import random

    rng = random.Random(seed)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n


def parse_report(output: str) -> dict[str, str]:
    """``KEY value`` lines a guest script printed (the first word upper-case), as a dict."""
    report = {}
    for line in output.splitlines():
        key, _, value = line.partition(" ")
        if key.isupper() and key.replace("_", "").isalnum():
            report[key] = value.strip()
    return report


__all__ = [
    "DaemonFactory",
    "DaemonProcess",
    "parse_report",
    "require_assets",
    "sha256_file",
    "write_random",
]
