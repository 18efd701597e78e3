"""Shared fixtures: the daemon run as a real process, mounted through the real kernel.

The object-storage fixtures live in :mod:`tests.opendal_fixtures`, registered here so that they
reach its module tests, the end-to-end and the attack suites alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd import accel

pytest_plugins = ["tests.opendal_fixtures"]


def can_mount_fuse() -> str | None:
    """Why /dev/fuse mounts can't run here, or None when they can."""
    if os.geteuid() != 0:
        return "mounting FUSE needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")


@contextlib.contextmanager
def fuse_uring_enabled(on: bool = True) -> Iterator[None]:
    """fuse's ``enable_uring`` parameter set to ``on`` for the block (skips the test where the
    kernel has no FUSE over io_uring or the parameter can't be written), then put back."""
    reason = can_mount_fuse()
    if reason:
        pytest.skip(reason)
    try:
        before = ENABLE_URING.read_text().strip()
        ENABLE_URING.write_text("Y" if on else "N")
    except OSError as e:
        pytest.skip(f"no FUSE over io_uring here ({ENABLE_URING}: {e.strerror})")
    try:
        yield
    finally:
        ENABLE_URING.write_text(before)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@dataclass
class Mounted:
    """The daemon as a process serving a /dev/fuse mount, and its log."""

    mnt: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (SIGKILL if it does not end), then make sure the mount is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        return self.proc.returncode


@dataclass
class Share(Mounted):
    """A directory served by the daemon and mounted through /dev/fuse."""

    src: Path


@contextlib.contextmanager
def mounted_share(src: Path, mnt: Path, *args: str, log: Path | None = None) -> Iterator[Share]:
    src.mkdir(parents=True, exist_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    log = log or mnt.parent / f"{mnt.name}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyvirtiofsd",
                "--shared-dir",
                str(src),
                "--mount",
                str(mnt),
                "--log-level",
                "debug",
                *args,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    share = Share(mnt, proc, log, src)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not mount:\n{share.log_text()}")
            time.sleep(0.05)
        yield share
    finally:
        rc = share.stop()
        assert rc == 0, f"daemon exited with {rc}:\n{share.log_text()[-3000:]}"
        assert "Traceback" not in share.log_text(), share.log_text()[-5000:]


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory every user can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["dev-fuse", "io-uring"])
def share(open_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Share]:
    """A mounted share, served through /dev/fuse alone and with FUSE over io_uring (then the
    daemon's log must say its queues started); ``@pytest.mark.daemon_args(...)`` adds daemon
    options."""
    reason = can_mount_fuse()
    if reason:
        pytest.skip(reason)
    marker = request.node.get_closest_marker("daemon_args")
    args: tuple[str, ...] = marker.args if marker else ()
    src = open_tmp / "src"
    src.mkdir()
    src.chmod(0o777)
    with contextlib.ExitStack() as stack:
        if request.param == "io-uring":
            stack.enter_context(fuse_uring_enabled())
            args = (*args, "--fuse-io-uring")
        s = stack.enter_context(mounted_share(src, open_tmp / "mnt", *args))
        if request.param == "io-uring":
            os.stat(s.mnt)  # a request: INIT is answered by then, and the queues started
            assert "FUSE over io_uring: " in s.log.read_text(), "io_uring was not taken up"
        yield s


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """A PassthroughFs built in this process sets the umask to 0, as the daemon needs; later
    tests must still start from the umask the run began with."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "daemon_args(*args): extra options for the share fixture")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a compiled build, skip the tests that replace compiled functions: compiled callers
    are bound to the originals when built, so the replacement would never run."""
    built = accel.compiled()
    if not built:
        return
    skip = pytest.mark.skip(reason=f"replaces functions of compiled modules ({accel.build()})")
    for item in items:
        if item.get_closest_marker("pure_python") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def guest_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guestprobe.c built static, for guests to run from a share."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the guest probe")
    out = tmp_path_factory.mktemp("probe") / "guestprobe"
    source = Path(__file__).with_name("guestprobe.c")
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(source)], check=True)
    return out


def in_thread(fn: Callable[[], Any]) -> Any:
    """``fn``'s value, computed on a thread of its own (whose ids and fs struct it may change,
    as the file system's workers do per request)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive()
    if "error" in result:
        raise result["error"]
    return result["value"]
