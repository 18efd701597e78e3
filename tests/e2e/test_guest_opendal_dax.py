"""DAX on the object-storage backend: QEMU 11.1's generic vhost-user device gets the window, the
guest reads objects and writes them through shared mappings; the mappings are of the backend's
local copies, and what the guest wrote reaches the store when it syncs."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opendal")

from pyvirtiofsd.vm import FsDevice, missing_assets, run_guest
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket

pytestmark = pytest.mark.vm


def test_dax_on_the_fs_service(tmp_path: Path, guest_probe: Path) -> None:
    missing = missing_assets(qemu="sid")
    if missing:
        pytest.skip("; ".join(missing))
    store = tmp_path / "store"
    store.mkdir()
    data = os.urandom(5 << 20) + b"tail of a file whose size is not a page multiple"
    (store / "obj").write_bytes(data)
    shutil.copy(guest_probe, store / "probe")
    sock = str(tmp_path / "fs.sock")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as f:
        proc = spawn_child(
            [sys.executable, "-m", "pyvirtiofsd", "--socket-path", sock, "--tag", "share",
             "--opendal", "fs", "--opendal-opt", f"root={store}",
             "--opendal-cache-dir", str(tmp_path / "cache"), "--dax-window", "256M"],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_socket(sock, proc)
        dev = FsDevice(sock, "share", generic=True)
        script = (
            f"{dev.mount_command('/mnt', 'dax=always')}\n"
            "sha256sum /mnt/obj\n"
            # objects get mode 0644 here: run the probe from a copy
            "cp /mnt/probe /tmp/probe && chmod +x /tmp/probe\n"
            "/tmp/probe write /mnt/obj 4096 written-through-dax\n"
            "/tmp/probe write /mnt/obj $(( $(stat -c %s /mnt/obj) - 4 )) TAIL\n"
            "/tmp/probe attr /mnt/obj\n"
        )
        result = run_guest(script, [dev], qemu="sid", timeout=300)
        assert result.status == 0, result.output
        assert proc.wait(30) == 0
    finally:
        kill_child(proc)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    lines = result.output.split()
    assert lines[0] == hashlib.sha256(data).hexdigest()
    assert lines[2] == "dax"
    stored = (store / "obj").read_bytes()
    assert stored[4096:4115] == b"written-through-dax"
    assert stored[-4:] == b"TAIL"  # the shadowed last page, copied back at fsync
    assert len(stored) == len(data)
    served = re.findall(r"requests served: (.*)", text)[-1]
    assert "SETUPMAPPING=" in served and "READ=" not in served.split("READDIRPLUS")[0]
