"""DAX benchmark: fio in a real guest (QEMU 11.1, TCG) reading through pyvirtiofsd's DAX window,
through pyvirtiofsd without DAX, and through the Rust virtiofsd 1.14 (which has no DAX), in one
run, side by side.

    .venv/bin/python bench/dax.py [--runtime 20] [--size-mib 256] [--window 512M]

Needs the VM assets (`.ci/install-vm-assets`): fio runs in the sid rootfs. The file is made on
the host and read once on the host first, so it is in the host's page cache ("a cached file").
Jobs: 4 KiB random reads with psync (O_DIRECT, so that without DAX each read is a FUSE READ;
with DAX it is a load from the window) and with fio's mmap engine, and 1 MiB sequential reads.
The DAX run uses QEMU's generic vhost-user device, the only one that gives a back-end a shared
memory region, with the tag in our config space; the others use vhost-user-fs-pci. Nothing
here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pyvirtiofsd.vm import FsDevice, GuestError, assets, missing_assets, run_guest
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket

MiB = 1 << 20
TAG = "share"
MOUNT = "/mnt/share"

#: (name, label, unit, fio arguments)
JOBS = [
    ("rand4k", "rand read 4K psync (IOPS)", "iops",
     "--rw=randread --bs=4k --ioengine=psync --direct=1"),
    ("rand4k-mmap", "rand read 4K mmap (IOPS)", "iops", "--rw=randread --bs=4k --ioengine=mmap"),
    ("seq1m", "seq read 1M (MB/s)", "bw", "--rw=read --bs=1M --ioengine=psync --direct=1"),
]  # fmt: skip

CONFIGS = [
    ("dax", "pyvirtiofsd DAX"),
    ("nodax", "pyvirtiofsd, no DAX"),
    ("rust", "virtiofsd 1.14 (Rust)"),
]


def guest_script(args: argparse.Namespace, device: FsDevice, mount_options: str) -> str:
    lines = ["set -e", device.mount_command(MOUNT, mount_options)]
    for name, _, _, fio in JOBS:
        lines.append(
            f"fio --name={name} --filename={MOUNT}/fio.dat --size={args.size_mib}M "
            f"--time_based --runtime={args.runtime} --eta=never --output-format=json "
            f"--output=/tmp/{name}.json {fio} >/dev/null"
        )
        lines.append(f"echo RESULT {name} $(tr -d '\\n' < /tmp/{name}.json)")
    return "\n".join(lines) + "\n"


def daemon_argv(kind: str, sock: str, share: Path, window: str) -> list[str]:
    if kind == "rust":
        return [
            *assets.rust_virtiofsd_command().argv,
            "--socket-path", sock, "--shared-dir", str(share), "--sandbox", "none",
        ]  # fmt: skip
    argv = [sys.executable, "-m", "pyvirtiofsd", "--socket-path", sock, "--shared-dir", str(share)]
    if kind == "dax":
        argv += ["--dax-window", window, "--tag", TAG]
    return argv


def run_one(kind: str, base: Path, args: argparse.Namespace) -> dict[str, float]:
    share = base / kind
    share.mkdir()
    data = share / "fio.dat"
    block = os.urandom(MiB)
    with data.open("wb") as f:
        for _ in range(args.size_mib):
            f.write(block)
    data.read_bytes()  # into the host's page cache
    sock = str(base / f"{kind}.sock")
    log = base / f"{kind}.log"
    env = assets.rust_virtiofsd_command().environ() if kind == "rust" else None
    with log.open("wb") as out:
        proc = spawn_child(
            daemon_argv(kind, sock, share, args.window), env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        wait_for_socket(sock, proc)
        device = FsDevice(sock, TAG, generic=kind == "dax")
        result = run_guest(
            guest_script(args, device, "dax=always" if kind == "dax" else ""),
            [device],
            qemu="sid",
            rootfs="sid",
            timeout=args.timeout,
        )
        if result.status != 0:
            raise GuestError(f"{kind}: guest script failed:\n{result.output[-3000:]}")
        figures = {}
        for line in result.output.splitlines():
            if line.startswith("RESULT "):
                _, name, raw = line.split(" ", 2)
                read = json.loads(raw)["jobs"][0]["read"]
                unit = next(u for n, _, u, _ in JOBS if n == name)
                figures[name] = read["iops"] if unit == "iops" else read["bw_bytes"] / 1e6
        return figures
    finally:
        kill_child(proc, grace=10.0)
        if args.keep_logs:
            print(f"--- {kind} log ---\n{log.read_text(errors='replace')[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runtime", type=int, default=20, help="seconds per fio job (default 20)")
    ap.add_argument("--size-mib", type=int, default=256, help="file size (default 256)")
    ap.add_argument("--window", default="512M", help="DAX window size (default 512M)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    missing = missing_assets(qemu="sid", rootfs="sid")
    if missing:
        raise SystemExit("\n".join(missing))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-dax-bench-") as tmp:
        for kind, label in CONFIGS:
            print(f"running fio against {label} ...", flush=True)
            results[kind] = run_one(kind, Path(tmp), args)
    width = 28
    print()
    print(f"{'workload':<{width}}" + "".join(f"{label:>24}" for _, label in CONFIGS))
    for name, label, _, _ in JOBS:
        print(f"{label:<{width}}" + "".join(f"{results[k][name]:>24.0f}" for k, _ in CONFIGS))
    dax, rust = results["dax"]["rand4k"], results["rust"]["rand4k"]
    print(f"\nDAX vs virtiofsd, 4K random psync reads: {dax / rust:.1f}x")
    print(
        f"fio: {args.size_mib} MiB file cached on the host, {args.runtime} s per job; guest: "
        "QEMU 11.1 TCG, 2 vCPUs, 2 GiB; daemons with default options (cache=auto)."
    )


if __name__ == "__main__":
    main()
