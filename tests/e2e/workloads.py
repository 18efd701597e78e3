"""Workloads the mount tests of both backends run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Each process writes and reads back files of its own, lists the shared root as it goes and
# renames every fifth file: concurrent creates, data, directory reads and renames.
_WORKER = textwrap.dedent(
    """
    import os, sys, hashlib
    root, n, files, scale = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    d = os.path.join(root, f"p{n}")
    os.mkdir(d)
    for i in range(files):
        data = hashlib.sha256(f"{n}-{i}".encode()).digest() * (i + 1) * scale
        with open(os.path.join(d, str(i)), "wb") as f:
            f.write(data)
        with open(os.path.join(d, str(i)), "rb") as f:
            assert f.read() == data
        os.listdir(root)
        if i % 5 == 0:
            os.rename(os.path.join(d, str(i)), os.path.join(d, f"r{i}"))
    """
)


def many_processes(root: Path, processes: int, files: int, scale: int) -> None:
    """Run ``processes`` workers at once under ``root``; each leaves ``files`` files in p<n>."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(n), str(files), str(scale)])
        for n in range(processes)
    ]
    assert [p.wait(300) for p in procs] == [0] * processes
