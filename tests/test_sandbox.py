"""--sandbox: the daemon serves from a private root that holds the share and little else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .frontend_daemon import finish, start


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_sandboxed_daemon_sees_only_the_share(tmp_path: Path, mode: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root")
    s = start(tmp_path, "--sandbox", mode)
    try:
        (s.src / "f").write_text("inside")
        ino = s.lookup("f")
        assert s.fuse.read(ino, s.fuse.open(ino).fh, 0, 10) == b"inside"
        root = Path(f"/proc/{s.proc.pid}/root")
        assert os.readlink(f"/proc/{s.proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert sorted(os.listdir(root / "share")) == ["f"]
        assert not (root / "etc/passwd").exists()
        assert not (root / "home").exists()
        assert not (root / "usr/bin").exists()
        assert not (root / str(tmp_path).lstrip("/")).exists()
    finally:
        text = finish(s)
    assert "sandboxed" in text
    assert not (tmp_path / "fs.sock").exists()  # removed on the way out, from inside
