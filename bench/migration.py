"""Live-migration benchmark: a guest holding many inodes and open files moved between two QEMU
11.1 processes (TCG) on this machine, with pyvirtiofsd and with the Rust virtiofsd 1.14 behind
them, side by side.

    .venv/bin/python bench/migration.py [--files 10000] [--open 100] [--rounds 3]

The guest looks up every file of a tree (``find``, which keeps them looked up in its dentry
cache) and holds ``--open`` of them open (one ``sleep`` each, reading it), then says so; the host
migrates it (QMP ``migrate``, polling ``query-migrate``) and reports what QEMU measured: the
downtime (the guest stopped: the last RAM pass, the devices' state, the destination's start) and
the total time. For pyvirtiofsd it also reports, from the daemons' logs, the size of the device
state and how long the file system took to save it and to load it. Both daemons serve the same
directory. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pyvirtiofsd.vm import assets, missing_assets
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket
from pyvirtiofsd.vm.migration import MigrationPair

TAG = "share"
FILES_PER_DIR = 100

SCRIPT = r"""
mkdir -p /mnt/s && mount -t virtiofs share /mnt/s || exit 1
cd /mnt/s
echo "LOOKED_UP $(find tree | wc -l)"
n=0
for f in $(find tree -type f | head -n __OPEN__); do
    sleep 100000 < "$f" &
    n=$((n + 1))
done
echo "HOLDING $n"
echo "@@READY@@"
while [ ! -e done ]; do usleep 50000; done
kill $(jobs -p) 2>/dev/null
echo "LOOKED_UP_AFTER $(find tree | wc -l)"
"""

_SAVED = re.compile(r"migration: saved (\d+) inodes .* in ([\d.]+) ms")
_LOADED = re.compile(r"migration: loaded (\d+) inodes .* in ([\d.]+) ms")
_STATE = re.compile(r"device state save: (\d+) bytes")


def make_tree(share: Path, files: int) -> None:
    for i in range(files):
        d = share / "tree" / f"d{i // FILES_PER_DIR}"
        if i % FILES_PER_DIR == 0:
            d.mkdir(parents=True)
        (d / f"f{i % FILES_PER_DIR}").write_bytes(b"x")


def daemon_argv(kind: str, sock: str, share: Path) -> list[str]:
    if kind == "virtiofsd":
        return [
            *assets.rust_virtiofsd_command().argv,
            "--socket-path", sock, "--shared-dir", str(share), "--sandbox", "none",
        ]  # fmt: skip
    return [sys.executable, "-m", "pyvirtiofsd", "--socket-path", sock, "--shared-dir", str(share)]


def run_one(kind: str, base: Path, share: Path, args: argparse.Namespace) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(dir=base))
    daemons = []
    logs = []
    try:
        for side in ("src", "dst"):
            sock = str(work / f"{side}.sock")
            log = work / f"{side}.log"
            with log.open("wb") as out:
                proc = spawn_child(
                    daemon_argv(kind, sock, share),
                    (assets.rust_virtiofsd_command().environ() if kind == "virtiofsd" else None),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                )
            daemons.append(proc)
            logs.append(log)
            wait_for_socket(sock, proc)
        script = SCRIPT.replace("__OPEN__", str(args.open))
        with MigrationPair(
            work, script, str(work / "src.sock"), str(work / "dst.sock"), tag=TAG
        ) as pair:
            pair.src.wait_for("^@@READY@@$", timeout=900)
            info = pair.migrate(timeout=900)
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {info}")
            (share / "done").write_bytes(b"")
            status = pair.status(pair.dst, timeout=900)
            output = pair.src.console() + pair.dst.console()
            if status != 0:
                raise RuntimeError(f"guest script failed:\n{output[-2000:]}")
            (share / "done").unlink()
        for proc in daemons:
            proc.wait(60)
        result = {
            "downtime": float(info["downtime"]),
            "total": float(info["total-time"]),
        }
        looked = re.search(r"LOOKED_UP (\d+)", output)
        result["looked_up"] = float(looked.group(1)) if looked else 0.0
        if kind == "pyvirtiofsd":
            src_log, dst_log = (p.read_text(errors="replace") for p in logs)
            saved, loaded, state = (
                _SAVED.search(src_log),
                _LOADED.search(dst_log),
                _STATE.search(src_log),
            )
            if saved and loaded and state:
                result["inodes"] = float(saved.group(1))
                result["save_ms"] = float(saved.group(2))
                result["load_ms"] = float(loaded.group(2))
                result["state_bytes"] = float(state.group(1))
        return result
    finally:
        for proc in daemons:
            kill_child(proc, grace=5.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10000)
    p.add_argument("--open", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--daemon", choices=["pyvirtiofsd", "virtiofsd", "both"], default="both")
    args = p.parse_args()
    missing = missing_assets()
    if missing:
        print("; ".join(missing), file=sys.stderr)
        return 1
    kinds = ["pyvirtiofsd", "virtiofsd"] if args.daemon == "both" else [args.daemon]
    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-bench-mig-") as tmp:
        base = Path(tmp)
        share = base / "share"
        share.mkdir()
        make_tree(share, args.files)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            for kind in kinds:
                print(f"round {r + 1}: {kind} ...", file=sys.stderr, flush=True)
                results[kind].append(run_one(kind, base, share, args))
    print(f"\n{args.files} files looked up, {args.open} open; medians of {args.rounds} rounds")
    fields = [
        ("looked_up", "entries found"),
        ("downtime", "downtime ms"),
        ("total", "total ms"),
        ("inodes", "inodes saved"),
        ("state_bytes", "state bytes"),
        ("save_ms", "fs save ms"),
        ("load_ms", "fs load ms"),
    ]
    print(f"{'':16}" + "".join(f"{label:>16}" for _, label in fields))
    for kind, runs in results.items():
        row = f"{kind:16}"
        for key, _ in fields:
            values = [run[key] for run in runs if key in run]
            row += f"{statistics.median(values):>16.0f}" if values else f"{'-':>16}"
        print(row)
        print(f"{'':16}downtimes: {[run['downtime'] for run in runs]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
