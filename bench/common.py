"""Pieces the host-side benchmarks share (run them as scripts: bench/ is then on sys.path)."""

from __future__ import annotations

import os
import time
from pathlib import Path

BLOCK = 1 << 20


def drop_caches() -> None:
    """Write back and drop the host's page cache, so that the next read goes to the daemon."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seq_write(root: Path, size_mib: int) -> float:
    """Write ``size_mib`` MiB to root/seq in 1 MiB writes, fsync; MB/s."""
    data = os.urandom(BLOCK)
    t = time.perf_counter()
    fd = os.open(root / "seq", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in range(size_mib):
        os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    return size_mib * BLOCK / 1e6 / (time.perf_counter() - t)
