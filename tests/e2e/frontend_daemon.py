"""The daemon as a real process, driven by the project's Python front-end (our own VMM):
FUSE requests go through a real virtqueue in a memfd "guest RAM", and a DAX window is really
mapped. No guest kernel; used where tests need to send exactly the requests they choose."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.testing.dax_window import FrontendDaxWindow
from pyvirtiofsd.testing.frontend import Frontend
from pyvirtiofsd.testing.fuse_client import FuseClient
from pyvirtiofsd.vhost_user.messages import ProtocolFeature

#: Window size for the front-end when the daemon offers none (never mapped into then).
WINDOW = 64 << 20


@dataclass
class Setup:
    """A daemon, its front-end, the front-end's DAX window and a FUSE client."""

    src: Path
    proc: subprocess.Popen[bytes]
    frontend: Frontend
    window: FrontendDaxWindow
    fuse: FuseClient
    init: object
    log: Path

    def lookup(self, name: str) -> int:
        return int(self.fuse.lookup(ROOT, name.encode()).nodeid)


def start(tmp_path: Path, *args: str) -> Setup:
    src = tmp_path / "share"
    src.mkdir()
    sock = tmp_path / "fs.sock"
    log = tmp_path / "daemon.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyvirtiofsd",
                "--socket-path",
                str(sock),
                "--shared-dir",
                str(src),
                "--log-level",
                "debug",
                *args,
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    frontend = Frontend.connect(str(sock))
    queues = frontend.setup(queues=(0, 1), arena_size=8 << 20, ram_size=64 << 20)
    has_window = frontend.has_protocol(ProtocolFeature.SHMEM)
    window = FrontendDaxWindow(frontend.get_shmem_config()[0] if has_window else WINDOW)
    frontend.open_backend_channel(window.hook)
    q = queues[1]

    def transact(request: bytes, reply_size: int) -> bytes:
        return q.request([request], [reply_size] if reply_size else [], timeout=20)

    fuse = FuseClient(transact)
    init = fuse.init(abi.InitFlag.MAP_ALIGNMENT | abi.InitFlag.HAS_INODE_DAX)
    return Setup(src, proc, frontend, window, fuse, init, log)


def finish(s: Setup) -> str:
    s.frontend.close()
    try:
        assert s.proc.wait(20) == 0
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        s.window.close()
    text = s.log.read_text()
    assert "Traceback" not in text, text
    return text
