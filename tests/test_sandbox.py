"""The sandbox's mounts (:mod:`pyvirtiofsd.sandbox`), without a daemon (the end-to-end tests in
tests/e2e/test_sandbox.py run sandboxed daemons)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_the_remount_of_old_kernels_adds_flags_and_keeps_the_others(tmp_path: Path) -> None:
    """Without mount_setattr (Linux < 5.12) the sandbox remounts: nodev and nosuid are added,
    and what the mount had (here noexec) stays."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    script = f"""
import os
from pyvirtiofsd import linux, sandbox
linux.unshare(linux.CLONE_NEWNS)
sandbox._mount(None, "/", None, sandbox._MS_REC | sandbox._MS_PRIVATE)
src, dst = "{tmp_path}/src", "{tmp_path}/dst"
os.mkdir(src)
os.mkdir(dst)
sandbox._mount("tmpfs", src, "tmpfs", sandbox._MS_NOEXEC)
sandbox._mount(src, dst, None, sandbox._MS_BIND)
sandbox._remount(dst, True)
print(os.statvfs(dst).f_flag, os.statvfs(src).f_flag)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    dst, src = int(out[0]), int(out[1])
    for flag in (os.ST_NODEV, os.ST_NOSUID, os.ST_NOEXEC, os.ST_RDONLY):
        assert dst & flag, flag
    assert src & os.ST_NOEXEC and not src & (os.ST_NODEV | os.ST_RDONLY)
