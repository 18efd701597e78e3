"""Guest benchmark: one fio workload in a real guest (QEMU 11.1, TCG) against pyvirtiofsd and the
Rust virtiofsd 1.14, in one run, side by side, with each daemon's own CPU time per request.

    .venv/bin/python bench/guest.py [--runtime 20] [--size-mib 256] [--files 5000] [--rounds 1]

Needs the VM assets (`.ci/install-vm-assets`): the guest runs in the sid rootfs, where fio and
python3 live. For each daemon a fresh directory is shared with default options (cache=auto) and
one guest runs, in order: fio sequential 1 MiB write and read, 4 KiB random read at queue depth
1 (psync) and 16 (libaio), all with O_DIRECT so that every I/O reaches the daemon, then
create, stat and unlink of ``--files`` files from Python.

Around each workload the guest prints a marker and waits for the host's acknowledgement (a
file on the share). At each marker the host reads the daemon's utime+stime from /proc and, for
pyvirtiofsd, sends SIGUSR1 and waits for the request counters it logs. A workload's CPU per
request is the daemon's CPU time during the workload divided by the requests it served then:
pyvirtiofsd's own count, and for virtiofsd (which prints no counts) the operations the guest
issued. Under TCG the guest itself is the bottleneck (see docs/benchmarks.md): throughput
figures compare the daemons only roughly; CPU per request is the daemon's own cost.
Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import cpu_seconds

from pyvirtiofsd.vm import FsDevice, GuestError, assets, missing_assets, run_guest
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket

MiB = 1 << 20
TAG = "share"
MOUNT = "/mnt/share"
MARKER = "@@BENCH"
_MARKER_RE = re.compile(rf"^{MARKER} (\d+) (begin|end) (\S+)\n", re.MULTILINE)
_SERVED_RE = re.compile(r"requests served: ?(.*)$", re.MULTILINE)

#: (name, label, unit, fio arguments); the guest adds filename, size, runtime and output.
FIO_JOBS = [
    ("seqwrite", "seq write 1M", "MB/s", "--rw=write --bs=1M --ioengine=psync --iodepth=1"),
    ("seqread", "seq read 1M", "MB/s", "--rw=read --bs=1M --ioengine=psync --iodepth=1"),
    ("randread1", "rand read 4K QD1", "IOPS", "--rw=randread --bs=4k --ioengine=psync --iodepth=1"),
    (
        "randread16",
        "rand read 4K QD16",
        "IOPS",
        "--rw=randread --bs=4k --ioengine=libaio --iodepth=16",
    ),
]
META = ("meta", "create/stat/unlink", "ops/s")

# Runs in the guest (python3 of the sid rootfs). Markers are followed by a line of padding: the
# harness passes script output on once 128 more characters have arrived.
GUEST_DRIVER = r"""
import json, os, subprocess, sys, time

mount, size_mib, runtime, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
jobs = json.loads(sys.argv[5])
seq = 0

def marker(event, name):
    global seq
    seq += 1
    print(f"\n__MARKER__ {seq} {event} {name}\n" + " " * 200, flush=True)
    ack = f"{mount}/.bench-ack-{seq}"
    deadline = time.monotonic() + 120
    while not os.path.exists(ack):
        if time.monotonic() > deadline:
            sys.exit(f"no acknowledgement for marker {seq}")
        time.sleep(0.01)

for name, args in jobs:
    out = f"/tmp/{name}.json"
    cmd = ["fio", f"--name={name}", f"--filename={mount}/fio.dat", f"--size={size_mib}M",
           "--direct=1", "--eta=never", "--time_based", f"--runtime={runtime}",
           "--output-format=json", f"--output={out}", *args.split()]
    marker("begin", name)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    marker("end", name)
    job = json.load(open(out))["jobs"][0]
    side = job["write"] if "write" in args else job["read"]
    print("RESULT " + json.dumps({"name": name, "bw": side["bw_bytes"], "iops": side["iops"],
                                  "ops": side["total_ios"]}), flush=True)

d = f"{mount}/meta"
os.mkdir(d)
paths = [f"{d}/f{i}" for i in range(files)]
marker("begin", "meta")
t = time.perf_counter()
for p in paths:
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
for p in paths:
    os.stat(p)
for p in paths:
    os.unlink(p)
elapsed = time.perf_counter() - t
marker("end", "meta")
print("RESULT " + json.dumps({"name": "meta", "rate": 3 * files / elapsed, "ops": 3 * files}),
      flush=True)
