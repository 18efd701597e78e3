"""Host /dev/fuse benchmark: pyvirtiofsd's mount beside the plain source directory and libfuse's
passthrough_ll example, in one run.

    sudo .venv/bin/python bench/fusedev.py [--size-mib 512] [--files 2000]

Needs root, /dev/fuse, gcc and Debian's libfuse3-dev (whose examples include passthrough_ll.c);
the example is compiled once into the cache directory. Figures are MB/s and operations/s; each
is the best of ``--repeat`` runs. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from common import BLOCK, cpu_seconds, drop_caches, seq_write

CACHE = Path(os.environ.get("PYVIRTIOFSD_CACHE", "/var/cache/pyvirtiofsd"))
EXAMPLE = Path("/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c")


def seq_read(root: Path, size_mib: int) -> float:
    drop_caches()
    buf = bytearray(BLOCK)
    t = time.perf_counter()
    fd = os.open(root / "seq", os.O_RDONLY)
    while os.readv(fd, [buf]):
        pass
    os.close(fd)
    return size_mib * BLOCK / 1e6 / (time.perf_counter() - t)


def rand_read_4k(root: Path, size_mib: int) -> float:
    """4 KiB reads at random offsets of the (now cached) file, in IOPS."""
    import random

    rng = random.Random(1)
    blocks = size_mib * 256
    count = 20000
    fd = os.open(root / "seq", os.O_RDONLY)
    offsets = [rng.randrange(blocks) * 4096 for _ in range(count)]
    t = time.perf_counter()
    for off in offsets:
        os.pread(fd, 4096, off)
    os.close(fd)
    return count / (time.perf_counter() - t)


def metadata(root: Path, files: int) -> float:
    d = root / "meta"
    d.mkdir(exist_ok=True)
    names = [d / f"f{i}" for i in range(files)]
    t = time.perf_counter()
    for p in names:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    for p in names:
        os.stat(p)
    for p in names:
        os.unlink(p)
    return 3 * files / (time.perf_counter() - t)


def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args} did not mount")
        time.sleep(0.05)


@contextmanager
def mounted(cmd: list[str], mnt: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_mounted(mnt, proc)
        yield proc
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def passthrough_ll() -> Path:
    binary = CACHE / "bench" / "passthrough_ll"
    if not binary.exists():
        if not EXAMPLE.exists():
            raise SystemExit("passthrough_ll.c not found: apt-get install libfuse3-dev")
        binary.parent.mkdir(parents=True, exist_ok=True)
        flags = subprocess.run(
            ["pkg-config", "fuse3", "--cflags", "--libs"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(EXAMPLE), *flags], check=True)
    return binary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (mounts FUSE, drops caches)")

    workloads: list[tuple[str, Callable[[Path], float], str]] = [
        ("seq write 1M", lambda r: seq_write(r, args.size_mib), "MB/s"),
        ("seq read 1M (cold)", lambda r: seq_read(r, args.size_mib), "MB/s"),
        ("rand read 4K (cached)", lambda r: rand_read_4k(r, args.size_mib), "IOPS"),
        ("create+stat+unlink", lambda r: metadata(r, args.files), "ops/s"),
    ]
    base = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-bench-"))
    results: dict[str, dict[str, float]] = {}
    cpu: dict[str, float] = {}
    try:
        targets: list[tuple[str, list[str] | None]] = [
            ("source dir", None),
            ("pyvirtiofsd", [sys.executable, "-m", "pyvirtiofsd", "--log-level", "error"]),
            (
                "pyvirtiofsd --fuse-passthrough",
                [sys.executable, "-m", "pyvirtiofsd", "--log-level", "error", "--fuse-passthrough"],
            ),
            ("passthrough_ll (libfuse)", [str(passthrough_ll())]),
        ]
        for name, cmd in targets:
            src = base / "src"
            mnt = base / "mnt"
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir()
            mnt.mkdir(exist_ok=True)
            if cmd is None:
                results[name] = {
                    w: max(fn(src) for _ in range(args.repeat)) for w, fn, _ in workloads
                }
                continue
            if "passthrough_ll" in cmd[0]:
                full = [*cmd, "-f", "-o", f"source={src}", str(mnt)]
            else:
                full = [*cmd, "--shared-dir", str(src), "--mount", str(mnt)]
            with mounted(full, mnt) as proc:
                before = cpu_seconds(proc.pid)
                results[name] = {
                    w: max(fn(mnt) for _ in range(args.repeat)) for w, fn, _ in workloads
                }
                cpu[name] = cpu_seconds(proc.pid) - before
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print_table(workloads, results, cpu)


def print_table(
    workloads: list[tuple[str, Callable[[Path], float], str]],
    results: dict[str, dict[str, float]],
    cpu: dict[str, float],
) -> None:
    names = list(results)
    widths = [max(len(n), 8) + 2 for n in names]
    print(f"{'workload':<26}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True)))
    for label, _, unit in workloads:
        cells = "".join(f"{results[n][label]:>{w}.0f}" for n, w in zip(names, widths, strict=True))
        print(f"{label + ' (' + unit + ')':<26}{cells}")
    cells = "".join(
        f"{cpu[n]:>{w}.1f}" if n in cpu else f"{'-':>{w}}"
        for n, w in zip(names, widths, strict=True)
    )
    print(f"{'daemon CPU seconds':<26}{cells}")


if __name__ == "__main__":
    main()
