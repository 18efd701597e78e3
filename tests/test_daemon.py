"""The daemon's configuration and the pieces it builds (:mod:`pyvirtiofsd.daemon`), without serving:
what :class:`DaemonConfig` refuses, the file system :func:`build_filesystem` makes of a backend's
config, the request counters it logs, and the open-file limit it raises. (The daemon serving is
tested as a process: tests/test_cli.py and tests/e2e/.)"""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtiofsd.backends.opendal.config import OpendalConfig
from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.daemon import DaemonConfig, ProcessConfig, build_filesystem, log_counters
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, direct
from pyvirtiofsd.transport.fusedev import FuseMountConfig
from pyvirtiofsd.transport.virtiofs import VhostUserConfig


@pytest.mark.parametrize("sandbox", ["namespace", "chroot"])
def test_a_sandbox_confines_only_a_passthrough_share_over_vhost_user(
    tmp_path: Path, sandbox: str
) -> None:
    vhost_user = VhostUserConfig(socket_path=str(tmp_path / "s"))
    share = PassthroughConfig(str(tmp_path))
    process = ProcessConfig(sandbox=sandbox)
    DaemonConfig(vhost_user, share, process=process)  # the one combination it takes
    refused = [
        (FuseMountConfig(str(tmp_path)), share),
        (vhost_user, OpendalConfig("memory")),
        (vhost_user, None),  # a file system the caller brings
    ]
    for transport, backend in refused:
        with pytest.raises(ValueError, match="sandbox"):
            DaemonConfig(transport, backend, process=process)
    # Without a sandbox, every pairing is fine.
    for transport, backend in refused:
        DaemonConfig(transport, backend)


def test_build_filesystem_serves_the_passthrough_share(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"served")
    fs = build_filesystem(PassthroughConfig(str(tmp_path), readonly=True))
    assert isinstance(fs, PassthroughFs)
    try:
        c = FuseClient(direct(Server(fs)))
        c.init()
        ino = c.lookup(ROOT, b"f").nodeid
        assert c.read(ino, c.open(ino).fh, 0, 10) == b"served"
        with pytest.raises(OSError) as e:
            c.create(ROOT, b"new")
        assert e.value.errno == errno.EROFS
    finally:
        fs.shutdown()


def test_build_filesystem_of_a_missing_share_is_an_oserror(tmp_path: Path) -> None:
    """The daemon turns this into "cannot serve DIR" and exit status 1, not a traceback."""
    with pytest.raises(OSError):
        build_filesystem(PassthroughConfig(str(tmp_path / "missing")))


def test_build_filesystem_serves_an_object_store(tmp_path: Path) -> None:
    pytest.importorskip("opendal")
    from pyvirtiofsd.backends.opendal import OpendalFs

    fs = build_filesystem(OpendalConfig("memory", cache_dir=str(tmp_path)))
    assert isinstance(fs, OpendalFs)
    try:
        c = FuseClient(direct(Server(fs)))
        c.init()
        entry, opened = c.create(ROOT, b"obj")
        c.write(entry.nodeid, opened.fh, 0, b"stored")
        c.release(entry.nodeid, opened.fh)
        assert c.read(entry.nodeid, c.open(entry.nodeid).fh, 0, 10) == b"stored"
    finally:
        fs.shutdown()


def test_counters_count_requests_by_opcode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "f").touch()
    fs = PassthroughFs(PassthroughConfig(str(tmp_path)))
    server = Server(fs)
    try:
        c = FuseClient(direct(server))
        c.init()
        c.lookup(ROOT, b"f")
        c.getattr(ROOT)
        c.getattr(ROOT)
        with caplog.at_level(logging.INFO, logger="pyvirtiofsd"):
            log_counters(server)
    finally:
        fs.shutdown()
    assert "requests served: GETATTR=2 INIT=1 LOOKUP=1" in caplog.text


def test_open_file_limit() -> None:
    """In a child process: the limit is this process's own. As virtiofsd: a limit given is set
    as given, lower than the current one too (libvirt's ``<openfiles max='N'/>`` becomes
    ``--rlimit-nofile=N``); none given raises it to min(1M, fs.nr_open) but never lowers it."""
    script = """
import resource
from pyvirtiofsd.daemon import raise_fd_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
raise_fd_limit(0)  # leave it alone
left = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
raise_fd_limit(512)
raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
raise_fd_limit(300)  # set as given, even lower
lowered = resource.getrlimit(resource.RLIMIT_NOFILE)
print(left, raised, *lowered)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["256", "512", "300", "300"]


EARLY_SIGNALS = """
import os, signal, sys
from pyvirtiofsd import daemon
from pyvirtiofsd.cli import parse_args

build = daemon.build_filesystem


def signalled_while_building(config):
    # The socket listens already; there is no transport yet to stop.
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    return build(config)


daemon.build_filesystem = signalled_while_building
sys.exit(daemon.run(parse_args(["--socket-path", sys.argv[1], "--shared-dir", sys.argv[2]])))
"""


def test_signals_before_there_is_a_transport(tmp_path: Path) -> None:
    """A stop signal between listening and serving still stops the daemon cleanly (status 0,
    socket file removed) rather than killing it by default action, and SIGUSR1 then is
    harmless: a daemon that listens handles its signals."""
    sock = tmp_path / "vhost.sock"
    result = subprocess.run(
        [sys.executable, "-c", EARLY_SIGNALS, str(sock), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert "signal 15: stopping" in result.stderr
    assert "Traceback" not in result.stderr
    assert not sock.exists(), "the socket outlived the daemon"