print("DONE", flush=True)
"""


@dataclass
class Phase:
    cpu: float = 0.0  # daemon CPU seconds during the workload
    requests: int | None = None  # requests the daemon says it served (pyvirtiofsd only)
    guest_ops: int = 0
    value: float = 0.0  # MB/s, IOPS or ops/s


@dataclass
class DaemonRun:
    name: str
    phases: dict[str, Phase] = field(default_factory=dict)
    boot_seconds: float = 0.0
    script_seconds: float = 0.0


def served_totals(log: Path) -> list[int]:
    """Total requests of each "requests served" line pyvirtiofsd logged so far."""
    text = log.read_text(errors="replace")
    return [
        sum(int(item.split("=")[1]) for item in line.split()) for line in _SERVED_RE.findall(text)
    ]


class Sampler:
    """Sees the guest's markers go by, samples the daemon, and lets the guest go on."""

    def __init__(self, proc: subprocess.Popen[bytes], share: Path, log: Path | None) -> None:
        self.proc = proc
        self.share = share
        self.log = log  # pyvirtiofsd's log, where SIGUSR1 puts its counters
        self.text = ""
        self.handled = 0
        self.samples: dict[tuple[str, str], tuple[float, int | None]] = {}

    def __call__(self, chunk: str) -> None:
        self.text += chunk
        for m in _MARKER_RE.finditer(self.text):
            seq, event, name = int(m.group(1)), m.group(2), m.group(3)
            if seq <= self.handled:
                continue
            self.handled = seq
            self.samples[(event, name)] = self.sample()
            (self.share / f".bench-ack-{seq}").touch()
        # Keep only an unfinished last line; markers are whole lines.
        self.text = self.text[self.text.rfind("\n") + 1 :]

    def sample(self) -> tuple[float, int | None]:
        if self.log is None:
            return cpu_seconds(self.proc.pid), None
        before = len(served_totals(self.log))
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while True:
            totals = served_totals(self.log)
            if len(totals) > before:
                return cpu_seconds(self.proc.pid), totals[-1]
            if time.monotonic() > deadline:
                raise RuntimeError("pyvirtiofsd did not log its counters after SIGUSR1")
            time.sleep(0.005)


def daemon_argv(kind: str, sock: str, share: Path) -> list[str]:
    if kind == "pyvirtiofsd":
        return [
            sys.executable, "-m", "pyvirtiofsd",
            "--socket-path", sock, "--shared-dir", str(share),
        ]  # fmt: skip
    return [
        *assets.rust_virtiofsd_command().argv,
        "--socket-path", sock, "--shared-dir", str(share), "--sandbox", "none",
    ]  # fmt: skip


def guest_script(args: argparse.Namespace) -> str:
    device = FsDevice("", TAG)
    jobs = json.dumps([(name, fio) for name, _, _, fio in FIO_JOBS])
    driver = GUEST_DRIVER.replace("__MARKER__", MARKER)
    argv = shlex.join(
        ["python3", "/tmp/bench.py", MOUNT, str(args.size_mib), str(args.runtime),
         str(args.files), jobs]
    )  # fmt: skip
    return (
        f"set -e\n{device.mount_command(MOUNT)}\n"
        f"cat > /tmp/bench.py <<'EOF'\n{driver}\nEOF\n{argv}\n"
    )


def prepare_file(path: Path, size_mib: int) -> None:
    """The file fio works on, made on the host so that no workload has to lay it out."""
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for _ in range(size_mib):
            f.write(block)


