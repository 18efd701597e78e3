"""Live-migration benchmark: a guest holding many inodes and open files moved between two QEMU
11.1 processes (TCG) on this machine, with pyvirtiofsd and with the Rust virtiofsd 1.14 behind
them, side by side.

    .venv/bin/python bench/migration.py [--files 10000] [--open 100] [--rounds 3]
        [--daemon pyvirtiofsd pyvirtiofsd-fh virtiofsd virtiofsd-fh]

The guest looks up every file of a tree (``find``, which keeps them looked up in its dentry
cache) and holds ``--open`` of them open (one ``sleep`` each, reading it), then says so; the host
migrates it (QMP ``migrate``, polling ``query-migrate``) and reports what QEMU measured, the
downtime (the source's view: the last RAM pass and the devices' state) and the total time, and,
from the two QEMUs' QMP events, how long the guest did not run (STOP on the source to RESUME on
the destination, which also counts the destination's loading of the devices' state). Both
daemons serve the same directory; each daemon is run in its default ``--migration-mode``
(find-paths) and, as ``-fh``, with ``--migration-mode file-handles``. Rounds are interleaved
(every daemon once per round), and the table gives medians.

The size of the device state is read from the migration stream itself, the same way for every
daemon: after the timed rounds, one more round per daemon sends the stream through a relay here
(:class:`StreamTap`), which finds the vhost-user-fs device's ``vhost-user-fs-backend``
subsection and adds up the length-prefixed chunks the back-end's state travels in. (The relay is
kept out of the timed rounds: its extra hop would add to the downtime.) For pyvirtiofsd the
daemons' logs also give the inodes saved and how long the file system took to save and load
them. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

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


class StreamTap:
    """A relay between the source QEMU and the destination's incoming socket that keeps the
    part of the stream from the last ``vhost-user-fs-backend`` subsection on (QEMU writes it
    as the subsection's header, then the back-end's state as big-endian u32-length chunks
    ending with a zero length)."""

    _NAME = b"vhost-user-fs-backend"
    _MARK = bytes([0x05, len(_NAME)]) + _NAME  # QEMU_VM_SUBSECTION, the name's length, name
    _KEEP = 256 << 20

    def __init__(self, listen_path: str, target_path: str) -> None:
        self.path = listen_path
        self._target = target_path
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._server.bind(listen_path)
        self._server.listen(1)
        self._kept: bytearray | None = None
        self._tail = b""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            src, _ = self._server.accept()
        except OSError:
            return  # closed before the source came
        dst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            dst.connect(self._target)
            back = threading.Thread(target=self._pump, args=(dst, src, False), daemon=True)
            back.start()
            self._pump(src, dst, True)
            back.join(60)
        finally:
            src.close()
            dst.close()

    def _pump(self, a: socket.socket, b: socket.socket, scan: bool) -> None:
        try:
            while chunk := a.recv(1 << 20):
                b.sendall(chunk)
                if scan:
                    self._scan(chunk)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _scan(self, chunk: bytes) -> None:
        data = self._tail + chunk
        at = data.rfind(self._MARK)
        if at >= 0:
            self._kept = bytearray(data[at:])
        elif self._kept is not None and len(self._kept) < self._KEEP:
            self._kept += chunk
        self._tail = data[-(len(self._MARK) - 1) :]

    def state_bytes(self) -> int | None:
        """The size of the back-end's state in the stream; None if it wasn't there whole."""
        self._thread.join(60)
        kept = self._kept
        if kept is None:
            return None
        pos = len(self._MARK) + 4  # the subsection's version
        total = 0
        while pos + 4 <= len(kept):
            n = int.from_bytes(kept[pos : pos + 4], "big")
            pos += 4
            if n == 0:
                return total
            total += n
            pos += n
        return None

    def close(self) -> None:
        self._server.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _event_time(pair: MigrationPair, vm: Any, name: str) -> float:
    for event in pair.qmp(vm).events:
        if event.get("event") == name:
            stamp = event["timestamp"]
            return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
    raise RuntimeError(f"no {name} event from the {vm.name}")


def guest_pause(pair: MigrationPair) -> float:
    """How long the guest did not run, in ms: from the source's STOP event to the
    destination's RESUME (both QEMUs stamp events with this host's clock). QEMU's own
    "downtime" is the source's view, which ends before the destination has loaded the devices'
    state."""
    pair.wait_running(pair.dst)
    return (_event_time(pair, pair.dst, "RESUME") - _event_time(pair, pair.src, "STOP")) * 1000


def make_tree(share: Path, files: int) -> None:
    for i in range(files):
        d = share / "tree" / f"d{i // FILES_PER_DIR}"
        if i % FILES_PER_DIR == 0:
            d.mkdir(parents=True)
        (d / f"f{i % FILES_PER_DIR}").write_bytes(b"x")


KINDS = ("pyvirtiofsd", "pyvirtiofsd-fh", "virtiofsd", "virtiofsd-fh")


def daemon_argv(kind: str, sock: str, share: Path) -> list[str]:
    mode = ["--migration-mode", "file-handles"] if kind.endswith("-fh") else []
    if kind.startswith("virtiofsd"):
        return [
            *assets.rust_virtiofsd_command().argv,
            "--socket-path", sock, "--shared-dir", str(share), "--sandbox", "none", *mode,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "pyvirtiofsd", "--socket-path", sock, "--shared-dir", str(share),
        *mode,
    ]  # fmt: skip


def run_one(
    kind: str, base: Path, share: Path, args: argparse.Namespace, *, tap: bool = False
) -> dict[str, float]:
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
                    (
                        assets.rust_virtiofsd_command().environ()
                        if kind.startswith("virtiofsd")
                        else None
                    ),
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
            relay = StreamTap(str(work / "tap.sock"), pair.incoming) if tap else None
            try:
                info = pair.migrate(timeout=900, via=None if relay is None else relay.path)
                state = None if relay is None else relay.state_bytes()
            finally:
                if relay is not None:
                    relay.close()
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {info}")
            pause = guest_pause(pair)
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
            "pause": pause,
            "total": float(info["total-time"]),
        }
        looked = re.search(r"LOOKED_UP (\d+)", output)
        result["looked_up"] = float(looked.group(1)) if looked else 0.0
        if state is not None:
            result["stream_state"] = float(state)
        if kind.startswith("pyvirtiofsd"):
            src_log, dst_log = (p.read_text(errors="replace") for p in logs)
            saved, loaded, logged = (
                _SAVED.search(src_log),
                _LOADED.search(dst_log),
                _STATE.search(src_log),
            )
            if saved and loaded and logged:
                result["inodes"] = float(saved.group(1))
                result["save_ms"] = float(saved.group(2))
                result["load_ms"] = float(loaded.group(2))
                result["state_bytes"] = float(logged.group(1))
        return result
    finally:
        for proc in daemons:
            kill_child(proc, grace=5.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10000)
    p.add_argument("--open", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--daemon", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument(
        "--no-state-size", action="store_true", help="skip the rounds that measure the state"
    )
    args = p.parse_args()
    missing = missing_assets()
    if missing:
        print("; ".join(missing), file=sys.stderr)
        return 1
    kinds = list(args.daemon)
    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-bench-mig-") as tmp:
        base = Path(tmp)
        share = base / "share"
        share.mkdir()
        make_tree(share, args.files)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        sizes: dict[str, dict[str, float]] = {}
        for r in range(args.rounds):
            for kind in kinds:
                print(f"round {r + 1}: {kind} ...", file=sys.stderr, flush=True)
                results[kind].append(run_one(kind, base, share, args))
        if not args.no_state_size:
            for kind in kinds:
                print(f"state size: {kind} ...", file=sys.stderr, flush=True)
                sizes[kind] = run_one(kind, base, share, args, tap=True)
    print(f"\n{args.files} files looked up, {args.open} open; medians of {args.rounds} rounds")
    fields = [
        ("looked_up", "entries found"),
        ("downtime", "downtime ms"),
        ("pause", "guest pause ms"),
        ("total", "total ms"),
        ("inodes", "inodes saved"),
        ("save_ms", "fs save ms"),
        ("load_ms", "fs load ms"),
    ]
    print(f"{'':16}" + "".join(f"{label:>15}" for _, label in fields) + f"{'state bytes':>15}")
    for kind, runs in results.items():
        row = f"{kind:16}"
        for key, _ in fields:
            values = [run[key] for run in runs if key in run]
            row += f"{statistics.median(values):>15.1f}" if values else f"{'-':>15}"
        stream = sizes.get(kind, {}).get("stream_state")
        row += f"{stream:>15.0f}" if stream is not None else f"{'-':>15}"
        print(row)
    for kind, runs in results.items():
        print(f"{kind:16}downtimes ms: {[run['downtime'] for run in runs]}")
        print(f"{'':16}guest pauses ms: {[round(run['pause'], 1) for run in runs]}")
        logged = [run["state_bytes"] for run in runs if "state_bytes" in run]
        if logged:
            print(f"{'':16}state bytes by its log: {logged}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
