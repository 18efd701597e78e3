"""Object-storage benchmark: the opendal backend on s3 (a local moto_server) and on fs, beside the
passthrough backend, all mounted through /dev/fuse, in one run.

    sudo .venv/bin/python bench/opendal.py [--size-mib 256] [--files 1000] [--services s3,fs]

Per target: sequential write (1 MiB writes, then fsync: for opendal that is the upload), a
sequential read from the store (a new daemon, so nothing is cached locally; the kernel's page
cache is dropped too), the same read again (served from the daemon's local cache), then small
files: create+write 4 KiB+close, and open+read+close after the kernel's caches are dropped.
Figures are MB/s and files/s, the best of ``--repeat`` runs, with the daemon's CPU seconds.
moto_server is an in-memory S3 written in Python: s3 figures measure the daemon and that
server on one machine, not a real S3. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
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
from contextlib import contextmanager
from pathlib import Path

from common import BLOCK, cpu_seconds, drop_caches, seq_write

SMALL = 4096


def seq_read(root: Path) -> float:
    drop_caches()
    buf = bytearray(BLOCK)
    total = 0
    t = time.perf_counter()
    fd = os.open(root / "seq", os.O_RDONLY)
    while n := os.readv(fd, [buf]):
        total += n
    os.close(fd)
    return total / 1e6 / (time.perf_counter() - t)


def small_create(root: Path, files: int) -> float:
    d = root / "small"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    data = os.urandom(SMALL)
    t = time.perf_counter()
    for i in range(files):
        fd = os.open(d / f"f{i}", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
    return files / (time.perf_counter() - t)


def small_read(root: Path, files: int) -> float:
    drop_caches()
    d = root / "small"
    t = time.perf_counter()
    for i in range(files):
        fd = os.open(d / f"f{i}", os.O_RDONLY)
        os.read(fd, SMALL)
        os.close(fd)
    return files / (time.perf_counter() - t)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    exe = Path(sys.executable).with_name("moto_server")
    port = free_port()
    proc = subprocess.Popen(
        [str(exe) if exe.exists() else "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("moto_server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def s3_args(endpoint: str) -> list[str]:
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ).create_bucket(Bucket=bucket)
    opts = {
        "bucket": bucket,
        "endpoint": endpoint,
        "region": "us-east-1",
        "access_key_id": "bench",
        "secret_access_key": "bench",
        "disable_config_load": "true",
        "disable_ec2_metadata": "true",
        "enable_virtual_host_style": "false",
    }
    out = ["--opendal", "s3"]
    for k, v in opts.items():
        out += ["--opendal-opt", f"{k}={v}"]
    return out


@contextmanager
def mounted(args: list[str], mnt: Path, cpu: list[float]) -> Iterator[None]:
    cmd = [sys.executable, "-m", "pyvirtiofsd", "--log-level", "error", "--mount", str(mnt)]
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{' '.join(args)}: did not mount")
            time.sleep(0.05)
        yield
        cpu.append(cpu_seconds(proc.pid))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


Workload = tuple[str, str]
WORKLOADS: list[Workload] = [
    ("seq write 1M + fsync", "MB/s"),
    ("seq read (from store)", "MB/s"),
    ("seq read (local cache)", "MB/s"),
    ("create 4K files", "files/s"),
    ("read 4K files (cold)", "files/s"),
]


def run_target(
    args: list[str], mnt: Path, size_mib: int, files: int, repeat: int
) -> tuple[dict[str, float], float]:
    res: dict[str, float] = {}
    cpu: list[float] = []

    def best(label: str, fn: Callable[[], float]) -> None:
        res[label] = max(res.get(label, 0.0), max(fn() for _ in range(repeat)))

    with mounted(args, mnt, cpu):
        best("seq write 1M + fsync", lambda: seq_write(mnt, size_mib))
    for _ in range(repeat):
        # A new daemon each time: its local cache starts empty, so the first read is the store's.
        with mounted(args, mnt, cpu):
            best("seq read (from store)", lambda: seq_read(mnt))
            best("seq read (local cache)", lambda: seq_read(mnt))
    with mounted(args, mnt, cpu):
        best("create 4K files", lambda: small_create(mnt, files))
        best("read 4K files (cold)", lambda: small_read(mnt, files))
    return res, sum(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--services", default="s3,fs", help="opendal services to run: s3, fs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (mounts FUSE, drops caches)")
    services = [s for s in args.services.split(",") if s]
    base = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-bench-odal-"))
    results: dict[str, dict[str, float]] = {}
    cpu: dict[str, float] = {}
    try:
        with moto_server() if "s3" in services else _nothing() as endpoint:
            targets: list[tuple[str, list[str]]] = [
                ("passthrough", ["--shared-dir", str(base / "src")])
            ]
            for svc in services:
                if svc == "s3":
                    targets.append(("opendal s3 (moto)", s3_args(endpoint or "")))
                elif svc == "fs":
                    root = f"root={base / 'root'}"
                    targets.append(("opendal fs", ["--opendal", "fs", "--opendal-opt", root]))
                else:
                    # memory would lose its data with each daemon the reads start.
                    raise SystemExit(f"unknown service {svc!r}")
            for name, extra in targets:
                for d in ("src", "root", "cache"):
                    shutil.rmtree(base / d, ignore_errors=True)
                    (base / d).mkdir()
                mnt = base / "mnt"
                mnt.mkdir(exist_ok=True)
                if "--opendal" in extra:
                    extra = [*extra, "--opendal-cache-dir", str(base / "cache")]
                t0 = time.monotonic()
                results[name], cpu[name] = run_target(
                    extra, mnt, args.size_mib, args.files, args.repeat
                )
                print(f"# {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_table(results, cpu, args)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def print_table(
    results: dict[str, dict[str, float]], cpu: dict[str, float], args: argparse.Namespace
) -> None:
    names = list(results)
    widths = [max(len(n), 8) + 2 for n in names]
    print(f"# {args.size_mib} MiB sequential, {args.files} small files, best of {args.repeat}")
    print(f"{'workload':<34}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True)))
    for label, unit in WORKLOADS:
        cells = "".join(
            f"{results[n].get(label, 0.0):>{w}.1f}" for n, w in zip(names, widths, strict=True)
        )
        print(f"{label + ' (' + unit + ')':<34}{cells}")
    cells = "".join(f"{cpu[n]:>{w}.1f}" for n, w in zip(names, widths, strict=True))
    print(f"{'daemon CPU seconds (all runs)':<34}{cells}")


if __name__ == "__main__":
    main()
