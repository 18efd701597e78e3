"""Fixtures for the object-storage backend's tests, wherever they are (its module tests, the
end-to-end and the attack suites): a real S3-compatible server (``moto_server``) on loopback,
the daemon serving a service through /dev/fuse, and an independent view of what the store holds
(boto3 for s3, the directory itself for fs).

Tests take ``service`` (parametrized over memory, fs and s3) and ``mount_store`` to start daemons.
The root conftest registers this module as a plugin, so its fixtures reach every folder; it
imports nothing of OpenDAL itself, and each module that needs OpenDAL skips without it
(``pytest.importorskip("opendal")``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mounted, can_mount_fuse, is_mounted

DAEMON = [sys.executable, "-m", "pyvirtiofsd"]
#: Fake credentials: moto accepts any, and OpenDAL must not go looking for real ones.
S3_KEY = "testing"
S3_SECRET = "testing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    endpoint: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
        )


def _moto_command() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    pytest.skip("moto_server is not installed (pip install 'moto[server]')")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A standalone S3 server process on a loopback port, for the whole session."""
    pytest.importorskip("boto3")
    cmd = _moto_command()
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = MotoServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_options(endpoint: str, bucket: str) -> dict[str, str]:
    return {
        "bucket": bucket,
        "endpoint": endpoint,
        "region": "us-east-1",
        "access_key_id": S3_KEY,
        "secret_access_key": S3_SECRET,
        "disable_config_load": "true",
        "disable_ec2_metadata": "true",
        "enable_virtual_host_style": "false",
    }


class StoreView:
    """What the store holds, seen without the daemon."""

    #: The view sees the store itself (False for memory: only the daemon holds that data).
    independent = True

    def names(self) -> set[str]:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def metadata(self, key: str) -> dict[str, str]:
        raise NotImplementedError

    def files(self) -> set[str]:
        """Keys of objects (not directory markers)."""
        return {k for k in self.names() if not k.endswith("/")}


class S3View(StoreView):
    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def names(self) -> set[str]:
        out: set[str] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            out.update(o["Key"] for o in page.get("Contents", []))
        return out

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def metadata(self, key: str) -> dict[str, str]:
        return dict(self.client.head_object(Bucket=self.bucket, Key=key)["Metadata"])


class DirView(StoreView):
    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> set[str]:
        out: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            prefix = "" if rel == "." else rel + "/"
            out.update(prefix + d + "/" for d in dirnames)
            out.update(prefix + f for f in filenames)
        return out

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def metadata(self, key: str) -> dict[str, str]:
        # OpenDAL's fs service keeps user metadata in extended attributes.
        path = self.root / key
        out = {}
        for name in os.listxattr(path):
            out[name] = os.getxattr(path, name).decode(errors="replace")
        return out


class NoView(StoreView):
    independent = False


@dataclass
class Service:
    """One OpenDAL service to test against: its daemon options and a view of its store."""

    scheme: str
    options: dict[str, str]
    view: StoreView
    extra: dict[str, Any] = field(default_factory=dict)

    def args(self) -> list[str]:
        out = ["--opendal", self.scheme]
        for k, v in self.options.items():
            out += ["--opendal-opt", f"{k}={v}"]
        return out


def make_service(scheme: str, work: Path, moto: Callable[[], MotoServer]) -> Service:
    if scheme == "memory":
        return Service("memory", {}, NoView())
    if scheme == "fs":
        root = work / "fsroot"
        root.mkdir()
        return Service("fs", {"root": str(root)}, DirView(root))
    server = moto()
    client = server.client()
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=bucket)
    return Service(
        "s3",
        s3_options(server.endpoint, bucket),
        S3View(client, bucket),
        {"client": client, "bucket": bucket, "endpoint": server.endpoint},
    )


@pytest.fixture
def work() -> Iterator[Path]:
    """A scratch directory every user can traverse."""
    path = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-odal-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for mnt in path.glob("mnt*"):
            if is_mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["memory", "fs", "s3"])
def service(request: pytest.FixtureRequest, work: Path) -> Service:
    return make_service(request.param, work, lambda: request.getfixturevalue("moto_server"))


@pytest.fixture
def s3_service(request: pytest.FixtureRequest, work: Path) -> Service:
    return make_service("s3", work, lambda: request.getfixturevalue("moto_server"))


@dataclass
class StoreMount(Mounted):
    service: Service
    cache_dir: Path

    def kill(self) -> None:
        """SIGKILL: no cleanup, no last upload."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        if is_mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)


MountStore = Callable[..., contextlib.AbstractContextManager[StoreMount]]


@pytest.fixture
def mount_store(work: Path) -> MountStore:
    """``with mount_store(service, *extra_args) as m:`` runs the daemon on a fresh mount point
    and checks, at the end, that it exited 0 (unless killed) without a traceback."""
    reason = can_mount_fuse()
    if reason:
        pytest.skip(reason)
    counter = iter(range(1000))

    @contextlib.contextmanager
    def run(service: Service, *args: str) -> Iterator[StoreMount]:
        n = next(counter)
        mnt = work / f"mnt{n}"
        mnt.mkdir()
        cache_dir = work / "cache"
        log = work / f"daemon{n}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [
                    *DAEMON,
                    *service.args(),
                    "--mount",
                    str(mnt),
                    "--opendal-cache-dir",
                    str(cache_dir),
                    "--log-level",
                    "debug",
                    *args,
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        m = StoreMount(mnt, proc, log, service, cache_dir)
        killed = False
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not mount:\n{m.log_text()}")
                time.sleep(0.05)
            yield m
            killed = proc.poll() is not None and proc.returncode == -signal.SIGKILL
        finally:
            rc = m.stop()
            text = m.log_text()
            if not killed:
                assert rc == 0, f"daemon exited with {rc}:\n{text[-3000:]}"
            assert "Traceback" not in text, text[-5000:]

    return run