def run_one(kind: str, label: str, base: Path, args: argparse.Namespace) -> DaemonRun:
    base.mkdir()
    share = base / "share"
    share.mkdir()
    prepare_file(share / "fio.dat", args.size_mib)
    sock = str(base / "daemon.sock")
    log = base / "daemon.log"
    command = daemon_argv(kind, sock, share)
    env = None if kind == "pyvirtiofsd" else assets.rust_virtiofsd_command().environ()
    with log.open("wb") as out:
        proc = spawn_child(command, env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    run = DaemonRun(label)
    try:
        wait_for_socket(sock, proc)
        sampler = Sampler(proc, share, log if kind == "pyvirtiofsd" else None)
        result = run_guest(
            guest_script(args),
            [FsDevice(sock, TAG)],
            qemu="sid",
            rootfs="sid",
            timeout=args.timeout,
            on_output=sampler,
        )
        if result.status != 0 or "DONE" not in result.output:
            raise GuestError(f"{label}: guest script failed:\n{result.output[-3000:]}")
        run.boot_seconds, run.script_seconds = result.boot_seconds, result.script_seconds
        for line in result.output.splitlines():
            if not line.startswith("RESULT "):
                continue
            r = json.loads(line[len("RESULT ") :])
            begin_cpu, begin_req = sampler.samples[("begin", r["name"])]
            end_cpu, end_req = sampler.samples[("end", r["name"])]
            unit = next((u for n, _, u, _ in FIO_JOBS if n == r["name"]), META[2])
            value = r["bw"] / 1e6 if unit == "MB/s" else r.get("iops", r.get("rate", 0.0))
            requests = None if begin_req is None or end_req is None else end_req - begin_req
            run.phases[r["name"]] = Phase(end_cpu - begin_cpu, requests, r["ops"], value)
    finally:
        kill_child(proc, grace=10.0)
        if args.keep_logs:
            print(f"--- {label} log ---\n{log.read_text(errors='replace')[-4000:]}")
    return run


def best_of(runs: list[DaemonRun]) -> DaemonRun:
    """Each workload from the round where it went fastest (the least disturbed one)."""
    best = DaemonRun(runs[0].name)
    for name in runs[0].phases:
        best.phases[name] = max((r.phases[name] for r in runs), key=lambda p: p.value)
    best.boot_seconds = min(r.boot_seconds for r in runs)
    best.script_seconds = min(r.script_seconds for r in runs)
    return best


def print_table(runs: list[DaemonRun], args: argparse.Namespace) -> None:
    rows = [(name, label, unit) for name, label, unit, _ in FIO_JOBS] + [
        (META[0], f"{META[1]} {args.files}", META[2])
    ]
    width = 32
    col = 52
    print()
    print(f"{'':<{width}}" + "".join(f"{r.name:>{col}}" for r in runs))
    heading = f"{'result':>10}{'guest ops':>10}{'requests':>10}{'CPU us/op':>11}{'CPU us/req':>11}"
    print(f"{'workload':<{width}}" + heading * len(runs))
    for name, label, unit in rows:
        cells = []
        for r in runs:
            p = r.phases[name]
            req = p.requests if p.requests is not None else p.guest_ops
            shown = f"{req}" if p.requests is not None else f"{req}*"
            per_op = 1e6 * p.cpu / p.guest_ops if p.guest_ops else float("nan")
            per_req = 1e6 * p.cpu / req if req else float("nan")
            cells.append(
                f"{p.value:>10.1f}{p.guest_ops:>10}{shown:>10}{per_op:>11.1f}{per_req:>11.1f}"
            )
        print(f"{label + ' (' + unit + ')':<{width}}" + "".join(cells))
    print()
    print(f"{'all workloads':<{width}}" + "".join(f"{r.name:>{col}}" for r in runs))
    totals = []
    for r in runs:
        cpu = sum(p.cpu for p in r.phases.values())
        req = sum(p.requests if p.requests is not None else p.guest_ops for p in r.phases.values())
        ops = sum(p.guest_ops for p in r.phases.values())
        totals.append((cpu, req, ops))

    def row(label: str, cells: list[str]) -> None:
        print(f"{label:<{width}}" + "".join(f"{c:>{col}}" for c in cells))

    row("daemon CPU seconds", [f"{c:.2f}" for c, _, _ in totals])
    row("guest ops", [str(o) for _, _, o in totals])
    row("requests", [str(q) for _, q, _ in totals])
    row("CPU seconds per request", [f"{c / q:.2e}" if q else "-" for c, q, _ in totals])
    row("CPU us per request", [f"{1e6 * c / q:.1f}" if q else "-" for c, q, _ in totals])
    row("CPU us per guest op", [f"{1e6 * c / o:.1f}" if o else "-" for c, _, o in totals])
    row(
        "guest boot / script seconds",
        [f"{r.boot_seconds:.1f} / {r.script_seconds:.0f}" for r in runs],
    )
    print()
    print(
        "* virtiofsd prints no request counts: its requests are the guest's operations. "
        "Compare the daemons by CPU us/op; us/req is pyvirtiofsd's exact cost per request."
    )
    print(
        f"fio: O_DIRECT, {args.size_mib} MiB file, {args.runtime} s per job; "
        f"best of {args.rounds} round(s); "
        "guest: QEMU 11.1 TCG, 2 vCPUs, 2 GiB; daemons with default options (cache=auto)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runtime", type=int, default=20, help="seconds per fio job (default 20)")
    ap.add_argument("--size-mib", type=int, default=256, help="fio file size (default 256)")
    ap.add_argument("--files", type=int, default=5000, help="files to create/stat/unlink")
    ap.add_argument(
        "--daemon",
        action="append",
        choices=("pyvirtiofsd", "rust"),
        help="only this daemon (repeatable; default: both)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the daemons in turn this many times; each workload's best round is shown",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="per guest, seconds")
    ap.add_argument("--keep-logs", action="store_true", help="print the daemons' log tails")
    args = ap.parse_args()
    missing = missing_assets(qemu="sid", rootfs="sid")
    if missing:
        raise SystemExit("\n".join(missing))

    labels = {"pyvirtiofsd": "pyvirtiofsd", "rust": "virtiofsd 1.14 (Rust)"}
    kinds = args.daemon or ["pyvirtiofsd", "rust"]
    load = os.getloadavg()
    rounds: dict[str, list[DaemonRun]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-bench-") as tmp:
        for n in range(args.rounds):
            # In turn rather than one daemon's rounds after the other's, so that a change in
            # the machine's load over time does not favour one of them.
            for kind in kinds:
                print(f"round {n + 1}: the workload against {labels[kind]} ...", flush=True)
                rounds[kind].append(run_one(kind, labels[kind], Path(tmp) / f"{kind}-{n}", args))
    print_table([best_of(r) for r in rounds.values()], args)
    print(f"host load average before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
